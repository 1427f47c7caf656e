"""Reference models: the frozen anchor a policy is tethered to.

Three forms: an explicit frozen model; a frozen copy of the policy (`create_reference_model`); or, for a
PEFT policy, the same model with its adapter disabled (`reference_mode`) or with another of its adapters
switched on (`adapter_mode`, TRL's `ref_adapter_name`), which hold no second copy.
`select_reference` is the one rule every trainer picks its reference by, and `reference_context` the one
way each computes under it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

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


def _peft_inside(model: nn.Module) -> nn.Module | None:
    """The PEFT model inside DDP-style and value-head wrappers, or None."""
    inner = model
    while not is_peft_model(inner) and (hasattr(inner, "module") or hasattr(inner, "pretrained_model")):
        inner = getattr(inner, "module", None) or inner.pretrained_model  # DDP, then the value-head wrapper
    return inner if is_peft_model(inner) else None


@contextlib.contextmanager
def reference_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `model` computes as its reference: a PEFT model with adapters disabled.

    Unwraps DDP-style wrappers to reach the PEFT model; raises if there is no adapter to disable.
    """
    inner = _peft_inside(model)
    if inner is None:
        raise ValueError("reference_mode needs a PEFT model: without an adapter there is no base to fall back to.")
    with inner.disable_adapter():
        yield model


def check_adapters(model: nn.Module, *names: str | None) -> None:
    """Raise a ValueError unless `model` (or the PEFT model inside its wrappers) holds every named adapter
    (None names are skipped)."""
    names = tuple(name for name in names if name is not None)
    if not names:
        return
    inner = _peft_inside(model)
    if inner is None:
        raise ValueError(f"Adapter name(s) {list(names)} were given, but the policy is not a PEFT model. Fix: load "
                         "it with its adapters (PeftModel.from_pretrained(..., adapter_name=...), then load_adapter "
                         "for the reference), or drop model_adapter_name / ref_adapter_name.")
    missing = [name for name in names if name not in inner.peft_config]
    if missing:
        raise ValueError(f"The PEFT model has no adapter named {missing}; its adapters: {sorted(inner.peft_config)}.")


def activate_trained_adapter(model: nn.Module, model_adapter_name: str | None, ref_adapter_name: str | None) -> str:
    """For a PEFT policy holding several adapters: make `model_adapter_name` (default: the active adapter) the
    active and trainable one, which freezes the others, `ref_adapter_name` among them. Returns its name."""
    check_adapters(model, model_adapter_name, ref_adapter_name)
    inner = _peft_inside(model)
    trained = model_adapter_name or inner.active_adapter
    if trained == ref_adapter_name:
        raise ValueError(f"The adapter to train would be {trained!r}, which is ref_adapter_name; the reference must "
                         f"stay as it is. Fix: pass model_adapter_name= the adapter to train (adapters: "
                         f"{sorted(inner.peft_config)}).")
    inner.set_adapter(trained)
    return trained


@contextlib.contextmanager
def adapter_mode(model: nn.Module, adapter: str, restore: str | None = None) -> Iterator[nn.Module]:
    """Within the block, `model` computes with its PEFT adapter `adapter` active (e.g. a frozen copy of the
    starting adapter serving as the reference). After it, `restore` is active (default: the adapter that was
    active before); when that is the one active before, every parameter's requires_grad is what it was, as
    peft's set_adapter marks adapters trainable or frozen as it switches, which must not leak into training.
    """
    check_adapters(model, adapter, restore)
    inner = _peft_inside(model)
    before = inner.active_adapter
    trainable = [(p, p.requires_grad) for p in inner.parameters()]
    inner.set_adapter(adapter, inference_mode=True)
    try:
        yield model
    finally:
        inner.set_adapter(restore or before)
        if (restore or before) == before:  # back where it was: exactly the flags it had
            for param, flag in trainable:
                param.requires_grad_(flag)


def is_partitioned(model: nn.Module) -> bool:
    """Whether ZeRO-3 has partitioned `model`'s parameters (loaded under zero.Init, or inside an engine)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def copy_for_reference(policy: nn.Module, source: str | None, load: Callable[[str], nn.Module],
                       **copy_kwargs: Any) -> nn.Module:
    """A frozen copy of `policy` to serve as its reference: `create_reference_model(policy, **copy_kwargs)`.

    A partitioned policy (ZeRO-3 loads models partitioned) holds only its shard of each weight, so it
    cannot be deep-copied: the reference is loaded again with `load(source)`, `source` being the name
    or path the policy was loaded from (nothing is shared with the policy then).
    """
    if not is_partitioned(policy):
        return create_reference_model(policy, **copy_kwargs)
    if source is None:
        raise ValueError("Under DeepSpeed ZeRO-3 the policy's weights are partitioned over the processes and cannot "
                         "be copied into a reference model. Pass the policy by name or path (the reference is then "
                         "loaded from it), or pass ref_model= explicitly.")
    return freeze(load(source))


def select_reference(policy: nn.Module, ref_model: nn.Module | str | None, *, source: str | None,
                     load: Callable[[str], nn.Module], copy_needed: bool = True,
                     num_shared_layers: int | None = None) -> nn.Module | None:
    """The reference module for `policy`, frozen, or None when the policy itself serves. One rule for every trainer:

    1. `ref_model` given: that model (loaded with `load` when it is a name or path); it must share no trainable
       weight with the policy (freezing it would freeze the policy too); frozen shared layers, as
       `create_reference_model(policy, num_shared_layers=N)` makes, are fine.
    2. else a PEFT policy: None; the policy with its adapter disabled is the reference (`reference_context`).
    3. else, if `copy_needed` (False when no reference is used, e.g. KL coefficient 0, or its log-probs were
       precomputed): a frozen copy of the policy, sharing its first `num_shared_layers` layers, or reloaded
       from `source` under ZeRO-3 (see `copy_for_reference`). Otherwise None.
    """
    if isinstance(ref_model, str):
        ref_model = load(ref_model)
    if ref_model is not None:
        trainable = {id(p) for p in policy.parameters() if p.requires_grad}
        if any(id(p) in trainable for p in ref_model.parameters()):
            raise ValueError("ref_model is the policy itself (or shares its weights); pass a separate model, or None "
                             "for a frozen copy (or, for a PEFT policy, its adapter-disabled self).")
        return freeze(ref_model)
    if _peft_inside(policy) is not None or not copy_needed:
        return None
    copy_kwargs = {} if num_shared_layers is None else {"num_shared_layers": num_shared_layers}
    return copy_for_reference(policy, source, load, **copy_kwargs)


def reference_context(policy: nn.Module, ref_model: nn.Module | None, *, ref_adapter_name: str | None = None,
                      model_adapter_name: str | None = None) -> tuple[nn.Module, contextlib.AbstractContextManager]:
    """(module to call, context to call it in) for reference log-probs: the reference model; else, with
    `ref_adapter_name`, the PEFT policy with that adapter active (`model_adapter_name`, default the one
    active before, is switched back on after); else the PEFT policy with its adapter disabled; else the
    policy itself (before training it is its own reference)."""
    if ref_model is not None:
        if ref_adapter_name is not None:
            raise ValueError("Both ref_model and ref_adapter_name were given; the reference is one or the other. "
                             "Fix: pass ref_model=None to use the adapter, or drop ref_adapter_name.")
        return ref_model, contextlib.nullcontext()
    if ref_adapter_name is not None:
        return policy, adapter_mode(policy, ref_adapter_name, restore=model_adapter_name)
    if _peft_inside(policy) is not None:
        return policy, reference_mode(policy)
    return policy, contextlib.nullcontext()
