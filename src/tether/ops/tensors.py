"""Small tensor helpers: clipping between (tensor) bounds, padding to a length, and exact integer division
for batch arithmetic.

These serve TRL's classic names (`core.clip_by_value`, `core.pad_to_size`, `trainer.utils.pad_to_length`,
`trainer.utils.exact_div`).
"""

from __future__ import annotations

import torch


def clip_by_value(x: torch.Tensor, tensor_min: torch.Tensor | float, tensor_max: torch.Tensor | float,
                  ) -> torch.Tensor:
    """max(min(x, tensor_max), tensor_min), elementwise (so tensor_min wins where the bounds cross, as in
    TRL); each bound a number or a tensor that broadcasts against x (e.g. PPO's value clipping:
    old_values -/+ cliprange). Same shape as x."""
    lower = torch.as_tensor(tensor_min, dtype=x.dtype, device=x.device)
    upper = torch.as_tensor(tensor_max, dtype=x.dtype, device=x.device)
    return torch.maximum(torch.minimum(x, upper), lower)


def pad_to_length(tensor: torch.Tensor, length: int, pad_value: float, dim: int = -1) -> torch.Tensor:
    """`tensor` extended along `dim` to `length` with `pad_value` (after the existing entries); returned
    unchanged when it is already that long or longer."""
    missing = length - tensor.size(dim)
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, tensor.new_full(shape, pad_value)], dim=dim)


def pad_to_size(tensor: torch.Tensor, size: int, dim: int = 1, padding: int = 50256) -> torch.Tensor:
    """`tensor` padded along `dim` to exactly `size` with `padding` (TRL's default is GPT-2's EOS id).

    A tensor longer than `size` is a ValueError (TRL's version cut it silently).
    """
    if tensor.size(dim) > size:
        raise ValueError(f"pad_to_size: the tensor has {tensor.size(dim)} entries along dim {dim}, more than "
                         f"size={size}; pass a larger size or cut the tensor first.")
    return pad_to_length(tensor, size, padding, dim=dim)


def exact_div(a: int, b: int, a_str: str = "a", b_str: str = "b", custom_error_message: str = "") -> int:
    """a // b, or a ValueError naming both quantities when b does not divide a (e.g. a batch size that
    must split into mini-batches)."""
    quotient = a // b
    if quotient * b != a:
        prefix = f"{custom_error_message}: " if custom_error_message else ""
        raise ValueError(f"{prefix}{a_str}={a} is not a multiple of {b_str}={b} ({a} / {b} = {a / b}).")
    return quotient
