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


# Where layer i's parameters live in common architectures; `{layer}` is its index.
LAYER_PATTERNS = ("model.layers.{layer}.", "transformer.h.{layer}.", "model.decoder.layers.{layer}.",
                  "gpt_neox.layers.{layer}.", "decoder.block.{layer}.")


def create_reference_model(model: nn.Module, num_shared_layers: int | None = None,
                           pattern: str | None = None) -> nn.Module:
    """A frozen copy of `model` in eval mode, for the KL penalty.

    With `num_shared_layers=N`, every parameter that comes before layer N (embeddings and layers
    0..N-1) is shared with `model` instead of copied, and frozen in both: a shared layer cannot move
    in the policy without moving the reference. `pattern` names layer parameters, e.g.
    "model.layers.{layer}." (found automatically for common architectures).
    """
    if is_peft_model(model) or is_peft_model(getattr(model, "pretrained_model", None)):
        raise ValueError("A PEFT model needs no reference copy: use it with its adapter disabled "
                         "(pass ref_model=None to the trainer).")
    reference = copy.deepcopy(model)
    if num_shared_layers is not None:
        names = [name for name, _ in model.named_parameters()]
        boundary = _first_parameter_of_layer(names, num_shared_layers, pattern)
        params = dict(model.named_parameters())
        for name in names[:boundary]:
            module_name, _, attribute = name.rpartition(".")
            shared = params[name]
            shared.requires_grad_(False)
            setattr(reference.get_submodule(module_name), attribute, shared)
    return freeze(reference)


def _first_parameter_of_layer(names: list[str], layer: int, pattern: str | None) -> int:
    candidates = [pattern] if pattern else list(LAYER_PATTERNS)
    for candidate in candidates:
        marker = candidate.format(layer=layer)
        hits = [i for i, name in enumerate(names) if marker in name]
        if hits:
            return hits[0]
        if any(candidate.format(layer=0) in name for name in names):
            raise ValueError(f"num_shared_layers={layer} but the model has fewer layers (pattern {candidate!r}).")
    raise ValueError("Could not find the model's layers to share; pass pattern=, e.g. 'model.layers.{layer}.'.")


@contextlib.contextmanager
def reference_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `model` computes as its reference: a PEFT model with adapters disabled.

    Unwraps DDP-style wrappers to reach the PEFT model; raises if there is no adapter to disable.
    """
    inner = model
    while not is_peft_model(inner) and (hasattr(inner, "module") or hasattr(inner, "pretrained_model")):
        inner = getattr(inner, "module", None) or inner.pretrained_model  # DDP, then the value-head wrapper
    if not is_peft_model(inner):
        raise ValueError("reference_mode needs a PEFT model: without an adapter there is no base to fall back to.")
    with inner.disable_adapter():
        yield model
