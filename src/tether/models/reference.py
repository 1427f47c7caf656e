"""Reference models: the frozen anchor a policy is tethered to.

Three forms: an explicit frozen model; a frozen copy of the policy (`create_reference_model`); or, for a
PEFT policy, the same model with its adapter disabled (`reference_mode`), which holds no second copy.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

from torch import nn

from .loading import is_peft_model


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def create_reference_model(model: nn.Module) -> nn.Module:
    """A frozen deep copy of `model` in eval mode."""
    return freeze(copy.deepcopy(model))


@contextlib.contextmanager
def reference_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `model` computes as its reference: a PEFT model with adapters disabled.

    Unwraps DDP-style wrappers to reach the PEFT model; raises if there is no adapter to disable.
    """
    inner = model
    while not is_peft_model(inner) and hasattr(inner, "module"):
        inner = inner.module
    if not is_peft_model(inner):
        raise ValueError("reference_mode needs a PEFT model: without an adapter there is no base to fall back to.")
    with inner.disable_adapter():
        yield model
