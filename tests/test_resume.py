"""Resume equality: a run killed mid-training and resumed from its last checkpoint by a NEW trainer ends
with the weights of an uninterrupted run with the same seed (SFT, DPO, PPO, and through `tether --resume`).

The kill is an exception raised inside training after a checkpoint was written and at least one more
step was taken (or while a checkpoint is being written), so the resumed run must restore the data
position and random streams, not just the weights. Dropout is switched on where the trainer allows it,
so that a random stream left unrestored shows up in the weights.
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from launching import run_two_processes
from tether import (
    AutoModelForCausalLMWithValueHead,
    DPOConfig,
    DPOTrainer,
    PPOConfig,
    PPOTrainer,
    SFTConfig,
    SFTTrainer,
)
from tether.cli import main
from tether.demo.corpus import generate_reviews, preference_pairs
from tether.reports.callback import RunReportCallback
from tether.reports.runfiles import read_jsonl
from tether.trainers.checkpoints import atomic_directory, latest_checkpoint, rotate_checkpoints

DROPOUT = {"attention_dropout": 0.1}  # from_pretrained kwargs: the conftest model has none


class Killed(BaseException):
    """Stands for the process being killed (a BaseException, like KeyboardInterrupt: nothing catches it)."""


class KillAfterStep(TrainerCallback):
    """Raises once `step` optimizer steps are done, before that step's logging and checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed(f"killed after step {self.step}")


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    # Same ops on the same numbers in the same order: equal up to float rounding noise at most.
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


# ----- SFT and DPO (transformers.Trainer based) ---------------------------------------------------------------
def make_trainer(method: str, model_dir: str, tokenizer, out: str, callbacks=None):
    # 10 rows in micro-batches of 2 with 2 accumulation steps: 3 optimizer steps per epoch, the last one of a
    # single micro-batch; 6 steps cross an epoch boundary, and a resume at step 2 starts mid-epoch.
    common = dict(output_dir=out, max_steps=6, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                  learning_rate=1e-3, save_steps=2, seed=3, report_to="none", disable_tqdm=True, logging_steps=1,
                  model_init_kwargs=DROPOUT)
    if method == "sft":
        args = SFTConfig(**common, max_length=32)
        data = Dataset.from_list(generate_reviews(10, seed=2))
        trainer = SFTTrainer(model_dir, args=args, train_dataset=data, processing_class=tokenizer, callbacks=callbacks)
    else:
        args = DPOConfig(**common, max_length=48, max_prompt_length=24, disable_dropout=False,
                         ref_model_init_kwargs=DROPOUT)
        data = Dataset.from_list(preference_pairs(10, seed=2))
        trainer = DPOTrainer(model_dir, args=args, train_dataset=data, processing_class=tokenizer, callbacks=callbacks)
    trainer.remove_callback(RunReportCallback)  # its plots cost seconds a run and are not what is tested here
    return trainer


@pytest.fixture(scope="module")
def uninterrupted(tiny_decoder_dir, tokenizer_dir, tmp_path_factory):
    """The uninterrupted run of each method, trained once for the module."""
    from transformers import AutoTokenizer

    runs = {}

    def get(method: str):
        if method not in runs:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
            trainer = make_trainer(method, tiny_decoder_dir, tokenizer, str(tmp_path_factory.mktemp(method)))
            trainer.train()
            runs[method] = trainer
        return runs[method]

    return get


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_trainer_resume_equals_uninterrupted(method, uninterrupted, tiny_decoder_dir, tokenizer, tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(Killed):
        make_trainer(method, tiny_decoder_dir, tokenizer, out, [KillAfterStep(3)]).train()
    assert latest_checkpoint(out) == os.path.join(out, "checkpoint-2")  # step 3 was trained, then lost

    resumed = make_trainer(method, tiny_decoder_dir, tokenizer, out)
    resumed.train(resume_from_checkpoint=True)
    full = uninterrupted(method)
    assert resumed.state.global_step == full.state.global_step == 6
    assert_same_weights(resumed.model, full.model)
    # The steps after the checkpoint saw the same batches and dropout masks: the same losses.
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (resumed, full)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_trainer_killed_while_saving_resumes_from_the_previous_checkpoint(uninterrupted, tiny_decoder_dir,
                                                                           tokenizer, tmp_path, monkeypatch):
    """A kill in the middle of writing checkpoint-4 (after the weights, before the RNG state) leaves only
    checkpoint-4.partial; resume ignores it, starts from checkpoint-2 and still ends like the full run."""
    out = tmp_path / "run"
    trainer = make_trainer("sft", tiny_decoder_dir, tokenizer, str(out))
    save_rng_state = trainer._save_rng_state

    def dies_at_step_4(output_dir: str) -> None:
        if trainer.state.global_step == 4:
            raise Killed("killed while saving")
        save_rng_state(output_dir)

    monkeypatch.setattr(trainer, "_save_rng_state", dies_at_step_4)
    with pytest.raises(Killed):
        trainer.train()
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()
    assert (out / "checkpoint-4.partial" / "checkpoint-4" / "model.safetensors").is_file()  # half-written
    assert latest_checkpoint(str(out)) == str(out / "checkpoint-2")

    resumed = make_trainer("sft", tiny_decoder_dir, tokenizer, str(out))
    resumed.train(resume_from_checkpoint=True)
    assert_same_weights(resumed.model, uninterrupted("sft").model)
    # The resumed run rewrote checkpoint-4 whole; nothing partial is left.
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert (out / "checkpoint-4" / "rng_state.pth").is_file()


def test_trainer_checkpoints_are_complete_folders_and_rotation_skips_partials(tiny_decoder_dir, tokenizer, tmp_path):
    out = tmp_path / "run"
    os.makedirs(out / "checkpoint-9.partial")  # left by an earlier crash: must neither count nor be kept
    trainer = make_trainer("sft", tiny_decoder_dir, tokenizer, str(out))
    trainer.args.save_total_limit = 2
    trainer.train()
    names = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint"))
    assert names == ["checkpoint-4", "checkpoint-6", "checkpoint-9.partial"]
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        assert (out / "checkpoint-6" / name).is_file(), name
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6


# ----- checkpoint helpers -------------------------------------------------------------------------------------
def test_atomic_directory_replaces_only_on_success(tmp_path):
    path = str(tmp_path / "checkpoint-1")
    with atomic_directory(path) as partial:
        assert partial == path + ".partial"
        (tmp_path / "checkpoint-1.partial" / "a.txt").write_text("old")
    assert (tmp_path / "checkpoint-1" / "a.txt").read_text() == "old"
    with pytest.raises(Killed), atomic_directory(path) as partial:
        (tmp_path / "checkpoint-1.partial" / "a.txt").write_text("new")
        raise Killed
    assert (tmp_path / "checkpoint-1" / "a.txt").read_text() == "old"  # the previous one is untouched
    with atomic_directory(path, subfolder="inner") as partial:
        os.makedirs(os.path.join(partial, "inner"))
        (tmp_path / "checkpoint-1.partial" / "inner" / "b.txt").write_text("nested")
    assert os.listdir(path) == ["b.txt"] and not os.path.exists(path + ".partial")


def test_latest_checkpoint_and_rotation_ignore_partial_folders(tmp_path):
    assert latest_checkpoint(str(tmp_path / "missing")) is None
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-3", "checkpoint-12.partial", "checkpoint-x"):
        os.makedirs(tmp_path / name)
    (tmp_path / "checkpoint-20").write_text("a file, not a folder")
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")  # numeric, not lexical
    rotate_checkpoints(str(tmp_path), 2, keep=[str(tmp_path / "checkpoint-2")])
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-10", "checkpoint-12.partial", "checkpoint-2", "checkpoint-20",
                                            "checkpoint-x"]


# ----- PPO ----------------------------------------------------------------------------------------------------
PROMPTS = ["this movie", "the plot", "the film", "the acting", "i think", "overall"]


class RecordingReward:
    """Length reward plus noise from python's and numpy's global generators (so those streams must be
    restored too); records every completion it scores and dies at rollout `kill_at`."""

    def __init__(self, kill_at: int | None = None) -> None:
        self.kill_at, self.calls, self.__name__ = kill_at, [], "recording"

    def __call__(self, prompts: list[str], completions: list[str], **_: list) -> list[float]:
        if len(self.calls) + 1 == self.kill_at:
            raise Killed(f"killed at rollout {self.kill_at}")
        self.calls.append(list(zip(prompts, completions)))
        return [len(c) / 20 + 0.1 * random.random() + 0.1 * float(np.random.rand()) for c in completions]


def ppo_trainer(model_dir: str, tokenizer, out: str, reward: RecordingReward) -> PPOTrainer:
    # 6 prompts, 2 per step: 3 steps an epoch, so 5 steps cross an epoch; 2 mini-batches and 2 PPO epochs
    # draw mini-batch orders; PPO-ptx draws batches from a second stream (3 texts, 2 per micro-batch, so
    # its epochs turn over every step).
    config = PPOConfig(batch_size=2, mini_batch_size=1, ppo_epochs=2, learning_rate=1e-3, total_steps=5,
                       max_new_tokens=5, save_steps=2, output_dir=out, seed=5, ptx_coef=0.5)
    random.seed(0)  # PPOTrainer seeds torch and numpy itself, but after the value head was initialised here
    torch.manual_seed(0)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir, **DROPOUT)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda n: 1 / (1 + n))  # its state must resume too
    ptx = Dataset.from_dict({"text": ["the film was good.", "a plot with holes.", "great acting overall."]})
    return PPOTrainer(config, model, None, tokenizer, dataset=Dataset.from_dict({"prompt": PROMPTS}),
                      optimizer=optimizer, lr_scheduler=scheduler, reward_funcs=reward, ptx_dataset=ptx)


def test_ppo_resume_equals_uninterrupted(tiny_decoder_dir, tokenizer, tmp_path):
    full_reward = RecordingReward()
    full = ppo_trainer(tiny_decoder_dir, tokenizer, str(tmp_path / "full"), full_reward)
    full.train()

    out = tmp_path / "run"
    with pytest.raises(Killed):  # steps 1-3 done (checkpoint-2 written), killed while scoring step 4
        ppo_trainer(tiny_decoder_dir, tokenizer, str(out), RecordingReward(kill_at=4)).train()
    os.makedirs(out / "checkpoint-4.partial")  # as if it had been killed while writing checkpoint 4
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 4, "env/rew')  # ... or while writing a log line
    assert latest_checkpoint(str(out)) == str(out / "checkpoint-2")

    reward = RecordingReward()
    resumed = ppo_trainer(tiny_decoder_dir, tokenizer, str(out), reward)
    resumed.train(resume_from_checkpoint=True)
    # The same prompts and the same sampled completions at steps 3, 4 and 5, then the same weights.
    assert reward.calls == full_reward.calls[2:]
    assert_same_weights(resumed.model, full.model)
    assert resumed.kl_ctl.value == pytest.approx(full.kl_ctl.value, rel=1e-9)
    assert resumed.lr_scheduler.state_dict() == full.lr_scheduler.state_dict()
    # metrics.jsonl and samples.jsonl: step 3, logged before the kill, and the cut line were dropped on
    # resume; step 3 was logged once more.
    rows, full_rows = (read_jsonl(d / "metrics.jsonl") for d in (out, tmp_path / "full"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for key in ("env/reward_mean", "objective/kl", "ppo/loss/total"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in full_rows], rel=1e-5), key
    samples, full_samples = (read_jsonl(d / "samples.jsonl") for d in (out, tmp_path / "full"))
    assert [(r["step"], r["completion"]) for r in samples] == [(r["step"], r["completion"]) for r in full_samples]
    assert (out / "checkpoint-4" / "rng_state_0.pth").is_file() and not (out / "checkpoint-4.partial").exists()


def test_ppo_resume_errors(tiny_decoder_dir, tokenizer, tmp_path):
    trainer = ppo_trainer(tiny_decoder_dir, tokenizer, str(tmp_path / "empty"), RecordingReward())
    with pytest.raises(ValueError, match="No checkpoint-N folder to resume from"):
        trainer.train(resume_from_checkpoint=True)
    os.makedirs(tmp_path / "checkpoint-3.partial")
    with pytest.raises(ValueError, match="still writing when it stopped"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3.partial"))


@pytest.mark.slow
def test_ppo_resume_with_two_processes(tiny_decoder_dir, tmp_path):
    """Under `accelerate launch` with 2 processes each one restores its own random state (its python stream
    differs from the other's here): the resumed run generates and ends as the uninterrupted one."""
    run_two_processes("ppo_resume_two_process.py", tiny_decoder_dir, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["processes"] == 2 and len(rank["resumed"]) == 2
        assert rank["resumed"] == rank["full"]
        assert rank["resumed_checksum"] == pytest.approx(rank["full_checksum"], rel=1e-7)
    assert ranks[0]["resumed"] != ranks[1]["resumed"]  # the processes did see different prompts
    assert sorted(os.listdir(tmp_path / "run" / "checkpoint-2")).count("rng_state_1.pth") == 1


# ----- the command line ---------------------------------------------------------------------------------------
def test_cli_resume_flag(tiny_decoder_dir, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in generate_reviews(12, seed=4)))

    def argv(out: str, *extra: str) -> list[str]:
        return ["sft", "--model_name_or_path", tiny_decoder_dir, "--dataset_name", str(data), "--output_dir", out,
                "--max_steps", "4", "--save_steps", "2", "--per_device_train_batch_size", "4", "--max_length", "32",
                "--learning_rate", "1e-3", "--report_to", "none", "--disable_tqdm", "true",
                "--model_init_kwargs", json.dumps(DROPOUT), *extra]

    with pytest.raises(SystemExit) as exit_info:  # nothing to resume from yet
        main(argv(str(tmp_path / "run"), "--resume"))
    assert exit_info.value.code == 2
    assert "--resume: no checkpoint-N folder in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(argv(str(tmp_path / "run"), "--resume", "--resume_from_checkpoint", str(tmp_path)))
    assert "not both" in capsys.readouterr().err

    assert main(argv(str(tmp_path / "full"))) == 0
    with monkeypatch.context() as patch:
        original = SFTTrainer.__init__

        def init_with_kill(self, *args, **kwargs):
            original(self, *args, **kwargs)
            self.add_callback(KillAfterStep(3))

        patch.setattr(SFTTrainer, "__init__", init_with_kill)
        with pytest.raises(Killed):
            main(argv(str(tmp_path / "run")))
    assert main(argv(str(tmp_path / "run"), "--resume")) == 0
    # ... and resuming from an explicit folder still works.
    assert main(argv(str(tmp_path / "again"), "--resume_from_checkpoint", str(tmp_path / "run" / "checkpoint-2"))) == 0

    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    for name in ("run", "again"):
        assert_same_weights(AutoModelForCausalLM.from_pretrained(tmp_path / name), full)
