"""`tether pipeline run.yaml`: the example pipelines (examples/pipeline/*.yaml) shrunk to a few steps of the tiny
test model, on generated review data.

(1) sft -> reward -> ppo: the PPO stage's policy starts from the SFT output's weights, its reward model and its
critic from the reward output's; (2) sft(LoRA) -> dpo(LoRA): each stage starts from the previous adapter merged
as peft's own merge_and_unload gives it; (3) a rerun skips unchanged stages without loading anything, and a changed
stage reruns with every later one; (4) --stages runs a subset, and names a missing input; (5) a pipeline killed
inside the reward stage and then inside the PPO stage resumes each from its checkpoint and ends with the weights of
the uninterrupted pipeline; (6) a bad YAML is an error naming the stage and key before anything runs.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from launching import CPU_ENV
from tether.cli import TRAIN_COMMANDS
from tether.cli import main as cli_main
from tether.pipeline import KINDS, PipelineError, parse_pipeline, run_pipeline
from tether.pipeline.plan import STAGE_FILE, known_options, make_plan

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "pipeline"
sys.path.insert(0, str(EXAMPLES))

import make_data  # noqa: E402

# A few steps of each stage, checkpoints every 2 (the kill test stops after the first one).
TINY = {
    "sft": dict(max_steps=4, per_device_train_batch_size=4, max_length=32, save_steps=2, packing=False,
                learning_rate=1e-2),
    "reward": dict(max_steps=4, per_device_train_batch_size=4, max_length=40, save_steps=2),
    "ppo": dict(total_steps=4, batch_size=2, mini_batch_size=1, ppo_epochs=1, max_new_tokens=5, save_steps=2),
    "dpo": dict(max_steps=3, per_device_train_batch_size=4, max_length=40, save_steps=2),
}


class Killed(BaseException):
    """Stands for the process being killed: nothing catches it."""


pytestmark = pytest.mark.filterwarnings("ignore:matplotlib is not installed")


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    """Drawing each stage's plots costs seconds and is tested elsewhere; the pages are still written."""
    monkeypatch.setattr("tether.reports.page.matplotlib_available", lambda: False)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The examples' data files (small), in the layout make_data.py writes: the pipelines run from here."""
    path = tmp_path_factory.mktemp("pipeline-data")
    make_data.write_data(str(path), n_reviews=40, n_pairs=24)
    return path


@pytest.fixture(autouse=True)
def in_workdir(workdir, monkeypatch):
    monkeypatch.chdir(workdir)  # the example YAMLs' relative paths (data/...) start here


def example(name: str, model: str, output_dir: Path, stages: tuple[str, ...] | None = None) -> dict[str, Any]:
    """examples/pipeline/`name` with the test model, `output_dir`, a few steps per stage and no plots."""
    values = yaml.safe_load((EXAMPLES / name).read_text())
    values.update(model=model, output_dir=str(output_dir))
    stages_in = values["stages"]
    if isinstance(stages_in, dict):
        stages_in = [dict(v, name=k) for k, v in stages_in.items()]
    values["stages"] = [s for s in stages_in if stages is None or s["name"] in stages]
    for stage in values["stages"]:
        stage["config"] = {**stage.get("config", {}), **TINY[stage.get("kind", stage["name"])]}
    values["defaults"] = {**values.get("defaults", {}), "logging_steps": 1}
    return values


def write_yaml(values: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def assert_equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {len(differ)} tensors differ, e.g. {differ[:3]}"


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def actions(result) -> dict[str, str]:
    return {s.name: s.action for s in result.stages}


# ----- (1) sft -> reward -> ppo --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rlhf(tiny_decoder_dir, workdir, tmp_path_factory):
    """The rlhf example (sft -> reward -> ppo) run uninterrupted, with what the PPO stage started from."""
    out = tmp_path_factory.mktemp("rlhf") / "run"
    values = example("rlhf.yaml", tiny_decoder_dir, out, stages=("sft", "reward", "ppo"))
    seen: dict[str, Any] = {}
    from tether.trainers.ppo import PPOTrainer

    original = PPOTrainer.train

    def recording_train(self, *args, **kwargs):
        seen["policy"] = snapshot(self.accelerator.unwrap_model(self.model).pretrained_model)
        seen["reward"] = snapshot(self.rewards.funcs[0].model)
        seen["critic"] = snapshot(self.accelerator.unwrap_model(self.critic))
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        patch.setattr(PPOTrainer, "train", recording_train)
        patch.setattr("tether.reports.page.matplotlib_available", lambda: False)
        result = run_pipeline(parse_pipeline(values, "rlhf.yaml"),
                              after_stage=lambda o: seen.setdefault("after", []).append((o.name, o.inputs)))
    return values, out, result, seen


def test_sft_reward_ppo_chains_each_output_into_the_next_stage(rlhf):
    values, out, result, seen = rlhf
    assert actions(result) == {"sft": "run", "reward": "run", "ppo": "run"}
    # The PPO policy started from the SFT model's weights, its reward model and critic from the reward model's.
    assert_equal_states(seen["policy"], state(out / "sft"), "PPO policy at the start vs the SFT output")
    assert_equal_states(seen["reward"], state(out / "reward"), "PPO reward model vs the reward output")
    assert_equal_states(seen["critic"], state(out / "reward"), "PPO critic at the start vs the reward output")
    # after_stage saw each stage once it was done, with the models it started from.
    assert [name for name, _ in seen["after"]] == ["sft", "reward", "ppo"]
    assert seen["after"][2][1] == {"model": [str(out / "sft")], "reward": [str(out / "reward")],
                                   "critic": [str(out / "reward")]}
    # The reward model started from the SFT model (a new score head on it), not from the base model.
    reward_command = yaml.safe_load((out / "reward" / "pipeline_stage.yaml").read_text())
    assert reward_command["model_name_or_path"] == str(out / "sft")
    ppo_command = yaml.safe_load((out / "ppo" / "pipeline_stage.yaml").read_text())
    assert ppo_command["model_name_or_path"] == str(out / "sft")
    assert ppo_command["reward_funcs"] == [str(out / "reward")]
    assert ppo_command["critic_model_name_or_path"] == str(out / "reward")
    assert ppo_command["init_kl_coef"] == 0.1 and ppo_command["total_steps"] == 4  # the YAML's config
    # Each stage trained: its weights moved away from where it started.
    assert not torch.equal(state(out / "sft")["lm_head.weight"],
                           load_file(str(Path(values["model"]) / "model.safetensors"))["lm_head.weight"])
    assert not torch.equal(state(out / "ppo")["lm_head.weight"], state(out / "sft")["lm_head.weight"])
    # One report over the three stages, and each stage's record says it completed.
    runs = yaml.safe_load((out / "report_runs.json").read_text())["runs"]
    assert [r[1] for r in runs] == ["sft", "reward", "ppo"] and (out / "report.html").is_file()
    assert result.report == str(out / "report.html")
    for name in ("sft", "reward", "ppo"):
        record = yaml.safe_load((out / name / STAGE_FILE).read_text())
        assert record["status"] == "complete" and record["model"] == "."


def test_the_example_pipeline_resolves_every_input(tiny_decoder_dir, tmp_path):
    """The whole rlhf example (its DPO stage too) as written, planned: who feeds whom."""
    values = yaml.safe_load((EXAMPLES / "rlhf.yaml").read_text())
    values.update(model=tiny_decoder_dir, output_dir=str(tmp_path / "out"))
    plan = make_plan(parse_pipeline(values, "rlhf.yaml"))
    out = tmp_path / "out"
    inputs = {s.name: {role: [src.value for src in sources] for role, sources in s.inputs.items()}
              for s in plan.stages}
    assert inputs == {
        "sft": {"model": [tiny_decoder_dir]},
        "reward": {"model": [str(out / "sft")]},
        "ppo": {"model": [str(out / "sft")], "reward": [str(out / "reward")], "critic": [str(out / "reward")]},
        "dpo": {"model": [str(out / "sft")]},  # from: {model: sft}, not the latest policy (ppo)
    }
    assert plan.stage("ppo").values["learning_rate"] == 1.5e-4 and plan.stage("ppo").config.learning_rate == 1.5e-4
    assert plan.stage("sft").config.seed == 0 and plan.stage("sft").config.dataloader_pin_memory is False
    assert not (tmp_path / "out").exists()  # planning writes nothing


def test_from_names_inputs_and_the_fingerprint_follows_their_contents(tiny_decoder_dir, tmp_path):
    """`from:` with a reference stage and a reward list mixing a reward stage and a reward function file; the
    `dataset:` mapping form. A stage's fingerprint changes with its reward file's and its data's content, and
    with an input stage's configuration, but not with logging options or the output folder."""
    (tmp_path / "rewards.py").write_text("def length(completions, **kw):\n    return [len(c) for c in completions]\n")
    split_pairs = Path("data/pairs_split")  # a folder with a file per split: a test split needs one
    split_pairs.mkdir(exist_ok=True)
    lines = Path("data/pairs.jsonl").read_text().splitlines(keepends=True)
    (split_pairs / "train.jsonl").write_text("".join(lines[4:]))
    (split_pairs / "test.jsonl").write_text("".join(lines[:4]))
    values = {
        "output_dir": str(tmp_path / "out"), "model": tiny_decoder_dir,
        "stages": {
            "sft": {"dataset": "data/reviews.jsonl", "config": {"max_steps": 2}},
            "rm": {"kind": "reward", "dataset": {"name": "data/pairs_split", "test_split": "test"}},
            "grpo": {"dataset": "data/prompts.jsonl", "from": {"reward": ["rm", f"{tmp_path}/rewards.py:length"]},
                     "config": {"num_generations": 2}},
            "dpo": {"dataset": "data/pairs.jsonl", "from": {"model": "grpo", "ref": "sft"}},
        },
    }

    def plan(changed: dict[str, Any] | None = None):
        return make_plan(parse_pipeline(values if changed is None else changed, "p.yaml"))

    first = plan()
    grpo, dpo = first.stage("grpo"), first.stage("dpo")
    assert grpo.values["reward_funcs"] == [str(tmp_path / "out" / "rm"), f"{tmp_path}/rewards.py:length"]
    assert grpo.values["model_name_or_path"] == str(tmp_path / "out" / "sft")
    assert dpo.values["model_name_or_path"] == str(tmp_path / "out" / "grpo")
    assert dpo.values["ref_model_name_or_path"] == str(tmp_path / "out" / "sft")
    assert first.stage("rm").values["dataset_test_split"] == "test"
    fingerprints = {s.name: s.fingerprint for s in first.stages}

    unchanged = copy.deepcopy(values)
    unchanged["output_dir"] = str(tmp_path / "elsewhere")
    unchanged["stages"]["sft"]["config"].update(logging_steps=3, save_steps=7, report_to="none")
    assert {s.name: s.fingerprint for s in plan(unchanged).stages} == fingerprints

    (tmp_path / "rewards.py").write_text("def length(completions, **kw):\n    return [0.0 for c in completions]\n")
    now = {s.name: s.fingerprint for s in plan().stages}
    assert [n for n in now if now[n] != fingerprints[n]] == ["grpo", "dpo"]  # the reward file, and what follows

    more_steps = copy.deepcopy(values)
    more_steps["stages"]["sft"]["config"]["max_steps"] = 3
    assert all(s.fingerprint != now[s.name] for s in plan(more_steps).stages)  # every stage depends on sft

    pairs = split_pairs / "train.jsonl"
    original = pairs.read_text()
    try:
        pairs.write_text(original.splitlines()[0] + "\n" + original)
        after = {s.name: s.fingerprint for s in plan().stages}
    finally:
        pairs.write_text(original)
    assert [n for n in after if after[n] != now[n]] == ["rm", "grpo", "dpo"]

    one_file = copy.deepcopy(values)  # a single file has one split: its rows would be the test split
    one_file["stages"]["rm"]["dataset"] = {"name": "data/pairs.jsonl", "test_split": "test"}
    with pytest.raises(PipelineError, match="single file holds one split"):
        plan(one_file)


def test_every_kind_runs_a_command_whose_options_it_fills():
    for name, kind in KINDS.items():
        assert kind.command in TRAIN_COMMANDS, name
        options = known_options(kind.command)
        for role, needed in kind.inputs.items():
            assert needed.field in options, f"{name}.{role}: `tether {kind.command}` has no --{needed.field}"


# ----- (2) LoRA: adapters merged between stages ----------------------------------------------------------------
def test_lora_stages_hand_on_the_adapter_merged_into_the_weights(tiny_decoder_dir, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tether.trainers.dpo import DPOTrainer

    out = tmp_path / "run"
    values = example("dpo_lora.yaml", tiny_decoder_dir, out)
    seen = {}
    original = DPOTrainer.train

    def recording_train(self, *args, **kwargs):
        # The adapter DPO adds starts at zero (B = 0): merged now, it gives the weights DPO starts from.
        seen["start"] = snapshot(copy.deepcopy(self.model).merge_and_unload())
        seen["reference_is_the_policy_without_adapter"] = self.ref_model is None
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DPOTrainer, "train", recording_train)
    result = run_pipeline(write_yaml(values, tmp_path / "run.yaml"))
    assert {s.name: s.model_dir for s in result.stages} == {"sft": str(out / "sft" / "merged"),
                                                            "dpo": str(out / "dpo" / "merged")}
    assert (out / "sft" / "adapter_model.safetensors").is_file() and not (out / "sft" / "model.safetensors").exists()

    # peft's own merge of the SFT adapter into the base model: what DPO must start from.
    base = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)
    merged_sft = snapshot(PeftModel.from_pretrained(base, str(out / "sft")).merge_and_unload())
    base_state = snapshot(AutoModelForCausalLM.from_pretrained(tiny_decoder_dir))
    assert any(not torch.equal(merged_sft[k], base_state[k]) for k in base_state)  # the adapter learned something
    assert_equal_states(seen["start"], merged_sft, "DPO's starting weights vs base + SFT adapter (peft merge)")
    assert seen["reference_is_the_policy_without_adapter"]  # i.e. the merged SFT model, not the base
    adapter = yaml.safe_load((out / "dpo" / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["lora_alpha"] == 32  # the stage's r over the shared peft settings

    # The final model: DPO's adapter merged into the merged SFT model, as peft merges it.
    sft_model = AutoModelForCausalLM.from_pretrained(str(out / "sft" / "merged"))
    merged_dpo = snapshot(PeftModel.from_pretrained(sft_model, str(out / "dpo")).merge_and_unload())
    assert_equal_states(state(out / "dpo" / "merged"), merged_dpo, "dpo/merged vs merged SFT + DPO adapter")
    assert any(not torch.equal(merged_dpo[k], merged_sft[k]) for k in merged_sft)


# ----- (3) skipping ---------------------------------------------------------------------------------------------
def test_rerun_skips_unchanged_stages_and_reruns_a_changed_one_with_the_later_ones(rlhf, tmp_path, monkeypatch):
    values, out, _, _ = rlhf
    copied = tmp_path / "run"
    shutil.copytree(out, copied)  # a moved output folder still matches: fingerprints hold no paths
    values = dict(values, output_dir=str(copied))

    def nothing_may_run(command, argv):
        raise AssertionError(f"stage command {command} ran")

    with monkeypatch.context() as patch:
        patch.setattr("tether.pipeline.runner.run_command", nothing_may_run)
        result = run_pipeline(parse_pipeline(values, "rlhf.yaml"))
    assert actions(result) == {"sft": "skip", "reward": "skip", "ppo": "skip"}

    sft_weights, reward_weights = state(copied / "sft"), state(copied / "reward")
    changed = copy.deepcopy(values)
    changed["stages"][1]["config"]["learning_rate"] = 5e-3
    plan = make_plan(parse_pipeline(changed, "rlhf.yaml"))
    assert plan.stage("sft").fingerprint == make_plan(parse_pipeline(values, "rlhf.yaml")).stage("sft").fingerprint
    result = run_pipeline(parse_pipeline(changed, "rlhf.yaml"))
    assert actions(result) == {"sft": "skip", "reward": "restart", "ppo": "restart"}
    reasons = {s.name: s.reason for s in result.stages}
    assert "run.config.learning_rate" in reasons["reward"] and "inputs.reward" in reasons["ppo"]
    assert_equal_states(state(copied / "sft"), sft_weights, "the skipped SFT stage")
    assert not torch.equal(state(copied / "reward")["score.weight"], reward_weights["score.weight"])
    assert sorted(p.name for p in (copied / "reward").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


# ----- (4) a subset of the stages -------------------------------------------------------------------------------
def test_stages_runs_a_subset_and_names_a_missing_input(tiny_decoder_dir, tmp_path, capsys):
    out = tmp_path / "run"
    path = write_yaml(example("rlhf.yaml", tiny_decoder_dir, out, stages=("sft", "reward", "ppo")), tmp_path / "r.yaml")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["pipeline", str(path), "--stages", "reward,ppo"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "Stage 'reward' needs the output of stage 'sft' (its starting model)" in message
    assert "add sft to --stages" in message and not out.exists()

    assert cli_main(["pipeline", str(path), "--stages", "sft"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["sft"]
    with pytest.raises(PipelineError, match="Stage 'ppo' needs the output of stage 'reward' .its reward model"):
        run_pipeline(path, stages=["ppo"])

    capsys.readouterr()
    assert cli_main(["pipeline", str(path), "--plan"]) == 0  # says what would happen, runs nothing
    printed = capsys.readouterr().out
    assert "1. sft (sft): skip (unchanged" in printed and "2. reward (reward): run (new)" in printed
    assert not (out / "reward").exists()

    result = run_pipeline(path, stages=["reward"])  # takes the completed SFT stage's output
    assert actions(result) == {"reward": "run"}
    assert yaml.safe_load((out / "reward" / "pipeline_stage.yaml").read_text())["model_name_or_path"] == str(out / "sft")
    assert not (out / "ppo").exists()

    # A completed input made with another configuration than the YAML's is used as it is, with a warning.
    values = yaml.safe_load(path.read_text())
    values["stages"][0]["config"]["learning_rate"] = 1e-3
    plan = make_plan(parse_pipeline(values, "r.yaml"), ["reward"])
    assert len(plan.warnings) == 1 and "stage 'sft'" in plan.warnings[0]
    assert "run.config.learning_rate" in plan.warnings[0]


# ----- (5) killed inside a stage --------------------------------------------------------------------------------
def test_a_killed_pipeline_resumes_inside_its_stage_and_ends_as_the_uninterrupted_one(rlhf, tmp_path, monkeypatch):
    """Killed inside the reward stage (after its checkpoint-2), then inside the PPO stage: each rerun continues the
    stage from its checkpoint (training only the steps after it) and the end equals the uninterrupted pipeline."""
    from tether.trainers.base import TetherTrainer
    from tether.trainers.ppo import PPOTrainer

    values, full, _, _ = rlhf
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(full / "sft", out / "sft")  # done already: the kills come later
    spec = parse_pipeline(dict(values, output_dir=str(out)), "rlhf.yaml")
    training_step, ppo_step = TetherTrainer.training_step, PPOTrainer.step
    trained: dict[str, list[int]] = {"reward": [], "ppo": []}

    def reward_step(self, *args, **kwargs):
        if kill == "reward" and self.state.global_step == 2:  # steps 1-2 and checkpoint-2 done
            raise Killed("killed in step 3")
        trained["reward"].append(self.state.global_step + 1)
        return training_step(self, *args, **kwargs)

    def step(self, *args, **kwargs):
        if kill == "ppo" and self.current_step == 2:
            raise Killed("killed in step 3")
        trained["ppo"].append(self.current_step + 1)
        return ppo_step(self, *args, **kwargs)

    monkeypatch.setattr(TetherTrainer, "training_step", reward_step)
    monkeypatch.setattr(PPOTrainer, "step", step)
    kill = "reward"
    with pytest.raises(Killed):
        run_pipeline(spec)
    record = yaml.safe_load((out / "reward" / STAGE_FILE).read_text())
    assert record["status"] == "running" and (out / "reward" / "checkpoint-2").is_dir()
    assert trained == {"reward": [1, 2], "ppo": []}

    kill, trained["reward"] = "ppo", []
    with pytest.raises(Killed):
        run_pipeline(spec)
    assert trained == {"reward": [3, 4], "ppo": [1, 2]}  # the reward stage resumed after its checkpoint
    assert yaml.safe_load((out / "reward" / STAGE_FILE).read_text())["status"] == "complete"
    assert (out / "ppo" / "checkpoint-2").is_dir() and not (out / "ppo" / "checkpoint-4").exists()

    kill, trained["ppo"] = None, []
    result = run_pipeline(spec)
    assert actions(result) == {"sft": "skip", "reward": "skip", "ppo": "resume"}
    assert "checkpoint-2" in result.stages[2].reason and trained["ppo"] == [3, 4]
    for name in ("reward", "ppo"):
        assert_equal_states(state(out / name), state(full / name), f"{name} resumed vs uninterrupted")
    assert_equal_states(load_file(str(out / "ppo" / "critic" / "model.safetensors")),
                        load_file(str(full / "ppo" / "critic" / "model.safetensors")), "critic")
    assert_equal_states(load_file(str(out / "ppo" / "value_head.safetensors")),
                        load_file(str(full / "ppo" / "value_head.safetensors")), "value head")


# ----- (6) a bad YAML -------------------------------------------------------------------------------------------
def _break(values: dict[str, Any], change: str) -> dict[str, Any]:
    values = copy.deepcopy(values)
    sft, reward, ppo = values["stages"]
    if change == "unknown top-level key":
        values["stage"] = values.pop("stages")
    elif change == "unknown kind":
        ppo["kind"] = "ppoo"
    elif change == "unknown config field":
        sft["config"]["learning_rat"] = 1e-3
    elif change == "bad config value":
        sft["config"]["learning_rate"] = "fast"
    elif change == "config check":
        reward["config"]["center_rewards_coefficient"] = -1
    elif change == "no reward model":
        values["stages"] = [sft, ppo]
    elif change == "missing dataset":
        reward["dataset"] = "data/missing.jsonl"
    elif change == "field set by the pipeline":
        sft["config"]["output_dir"] = "elsewhere"
    elif change == "critic on a dpo stage":
        reward.update(kind="dpo", critic="sft")
    elif change == "policy as reward":
        ppo["from"] = {"reward": "sft"}
    elif change == "input from a later stage":
        reward["from"] = {"model": "ppo"}
    elif change == "duplicate name":
        reward["name"] = "sft"
    elif change == "unknown peft key":
        sft["peft"] = {"rank": 8}
    elif change == "unknown default":
        values["defaults"]["warmup_step"] = 3
    elif change == "missing model":
        values["model"] = "./no-such-model"
    return values


BAD = {
    "unknown top-level key": r"unknown key 'stage' \(did you mean 'stages'\?\)",
    "unknown kind": r"stage 'ppo'.kind: unknown kind 'ppoo' \(did you mean 'ppo'\?\)",
    "unknown config field": r"stage 'sft'.config.learning_rat: sft has no option 'learning_rat' \(did you mean "
                            r"'learning_rate'\?\)",
    "bad config value": r"stage 'sft'.config.learning_rate: invalid float value: 'fast'",
    "config check": r"stage 'reward'.config: center_rewards_coefficient must be >= 0",
    "no reward model": r"stage 'ppo': a ppo stage needs a reward model .* Add a stage of kind reward before it",
    "missing dataset": r"stage 'reward'.dataset: no such file or folder 'data/missing.jsonl'",
    "field set by the pipeline": r"stage 'sft'.config.output_dir: set by the pipeline",
    "critic on a dpo stage": r"stage 'reward'.critic: a dpo stage has no critic",
    "policy as reward": r"stage 'ppo'.from.reward: stage 'sft' \(sft\) produces a policy model",
    "input from a later stage": r"stage 'reward'.from.model: stage 'ppo' comes later",
    "duplicate name": r"two stages are named 'sft'",
    "unknown peft key": r"stage 'sft'.peft: unknown key 'rank'",
    "unknown default": r"defaults.warmup_step: no stage's command has this option \(did you mean 'warmup_steps'\?\)",
    "missing model": r"model: Model './no-such-model': no such local folder",
}


@pytest.mark.parametrize("change", list(BAD))
def test_a_bad_yaml_is_an_error_naming_stage_and_key_before_anything_runs(change, tiny_decoder_dir, tmp_path):
    out = tmp_path / "run"
    values = _break(example("rlhf.yaml", tiny_decoder_dir, out, stages=("sft", "reward", "ppo")), change)
    path = write_yaml(values, tmp_path / "bad.yaml")
    with pytest.raises(PipelineError, match=BAD[change]):
        run_pipeline(path)
    assert not out.exists()


def test_checkpoints_the_pipeline_did_not_write_are_refused_before_anything_runs(tiny_decoder_dir, tmp_path):
    out = tmp_path / "run"
    (out / "reward" / "checkpoint-3").mkdir(parents=True)  # e.g. an earlier `tether reward --output_dir run/reward`
    values = example("rlhf.yaml", tiny_decoder_dir, out, stages=("sft", "reward", "ppo"))
    with pytest.raises(PipelineError, match=r"Stage 'reward': .*holds checkpoints \(checkpoint-3, ...\) that this "
                                            r"pipeline did not write"):
        run_pipeline(parse_pipeline(values, "r.yaml"))
    assert not (out / "sft").exists()
    values["stages"][1]["config"]["overwrite_output_dir"] = True  # the trainer deletes them: accepted
    make_plan(parse_pipeline(values, "r.yaml"))


def test_unknown_stage_in_stages_is_named(tiny_decoder_dir, tmp_path):
    path = write_yaml(example("rlhf.yaml", tiny_decoder_dir, tmp_path / "run"), tmp_path / "r.yaml")
    with pytest.raises(PipelineError, match=r"no stage 'rewrd' \(did you mean 'reward'\?\)"):
        run_pipeline(path, stages=["rewrd"])


# ----- several processes ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_every_stage_runs_on_two_processes(tiny_decoder_dir, workdir, tmp_path):
    """`tether pipeline run.yaml --accelerate_config ddp --num_processes 2`: every stage under accelerate launch,
    one set of files; a rerun skips everything."""
    out = tmp_path / "run"
    path = write_yaml(example("rlhf.yaml", tiny_decoder_dir, out, stages=("sft", "reward", "ppo")), tmp_path / "r.yaml")
    command = [sys.executable, "-m", "tether.cli", "pipeline", str(path), "--accelerate_config", "ddp",
               "--num_processes", "2"]
    run = subprocess.run(command, capture_output=True, text=True, env=CPU_ENV, cwd=workdir, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for name in ("sft", "reward", "ppo"):
        record = yaml.safe_load((out / name / STAGE_FILE).read_text())
        assert record["status"] == "complete"
    # Both processes trained on their share of the data: 24 pairs in batches of 4 per process are 3 steps an
    # epoch on 2 processes (6 on one), so the reward stage's 4 steps end past its first epoch.
    reward = [json.loads(line) for line in (out / "reward" / "metrics.jsonl").read_text().splitlines()]
    assert reward[-1]["epoch"] == pytest.approx(4 / 3, abs=0.01)
    assert len((out / "ppo" / "metrics.jsonl").read_text().splitlines()) == 4 and (out / "report.html").is_file()
    rerun = subprocess.run(command, capture_output=True, text=True, env=CPU_ENV, cwd=workdir, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert rerun.stdout.count("-- skip: unchanged") == 3
