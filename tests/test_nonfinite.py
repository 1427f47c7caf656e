"""A non-finite loss or gradient never reaches the weights; non-finite weights are never saved (issue 13, item 1)."""

from __future__ import annotations

import os

import pytest
import torch
from datasets import Dataset

from tether import SFTConfig, SFTTrainer
from tether.trainers.finite_guard import NonFiniteTrainingError, all_finite


class PoisonedSFT(SFTTrainer):
    """SFT whose loss is NaN at the given optimizer steps (1-based), as an overflow or a bad row would make it."""

    poisoned_steps: set[int] = set()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.state.global_step + 1 in self.poisoned_steps:
            loss = loss * float("nan")
        return loss




def build(tmp_path, tiny_decoder_dir, poisoned, **options):
    PoisonedSFT.poisoned_steps = set(poisoned)
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1,
                     report_to="none", save_strategy="no", disable_tqdm=True, seed=0, **options)
    rows = Dataset.from_list([{"text": f"the film number {i} was good"} for i in range(16)])
    return PoisonedSFT(tiny_decoder_dir, args=args, train_dataset=rows)


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_a_nonfinite_step_is_skipped_and_training_goes_on(tmp_path, tiny_decoder_dir):
    trainer = build(tmp_path, tiny_decoder_dir, poisoned={2}, max_steps=3)
    snapshots = []
    original_step = trainer.training_step

    def recording_step(*args, **kwargs):
        snapshots.append(weights(trainer.model))  # the weights before each step's forward
        return original_step(*args, **kwargs)

    trainer.training_step = recording_step
    with pytest.warns(RuntimeWarning, match="step 2: non-finite"):
        trainer.train()
    final = weights(trainer.model)
    assert all(torch.isfinite(p).all() for p in final.values())
    # step 2 (NaN) changed nothing: the weights entering step 3 are those that entered step 2
    assert all(torch.equal(snapshots[1][n], snapshots[2][n]) for n in final)
    assert not all(torch.equal(snapshots[0][n], snapshots[1][n]) for n in final)  # step 1 trained
    assert not all(torch.equal(snapshots[2][n], final[n]) for n in final)  # and step 3 too
    assert trainer.nonfinite_guard.skipped == 1
    logged = {h["step"]: h.get("nonfinite/skipped_steps") for h in trainer.state.log_history if "loss" in h}
    assert logged == {1: None, 2: 1, 3: 1}  # counted in the logs from the skipped step on


def test_too_many_nonfinite_steps_in_a_row_stop_training(tmp_path, tiny_decoder_dir):
    trainer = build(tmp_path, tiny_decoder_dir, poisoned={2, 3, 4}, max_steps=6, max_nonfinite_steps=2)
    with pytest.warns(RuntimeWarning), pytest.raises(NonFiniteTrainingError, match="step 4.*3 steps in a row"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_nonfinite_weights_are_never_saved(tmp_path, tiny_decoder_dir):
    trainer = build(tmp_path / "out", tiny_decoder_dir, poisoned=set(), max_steps=1)
    with torch.no_grad():
        next(trainer.model.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteTrainingError, match="Not saving"):
        trainer.save_model(str(tmp_path / "final"))
    assert not os.path.exists(tmp_path / "final" / "model.safetensors")


def test_all_finite_against_the_element_wise_check():
    """One summing pass decides the common case; values whose sum overflows (finite themselves) are still
    finite, and a single inf or NaN anywhere is found, against torch.isfinite element by element."""
    cases = [
        [torch.randn(5, 3), torch.randn(4)],
        [torch.randn(5, 3), torch.tensor([1.0, float("inf"), 2.0])],
        [torch.tensor([float("nan")]), torch.randn(4)],
        [torch.tensor([float("inf"), float("-inf")])],  # the sum is NaN
        [torch.full((4,), 60000.0, dtype=torch.float16)],  # finite, but the float16 sum overflows
        [torch.full((3,), 3e38)],  # the same in float32
        [],
    ]
    for tensors in cases:
        want = all(bool(torch.isfinite(t).all()) for t in tensors)
        assert all_finite(tensors) == want, tensors
    assert not all_finite([torch.tensor([1.0, float("inf")])]) and all_finite([torch.full((3,), 3e38)])
