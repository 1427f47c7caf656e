"""Dictionaries of statistics, as trainers log them: nested -> flat keys, per-step tensors -> one padded
tensor or a mean, tensors -> numpy arrays or Python scalars for loggers.

These are TRL's classic `core` stats helpers (flatten_dict, stack_dicts, average_torch_dicts,
stats_to_np, convert_to_scalar, add_suffix), with the same keys and shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

# Fill value where stack_dicts pads shorter rows (TRL's name: the value its wandb tables ignore).
WANDB_PADDING = -1


def flatten_dict(nested: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """{"a": {"b": 1}, "c": 2} -> {"a/b": 1, "c": 2}: nested mappings joined with `sep`, depth first.

    A key that already contains `sep` would make two paths collide, so it is a ValueError.
    """
    flat: dict[str, Any] = {}

    def visit(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if sep in key:
                raise ValueError(f"flatten_dict: key {key!r} contains the separator {sep!r}; rename the key or "
                                 "pass another sep=.")
            if isinstance(value, Mapping):
                visit(value, f"{prefix}{key}{sep}")
            else:
                flat[f"{prefix}{key}"] = value

    visit(nested, "")
    return flat


def convert_to_scalar(stats: Mapping[str, Any]) -> dict[str, Any]:
    """Tensors and arrays of one element (shape [] or [1]) become Python numbers (for tensorboard, which
    logs scalars only); everything else is passed through."""
    out = {}
    for key, value in stats.items():
        if isinstance(value, (torch.Tensor, np.ndarray)) and (value.ndim == 0 or tuple(value.shape) == (1,)):
            value = value.item()
        out[key] = value
    return out


def stack_dicts(stats_dicts: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per key, the flattened tensors of each dict as rows of one [n_dicts, longest] tensor, shorter rows
    padded with WANDB_PADDING. The keys are those of the first dict (each dict must have them)."""
    if not stats_dicts:
        raise ValueError("stack_dicts needs at least one dict.")
    return {
        key: pad_sequence([torch.flatten(d[key]) for d in stats_dicts], batch_first=True,
                          padding_value=WANDB_PADDING)
        for key in stats_dicts[0]
    }


def add_suffix(input_dict: Mapping[str, Any], suffix: str) -> dict[str, Any]:
    """The same values under keys with `suffix` appended."""
    return {f"{key}{suffix}": value for key, value in input_dict.items()}


def average_torch_dicts(list_of_dicts: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per key, the elementwise mean over the dicts: tensors of one shape s -> a tensor of shape s."""
    if not list_of_dicts:
        raise ValueError("average_torch_dicts needs at least one dict.")
    return {key: torch.stack([d[key] for d in list_of_dicts]).mean(dim=0) for key in list_of_dicts[0]}


def stats_to_np(stats_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Tensors -> numpy arrays on the CPU (bfloat16, which numpy lacks, as float32); numpy and Python
    scalars -> float; anything else unchanged."""
    out: dict[str, Any] = {}
    for key, value in stats_dict.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            value = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
        if np.isscalar(value) and not isinstance(value, (str, bytes)):
            value = float(value)
        out[key] = value
    return out
