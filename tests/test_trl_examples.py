"""TRL 0.7.11's example scripts and notebooks, run under tether with only their imports renamed.

Each test rewrites one example with tests/trl_examples/harness.py (trl -> tether in imports, hub ids ->
tiny local stand-ins, nothing else), runs it in a subprocess with its own flags set small, and checks that
it exits 0 and left behind what it should (a saved model, training stats, a CSV...). Scripts that cannot
run on this stack whatever tether does (transformers 5 removed a keyword they pass, they require CUDA...)
are asserted to stop exactly there, so everything before that line is still exercised.
scripts/ddpo.py (issue 17) is in test_trl_example_ddpo.py; research_projects/tools (issue 16) in test_trl_tool_examples.py.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from trl_examples.harness import HUB_IDS, examples_dir, prepare, rewrite_source, run_script

# The shared examples sit next to the repository, in CI too.
SHARED_EXAMPLES = Path(__file__).resolve().parents[2] / "shared" / "trl-0.7.11-examples"


def run_example(
    standins, hf_home, tmp_path, relative, replace=(), args=(), dump=(), skip_cells=None, replay=False
):
    source = prepare(standins, relative, tuple(replace), skip_cells, replay)
    name = Path(relative).stem.replace("-", "_") + ".py"
    return run_script(source, name, [str(a) for a in args], tmp_path / "run", hf_home, tuple(dump))


def assert_saved_model(folder: Path) -> None:
    assert (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file(), (
        f"no model saved in {folder}: {sorted(p.name for p in folder.iterdir()) if folder.exists() else 'missing'}"
    )
    assert any(folder.glob("*.safetensors")), f"no safetensors weights in {folder}"


def assert_ppo_stats(stats: dict) -> None:
    """The stats dict PPOTrainer.step returned: TRL's key names, finite values."""
    for key in ("ppo/loss/total", "ppo/loss/policy", "ppo/loss/value", "objective/kl", "ppo/policy/entropy"):
        assert key in stats, f"step() stats lack {key!r}: {sorted(stats)}"
        assert isinstance(stats[key], float), f"{key} is not a finite number: {stats[key]}"


# ---- the harness itself (fast) --------------------------------------------------------------------------
def test_examples_are_present():
    assert SHARED_EXAMPLES.is_dir(), (
        f"TRL 0.7.11's examples are missing at {SHARED_EXAMPLES}: the repository expects ../shared next to it"
    )
    assert examples_dir() == SHARED_EXAMPLES.resolve() or examples_dir() == SHARED_EXAMPLES


def test_rewrite_touches_only_imports_and_listed_ids():
    source = 'from trl import PPOConfig\nimport trl.core\nx = "gpt2"\ny = "gpt2-large"\nz = "trl"\n'
    text = rewrite_source(source, {"gpt2": "/tmp/gpt2"})
    assert (
        text
        == 'from tether import PPOConfig\nimport tether.core\nx = "/tmp/gpt2"\ny = "gpt2-large"\nz = "trl"\n'
    )


def test_rewrite_table_is_used_whole():
    """Every id in the table is replaced in at least one example (no dead rows)."""
    texts = [p.read_text() for p in examples_dir().rglob("*") if p.suffix in (".py", ".ipynb")]
    for hub_id in HUB_IDS:
        assert any(f'"{hub_id}"' in t or f'\\"{hub_id}\\"' in t for t in texts), hub_id


# ---- scripts ----------------------------------------------------------------------------------------------
def test_hello_world(standins, hf_home, tmp_path):
    run = run_example(
        standins, hf_home, tmp_path, "hello_world.py", ["gpt2"], dump=["train_stats", "response_txt"]
    )
    run.check()
    assert_ppo_stats(run.dumped["train_stats"])
    assert isinstance(run.dumped["response_txt"], str)


@pytest.mark.slow
@pytest.mark.parametrize("peft", [False, True], ids=["full", "peft"])
def test_scripts_sft(standins, hf_home, tmp_path, peft):
    args = [
        "--model_name_or_path",
        standins.path("gpt2"),
        "--dataset_name",
        standins.path("openassistant-guanaco"),
        "--output_dir",
        "out",
        "--max_steps",
        2,
        "--per_device_train_batch_size",
        2,
        "--per_device_eval_batch_size",
        2,
        "--max_seq_length",
        64,
        "--logging_steps",
        1,
        "--report_to",
        "none",
        "--save_strategy",
        "no",
    ]
    if peft:
        args += ["--use_peft", "--lora_r", 4, "--lora_alpha", 8]
    run = run_example(standins, hf_home, tmp_path, "scripts/sft.py", args=args)
    run.check()
    assert_saved_model(run.cwd / "out")
    assert (run.cwd / "out" / "adapter_config.json").is_file() == peft


@pytest.mark.slow
@pytest.mark.parametrize("peft", [False, True], ids=["full", "peft"])
def test_scripts_dpo(standins, hf_home, tmp_path, peft):
    args = [
        "--model_name_or_path",
        standins.path("gpt2"),
        "--per_device_train_batch_size",
        2,
        "--max_steps",
        2,
        "--learning_rate",
        1e-3,
        "--logging_steps",
        1,
        "--output_dir",
        "out",
        "--report_to",
        "none",
        "--no_remove_unused_columns",
        "--max_length",
        96,
        "--max_prompt_length",
        64,
        "--max_target_length",
        32,
        "--save_strategy",
        "no",
    ]
    if peft:
        args += ["--use_peft", "--lora_r", 4, "--lora_alpha", 8]
    run = run_example(standins, hf_home, tmp_path, "scripts/dpo.py", ["Anthropic/hh-rlhf"], args)
    run.check()
    assert_saved_model(run.cwd / "out")
    assert (run.cwd / "out" / "adapter_config.json").is_file() == peft


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["causal", "seq2seq", "peft"])
def test_scripts_ppo(standins, hf_home, tmp_path, variant):
    model = standins.path("t5") if variant == "seq2seq" else standins.path("gpt2")
    args = [
        "--model_name",
        model,
        "--query_dataset",
        standins.path("imdb-small"),
        "--reward_model",
        "sentiment-analysis:" + standins.path("distilbert-sentiment"),
        "--batch_size",
        4,
        "--mini_batch_size",
        2,
    ]
    args += {"causal": [], "seq2seq": ["--use_seq2seq"], "peft": ["--use_peft", "--lora_r", 4]}[variant]
    run = run_example(standins, hf_home, tmp_path, "scripts/ppo.py", args=args)
    if variant == "peft":
        # `device_map = {"": Accelerator().local_process_index}` is {"": 0}: a GPU is required.
        run.check_stops_at("model = trl_model_class.from_pretrained(", "Cannot access accelerator device")
    else:
        # Model, PPOTrainer, generate(generate_ref_response=True) all ran; then transformers 5's pipeline
        # ignores `return_all_scores=True` and returns only the top label, so `output[1]` fails.
        run.check_stops_at('rewards = [torch.tensor(output[1]["score"])', "KeyError: 1")


@pytest.mark.slow
def test_scripts_ppo_multi_adapter(standins, hf_home, tmp_path):
    args = [
        "--model_name",
        standins.path("llama"),
        "--dataset_name",
        standins.path("hh-rlhf"),
        "--rm_adapter",
        standins.path("llama-reward-adapter-2-labels"),
        "--use_safetensors",
        "True",
    ]
    run = run_example(standins, hf_home, tmp_path, "scripts/ppo_multi_adapter.py", args=args)
    # `{"": "npu:0"} if is_npu_available else ...` tests the function object, not its result: the script
    # asks for an NPU on every machine without an XPU (with TRL too), besides a 4-bit CUDA load.
    run.check_stops_at("model = AutoModelForCausalLMWithValueHead.from_pretrained(", "device string: npu")


@pytest.mark.slow
def test_scripts_reward_modeling(standins, hf_home, tmp_path):
    args = [
        "--model_name_or_path",
        standins.path("gpt2"),
        "--output_dir",
        "out",
        "--per_device_train_batch_size",
        2,
        "--max_steps",
        2,
        "--max_length",
        128,
        "--remove_unused_columns",
        "False",
        "--report_to",
        "none",
        "--logging_steps",
        1,
        "--save_strategy",
        "no",
    ]
    run = run_example(standins, hf_home, tmp_path, "scripts/reward_modeling.py", ["Anthropic/hh-rlhf"], args)
    run.check()
    assert_saved_model(run.cwd / "out")


# ---- research_projects/stack_llama -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["llama-causal-adapter", "llama-reward-adapter-1-label"])
def test_stack_llama_merge_peft_adapter(standins, hf_home, tmp_path, adapter):
    args = [
        "--adapter_model_name",
        standins.path(adapter),
        "--base_model_name",
        standins.path("llama"),
        "--output_name",
        "merged",
    ]
    run = run_example(
        standins, hf_home, tmp_path, "research_projects/stack_llama/scripts/merge_peft_adapter.py", args=args
    )
    # The merged model is saved; the script's last line uploads it to the hub, which fails offline.
    assert_saved_model(run.cwd / "merged")
    config = json.loads((run.cwd / "merged" / "config.json").read_text())
    want = "LlamaForSequenceClassification" if "reward" in adapter else "LlamaForCausalLM"
    assert config["architectures"] == [want]
    run.check_stops_at("model.push_to_hub(", "")


@pytest.mark.slow
def test_stack_llama_reward_modeling(standins, hf_home, tmp_path):
    args = [
        "--model_name",
        standins.path("gpt2"),
        "--train_subset",
        8,
        "--eval_subset",
        4,
        "--bf16",
        "False",
        "--per_device_train_batch_size",
        2,
        "--max_length",
        128,
    ]
    run = run_example(
        standins,
        hf_home,
        tmp_path,
        "research_projects/stack_llama/scripts/reward_modeling.py",
        ["lvwerra/stack-exchange-paired", "accuracy"],
        args,
    )
    # transformers 5 removed TrainingArguments(evaluation_strategy=...) (now eval_strategy).
    run.check_stops_at(
        "training_args = TrainingArguments(", "unexpected keyword argument 'evaluation_strategy'"
    )


@pytest.mark.slow
def test_stack_llama_rl_training(standins, hf_home, tmp_path):
    args = [
        "--model_name",
        standins.path("llama"),
        "--tokenizer_name",
        standins.path("llama"),
        "--reward_model_name",
        standins.path("distilbert-sentiment"),
        "--batch_size",
        2,
        "--mini_batch_size",
        1,
        "--gradient_accumulation_steps",
        1,
        "--ppo_epochs",
        1,
        "--steps",
        2,
        "--output_max_length",
        34,
        "--output_dir",
        "runs/",
    ]
    run = run_example(
        standins,
        hf_home,
        tmp_path,
        "research_projects/stack_llama/scripts/rl_training.py",
        ["lvwerra/stack-exchange-paired"],
        args,
    )
    # load_in_8bit=True with device_map={"": 0}: a GPU is required (and further down the reward pipeline
    # passes model_kwargs={"load_in_8bit": True}, which transformers 5 no longer accepts).
    run.check_stops_at(
        "model = AutoModelForCausalLMWithValueHead.from_pretrained(", "Cannot access accelerator"
    )


@pytest.mark.slow
def test_stack_llama_supervised_finetuning(standins, hf_home, tmp_path):
    args = [
        "--model_path",
        standins.path("llama"),
        "--dataset_name",
        standins.path("stack-exchange-paired"),
        "--size_valid_set",
        4,
        "--seq_length",
        32,
        "--max_steps",
        2,
        "--batch_size",
        2,
        "--num_warmup_steps",
        0,
        "--eval_freq",
        1,
        "--save_freq",
        100,
        "--output_dir",
        "out",
        "--num_workers",
        1,
    ]
    run = run_example(
        standins,
        hf_home,
        tmp_path,
        "research_projects/stack_llama/scripts/supervised_finetuning.py",
        args=args,
    )
    # datasets 5 no longer accepts load_dataset(use_auth_token=True); further down transformers 5 rejects
    # TrainingArguments(evaluation_strategy=...) and from_pretrained(load_in_8bit=True).
    run.check_stops_at("dataset = load_dataset(", "doesn't have a 'use_auth_token' key")


# ---- research_projects/stack_llama_2 ------------------------------------------------------------------------
@pytest.mark.slow
def test_stack_llama_2_dpo_llama2(standins, hf_home, tmp_path):
    args = [
        "--model_name_or_path",
        standins.path("llama"),
        "--per_device_train_batch_size",
        2,
        "--per_device_eval_batch_size",
        2,
        "--gradient_accumulation_steps",
        1,
        "--gradient_checkpointing",
        "False",
        "--max_prompt_length",
        32,
        "--max_length",
        256,
        "--max_steps",
        2,
        "--logging_steps",
        1,
        "--save_steps",
        100,
        "--eval_steps",
        100,
        "--output_dir",
        "out",
        "--report_to",
        "none",
        "--warmup_steps",
        0,
        "--optimizer_type",
        "adamw_torch",
        "--lora_r",
        4,
    ]
    run = run_example(
        standins,
        hf_home,
        tmp_path,
        "research_projects/stack_llama_2/scripts/dpo_llama2.py",
        ["meta-llama/Llama-2-7b-hf", "lvwerra/stack-exchange-paired"],
        args,
    )
    # transformers 5 removed from_pretrained(load_in_4bit=True) (now quantization_config=...), and later
    # TrainingArguments(evaluation_strategy=...).
    run.check_stops_at(
        "model = AutoModelForCausalLM.from_pretrained(", "unexpected keyword argument 'load_in_4bit'"
    )


@pytest.mark.slow
def test_stack_llama_2_sft_llama2(standins, hf_home, tmp_path):
    args = [
        "--model_name",
        standins.path("llama"),
        "--dataset_name",
        standins.path("stack-exchange-paired"),
        "--streaming",
        "False",
        "--size_valid_set",
        4,
        "--seq_length",
        32,
        "--num_workers",
        1,
        "--lora_r",
        4,
        "--output_dir",
        "out",
        "--max_steps",
        2,
        "--per_device_train_batch_size",
        2,
        "--per_device_eval_batch_size",
        2,
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--logging_steps",
        1,
    ]
    run = run_example(
        standins, hf_home, tmp_path, "research_projects/stack_llama_2/scripts/sft_llama2.py", args=args
    )
    # transformers 5 removed TrainingArguments.group_by_length; further down the script loads in 4 bits
    # with device_map={"": 0}, which needs a GPU.
    run.check_stops_at(
        "if training_args.group_by_length and script_args.packing:", "no attribute 'group_by_length'"
    )


# ---- research_projects/toxicity -----------------------------------------------------------------------------
@pytest.mark.slow
def test_toxicity_evaluate_toxicity(standins, hf_home, tmp_path):
    args = [
        "--model_type",
        standins.path("gpt2"),
        "--output_file",
        "toxicity.csv",
        "--batch_size",
        2,
        "--num_samples",
        4,
        "--context_length",
        64,
        "--max_new_tokens",
        4,
    ]
    ids = ["ybelkada/toxicity", "DaNLP/da-electra-hatespeech-detection", "OxAISH-AL-LLM/wiki_toxic"]
    run = run_example(
        standins, hf_home, tmp_path, "research_projects/toxicity/scripts/evaluate-toxicity.py", ids, args
    )
    run.check()
    rows = list(csv.reader((run.cwd / "toxicity.csv").open()))
    assert rows[0] == ["model_id", "mean_toxicity", "std_toxicity"] and len(rows) == 2
    assert 0.0 <= float(rows[1][1]) <= 1.0


@pytest.mark.slow
def test_toxicity_gpt_j_6b_toxicity(standins, hf_home, tmp_path):
    args = [
        "--model_name",
        standins.path("gptj-24-layers"),
        "--batch_size",
        2,
        "--mini_batch_size",
        1,
        "--model_save_path",
        "detoxified",
    ]
    ids = ["allenai/real-toxicity-prompts", "facebook/roberta-hate-speech-dynabench-r4-target"]
    run = run_example(
        standins,
        hf_home,
        tmp_path,
        "research_projects/toxicity/scripts/gpt-j-6b-toxicity.py",
        ids,
        args,
        dump=["stats", "epoch"],
    )
    run.check()
    assert_ppo_stats(run.dumped["stats"])
    assert run.dumped["epoch"] == 0.0  # 5 prompts, 3 toxic, 80% of them: one batch of 2
    assert_saved_model(run.cwd / "detoxified")


# ---- notebooks ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_notebook_gpt2_sentiment(standins, hf_home, tmp_path):
    ids = ["lvwerra/gpt2-imdb", "lvwerra/distilbert-imdb", "imdb"]
    skip = {37: "uploads the model to the hub (push_to_hub=True)"}
    run = run_example(
        standins,
        hf_home,
        tmp_path,
        "notebooks/gpt2-sentiment.ipynb",
        ids,
        skip_cells=skip,
        dump=["stats", "df_results"],
    )
    # As scripts/ppo.py: transformers 5's pipeline ignores return_all_scores=True.
    run.check_stops_at('rewards = [torch.tensor(output[1]["score"])', "KeyError: 1")


@pytest.mark.slow
def test_notebook_gpt2_sentiment_control(standins, hf_home, tmp_path):
    ids = ["lvwerra/gpt2-imdb", "imdb", "lvwerra/distilbert-imdb"]
    skip = {49: "plotting only (and it reads logs['env/reward_dist'], which the notebook never sets)"}
    run = run_example(
        standins,
        hf_home,
        tmp_path,
        "notebooks/gpt2-sentiment-control.ipynb",
        ids,
        skip_cells=skip,
        dump=["stats"],
    )
    run.check()
    assert_ppo_stats(run.dumped["stats"])
    for task in ("negative", "neutral", "positive"):
        assert f"env/reward_{task}" in run.dumped["stats"]
    assert_saved_model(run.cwd / "gpt2-imdb-ctrl")


@pytest.mark.slow
def test_notebook_best_of_n(standins, hf_home, tmp_path):
    ids = ["lvwerra/gpt2-imdb", "lvwerra/gpt2-imdb-pos-v2", "lvwerra/distilbert-imdb", "imdb"]
    run = run_example(standins, hf_home, tmp_path, "notebooks/best_of_n.ipynb", ids, dump=["df_results"])
    # The notebook moves both models with `.cuda()` unconditionally: a GPU is required.
    run.check_stops_at("model.cuda()", "Torch not compiled with CUDA enabled")


# ---- replays: the examples above that stop on this stack, with harness.ENVIRONMENT_PATCHES applied -------
PPO_ARGS = ("--batch_size", 4, "--mini_batch_size", 2)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["causal", "seq2seq", "peft"])
def test_replay_scripts_ppo(standins, hf_home, tmp_path, variant):
    model = standins.path("t5") if variant == "seq2seq" else standins.path("gpt2")
    args = [
        "--model_name",
        model,
        "--query_dataset",
        standins.path("imdb-small"),
        "--reward_model",
        "sentiment-analysis:" + standins.path("distilbert-sentiment"),
        *PPO_ARGS,
    ]
    args += {"causal": [], "seq2seq": ["--use_seq2seq"], "peft": ["--use_peft", "--lora_r", 4]}[variant]
    run = run_example(
        standins,
        hf_home,
        tmp_path,
        "scripts/ppo.py",
        args=args,
        dump=["stats", "batch", "_epoch"],
        replay=True,
    )
    run.check()
    assert_ppo_stats(run.dumped["stats"])
    assert run.dumped["_epoch"] == 1.0  # 8 rows, batches of 4: two PPO steps
    assert run.dumped["batch"]["ref_rewards"]["len"] == 4


@pytest.mark.slow
def test_replay_scripts_ppo_multi_adapter(standins, hf_home, tmp_path):
    args = [
        "--model_name",
        standins.path("llama"),
        "--dataset_name",
        standins.path("hh-rlhf"),
        "--rm_adapter",
        standins.path("llama-reward-adapter-2-labels"),
        "--use_safetensors",
        "True",
    ]
    run = run_example(
        standins,
        hf_home,
        tmp_path,
        "scripts/ppo_multi_adapter.py",
        args=args,
        dump=["stats", "raw_rewards", "_epoch"],
        replay=True,
    )
    run.check()
    assert_ppo_stats(run.dumped["stats"])
    assert run.dumped["_epoch"] == 0.0  # 1% of 800 rows: one batch of 8
    shape = run.dumped["raw_rewards"]["tensor_shape"]
    assert shape[0] == 8 and shape[2] == 2  # [batch, tokens, 2 labels] from compute_reward_score


@pytest.mark.slow
def test_replay_stack_llama_rl_training(standins, hf_home, tmp_path):
    args = [
        "--model_name",
        standins.path("llama"),
        "--tokenizer_name",
        standins.path("llama"),
        "--reward_model_name",
        standins.path("distilbert-sentiment"),
        "--batch_size",
        2,
        "--mini_batch_size",
        1,
        "--gradient_accumulation_steps",
        1,
        "--ppo_epochs",
        1,
        "--steps",
        4,
        "--output_max_length",
        34,
        "--output_dir",
        "runs/",
        "--save_freq",
        1,
    ]
    run = run_example(
        standins,
        hf_home,
        tmp_path,
        "research_projects/stack_llama/scripts/rl_training.py",
        ["lvwerra/stack-exchange-paired"],
        args,
        dump=["stats", "epoch"],
        replay=True,
    )
    run.check()
    assert_ppo_stats(run.dumped["stats"])
    assert run.dumped["epoch"] == 2.0  # steps=4 with batch 2 -> total_ppo_epochs 2: the loop breaks at 2
    assert_saved_model(run.cwd / "runs" / "step_1")


@pytest.mark.slow
def test_replay_stack_llama_supervised_finetuning(standins, hf_home, tmp_path):
    args = [
        "--model_path",
        standins.path("llama"),
        "--dataset_name",
        standins.path("stack-exchange-paired"),
        "--size_valid_set",
        4,
        "--seq_length",
        32,
        "--max_steps",
        2,
        "--batch_size",
        2,
        "--num_warmup_steps",
        0,
        "--eval_freq",
        1,
        "--save_freq",
        100,
        "--output_dir",
        "out",
        "--num_workers",
        1,
    ]
    run = run_example(
        standins,
        hf_home,
        tmp_path,
        "research_projects/stack_llama/scripts/supervised_finetuning.py",
        args=args,
        replay=True,
    )
    run.check()
    assert_saved_model(run.cwd / "out" / "final_checkpoint")


@pytest.mark.slow
def test_replay_stack_llama_2_sft_llama2(standins, hf_home, tmp_path):
    args = [
        "--model_name",
        standins.path("llama"),
        "--dataset_name",
        standins.path("stack-exchange-paired"),
        "--streaming",
        "False",
        "--size_valid_set",
        4,
        "--seq_length",
        32,
        "--num_workers",
        1,
        "--lora_r",
        4,
        "--output_dir",
        "out",
        "--max_steps",
        2,
        "--per_device_train_batch_size",
        2,
        "--per_device_eval_batch_size",
        2,
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--logging_steps",
        1,
    ]
    run = run_example(
        standins,
        hf_home,
        tmp_path,
        "research_projects/stack_llama_2/scripts/sft_llama2.py",
        args=args,
        replay=True,
    )
    run.check()
    assert_saved_model(run.cwd / "out" / "final_checkpoint")
    assert_saved_model(run.cwd / "out" / "final_merged_checkpoint")


@pytest.mark.slow
def test_replay_stack_llama_2_dpo_llama2(standins, hf_home, tmp_path):
    args = [
        "--model_name_or_path",
        standins.path("llama"),
        "--per_device_train_batch_size",
        2,
        "--per_device_eval_batch_size",
        2,
        "--gradient_accumulation_steps",
        1,
        "--gradient_checkpointing",
        "False",
        "--max_prompt_length",
        32,
        "--max_length",
        256,
        "--max_steps",
        2,
        "--logging_steps",
        1,
        "--save_steps",
        100,
        "--eval_steps",
        100,
        "--output_dir",
        "out",
        "--report_to",
        "none",
        "--warmup_steps",
        0,
        "--optimizer_type",
        "adamw_torch",
        "--lora_r",
        4,
    ]
    run = run_example(
        standins,
        hf_home,
        tmp_path,
        "research_projects/stack_llama_2/scripts/dpo_llama2.py",
        ["meta-llama/Llama-2-7b-hf", "lvwerra/stack-exchange-paired"],
        args,
        replay=True,
    )
    run.check()
    assert_saved_model(run.cwd / "out" / "final_checkpoint")


@pytest.mark.slow
def test_replay_notebook_gpt2_sentiment(standins, hf_home, tmp_path):
    ids = ["lvwerra/gpt2-imdb", "lvwerra/distilbert-imdb", "imdb"]
    skip = {37: "uploads the model to the hub (push_to_hub=True)"}
    run = run_example(
        standins,
        hf_home,
        tmp_path,
        "notebooks/gpt2-sentiment.ipynb",
        ids,
        skip_cells=skip,
        dump=["stats", "df_results"],
        replay=True,
    )
    run.check()
    assert_ppo_stats(run.dumped["stats"])
    assert run.dumped["df_results"]["frame_shape"] == [16, 5]


@pytest.mark.slow
def test_replay_notebook_best_of_n(standins, hf_home, tmp_path):
    ids = ["lvwerra/gpt2-imdb", "lvwerra/gpt2-imdb-pos-v2", "lvwerra/distilbert-imdb", "imdb"]
    run = run_example(
        standins, hf_home, tmp_path, "notebooks/best_of_n.ipynb", ids, dump=["df_results"], replay=True
    )
    run.check()
    assert run.dumped["df_results"]["frame_shape"] == [16, 7]  # query + 3 responses + 3 scores
