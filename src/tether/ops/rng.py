"""Randomness: seeding every random number generator a run uses, and normal tensors drawn from one
generator or one per row."""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence

import numpy as np
import torch


def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seed Python's `random`, numpy's global RNG and torch on every device (torch.manual_seed seeds the
    CPU and each accelerator backend: CUDA, XPU, MPS, NPU, ...). deterministic=True also makes torch use
    deterministic algorithms (slower; some operations then raise).

    The same seeding as `transformers.set_seed` (equal draws afterwards), without importing transformers'
    trainer stack, which `tether.core` would otherwise pay for on import.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)


def randn_tensor(
    shape: Sequence[int],
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    layout: torch.layout | None = None,
) -> torch.Tensor:
    """Standard normal samples of `shape` on `device` (default CPU), as diffusers' helper of that name.

    `generator` may be a list of one generator per row (shape[0] of them), so each row is reproducible on
    its own. A CPU generator for a non-CPU device draws on the CPU and moves the result (with a warning,
    as it is slower); a generator on another accelerator is a ValueError.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    layout = layout or torch.strided
    shape = tuple(shape)
    draw_device = device
    if generator is not None:
        generator_device = (generator[0] if isinstance(generator, list) else generator).device
        if generator_device.type != device.type:
            if generator_device.type != "cpu":
                raise ValueError(f"randn_tensor: cannot draw a {device.type} tensor from a "
                                 f"{generator_device.type} generator; pass a generator on {device.type} or the CPU.")
            draw_device = torch.device("cpu")
            if device.type != "mps":
                warnings.warn(f"randn_tensor: the generator is on the CPU but the tensor goes to {device}; it is "
                              "drawn on the CPU and moved (a generator on that device is faster).", stacklevel=2)
    if isinstance(generator, list):
        if len(generator) == 1:
            generator = generator[0]
        elif len(generator) != shape[0]:
            raise ValueError(f"randn_tensor: got {len(generator)} generators for {shape[0]} rows; pass one per row "
                             "(shape[0]) or a single generator.")
    if isinstance(generator, list):
        rows = [torch.randn((1, *shape[1:]), generator=g, device=draw_device, dtype=dtype, layout=layout)
                for g in generator]
        return torch.cat(rows, dim=0).to(device)
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype, layout=layout).to(device)
