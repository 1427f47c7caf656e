"""A non-finite loss or gradient never reaches the weights, and non-finite weights are never saved.

Before each optimizer step (a step pre-hook on the torch optimizer, so it runs after gradient accumulation,
all-reduce and clipping), the gradients are checked: if any is NaN or infinite the step is skipped (every grad
is dropped, so the optimizer leaves the weights and its own state as they were), counted, and warned about; after
`limit` skipped steps in a row training stops with an error naming the step and the usual causes. Under data
parallelism every process sees the same all-reduced gradients, so they all skip the same step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn


class NonFiniteTrainingError(RuntimeError):
    """Training stopped because its loss or gradients, or the weights about to be saved, are not finite."""


LIKELY_CAUSES = ("a learning rate too high for the model, fp16 overflow (use bf16 or a loss scale), a sampling "
                 "temperature near 0, or a bad row in the data (e.g. an empty completion)")


class NonFiniteGuard:
    """Skips optimizer steps whose gradients are not finite; `limit` skipped in a row is an error. `step_of`
    gives the optimizer step being taken (for messages)."""

    def __init__(self, limit: int, step_of: Callable[[], int]) -> None:
        self.limit, self.step_of = limit, step_of
        self.skipped = 0  # steps skipped in this run
        self.in_a_row = 0

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Check the gradients before every step of `optimizer` (once, however often it is called)."""
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
        if isinstance(inner, torch.optim.Optimizer) and not getattr(inner, "_tether_finite_guard", False):
            inner.register_step_pre_hook(self._before_step)
            inner._tether_finite_guard = True

    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if all_finite([p.grad for p in params]):
            self.in_a_row = 0
            return
        for p in params:
            p.grad = None  # the optimizer skips parameters without a gradient: weights and moments stay
        self.skipped += 1
        self.in_a_row += 1
        step = self.step_of() + 1
        if self.in_a_row > self.limit:
            raise NonFiniteTrainingError(
                f"Optimizer step {step}: the gradients have not been finite for {self.in_a_row} steps in a row "
                f"(each was skipped; the weights are those of the last finite step). Likely causes: {LIKELY_CAUSES}.")
        warnings.warn(f"Optimizer step {step}: non-finite loss or gradients; the step was skipped (weights unchanged). "
                      f"{self.in_a_row} in a row; training stops after {self.limit}.", RuntimeWarning, stacklevel=2)


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite, with one device sync.

    One read of each tensor: a sum is finite whenever all its elements are (an inf or a NaN makes it inf or NaN).
    Only when a sum is not, which finite values past the dtype's range could also cause, does the element-wise
    check (five passes: isfinite is x == x and |x| != inf, then all) decide."""
    if not tensors:
        return True
    device = tensors[0].device
    sums = torch.stack([t.sum().to(device) for t in tensors])  # [k]
    if bool(torch.isfinite(sums).all()):
        return True
    return bool(torch.stack([torch.isfinite(t).all().to(device) for t in tensors]).all())


def check_finite_weights(model: nn.Module, where: str) -> None:
    """Raise NonFiniteTrainingError, naming the first bad parameter, if any weight of `model` is NaN or inf."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and param.numel() and not torch.isfinite(param.detach()).all():
            raise NonFiniteTrainingError(f"Not saving {where}: parameter {name!r} holds NaN or infinite values. "
                                         f"Likely causes: {LIKELY_CAUSES}.")
