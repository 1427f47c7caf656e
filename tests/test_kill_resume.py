"""Kill and resume for every method tests/test_resume.py does not already cover (it has SFT and DPO, and PPO
without a critic): Reward, KTO, ORPO, CPO, GRPO and RLOO (GRPO and RLOO also with rounds of generation that span
several optimizer steps: num_iterations=2, and steps_per_generation > gradient_accumulation_steps), and
PPOTrainer.train() with a separate critic, PPO-ptx and score scaling.

(a) A run killed between checkpoints (a `Killed` raised from a callback after a step, or from PPO's reward
function) and resumed by a NEW trainer from its last checkpoint ends with every weight equal (torch.equal) to
an uninterrupted run's.
(b) A run killed while writing a checkpoint (after its weights, before its random or optimizer state) leaves a
`.partial` folder; resuming takes the previous checkpoint and still ends equal.

Dropout is on where the method allows it, and the reward functions draw from python's and numpy's global random
streams, so an unrestored random stream shows up in the weights. In the round-spanning variants the checkpoint
falls inside a round: the resumed run must train the rest of the round on the same completions, not on new ones
sampled by the updated policy.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from datasets import Dataset

from launching import run_two_processes
from test_resume import DROPOUT, KillAfterStep, Killed
from tether import (
    AutoModelForCausalLMWithValueHead,
    CPOConfig,
    CPOTrainer,
    DPOConfig,
    DPOTrainer,
    GRPOConfig,
    GRPOTrainer,
    KTOConfig,
    KTOTrainer,
    ORPOConfig,
    ORPOTrainer,
    PPOConfig,
    PPOTrainer,
    RewardConfig,
    RewardTrainer,
    RLOOConfig,
    RLOOTrainer,
    SFTConfig,
    SFTTrainer,
)
from tether.demo.corpus import generate_reviews, preference_pairs
from tether.reports.callback import RunReportCallback
from tether.trainers.checkpoints import latest_checkpoint
from tether.trainers.online import ROUND_FILE

# Every run: 4 optimizer steps (unless a variant says otherwise), a checkpoint every 2, a short max_length.
COMMON = dict(max_steps=4, save_steps=2, learning_rate=1e-3, seed=3, report_to="none", disable_tqdm=True,
              logging_steps=1, model_init_kwargs=DROPOUT)


def noisy_length_reward(completions: list[str], **_: Any) -> list[float]:
    """Length plus noise from python's and numpy's global generators: those streams must be restored too."""
    return [len(c) / 10 + 0.1 * random.random() + 0.1 * float(np.random.rand()) for c in completions]


def prompts(n: int) -> Dataset:
    return Dataset.from_dict({"prompt": [f"the film number {i}" for i in range(n)]})


def pairs(n: int) -> Dataset:
    return Dataset.from_list(preference_pairs(n, seed=2))


# method -> (trainer class, config class, config overrides, dataset, extra trainer keywords). The offline runs
# have 6 rows in batches of 2: 3 steps an epoch, so 4 steps cross an epoch and a resume at step 2 starts mid-epoch.
PAIRWISE = dict(per_device_train_batch_size=2, max_length=40, max_prompt_length=16, disable_dropout=False)
ONLINE = dict(per_device_train_batch_size=4, num_generations=2, max_completion_length=5, max_prompt_length=16)
METHODS: dict[str, tuple[type, type, dict[str, Any], Callable[[], Dataset], dict[str, Any]]] = {
    "sft": (SFTTrainer, SFTConfig, dict(per_device_train_batch_size=2, max_length=32),
            lambda: Dataset.from_list(generate_reviews(6, seed=2)), {}),
    "reward": (RewardTrainer, RewardConfig, dict(per_device_train_batch_size=2, max_length=40, disable_dropout=False),
               lambda: pairs(6), {}),
    "dpo": (DPOTrainer, DPOConfig, dict(PAIRWISE, ref_model_init_kwargs=DROPOUT), lambda: pairs(6), {}),
    "kto": (KTOTrainer, KTOConfig, dict(PAIRWISE, ref_model_init_kwargs=DROPOUT), lambda: pairs(3), {}),
    "orpo": (ORPOTrainer, ORPOConfig, PAIRWISE, lambda: pairs(6), {}),
    "cpo": (CPOTrainer, CPOConfig, PAIRWISE, lambda: pairs(6), {}),
    # 2 prompts x 2 completions per step; 6 prompts: 3 rounds an epoch.
    "grpo": (GRPOTrainer, GRPOConfig, dict(ONLINE, beta=0.1), lambda: prompts(6),
             dict(reward_funcs=noisy_length_reward)),
    "rloo": (RLOOTrainer, RLOOConfig, ONLINE, lambda: prompts(6), dict(reward_funcs=noisy_length_reward)),
}
# Rounds of generation spanning 2 optimizer steps: checkpoint-3 falls inside the round of steps 3-4, so a run
# killed after step 4 resumes in the middle of a round. num_iterations=2: each round trained twice (2 steps of
# one micro-batch each); steps_per_generation=2 with no accumulation: a round cut into 2 optimizer steps.
ROUNDS = dict(max_steps=5, save_steps=3)
ROUND_VARIANTS = {
    "grpo-iterations": ("grpo", dict(ROUNDS, num_iterations=2)),
    "grpo-spg": ("grpo", dict(ROUNDS, steps_per_generation=2, per_device_train_batch_size=2)),
    "rloo-iterations": ("rloo", dict(ROUNDS, num_iterations=2)),
    "rloo-spg": ("rloo", dict(ROUNDS, steps_per_generation=2, per_device_train_batch_size=2)),
}
# TR-DPO's reference sync: the reference mixed with the policy at steps 2 and 4, so checkpoint-2 holds a synced one.
REF_SYNC = dict(sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=0.6)
VARIANTS = {**ROUND_VARIANTS, "dpo-ref-sync": ("dpo", REF_SYNC), "grpo-ref-sync": ("grpo", REF_SYNC)}


def make_trainer(run: str, model_dir: str, tokenizer, out: str, callbacks=None, trainer_kwargs=None,
                 **overrides: Any):
    """The trainer of `run` (a METHODS key or a VARIANTS key) writing to `out`; `overrides` go to its config,
    `trainer_kwargs` to the trainer."""
    method, variant = VARIANTS.get(run, (run, {}))
    trainer_class, config_class, fields, data, extra = METHODS[method]
    args = config_class(output_dir=out, **{**COMMON, **fields, **variant, **overrides})
    trainer = trainer_class(model_dir, args=args, train_dataset=data(), processing_class=tokenizer,
                            callbacks=callbacks, **{**extra, **(trainer_kwargs or {})})
    trainer.remove_callback(RunReportCallback)  # its plots cost seconds a run and are not what is tested here
    return trainer


def kill_step(run: str) -> int:
    """The step after which the killed run dies: one step past its last checkpoint."""
    method, variant = VARIANTS.get(run, (run, {}))
    return {**COMMON, **variant}["save_steps"] + 1


def assert_equal_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Bitwise: the same ops on the same numbers in the same order in one process give the same bits."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    differ = [name for name in sa if not torch.equal(sa[name], sb[name])]
    assert not differ, f"{len(differ)} of {len(sa)} tensors differ, e.g. {differ[:3]}"


# ----- the transformers.Trainer based methods -----------------------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(tiny_decoder_dir, tokenizer_dir, tmp_path_factory):
    """The uninterrupted run of each method or variant, trained once for the module."""
    from transformers import AutoTokenizer

    runs = {}

    def get(run: str):
        if run not in runs:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
            trainer = make_trainer(run, tiny_decoder_dir, tokenizer, str(tmp_path_factory.mktemp(run)))
            trainer.train()
            runs[run] = trainer
        return runs[run]

    return get


def assert_resumed_like_uninterrupted(resumed, full) -> None:
    assert resumed.state.global_step == full.state.global_step == full.args.max_steps
    assert_equal_weights(resumed.model, full.model)
    # The steps after the checkpoint saw the same batches (and completions) and dropout masks: the same losses.
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (resumed, full)]
    assert losses[0] == losses[1]


KILL_RUNS = ["reward", "kto", "orpo", "cpo", "grpo", "rloo", *ROUND_VARIANTS]
# The reference a sync changed is not in the checkpoint yet: the resumed run restarts from the original reference.
@pytest.mark.parametrize("run", [*KILL_RUNS, "dpo-ref-sync", "grpo-ref-sync"])
def test_killed_between_checkpoints_resumes_to_the_uninterrupted_weights(run, uninterrupted, tiny_decoder_dir,
                                                                         tokenizer, tmp_path):
    out, step = str(tmp_path / "run"), kill_step(run)
    with pytest.raises(Killed):
        make_trainer(run, tiny_decoder_dir, tokenizer, out, [KillAfterStep(step)]).train()
    checkpoint = os.path.join(out, f"checkpoint-{step - 1}")
    assert latest_checkpoint(out) == checkpoint  # the step after it was lost
    # A checkpoint inside a round of generation holds the round (each process its own); one at a round's start not.
    assert os.path.isfile(os.path.join(checkpoint, ROUND_FILE.format(0))) == (run in ROUND_VARIANTS)

    resumed = make_trainer(run, tiny_decoder_dir, tokenizer, out)
    resumed.train(resume_from_checkpoint=True)
    assert_resumed_like_uninterrupted(resumed, uninterrupted(run))


def test_resuming_inside_a_round_without_its_completions_warns(uninterrupted, tiny_decoder_dir, tokenizer, tmp_path):
    """A checkpoint inside a round that lacks the round (written before rounds were saved, or by TRL): the rest of
    the round is sampled anew, with a warning, and the run then differs from the uninterrupted one."""
    out, step = str(tmp_path / "run"), kill_step("grpo-iterations")
    with pytest.raises(Killed):
        make_trainer("grpo-iterations", tiny_decoder_dir, tokenizer, out, [KillAfterStep(step)]).train()
    os.remove(os.path.join(out, f"checkpoint-{step - 1}", ROUND_FILE.format(0)))
    resumed = make_trainer("grpo-iterations", tiny_decoder_dir, tokenizer, out)
    with pytest.warns(UserWarning, match=f"Resuming at optimizer step {step - 1}, inside a round of generation"):
        resumed.train(resume_from_checkpoint=True)
    full = uninterrupted("grpo-iterations").model.state_dict()
    assert any(not torch.equal(value, full[name]) for name, value in resumed.model.state_dict().items())


SLOW = pytest.mark.slow


@pytest.mark.parametrize("run", ["grpo-iterations", *(pytest.param(r, marks=SLOW) for r in KILL_RUNS
                                                      if r != "grpo-iterations"), pytest.param("dpo", marks=SLOW)])
def test_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(run, uninterrupted, tiny_decoder_dir,
                                                                          tokenizer, tmp_path, monkeypatch):
    """Killed inside the second checkpoint's write, after its weights and optimizer (in the save of the random
    state): only a .partial folder is left, and the run resumes from the first checkpoint."""
    out = tmp_path / "run"
    first = kill_step(run) - 1
    trainer = make_trainer(run, tiny_decoder_dir, tokenizer, str(out))
    save_rng_state = trainer._save_rng_state

    def dies_at_the_second_checkpoint(output_dir: str) -> None:
        if trainer.state.global_step > first:
            raise Killed("killed while saving")
        save_rng_state(output_dir)

    monkeypatch.setattr(trainer, "_save_rng_state", dies_at_the_second_checkpoint)
    with pytest.raises(Killed):
        trainer.train()
    second = min(2 * first, trainer.args.max_steps)
    assert (out / f"checkpoint-{second}.partial" / f"checkpoint-{second}" / "optimizer.pt").is_file()  # half-written
    assert latest_checkpoint(str(out)) == str(out / f"checkpoint-{first}")

    resumed = make_trainer(run, tiny_decoder_dir, tokenizer, str(out))
    resumed.train(resume_from_checkpoint=True)
    assert_resumed_like_uninterrupted(resumed, uninterrupted(run))
    assert not any(p.name.endswith(".partial") for p in out.iterdir())



@pytest.mark.slow
def test_round_resume_with_two_processes(tiny_decoder_dir, tmp_path):
    """Under `accelerate launch` with 2 processes, each process saves and restores its own round: the resumed run
    scores the same completions after the checkpoint and ends with the uninterrupted run's weights."""
    run_two_processes("grpo_resume_two_process.py", tiny_decoder_dir, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["processes"] == 2 and rank["saved_round"]
        # Rounds are generated at steps 1, 3 and 5: the resumed run (from step 3) generates only step 5's.
        assert len(rank["resumed"]) == 1 and rank["resumed"] == rank["full"]
        assert rank["resumed_checksum"] == rank["full_checksum"]
    assert ranks[0]["resumed"] != ranks[1]["resumed"]  # the processes did sample different completions

# ----- PPO ----------------------------------------------------------------------------------------------------
PPO_PROMPTS = ["this movie", "the plot", "the film", "the acting", "i think", "overall"]


def ppo_trainer(model_dir: str, tokenizer, out: str, dataset: Dataset | None = None, ptx_dataset: Any = None,
                critic: Any = None, reward: Callable = noisy_length_reward, **fields: Any) -> PPOTrainer:
    """6 prompts, 2 per step: 3 steps an epoch; 2 mini-batches and 2 PPO epochs draw mini-batch orders; `fields`
    go to PPOConfig. The model is built here, before the trainer, as a script does (its fresh value head is drawn
    from PPOConfig.seed)."""
    config = PPOConfig(**{**dict(batch_size=2, mini_batch_size=1, ppo_epochs=2, learning_rate=1e-3, total_steps=4,
                                 max_new_tokens=5, save_steps=2, output_dir=out, seed=5), **fields})
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir, **DROPOUT)
    dataset = Dataset.from_dict({"prompt": PPO_PROMPTS}) if dataset is None else dataset
    return PPOTrainer(config, model, None, tokenizer, dataset=dataset, reward_funcs=reward,
                      ptx_dataset=ptx_dataset, critic=critic)


PTX = {"text": ["the film was good.", "a plot with holes.", "great acting overall."]}


def full_ppo_trainer(model_dir: str, tokenizer, out: str, reward: Callable = noisy_length_reward) -> PPOTrainer:
    """PPO with what a checkpoint must carry besides test_resume.py's run: a separate critic (its weights are in
    the same optimizer), PPO-ptx batches, and use_score_scaling's running score statistics."""
    return ppo_trainer(model_dir, tokenizer, out, ptx_dataset=Dataset.from_dict(PTX), critic=model_dir,
                       reward=reward, ptx_coef=0.5, use_score_scaling=True, use_score_norm=True)


class KilledAtRollout:
    """The noisy length reward, dying when scoring rollout `kill_at` (its PPO step): after the steps before it."""

    def __init__(self, kill_at: int) -> None:
        self.kill_at, self.calls, self.__name__ = kill_at, 0, "killed_at_rollout"

    def __call__(self, completions: list[str], **_: Any) -> list[float]:
        self.calls += 1
        if self.calls == self.kill_at:
            raise Killed(f"killed at rollout {self.kill_at}")
        return noisy_length_reward(completions)


@pytest.fixture(scope="module")
def uninterrupted_ppo(tiny_decoder_dir, tokenizer_dir, tmp_path_factory) -> PPOTrainer:
    from transformers import AutoTokenizer

    trainer = full_ppo_trainer(tiny_decoder_dir, AutoTokenizer.from_pretrained(tokenizer_dir),
                               str(tmp_path_factory.mktemp("ppo")))
    trainer.train()
    return trainer


def assert_ppo_resumed_like_uninterrupted(resumed: PPOTrainer, full: PPOTrainer) -> None:
    assert resumed.current_step == full.current_step == 4
    assert_equal_weights(torch.nn.ModuleList([resumed.model, resumed.critic]),
                         torch.nn.ModuleList([full.model, full.critic]))
    assert vars(resumed.running) == vars(full.running) | {"accelerator": resumed.running.accelerator}
    assert resumed.kl_ctl.value == full.kl_ctl.value


def test_ppo_killed_between_checkpoints_resumes_to_the_uninterrupted_weights(uninterrupted_ppo, tiny_decoder_dir,
                                                                             tokenizer, tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(Killed):  # steps 1-3 done (checkpoint-2 written), killed while scoring step 4
        full_ppo_trainer(tiny_decoder_dir, tokenizer, out, reward=KilledAtRollout(4)).train()
    assert latest_checkpoint(out) == os.path.join(out, "checkpoint-2")
    resumed = full_ppo_trainer(tiny_decoder_dir, tokenizer, out)
    resumed.train(resume_from_checkpoint=True)
    assert_ppo_resumed_like_uninterrupted(resumed, uninterrupted_ppo)


def test_ppo_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(uninterrupted_ppo, tiny_decoder_dir,
                                                                             tokenizer, tmp_path, monkeypatch):
    """Killed while writing checkpoint-4, after its weights, before its optimizer state."""
    out = tmp_path / "run"
    trainer = full_ppo_trainer(tiny_decoder_dir, tokenizer, str(out))
    save = torch.save

    def dies_saving_the_optimizer_at_step_4(obj: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        if str(path).endswith("trainer_state.pt") and trainer.current_step == 4:
            raise Killed("killed while saving")
        save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dies_saving_the_optimizer_at_step_4)
    with pytest.raises(Killed):
        trainer.train()
    monkeypatch.undo()
    assert (out / "checkpoint-4.partial" / "model.safetensors").is_file()  # half-written
    assert not (out / "checkpoint-4.partial" / "trainer_state.pt").exists()
    assert latest_checkpoint(str(out)) == str(out / "checkpoint-2")

    resumed = full_ppo_trainer(tiny_decoder_dir, tokenizer, str(out))
    resumed.train(resume_from_checkpoint=True)
    assert_ppo_resumed_like_uninterrupted(resumed, uninterrupted_ppo)
    assert (out / "checkpoint-4" / "trainer_state.pt").is_file() and not (out / "checkpoint-4.partial").exists()
