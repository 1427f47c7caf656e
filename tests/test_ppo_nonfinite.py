"""PPOTrainer's own loop (issue 13, item 1): an optimizer step whose gradients are not finite never reaches the
weights (policy, value head, separate critic) nor the optimizer's state; it is counted in the step's stats as
`nonfinite/skipped_steps` (cumulative); more than `max_nonfinite_steps` in a row stop training with
NonFiniteTrainingError; and non-finite weights are never saved, by a checkpoint, the final save or
save_pretrained."""

from __future__ import annotations

import os

import pytest
import torch
from datasets import Dataset

from test_ppo import make_queries, make_responses, scores_for, snapshot, value_model
from tether import PPOConfig, PPOTrainer
from tether.reports.runfiles import read_jsonl
from tether.trainers.finite_guard import NonFiniteTrainingError

NAN = float("nan")


def trainer_for_steps(model_dir: str, tokenizer, **fields) -> PPOTrainer:
    # 2 samples, one mini-batch, one PPO epoch: one optimizer step per step().
    config = PPOConfig(batch_size=2, mini_batch_size=2, ppo_epochs=1, learning_rate=1e-2, seed=0, **fields)
    return PPOTrainer(config, value_model(model_dir), None, tokenizer)


def step(trainer: PPOTrainer, tokenizer, scores=None) -> dict:
    return trainer.step(make_queries(tokenizer, 2), make_responses(2), scores or scores_for(2))


def assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(model)
    assert all(torch.equal(after[name], before[name]) for name in before)


def test_a_nan_gradient_is_skipped_counted_and_too_many_in_a_row_stop(tiny_decoder_dir, tokenizer):
    trainer = trainer_for_steps(tiny_decoder_dir, tokenizer, max_nonfinite_steps=1)
    model = trainer.accelerator.unwrap_model(trainer.model)
    # A backward hook turning one tensor's gradient NaN, as an overflow in the backward pass would.
    poison = model.pretrained_model.model.layers[0].mlp.up_proj.weight.register_hook(lambda g: g * NAN)
    before = snapshot(model)
    with pytest.warns(RuntimeWarning, match="Optimizer step 1: non-finite loss or gradients; the step was skipped"):
        stats = step(trainer, tokenizer)
    assert_unchanged(model, before)  # every weight, value head included: the whole step is skipped
    assert trainer.optimizer.state_dict()["state"] == {}  # Adam's moments were not touched either
    assert stats["nonfinite/skipped_steps"] == 1
    assert trainer.current_step == 1  # the PPO step itself completed (stats, KL controller)

    poison.remove()
    stats = step(trainer, tokenizer)
    assert stats["nonfinite/skipped_steps"] == 1  # cumulative: no new skip
    assert not all(torch.equal(value, before[name]) for name, value in snapshot(model).items())

    poison = model.pretrained_model.model.layers[0].mlp.up_proj.weight.register_hook(lambda g: g * NAN)
    with pytest.warns(RuntimeWarning):
        assert step(trainer, tokenizer)["nonfinite/skipped_steps"] == 2  # one in a row: still allowed
    trained = snapshot(model)
    with pytest.raises(NonFiniteTrainingError, match="Optimizer step 4: the gradients have not been finite for 2 "
                                                     "steps in a row"):
        step(trainer, tokenizer)
    assert_unchanged(model, trained)


def test_a_huge_reward_overflowing_the_value_loss_leaves_the_weights_and_is_logged(tiny_decoder_dir, tokenizer,
                                                                                   tmp_path):
    """train(): a reward function returning 3e38 at step 2 (finite, so accepted) makes the squared value error
    overflow to inf: step 2's optimizer steps are skipped, the others train, metrics.jsonl counts the skips."""
    calls = []

    def reward(completions, **_):
        calls.append(1)
        return [3e38 if len(calls) == 2 else float(len(c)) for c in completions]

    config = PPOConfig(batch_size=2, mini_batch_size=1, ppo_epochs=2, learning_rate=1e-3, total_steps=3,
                       max_new_tokens=4, output_dir=str(tmp_path), seed=0, max_nonfinite_steps=4)
    trainer = PPOTrainer(config, value_model(tiny_decoder_dir), None, tokenizer,
                         dataset=Dataset.from_dict({"prompt": ["the film", "the plot", "i think", "overall"]}),
                         reward_funcs=reward)
    weights, step_of = [], trainer.step

    def step_and_keep(*args, **kwargs):
        stats = step_of(*args, **kwargs)
        weights.append(snapshot(trainer.model))
        return stats

    trainer.step = step_and_keep
    with pytest.warns(RuntimeWarning, match="non-finite loss or gradients"):
        trainer.train()
    rows = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
    assert [r["nonfinite/skipped_steps"] for r in rows] == [0, 4, 4]  # 2 epochs x 2 mini-batches at step 2
    assert all(torch.equal(weights[1][name], weights[0][name]) for name in weights[0])
    assert not all(torch.equal(weights[2][name], weights[1][name]) for name in weights[0])
    assert all(torch.isfinite(value).all() for value in weights[2].values())


def test_non_finite_weights_are_never_saved(tiny_decoder_dir, tokenizer, tmp_path):
    """save_pretrained, a train() checkpoint and the final save refuse NaN weights before writing anything."""
    trainer = trainer_for_steps(tiny_decoder_dir, tokenizer)
    model = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():
        model.v_head.summary.bias.fill_(NAN)
    with pytest.raises(NonFiniteTrainingError, match="parameter 'v_head.summary.bias' holds NaN"):
        trainer.save_pretrained(str(tmp_path / "final"))
    assert not (tmp_path / "final").exists()

    # In train(): weights broken at step 2 (by a reward function, standing for anything outside the optimizer).
    def breaking_reward(completions, **_):
        if trainer.current_step == 1:
            with torch.no_grad():
                model.pretrained_model.lm_head.weight[0, 0] = float("inf")
        return [float(len(c)) for c in completions]

    trainer = PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2, ppo_epochs=1, total_steps=3, save_steps=1,
                                   max_new_tokens=3, output_dir=str(tmp_path / "run"), seed=0),
                         value_model(tiny_decoder_dir), None, tokenizer,
                         dataset=Dataset.from_dict({"prompt": ["the film", "the plot"]}), reward_funcs=breaking_reward)
    model = trainer.accelerator.unwrap_model(trainer.model)
    with pytest.raises(NonFiniteTrainingError, match=r"Not saving .*checkpoint-2: parameter "
                                                     r"'pretrained_model.lm_head.weight'"), pytest.warns(RuntimeWarning):
        trainer.train()
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint-1", "metrics.jsonl", "samples.jsonl"]
