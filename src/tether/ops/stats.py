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
classic `core.masked_var`; `whiten` is masked_whiten with every entry counted.

Streams: `RunningMoments` keeps the mean and variance of everything seen so far, merging each batch's
moments with Chan et al.'s parallel update; `get_global_statistics` gives a batch's moments over all
processes of an accelerator (two all-reduces), so both equal the moments of the concatenated data.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _as_bool(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of values where mask is True: over everything (scalar) or along `dim` (that dim removed).

    values [b, t], mask [b, t] -> [] or, e.g. with dim=-1, [b].
    """
    kept = torch.where(_as_bool(mask), values, torch.zeros((), dtype=values.dtype, device=values.device))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None,
                axis: int | None = None) -> torch.Tensor:
    """Mean of values where mask is True, over everything or along `dim`; nan where nothing counts
    (as torch.mean of an empty tensor). values [b, t], mask [b, t] -> [] or, with dim=-1, [b].

    `axis` is TRL's classic name for `dim` (`masked_mean(values, mask, axis=1)`); give one or the other.
    """
    if axis is not None:
        if dim is not None and dim != axis:
            raise ValueError(f"masked_mean got dim={dim} and axis={axis}; axis is another name for dim, "
                             "pass only one.")
        dim = axis
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
                  eps: float = 1e-8, accelerator: Any = None) -> torch.Tensor:
    """(values - mean) / sqrt(var + eps) with mean and unbiased var over the counted entries.

    values [b, t], mask [b, t] -> [b, t], 0 where mask is False. shift_mean=False adds the mean back
    (only the scale changes), as TRL's classic `masked_whiten` does for rewards. With an `accelerator` of
    several processes, mean and var are those of every process's counted entries (`get_global_statistics`),
    so each process's result equals whitening the concatenated batch in one process.
    """
    mask = _as_bool(mask)
    if accelerator is not None and getattr(accelerator, "num_processes", 1) > 1:
        mean, population_var, count = get_global_statistics(accelerator, values, mask, device=values.device)
        if count < 2:
            raise ValueError(f"whitening needs at least 2 counted entries over all processes, got {int(count)}")
        mean, var = mean.to(values.dtype), (population_var * count / (count - 1)).to(values.dtype)
    else:
        mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))


def whiten(values: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(values - mean) / sqrt(var + eps) over all entries (unbiased var, as torch.var): any shape -> same.

    masked_whiten with every entry counted; shift_mean=False adds the mean back (TRL's classic `whiten`).
    """
    return masked_whiten(values, torch.ones_like(values, dtype=torch.bool), shift_mean=shift_mean, eps=eps)


def _stats_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 for streaming moments (counts reach millions of samples), except where a device has none."""
    return torch.float32 if tensor.device.type == "mps" else torch.float64


@torch.no_grad()
def get_global_statistics(accelerator: Any, xs: torch.Tensor, mask: torch.Tensor | None = None,
                          device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, population variance, count) of the entries of `xs` (where `mask` is True, if given) over
    all processes of `accelerator`, as 0-d tensors on `device`.

    xs: any shape; mask: the shape of xs. Each process passes its own shard; the result is the same on
    every process and equals the statistics of the concatenated shards. Two all-reduces (sums): first
    (sum, count), then the sum of squared deviations from the global mean (two-pass, so no cancellation
    between sum(x^2) and n * mean^2). `accelerator` needs `.device` and `.reduce(tensor, reduction="sum")`
    (an `accelerate.Accelerator`).
    """
    xs = xs.to(accelerator.device)
    dtype = _stats_dtype(xs)
    values = xs.to(dtype)
    keep = torch.ones_like(values, dtype=torch.bool) if mask is None else _as_bool(mask.to(xs.device))
    totals = torch.stack([masked_sum(values, keep), keep.sum().to(dtype)])  # [2]
    total, count = accelerator.reduce(totals, reduction="sum")
    if count < 1:
        raise ValueError("get_global_statistics: no entry counts on any process (empty xs or all-False mask).")
    mean = total / count
    centered = values - mean
    var = accelerator.reduce(masked_sum(centered * centered, keep), reduction="sum") / count
    return mean.to(device), var.to(device), count.to(device)


class RunningMoments:
    """Mean and standard deviation of a stream of batches, e.g. of PPO scores for `use_score_scaling`.

    After updates with batches x_1..x_k, `mean`, `var` (population) and `std` (unbiased, n - 1) are
    those of their concatenation, exactly up to rounding, via the parallel update of Chan, Golub and
    LeVeque (1979, "Updating formulae and a pairwise algorithm for computing sample variances"): with
    (n_a, mean_a, M2_a) the stream so far and (n_b, mean_b, M2_b) the new batch (M2 = sum of squared
    deviations),

        n     = n_a + n_b,   delta = mean_b - mean_a
        mean  = mean_a + delta * n_b / n
        M2    = M2_a + M2_b + delta^2 * n_a * n_b / n

    `accelerator` (an `accelerate.Accelerator`, as TRL's signature takes) makes each batch the union of
    all processes' batches; None (or a single process) uses the local batch only. Before any update,
    mean = 0 and std = var = 1 (TRL's starting values: scaling by them changes nothing), and std stays 1
    until two samples have been seen (an unbiased std of one sample is undefined; TRL's became inf).
    Statistics are kept as Python floats (float64).
    """

    def __init__(self, accelerator: Any = None) -> None:
        self.accelerator = accelerator
        self.mean = 0.0
        self.var = 1.0
        self.std = 1.0
        self.count = 0

    def _batch_moments(self, xs: torch.Tensor) -> tuple[float, float, int]:
        """(mean, population variance, count) of this batch, over all processes when distributed."""
        if self.accelerator is not None and getattr(self.accelerator, "num_processes", 1) > 1:
            mean, var, count = get_global_statistics(self.accelerator, xs)
            return float(mean), float(var), int(count)
        values = xs.detach().to(_stats_dtype(xs)).flatten()
        if values.numel() == 0:
            raise ValueError("RunningMoments.update needs a non-empty batch, got a tensor with no entries.")
        mean = values.mean()
        return float(mean), float((values - mean).square().mean()), values.numel()

    @torch.no_grad()
    def update(self, xs: torch.Tensor) -> tuple[float, float]:
        """Merge the batch xs (any shape; every entry is one sample) into the running moments.

        Returns the batch's own (mean, unbiased std); the std is nan for a batch of one sample.
        """
        batch_mean, batch_var, batch_count = self._batch_moments(xs)
        old_count = self.count
        total = old_count + batch_count
        old_m2 = self.var * old_count if old_count else 0.0
        delta = batch_mean - self.mean
        m2 = old_m2 + batch_var * batch_count + delta * delta * old_count * batch_count / total
        self.mean += delta * batch_count / total
        self.var = m2 / total
        self.std = math.sqrt(m2 / (total - 1)) if total > 1 else 1.0
        self.count = total
        batch_std = math.sqrt(batch_var * batch_count / (batch_count - 1)) if batch_count > 1 else math.nan
        return batch_mean, batch_std
