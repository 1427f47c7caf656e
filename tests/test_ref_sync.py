"""TR-DPO's reference sync (sync_ref_model): ref <- alpha * policy + (1 - alpha) * ref every
ref_model_sync_steps optimizer steps, checked against that formula written here; and the errors before
training where there is no separate reference to move."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from torch import nn
from transformers import TrainerCallback

from tether import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer
from tether.trainers.ref_sync import ReferenceSyncCallback, mix_into_reference


def common(tmp_path, **overrides) -> dict:
    values = dict(output_dir=str(tmp_path), report_to="none", save_strategy="no", disable_tqdm=True,
                  dataloader_pin_memory=False, seed=0, logging_steps=1)
    return {**values, **overrides}


PAIRS = [{"prompt": "the capital of france is", "chosen": " paris.", "rejected": " four."},
         {"prompt": "two plus two is", "chosen": " four.", "rejected": " paris."},
         {"prompt": "hello", "chosen": " world", "rejected": " four."},
         {"prompt": "question:", "chosen": " answer:", "rejected": " hello"}]


# ----- the update on two small modules --------------------------------------------------------------------
def two_modules() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    policy = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    reference = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    return policy, reference


def test_mix_into_reference_is_the_tr_dpo_soft_update():
    policy, reference = two_modules()
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    mix_into_reference(policy, reference, alpha=0.25)
    for name, value in reference.state_dict().items():
        expected = 0.25 * policy.state_dict()[name] + 0.75 * before[name]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-7)
        assert not torch.equal(value, before[name])
    # alpha = 1: the hard update (a copy of the policy); the policy itself never moves
    mix_into_reference(policy, reference, alpha=1.0)
    for name, value in reference.state_dict().items():
        assert torch.equal(value, policy.state_dict()[name])


def test_mix_into_reference_needs_matching_parameters():
    policy, _ = two_modules()
    with pytest.raises(ValueError, match="same architecture"):
        mix_into_reference(policy, nn.Sequential(nn.Linear(3, 4)), alpha=0.5)


def test_callback_updates_every_sync_steps_only():
    policy, reference = two_modules()
    start = copy.deepcopy(reference)
    trainer = SimpleNamespace(ref_model=reference, model=policy, accelerator=SimpleNamespace(unwrap_model=lambda m: m))
    callback = ReferenceSyncCallback(trainer)
    args = SimpleNamespace(ref_model_sync_steps=3, ref_model_mixup_alpha=0.5)
    for step in (1, 2):
        callback.on_step_end(args, SimpleNamespace(global_step=step), None, model=policy)
    assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), start.parameters()))
    callback.on_step_end(args, SimpleNamespace(global_step=3), None, model=policy)
    for ref, old, new in zip(reference.parameters(), start.parameters(), policy.parameters()):
        torch.testing.assert_close(ref, 0.5 * new + 0.5 * old, rtol=0, atol=1e-7)


# ----- DPOTrainer, as a TRL user writes it ------------------------------------------------------------------
class PolicySnapshots(TrainerCallback):
    """The policy's weights after each optimizer step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append({k: v.detach().clone() for k, v in model.named_parameters()})


def test_dpo_reference_follows_the_policy_by_the_formula(tmp_path, tiny_decoder_dir):
    alpha = 0.3
    trainer = DPOTrainer(model=tiny_decoder_dir, train_dataset=Dataset.from_list(PAIRS), args=DPOConfig(**common(
        tmp_path, per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2, sync_ref_model=True,
        ref_model_mixup_alpha=alpha, ref_model_sync_steps=1)))
    expected = {k: v.detach().clone() for k, v in trainer.ref_model.named_parameters()}
    assert all(torch.equal(v, dict(trainer.model.named_parameters())[k]) for k, v in expected.items())
    snapshots = PolicySnapshots()
    trainer.add_callback(snapshots)
    trainer.train()
    assert len(snapshots.steps) == 2
    for policy in snapshots.steps:  # one update after each step (ref_model_sync_steps=1)
        expected = {k: alpha * policy[k] + (1 - alpha) * v for k, v in expected.items()}
    reference = dict(trainer.ref_model.named_parameters())
    for name, value in expected.items():
        torch.testing.assert_close(reference[name], value, rtol=0, atol=1e-6)
    moved = [k for k, v in snapshots.steps[-1].items() if not torch.allclose(reference[k], v)]
    assert moved, "the reference should lag behind the policy, not equal it"


def test_dpo_sync_errors_before_training(tmp_path, tiny_decoder_dir):
    data = Dataset.from_list(PAIRS)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match="PEFT"):
        DPOTrainer(model=tiny_decoder_dir, train_dataset=data, peft_config=lora,
                   args=DPOConfig(**common(tmp_path, sync_ref_model=True)))
    with pytest.raises(ValueError, match="precompute_ref_log_probs"):
        DPOTrainer(model=tiny_decoder_dir, train_dataset=data,
                   args=DPOConfig(**common(tmp_path, sync_ref_model=True, precompute_ref_log_probs=True)))
    with pytest.raises(ValueError, match="ref_model_mixup_alpha"):
        DPOTrainer(model=tiny_decoder_dir, train_dataset=data,
                   args=DPOConfig(**common(tmp_path, sync_ref_model=True, ref_model_mixup_alpha=1.5)))


def test_grpo_sync_without_reference_errors_before_the_first_step(tmp_path, tiny_decoder_dir):
    prompts = Dataset.from_list([{"prompt": p["prompt"]} for p in PAIRS])
    trainer = GRPOTrainer(model=tiny_decoder_dir, reward_funcs=lambda completions, **_: [0.0] * len(completions),
                          train_dataset=prompts, args=GRPOConfig(**common(
                              tmp_path, beta=0.0, sync_ref_model=True, per_device_train_batch_size=4,
                              num_generations=2, max_completion_length=4, max_steps=1)))
    with pytest.raises(ValueError, match="no separate reference"):
        trainer.train()
    assert trainer.state.global_step == 0
