"""TR-DPO's reference-model update (Gorbatovski et al., 2024, "Learn Your Reference Model for Real Good
Alignment", eq. 7, soft update): every `ref_model_sync_steps` optimizer steps the reference becomes

    ref <- alpha * policy + (1 - alpha) * ref          (alpha = ref_model_mixup_alpha)

alpha = 1 is the hard update (the reference becomes a copy of the policy). The config fields, named as in
TRL, for the methods that keep a reference model (DPO, KTO, GRPO, RLOO), and the callback that applies the
update; `TetherTrainer` adds the callback when `sync_ref_model=True`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ..models.loading import is_peft_model

REFERENCE_FILE = "ref_model.safetensors"  # in a checkpoint of a sync_ref_model run: the reference as it was


@dataclass
class ReferenceSyncFields:
    """Fields of the configs whose method keeps a reference model (DPO, KTO, GRPO, RLOO), named as in TRL."""

    sync_ref_model: bool = field(default=False, metadata={
        "help": "Move the reference model towards the policy every ref_model_sync_steps steps (TR-DPO)."})
    ref_model_mixup_alpha: float = field(default=0.6, metadata={
        "help": "Weight of the policy in that update: ref = alpha * policy + (1 - alpha) * ref."})
    ref_model_sync_steps: int = field(default=512, metadata={
        "help": "Optimizer steps between two reference updates."})


def check_sync_config(args: Any, policy: nn.Module) -> None:
    """Before training: the reasons TR-DPO cannot run that the config and the policy already tell (a PEFT
    policy, whose reference is itself with the adapter off; reference log-probs computed once, up front) and
    out-of-range values. A ValueError naming the field and the fix."""
    if not 0.0 <= args.ref_model_mixup_alpha <= 1.0:
        raise ValueError(f"ref_model_mixup_alpha={args.ref_model_mixup_alpha}: it is the policy's weight in "
                         "ref = alpha * policy + (1 - alpha) * ref, so it lies in [0, 1].")
    if args.ref_model_sync_steps < 1:
        raise ValueError(f"ref_model_sync_steps={args.ref_model_sync_steps}: it counts optimizer steps between "
                         "updates of the reference, so it is at least 1.")
    if _peft_policy(policy):
        raise ValueError("sync_ref_model=True with a PEFT policy: its reference is the same model with the adapter "
                         "disabled, so there is no separate reference to update. Fix: set sync_ref_model=False, or "
                         "train without peft_config (full fine-tuning keeps a reference copy).")
    if getattr(args, "precompute_ref_log_probs", False):
        raise ValueError("sync_ref_model=True with precompute_ref_log_probs=True: the reference log-probs would be "
                         "computed once, from a reference that then moves. Fix: set one of them to False.")


def _peft_policy(model: nn.Module) -> bool:
    inner = model
    while not is_peft_model(inner) and isinstance(getattr(inner, "module", None), nn.Module):
        inner = inner.module  # DDP / DeepSpeed wrappers
    return is_peft_model(inner)


@torch.no_grad()
def mix_into_reference(policy: nn.Module, reference: nn.Module, alpha: float) -> None:
    """reference <- alpha * policy + (1 - alpha) * reference, parameter by parameter, matched by name.

    Both are the plain models (unwrapped). A parameter the two share (layers `create_reference_model` shared)
    is left alone: it already equals itself. Under DeepSpeed ZeRO-3 both are gathered, updated on rank 0 and
    partitioned again.
    """
    policy_params = dict(policy.named_parameters())
    reference_params = dict(reference.named_parameters())
    if policy_params.keys() != reference_params.keys():
        missing = sorted(policy_params.keys() ^ reference_params.keys())[:3]
        raise ValueError(f"sync_ref_model=True needs a reference with the policy's parameters; they differ at "
                         f"{missing}. Fix: let the trainer copy the policy (ref_model=None), or pass a ref_model of "
                         "the same architecture.")
    pairs = [(reference_params[name], policy_params[name]) for name in policy_params
             if reference_params[name] is not policy_params[name]]
    with _gathered([p for pair in pairs for p in pair]) as writer:
        if writer:
            for ref, new in pairs:
                ref.mul_(1.0 - alpha).add_(new.to(ref.dtype), alpha=alpha)


@contextlib.contextmanager
def _gathered(params: list[nn.Parameter]) -> Iterator[bool]:
    """Yields whether this process writes; under ZeRO-3 the parameters are whole within the block (rank 0
    writes, and its result is partitioned to every rank at exit)."""
    if not any(hasattr(p, "ds_id") for p in params):
        yield True
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        yield deepspeed.comm.get_rank() == 0


class ReferenceSyncCallback(TrainerCallback):
    """Applies `mix_into_reference` every `ref_model_sync_steps` optimizer steps. The trainer's `ref_model` is
    looked up each time (subclasses set it after the base constructor, and model_init may replace it)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def _reference(self) -> nn.Module:
        reference = getattr(self.trainer, "ref_model", None)
        if reference is None:
            raise ValueError(f"sync_ref_model=True, but {type(self.trainer).__name__} has no separate reference model "
                             "here (beta=0, reference_free=True, a reference adapter, or log-probs computed up "
                             "front), so there is nothing to update. Fix: set sync_ref_model=False.")
        return reference

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._reference()  # fail before the first step, not at the first sync

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        if state.global_step % args.ref_model_sync_steps != 0:
            return
        accelerator = self.trainer.accelerator
        policy = accelerator.unwrap_model(model if model is not None else self.trainer.model)
        reference = accelerator.unwrap_model(self._reference())
        mix_into_reference(policy, reference, args.ref_model_mixup_alpha)


def save_synced_reference(trainer: Any, folder: str) -> None:
    """Into a checkpoint being written: the reference of a sync_ref_model run, which has moved away from the model
    it was loaded from, so that a resumed run continues from it (not from the original reference)."""
    reference = getattr(trainer, "ref_model", None)
    if not getattr(trainer.args, "sync_ref_model", False) or reference is None or not trainer.args.should_save:
        return
    from safetensors.torch import save_model

    save_model(trainer.accelerator.unwrap_model(reference), os.path.join(folder, REFERENCE_FILE))  # tied weights ok


def load_synced_reference(trainer: Any, checkpoint: str) -> None:
    """On resume: the reference `save_synced_reference` kept, or a warning when the checkpoint has none."""
    reference = getattr(trainer, "ref_model", None)
    if not getattr(trainer.args, "sync_ref_model", False) or reference is None:
        return
    path = os.path.join(checkpoint, REFERENCE_FILE)
    if not os.path.isfile(path):
        warnings.warn(f"Resuming a sync_ref_model run from {checkpoint}, which holds no {REFERENCE_FILE}: the "
                      "reference restarts from the model it was loaded from, so the resumed run differs from the "
                      "interrupted one.", UserWarning, stacklevel=3)
        return
    from safetensors.torch import load_model

    load_model(trainer.accelerator.unwrap_model(reference), path, device=str(trainer.accelerator.device))
