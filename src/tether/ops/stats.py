"""Masked statistics over token tensors: sum, mean, variance, whitening.

Shapes: b = batch, t = tokens. `mask` is [b, t] (or any shape of `values`), True (or 1) where a token
counts; masked-out entries may hold anything, inf and nan included: they are selected away with
`torch.where`, never multiplied by zero, so they cannot reach the result.

The naive equivalents, with x = values[mask] (the counted entries as a flat list, n of them):

    masked_sum   = sum(x)
    masked_mean  = sum(x) / n
    masked_var   = sum((x - mean)^2) / (n - 1)         (unbiased; / n when unbiased=False)
    masked_whiten: (x - mean) / sqrt(var + eps) at counted entries, 0 elsewhere

For a full mask masked_var equals torch.var (correction=1, or 0 when unbiased=False), as in TRL's
classic `core.masked_var`.
"""

from __future__ import annotations

import torch


def _as_bool(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of values where mask is True: over everything (scalar) or along `dim` (that dim removed).

    values [b, t], mask [b, t] -> [] or, e.g. with dim=-1, [b].
    """
    kept = torch.where(_as_bool(mask), values, torch.zeros((), dtype=values.dtype, device=values.device))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of values where mask is True, over everything or along `dim`; nan where nothing counts
    (as torch.mean of an empty tensor). values [b, t], mask [b, t] -> [] or, with dim=-1, [b]."""
    mask = _as_bool(mask)
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of values where mask is True, over everything -> []. values [b, t], mask [b, t].

    unbiased=True divides by n - 1 (Bessel's correction, torch.var's default), so it needs n >= 2;
    unbiased=False divides by n. Raises ValueError when too few entries count (this reads the count on
    the host: one synchronisation per call).
    """
    mask = _as_bool(mask)
    count = int(mask.sum().item())
    needed = 2 if unbiased else 1
    if count < needed:
        raise ValueError(f"masked_var needs at least {needed} counted entries (unbiased={unbiased}), got {count}")
    centered = values - masked_mean(values, mask)
    return masked_sum(centered * centered, mask) / (count - 1 if unbiased else count)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """(values - mean) / sqrt(var + eps) with mean and unbiased var over the counted entries.

    values [b, t], mask [b, t] -> [b, t], 0 where mask is False. shift_mean=False adds the mean back
    (only the scale changes), as TRL's classic `masked_whiten` does for rewards.
    """
    mask = _as_bool(mask)
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))
