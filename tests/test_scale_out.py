"""Scale-out: the shipped accelerate configs, `--accelerate_config` on the CLI, where frozen models go,
statistics across processes, and 2-process training (gloo on CPU) equal to 1-process training with the
same global batch, for SFT (through the CLI), DPO and PPO.

Each 2-process run is one `accelerate launch` (about 10 s of imports per process). Runs use SGD, so the
final weights are the initial ones minus the learning rate times the summed gradients: a loss normalised
per process instead of over all processes (a mean of per-process means) moves them by a large fraction of
the update, while the two runs agree to float rounding (~1e-7 here).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from launching import CPU_ENV, ONE_THREAD_ENV, SCRIPTS
from tether import cli, launch
from tether.distributed import (
    deepspeed_inference_config,
    prepare_frozen_model,
    prepare_reward_models,
    token_normalizer_across_processes,
    unwrap_model_for_generation,
)
from tether.models.forward import causal_token_log_probs, splittable_head
from tether.models.reference import copy_for_reference
from tether.ops.stats import masked_whiten

SFT_TEXTS = [" ".join(["the film was good"] * n) for n in (1, 7, 2, 9, 3, 5, 4, 8)]  # unequal token counts


def _load_script():
    spec = importlib.util.spec_from_file_location("scale_out_train", os.path.join(SCRIPTS, "scale_out_train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _launch(args: list[str], env: dict[str, str], config: str = "ddp") -> None:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               launch.shipped_accelerate_configs().get(config, config), "--num_processes", "2",
               "--main_process_port", "0", *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def _assert_same_training(one: str, two: str, initial: str, atol: float = 1e-5) -> None:
    """Both runs moved the weights the same way: L2 distance between them <= atol while the update
    (from the initial weights) is far larger."""
    a, b, start = load_file(one), load_file(two), load_file(initial)
    assert a.keys() == b.keys()
    distance = sum(float(((a[k] - b[k].float()) ** 2).sum()) for k in a) ** 0.5
    moved = [k for k in a if k.removeprefix("pretrained_model.") in start]
    update = sum(float(((a[k] - start[k.removeprefix("pretrained_model.")]) ** 2).sum()) for k in moved) ** 0.5
    assert len(moved) >= len(start) and update > 0.1, update
    assert distance <= atol, f"2-process weights differ from 1-process by {distance:.3g} (update {update:.3g})"


# ----- shipped configs and the CLI -----------------------------------------------------------------------
@pytest.mark.parametrize("name, kind, zero_stage, offload", [
    ("ddp", "multi_gpu", None, None), ("zero2", "deepspeed", "2", "none"), ("zero3", "deepspeed", "3", "none"),
    ("zero3_offload", "deepspeed", "3", "cpu"), ("fsdp", "fsdp", None, None)])
def test_shipped_config_is_accepted_by_accelerate_launch(name, kind, zero_stage, offload):
    """Each config goes through `accelerate launch --config_file`'s own validation and environment
    preparation (everything but starting processes), and the plugin accelerate then builds in each
    process has the intended settings."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    path = launch.shipped_accelerate_configs()[name]
    args = launch_command_parser().parse_args(["--config_file", path, "--num_processes", "2", "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    assert (args.multi_gpu, args.use_deepspeed, args.use_fsdp) == (kind == "multi_gpu", kind == "deepspeed",
                                                                   kind == "fsdp")
    assert args.num_processes == 2 and args.num_machines == 1 and args.mixed_precision == "no"
    if kind == "deepspeed":
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
        _, env = prepare_deepspeed_cmd_env(args)
        assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == zero_stage
        with mock.patch.dict(os.environ, env):
            plugin = DeepSpeedPlugin()
        zero = plugin.deepspeed_config["zero_optimization"]
        assert zero["stage"] == int(zero_stage)
        assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == offload
        assert plugin.zero3_init_flag == (zero_stage == "3")  # models load partitioned under ZeRO-3
        assert zero["stage3_gather_16bit_weights_on_model_save"] == (zero_stage == "3")  # a whole model is saved
        # Batch size, accumulation and clipping are left to the training flags.
        assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == "auto"
        assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"
    else:
        env = prepare_multi_gpu_env(args)
        if kind == "fsdp":
            with mock.patch.dict(os.environ, env):
                plugin = FullyShardedDataParallelPlugin()
            assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
            assert str(plugin.state_dict_type).endswith("FULL_STATE_DICT") and not plugin.cpu_ram_efficient_loading
        else:
            assert env.get("ACCELERATE_USE_FSDP", "false") == "false"


def test_accelerate_config_flag_builds_the_launch_command(tmp_path):
    argv = ["--model_name_or_path", "m", "--accelerate_config", "zero3", "--dataset_name", "d.jsonl",
            "--num_processes=4", "--learning_rate", "1e-4"]
    spec = launch.accelerate_launch("dpo", argv, gpu_count=8)
    config = launch.shipped_accelerate_configs()["zero3"]
    assert spec.command == [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
                            "--num_processes", "4", "--main_process_port", "0", "-m", "tether.cli", "dpo",
                            "--model_name_or_path", "m", "--dataset_name", "d.jsonl", "--learning_rate", "1e-4"]
    assert spec.env == {}  # GPUs: accelerate's defaults
    # No --num_processes: one per GPU.
    assert launch.accelerate_launch("sft", ["--accelerate_config", "ddp"], gpu_count=8).command[5:7] == [
        "--num_processes", "8"]
    # Without GPUs: gloo processes on the CPU (DDP through ACCELERATE_USE_CPU, DeepSpeed its CPU accelerator).
    assert launch.accelerate_launch("sft", ["--accelerate_config", "ddp", "--num_processes", "2"],
                                 gpu_count=0).env == {"ACCELERATE_USE_CPU": "true"}
    assert launch.accelerate_launch("sft", ["--accelerate_config", "zero2", "--num_processes", "2"],
                                 gpu_count=0).env == {"DS_ACCELERATOR": "cpu"}
    # A YAML file of the user's, with its own process count and port.
    own = tmp_path / "mine.yaml"
    own.write_text("distributed_type: MULTI_GPU\nnum_processes: 3\nmain_process_port: 29123\n")
    command = launch.accelerate_launch("sft", ["--accelerate_config", str(own)], gpu_count=8).command
    assert command[4] == str(own) and "--num_processes" not in command and "--main_process_port" not in command


@pytest.mark.parametrize("argv, gpus, message", [
    (["--accelerate_config", "zero4"], 8, "neither a shipped config (ddp, fsdp, zero2, zero3, zero3_offload)"),
    (["--accelerate_config", "ddp"], 0, "no GPU: say how many processes"),
    (["--accelerate_config", "fsdp", "--num_processes", "2"], 0, "FSDP on GPUs only"),
    (["--accelerate_config", "ddp", "--num_processes", "two"], 8, "positive integer"),
    (["--num_processes", "2"], 8, "applies with --accelerate_config NAME only"),
    (["--accelerate_config"], 8, "--accelerate_config needs a value"),
])
def test_accelerate_config_flag_errors(argv, gpus, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        launch.accelerate_launch("sft", argv, gpu_count=gpus)


def test_accelerate_config_must_be_an_accelerate_file(tmp_path, capsys):
    bad = tmp_path / "run.yaml"
    bad.write_text("learning_rate: 0.1\n")  # a tether --config file, not an accelerate one
    with pytest.raises(ValueError, match="not an accelerate config"):
        launch.accelerate_launch("sft", ["--accelerate_config", str(bad)], gpu_count=1)
    assert cli.main(["sft", "--accelerate_config", "nope"]) == 2  # main() reports it, no traceback
    assert "tether sft: error: --accelerate_config nope" in capsys.readouterr().err


def test_main_reexecutes_under_accelerate_launch():
    with mock.patch("subprocess.run", return_value=SimpleNamespace(returncode=0)) as run:
        assert cli.main(["kto", "--accelerate_config", "ddp", "--num_processes", "2", "--beta", "0.2"]) == 0
    command, env = run.call_args.args[0], run.call_args.kwargs["env"]
    assert command[-5:] == ["-m", "tether.cli", "kto", "--beta", "0.2"]
    assert env.get("ACCELERATE_USE_CPU") == (os.environ.get("ACCELERATE_USE_CPU") if torch.cuda.is_available() else "true")
    # The flags are documented in the subcommand's help and rejected in a --config YAML file.
    assert {"accelerate_config", "num_processes"} <= {a.dest for a in cli.build_parser("sft")._actions}


# ----- placement, reference copies, statistics (one process) ------------------------------------------------
def _fake_accelerator(config: dict, mixed_precision: str = "no") -> SimpleNamespace:
    plugin = SimpleNamespace(deepspeed_config=config)
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), mixed_precision=mixed_precision)


@pytest.mark.parametrize("stage, offload", [(2, "none"), (3, "none"), (3, "cpu")])
def test_deepspeed_config_of_frozen_models(stage, offload):
    """The reference/reward engine beside a training engine: ZeRO-3 partitioning and parameter offload
    kept, optimizer offload and the training schedule dropped, stages 1-2 reduced to 0, no "auto" left."""
    training = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": float("inf"),
                "bf16": {"enabled": "auto"}, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
                "zero_optimization": {"stage": stage, "offload_optimizer": {"device": offload},
                                      "offload_param": {"device": offload}, "stage3_prefetch_bucket_size": "auto",
                                      "stage3_gather_16bit_weights_on_model_save": True}}
    config = deepspeed_inference_config(_fake_accelerator(training, "bf16"), torch.nn.Linear(2, 2))
    assert config["train_micro_batch_size_per_gpu"] == 1 and config["gradient_accumulation_steps"] == 1
    assert config["bf16"] == {"enabled": True}
    assert "optimizer" not in config and "train_batch_size" not in config and "gradient_clipping" not in config
    if stage == 3:
        assert config["zero_optimization"] == {"stage": 3, "offload_param": {"device": offload},
                                               "stage3_gather_16bit_weights_on_model_save": True}
    else:
        assert config["zero_optimization"] == {"stage": 0}
    assert training["zero_optimization"]["stage"] == stage and "optimizer" in training  # the original untouched


def test_frozen_model_is_placed_not_wrapped(tiny_decoder):
    accelerator = Accelerator()
    reference = prepare_frozen_model(accelerator, tiny_decoder)
    assert reference is tiny_decoder and not reference.training  # no DDP wrapper, eval mode
    assert all(not p.requires_grad and p.device.type == accelerator.device.type for p in reference.parameters())
    with unwrap_model_for_generation(reference, accelerator) as unwrapped:  # no engine: nothing to gather
        assert unwrapped is tiny_decoder


def test_reward_models_are_placed_and_reward_functions_left_alone(tiny_decoder_dir):
    from transformers import AutoModelForSequenceClassification

    from tether.rollout.rewards import RewardFunctions

    def length(prompts: list[str], completions: list[str], **_: list) -> list[float]:
        return [float(len(c)) for c in completions]

    model = AutoModelForSequenceClassification.from_pretrained(tiny_decoder_dir, num_labels=1)
    rewards = RewardFunctions([length, model])
    prepare_reward_models(rewards, Accelerator())
    assert rewards.funcs[0] is length and rewards.funcs[1].model is model  # placed, not wrapped
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    total, each = rewards.score(["the film"], [" was good"])
    assert total.shape == (1,) and float(each["length"][0]) == len(" was good")


def test_reference_copy_of_a_partitioned_policy(tiny_decoder):
    copy = copy_for_reference(tiny_decoder, None, lambda source: pytest.fail("not loaded: a plain copy serves"))
    assert copy is not tiny_decoder and not any(p.requires_grad for p in copy.parameters())
    torch.testing.assert_close(copy.state_dict(), tiny_decoder.state_dict())
    # What ZeRO-3 leaves in a partitioned model: parameters with a ds_id and an empty local shard.
    next(tiny_decoder.parameters()).ds_id = 0
    with pytest.raises(ValueError, match="pass ref_model= explicitly"):
        copy_for_reference(tiny_decoder, None, lambda source: tiny_decoder)
    loaded = copy_for_reference(tiny_decoder, "some/model", lambda source: torch.nn.Linear(1, 1))
    assert isinstance(loaded, torch.nn.Linear) and not loaded.weight.requires_grad


def test_sharded_lm_head_takes_the_full_logits_path(tiny_decoder):
    """A partitioned head weight is only whole inside the head's own forward: then log-probs come from the
    full logits, with the same values as the fast path on the whole weight."""
    batch = {"input_ids": torch.randint(3, 300, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long),
             "loss_mask": torch.ones(2, 9, dtype=torch.bool)}
    head = tiny_decoder.get_output_embeddings()
    assert splittable_head(tiny_decoder) is head
    fast = causal_token_log_probs(tiny_decoder, batch).logps
    head.weight.ds_id = 7  # as ZeRO-3 marks it
    assert splittable_head(tiny_decoder) is None
    torch.testing.assert_close(causal_token_log_probs(tiny_decoder, batch).logps, fast, rtol=1e-5, atol=1e-5)


def test_whitening_and_token_normaliser_across_processes():
    """Two processes holding the same [b, t] rows: an all-reduce doubles each sum. Whitening must then
    equal whitening both copies together (n - 1 = 2n' - 1 in the variance, not n' - 1), and the
    normaliser be the global token count over the 2 processes."""
    torch.manual_seed(0)
    values = torch.randn(3, 5)
    mask = torch.rand(3, 5) > 0.3
    twin = SimpleNamespace(num_processes=2, device=torch.device("cpu"),
                           reduce=lambda tensor, reduction: tensor * 2 if reduction == "sum" else tensor)
    both = masked_whiten(torch.cat([values, values]), torch.cat([mask, mask]), shift_mean=False)
    torch.testing.assert_close(masked_whiten(values, mask, shift_mean=False, accelerator=twin), both[:3])
    assert not torch.allclose(masked_whiten(values, mask, shift_mean=False), both[:3])  # the local variance differs
    assert float(token_normalizer_across_processes(mask, twin)) == float(mask.sum())  # (2 * n) / 2
    alone = SimpleNamespace(num_processes=1)
    torch.testing.assert_close(masked_whiten(values, mask, accelerator=alone), masked_whiten(values, mask))


# ----- two processes equal one --------------------------------------------------------------------------------
def _sft_argv(model_dir: str, data: str, out: str, per_device: int) -> list[str]:
    return ["sft", "--model_name_or_path", model_dir, "--dataset_name", data, "--output_dir", out,
            "--per_device_train_batch_size", str(per_device), "--max_steps", "2", "--optim", "sgd",
            "--learning_rate", "0.5", "--lr_scheduler_type", "constant", "--max_length", "64", "--seed", "0",
            "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("sft-data") / "reviews.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in SFT_TEXTS))
    return str(path)


@pytest.fixture(scope="module")
def one_process(tiny_decoder_dir, sft_data, tmp_path_factory) -> str:
    """SFT (through the CLI), DPO and PPO in this process: global batches of 4 rows on one process."""
    out = tmp_path_factory.mktemp("one-process")
    assert cli.main(_sft_argv(tiny_decoder_dir, sft_data, str(out / "sft"), per_device=4)) == 0
    _load_script().main(tiny_decoder_dir, str(out), "dpo,ppo")
    return str(out)


def test_two_process_sft_through_the_cli_equals_one_process(tiny_decoder_dir, sft_data, one_process, tmp_path):
    """`tether sft --accelerate_config ddp --num_processes 2`: the CLI re-executes itself under accelerate
    launch; 2 x 2 rows per step train like 1 x 4 although the processes' token counts differ."""
    argv = _sft_argv(tiny_decoder_dir, sft_data, str(tmp_path / "sft"), per_device=2)
    argv += ["--accelerate_config", "ddp", "--num_processes", "2"]
    result = subprocess.run([sys.executable, "-m", "tether.cli", *argv], capture_output=True, text=True,
                            env=ONE_THREAD_ENV, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "accelerate.commands.launch --config_file" in result.stderr  # the command is shown
    _assert_same_training(os.path.join(one_process, "sft", "model.safetensors"),
                          str(tmp_path / "sft" / "model.safetensors"),
                          os.path.join(tiny_decoder_dir, "model.safetensors"))


@pytest.fixture(scope="module")
def two_processes(tiny_decoder_dir, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("two-processes")
    _launch([os.path.join(SCRIPTS, "scale_out_train.py"), tiny_decoder_dir, str(out), "dpo,ppo"], CPU_ENV)
    return str(out)


def test_two_process_dpo_equals_one_process(tiny_decoder_dir, one_process, two_processes):
    ranks = [json.loads(open(os.path.join(two_processes, f"rank{r}.json")).read()) for r in (0, 1)]
    assert [r["processes"] for r in ranks] == [2, 2]
    assert ranks[0]["dpo"]["reference"] == "LlamaForCausalLM"  # a plain frozen model, no DDP wrapper
    alone = json.loads(open(os.path.join(one_process, "rank0.json")).read())
    assert ranks[0]["dpo"]["losses"] == pytest.approx(alone["dpo"]["losses"], abs=1e-6)
    _assert_same_training(os.path.join(one_process, "dpo.safetensors"), os.path.join(two_processes, "dpo.safetensors"),
                          os.path.join(tiny_decoder_dir, "model.safetensors"))


def test_two_process_ppo_equals_one_process(tiny_decoder_dir, one_process, two_processes):
    """Advantages whitened over both processes' rows and losses divided by the global token count: the
    2 x 2 rows train like 1 x 4 (accumulated as 2 micro-batches), KL controller included."""
    alone = json.loads(open(os.path.join(one_process, "rank0.json")).read())
    ranks = [json.loads(open(os.path.join(two_processes, f"rank{r}.json")).read()) for r in (0, 1)]
    assert ranks[0]["ppo"]["kl_coef"] == ranks[1]["ppo"]["kl_coef"] == pytest.approx(alone["ppo"]["kl_coef"])
    _assert_same_training(os.path.join(one_process, "ppo.safetensors"), os.path.join(two_processes, "ppo.safetensors"),
                          os.path.join(tiny_decoder_dir, "model.safetensors"))


# ----- DeepSpeed on CPU (slow: DeepSpeed compiles its shared-memory op on first use) ---------------------------
ZERO3_TEST_CONFIG = {
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
    "gradient_clipping": "auto",
    # Partition every parameter: by default ZeRO-3 keeps parameters under 1e5 elements (all of this tiny
    # model's) whole on every process, and there would be nothing to gather.
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                          "stage3_gather_16bit_weights_on_model_save": True},
}


@pytest.mark.slow
def test_zero3_dpo_and_ppo_equal_one_process_and_generation_gathers_once(tiny_decoder_dir, one_process, tmp_path):
    """ZeRO-3 over 2 CPU processes: DPO and PPO train like one process; their references are partitioned
    DeepSpeed engines; PPO's rollout costs a fixed number of collectives whatever its length, where the
    bare partitioned model gathers its layers at every token, and both generate the same tokens."""
    (tmp_path / "ds.json").write_text(json.dumps(ZERO3_TEST_CONFIG))
    config = tmp_path / "zero3.yaml"
    config.write_text(f"distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: {tmp_path / 'ds.json'}\n"
                      "  zero3_init_flag: true\nnum_machines: 1\nmachine_rank: 0\nuse_cpu: false\n")
    out = tmp_path / "out"
    out.mkdir()
    env = {**ONE_THREAD_ENV, **launch.accelerate_launch("dpo", ["--accelerate_config", str(config), "--num_processes", "2"],
                                                  gpu_count=0).env}
    _launch([os.path.join(SCRIPTS, "scale_out_train.py"), tiny_decoder_dir, str(out), "dpo,ppo"], env, str(config))
    initial = os.path.join(tiny_decoder_dir, "model.safetensors")
    for method in ("dpo", "ppo"):
        _assert_same_training(os.path.join(one_process, f"{method}.safetensors"), str(out / f"{method}.safetensors"),
                              initial)
    result = json.loads((out / "rank0.json").read_text())
    assert result["dpo"]["reference"] == "DeepSpeedEngine" and result["dpo"]["reference_partitioned"]
    assert result["ppo"]["reference_partitioned"]
    short, long = result["ppo"]["generation"]["3"], result["ppo"]["generation"]["9"]
    assert short["same_tokens"] and long["same_tokens"] and short["partitioned_after"] and long["partitioned_after"]
    assert short["rollout"] == long["rollout"] > 0  # one gather of the model per rollout, whatever its length
    assert long["bare"] - short["bare"] >= 6 * 2  # the bare model: at least one gather per layer per token
    assert long["bare"] > 3 * long["rollout"]


@pytest.mark.slow
def test_zero2_sft_through_the_cli_equals_one_process(tiny_decoder_dir, sft_data, one_process, tmp_path):
    """`--accelerate_config zero2` on a machine without GPUs: DeepSpeed's CPU accelerator, gloo asked for by
    the trainer's config, and the same training as one process."""
    argv = _sft_argv(tiny_decoder_dir, sft_data, str(tmp_path / "sft"), per_device=2)
    spec = launch.accelerate_launch(argv[0], [*argv[1:], "--accelerate_config", "zero2", "--num_processes", "2"],
                                 gpu_count=0)
    result = subprocess.run(spec.command, capture_output=True, text=True, env={**ONE_THREAD_ENV, **spec.env}, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    _assert_same_training(os.path.join(one_process, "sft", "model.safetensors"),
                          str(tmp_path / "sft" / "model.safetensors"), os.path.join(tiny_decoder_dir, "model.safetensors"))


_EXIT_SCRIPT = """
import atexit, os, sys, tempfile, types
import torch.distributed as dist
from tether.distributed import destroy_process_group_at_exit
# atexit runs handlers last-registered first: this one runs after tether's and sees what it left.
atexit.register(lambda: print("group alive at exit:", dist.is_initialized(), flush=True))
store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
dist.init_process_group("gloo", store=store, rank=0, world_size=1)
several = types.SimpleNamespace(num_processes=2)  # what the trainers pass: their accelerator
destroy_process_group_at_exit(types.SimpleNamespace(num_processes=1))  # one process: nothing registered
destroy_process_group_at_exit(several)
destroy_process_group_at_exit(several)  # registered once
if sys.argv[1] == "raise":
    raise RuntimeError("the training script failed")
"""


@pytest.mark.parametrize("ending, alive", [("normal", False), ("raise", True)])
def test_process_group_destroyed_at_a_normal_exit_only(ending, alive):
    """Without it, a gloo group alive at interpreter shutdown can abort a process after training succeeded
    (SIGABRT, failing the whole launch); after an uncaught exception the group is left alone (tearing it
    down while other processes wait in a collective can hang them)."""
    result = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, ending], capture_output=True, text=True,
                            env=ONE_THREAD_ENV, timeout=120)
    assert f"group alive at exit: {alive}" in result.stdout, result.stdout + result.stderr
    assert result.stdout.count("group alive at exit") == 1
