"""ops/stats.py (masked sum, mean, variance, whitening) against plain-Python references over the list of
counted entries x = values[mask]:

    mean = sum(x) / n,  var = sum((x - mean)^2) / (n - 1)  (or / n),  whiten = (x - mean) / sqrt(var + eps)
"""

from __future__ import annotations

import math

import pytest
import torch

from tether.ops.stats import masked_mean, masked_sum, masked_var, masked_whiten

TOL = dict(rtol=1e-12, atol=1e-12)


def _data(seed: int = 0, b: int = 5, t: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(b, t, generator=g, dtype=torch.float64) * 3 + 1
    mask = torch.rand(b, t, generator=g) < 0.6
    mask[:, 0] = True  # every row counts something
    return values, mask


def _counted(values: torch.Tensor, mask: torch.Tensor) -> list[float]:
    return [v for row_v, row_m in zip(values.tolist(), mask.tolist()) for v, m in zip(row_v, row_m) if m]


def test_masked_sum_and_mean_match_loops():
    values, mask = _data()
    x = _counted(values, mask)
    torch.testing.assert_close(masked_sum(values, mask), torch.tensor(math.fsum(x), dtype=torch.float64), **TOL)
    torch.testing.assert_close(masked_mean(values, mask), torch.tensor(math.fsum(x) / len(x), dtype=torch.float64),
                               **TOL)
    # along the token dim: one mean per row
    rows = [math.fsum(v for v, m in zip(rv, rm) if m) / sum(rm) for rv, rm in zip(values.tolist(), mask.tolist())]
    torch.testing.assert_close(masked_mean(values, mask, dim=-1), torch.tensor(rows, dtype=torch.float64), **TOL)
    # a 0/1 integer mask means the same as the bool mask
    torch.testing.assert_close(masked_mean(values, mask.long()), masked_mean(values, mask), **TOL)


def test_masked_entries_never_reach_the_result():
    values, mask = _data(seed=1)
    poisoned = values.masked_fill(~mask, float("nan"))
    poisoned[~mask & (torch.arange(values.shape[1]) % 2 == 0)] = float("inf")
    for fn in (masked_sum, masked_mean, masked_var):
        torch.testing.assert_close(fn(poisoned, mask), fn(values, mask), **TOL)
    torch.testing.assert_close(masked_whiten(poisoned, mask), masked_whiten(values, mask), **TOL)


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var_matches_loop(unbiased):
    values, mask = _data(seed=2)
    x = _counted(values, mask)
    mean = math.fsum(x) / len(x)
    var = math.fsum((v - mean) ** 2 for v in x) / (len(x) - 1 if unbiased else len(x))
    torch.testing.assert_close(masked_var(values, mask, unbiased), torch.tensor(var, dtype=torch.float64), **TOL)


def test_masked_var_full_mask_is_torch_var():
    values, _ = _data(seed=3)
    full = torch.ones_like(values, dtype=torch.bool)
    torch.testing.assert_close(masked_var(values, full), values.var(), **TOL)
    torch.testing.assert_close(masked_var(values, full, unbiased=False), values.var(correction=0), **TOL)


def test_masked_var_needs_enough_entries():
    values = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    one = torch.tensor([[False, True, False]])
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(values, one)
    assert masked_var(values, one, unbiased=False).item() == 0.0  # a single value has zero spread
    with pytest.raises(ValueError, match="at least 1"):
        masked_var(values, torch.zeros_like(one), unbiased=False)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_loop(shift_mean):
    values, mask = _data(seed=4)
    eps = 1e-8
    x = _counted(values, mask)
    mean = math.fsum(x) / len(x)
    var = math.fsum((v - mean) ** 2 for v in x) / (len(x) - 1)
    expected = [
        [((v - mean) / math.sqrt(var + eps) + (0.0 if shift_mean else mean)) if m else 0.0 for v, m in zip(rv, rm)]
        for rv, rm in zip(values.tolist(), mask.tolist())
    ]
    out = masked_whiten(values, mask, shift_mean=shift_mean, eps=eps)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), **TOL)
    # the counted entries end up with unit variance (up to eps) and mean 0 (or the old mean)
    torch.testing.assert_close(masked_var(out, mask), torch.tensor(var / (var + eps), dtype=torch.float64), **TOL)
    torch.testing.assert_close(masked_mean(out, mask), torch.tensor(0.0 if shift_mean else mean,
                                                                    dtype=torch.float64), **TOL)
