"""GRPO's adaptive entropy coefficient (use_adaptive_entropy) survives a checkpoint: a run killed after a
checkpoint and resumed by a NEW trainer ends with the coefficient and the weights of an uninterrupted run.

With entropy_target above any entropy the tiny model has, the coefficient rises by entropy_coef_delta at
every optimizer step: after 4 steps it is entropy_coef + 4 * delta. A resumed run that restarted it would end
at entropy_coef + 2 * delta (2 steps after the checkpoint) and, since the bonus is applied only once an
entropy has been measured, would also skip the bonus in its first step, so its weights would differ too.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from datasets import Dataset

from test_resume import KillAfterStep, Killed
from tether import GRPOConfig, GRPOTrainer
from tether.reports.callback import RunReportCallback
from tether.trainers.checkpoints import latest_checkpoint

COEF, DELTA, STEPS = 0.01, 0.02, 4


def length_reward(completion_ids, **_):
    return [float(len(c)) for c in completion_ids]


def make_trainer(model_dir: str, tokenizer, out: str, callbacks=None) -> GRPOTrainer:
    args = GRPOConfig(output_dir=out, max_steps=STEPS, save_steps=2, per_device_train_batch_size=4,
                      num_generations=2, max_completion_length=6, learning_rate=1e-2, logging_steps=1,
                      report_to=[], use_cpu=True, seed=0, disable_tqdm=True, use_adaptive_entropy=True,
                      entropy_coef=COEF, entropy_coef_delta=DELTA, entropy_target=100.0)
    prompts = Dataset.from_dict({"prompt": [f"the film number {i}" for i in range(8)]})
    trainer = GRPOTrainer(model_dir, reward_funcs=length_reward, args=args, train_dataset=prompts,
                          processing_class=tokenizer, callbacks=callbacks)
    trainer.remove_callback(RunReportCallback)  # its plots cost seconds and are not what is tested here
    return trainer


def test_adaptive_entropy_coefficient_resumes_from_the_checkpoint(tiny_decoder_dir, tokenizer, tmp_path):
    full = make_trainer(tiny_decoder_dir, tokenizer, str(tmp_path / "full"))
    full.train()
    assert full.entropy_control.coef == pytest.approx(COEF + STEPS * DELTA)

    out = str(tmp_path / "run")
    with pytest.raises(Killed):
        make_trainer(tiny_decoder_dir, tokenizer, out, [KillAfterStep(3)]).train()
    checkpoint = latest_checkpoint(out)
    assert checkpoint == os.path.join(out, "checkpoint-2")
    with open(os.path.join(checkpoint, "entropy_ctrl_state.json")) as f:  # TRL's file and keys
        saved = json.load(f)
    assert saved["entropy_coef"] == pytest.approx(COEF + 2 * DELTA) and saved["last_world_entropy"] < 100.0

    resumed = make_trainer(tiny_decoder_dir, tokenizer, out)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == STEPS
    assert resumed.entropy_control.coef == pytest.approx(full.entropy_control.coef)
    assert resumed.entropy_control.last_entropy == pytest.approx(full.entropy_control.last_entropy, rel=1e-5)
    for (name, a), b in zip(resumed.model.state_dict().items(), full.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    # The coefficient in force at each of the steps after the checkpoint, as logged.
    logged = [[row["entropy_coef"] for row in t.state.log_history if "entropy_coef" in row] for t in (resumed, full)]
    assert logged[0][-2:] == pytest.approx(logged[1][-2:])


def test_resuming_a_checkpoint_without_the_state_warns(tiny_decoder_dir, tokenizer, tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(Killed):
        make_trainer(tiny_decoder_dir, tokenizer, out, [KillAfterStep(3)]).train()
    os.remove(os.path.join(out, "checkpoint-2", "entropy_ctrl_state.json"))
    resumed = make_trainer(tiny_decoder_dir, tokenizer, out)
    with pytest.warns(UserWarning, match="entropy_ctrl_state.json"):
        resumed.train(resume_from_checkpoint=True)
    assert resumed.entropy_control.coef == pytest.approx(COEF + 2 * DELTA)  # restarted at step 2
