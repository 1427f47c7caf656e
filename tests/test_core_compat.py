"""`tether.core` (TRL 0.7's `trl.core`) and RunningMoments, each against an obvious reference written here:
numpy or plain-Python statistics over the selected entries, softmax written out, uniform counts.

Also that the names are tether's one implementation (identity with the ops/rollout functions).
"""

from __future__ import annotations

import math
import random
import threading

import numpy as np
import pytest
import torch

import tether.core as core
from tether.ops import logprobs as ops_logprobs
from tether.ops import stats as ops_stats
from tether.ops.stats import RunningMoments, get_global_statistics

TOL = dict(rtol=1e-12, atol=1e-12)


def _data(seed: int = 0, b: int = 4, t: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(b, t, generator=g, dtype=torch.float64) * 2 + 0.5
    mask = torch.rand(b, t, generator=g) < 0.6
    mask[:, 0] = True
    return values, mask


def test_names_are_the_ops_implementations():
    from tether.rollout.generation import respond_to_batch

    assert core.masked_mean is ops_stats.masked_mean and core.masked_whiten is ops_stats.masked_whiten
    assert core.masked_var is ops_stats.masked_var and core.whiten is ops_stats.whiten
    assert core.logprobs_from_logits is ops_logprobs.logprobs_from_logits
    assert core.entropy_from_logits is ops_logprobs.entropy_from_logits
    assert core.respond_to_batch is respond_to_batch


# ----- statistics dictionaries ------------------------------------------------------------------------------
def test_flatten_dict():
    nested = {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
    assert core.flatten_dict(nested) == {"a/b": 1, "a/c/d": 2, "e": 3}
    assert core.flatten_dict(nested, sep=".") == {"a.b": 1, "a.c.d": 2, "e": 3}
    with pytest.raises(ValueError, match="separator"):
        core.flatten_dict({"a/b": 1})


def test_convert_to_scalar_and_add_suffix():
    stats = {"zero_d": torch.tensor(2.5), "one": np.array([3.0]), "many": torch.tensor([1.0, 2.0]), "s": "x"}
    out = core.convert_to_scalar(stats)
    assert out["zero_d"] == 2.5 and isinstance(out["zero_d"], float)
    assert out["one"] == 3.0 and isinstance(out["one"], float)
    assert out["many"] is stats["many"] and out["s"] == "x"
    assert core.add_suffix({"a": 1, "b": 2}, "_x") == {"a_x": 1, "b_x": 2}


def test_stack_dicts_pads_with_wandb_padding():
    dicts = [{"x": torch.tensor([[1.0, 2.0]])}, {"x": torch.tensor([3.0, 4.0, 5.0])}, {"x": torch.tensor(6.0)}]
    stacked = core.stack_dicts(dicts)["x"]
    assert core.WANDB_PADDING == -1
    assert torch.equal(stacked, torch.tensor([[1.0, 2.0, -1.0], [3.0, 4.0, 5.0], [6.0, -1.0, -1.0]]))


def test_average_torch_dicts_and_stats_to_np():
    dicts = [{"a": torch.tensor([1.0, 2.0]), "b": torch.tensor(3.0)},
             {"a": torch.tensor([3.0, 6.0]), "b": torch.tensor(5.0)}]
    avg = core.average_torch_dicts(dicts)
    assert torch.equal(avg["a"], torch.tensor([2.0, 4.0])) and avg["b"].item() == 4.0
    out = core.stats_to_np({"t": torch.tensor([1.5, 2.5], dtype=torch.bfloat16), "n": np.float32(2.0), "i": 3,
                            "s": "text", "grad": torch.ones(2, requires_grad=True)})
    assert isinstance(out["t"], np.ndarray) and out["t"].dtype == np.float32 and out["t"].tolist() == [1.5, 2.5]
    assert out["n"] == 2.0 and type(out["n"]) is float and type(out["i"]) is float and out["s"] == "text"
    assert isinstance(out["grad"], np.ndarray)


# ----- tensor helpers ---------------------------------------------------------------------------------------
def test_pad_to_size_and_pad_to_length():
    from tether.trainer.utils import pad_to_length

    x = torch.tensor([[1, 2], [3, 4]])
    assert torch.equal(core.pad_to_size(x, 4), torch.tensor([[1, 2, 50256, 50256], [3, 4, 50256, 50256]]))
    assert core.pad_to_size(x, 2) is x
    assert torch.equal(core.pad_to_size(x, 3, dim=0, padding=0), torch.tensor([[1, 2], [3, 4], [0, 0]]))
    with pytest.raises(ValueError, match="size=1"):
        core.pad_to_size(x, 1)
    y = torch.zeros(2, 3, 2)
    padded = pad_to_length(y, 5, -1.5, dim=1)
    assert padded.shape == (2, 5, 2) and bool((padded[:, 3:] == -1.5).all()) and bool((padded[:, :3] == 0).all())
    assert pad_to_length(y, 2, 9.0, dim=1) is y  # already longer: unchanged


def test_clip_by_value_tensor_and_number_bounds():
    x = torch.tensor([-3.0, -0.5, 0.25, 4.0, 0.0])
    low, high = torch.tensor([-1.0, -1.0, 0.5, 0.0, 1.0]), torch.tensor([1.0, 0.0, 1.0, 2.0, -1.0])
    expected = [max(min(v, hi), lo) for v, lo, hi in zip(x.tolist(), low.tolist(), high.tolist())]
    assert core.clip_by_value(x, low, high).tolist() == expected  # the last bounds cross: the lower one wins
    assert core.clip_by_value(x, -1.0, 1.0).tolist() == [-1.0, -0.5, 0.25, 1.0, 0.0]


def test_randn_tensor_generators():
    shape = (3, 2, 4)
    ours = core.randn_tensor(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    reference = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.equal(ours, reference)
    generators = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    rows = core.randn_tensor(shape, generator=generators)
    for row, seed in zip(rows, (1, 2, 3)):  # each row is that generator's own draw
        assert torch.equal(row, torch.randn((1, 2, 4), generator=torch.Generator().manual_seed(seed))[0])
    with pytest.raises(ValueError, match="one per row"):
        core.randn_tensor(shape, generator=generators[:2])
    assert core.randn_tensor((2, 2)).shape == (2, 2)


def test_exact_div():
    from tether.trainer.utils import exact_div

    assert exact_div(12, 4, "batch_size", "mini_batch_size") == 3
    with pytest.raises(ValueError, match="batch_size=10 is not a multiple of mini_batch_size=4"):
        exact_div(10, 4, "batch_size", "mini_batch_size")


# ----- log-probs and entropy ----------------------------------------------------------------------------------
def test_logprobs_from_logits_matches_softmax_written_out():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 11, (2, 5), generator=g)
    logp = core.logprobs_from_logits(logits, labels)
    assert logp.shape == (2, 5)
    for b in range(2):
        for t in range(5):
            row = logits[b, t].tolist()
            expected = row[labels[b, t]] - math.log(sum(math.exp(v) for v in row))
            assert logp[b, t].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    full = core.logprobs_from_logits(logits, labels, gather=False)
    assert full.shape == (2, 5, 11)
    torch.testing.assert_close(full.gather(-1, labels[..., None])[..., 0], logp, **TOL)
    half = core.logprobs_from_logits(logits.to(torch.bfloat16), labels)
    assert half.dtype == torch.float32  # computed in float32, never in the logits' half precision


def test_entropy_from_logits_is_minus_sum_p_log_p():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 9, generator=g, dtype=torch.float64)
    entropy = core.entropy_from_logits(logits)
    for b in range(3):
        for t in range(4):
            exps = [math.exp(v) for v in logits[b, t].tolist()]
            p = [e / sum(exps) for e in exps]
            assert entropy[b, t].item() == pytest.approx(-sum(q * math.log(q) for q in p), rel=1e-12)
    uniform = core.entropy_from_logits(torch.zeros(6, dtype=torch.float64))
    assert uniform.item() == pytest.approx(math.log(6), rel=1e-14)
    # A token with probability 0 adds nothing (not nan), to the value and to the gradient.
    masked = torch.tensor([0.0, 0.0, float("-inf")], dtype=torch.float64, requires_grad=True)
    value = core.entropy_from_logits(masked)
    value.backward()
    assert value.item() == pytest.approx(math.log(2), rel=1e-14)
    assert torch.isfinite(masked.grad).all()


# ----- whitening and masked statistics --------------------------------------------------------------------------
def test_whiten_matches_numpy():
    values, _ = _data()
    x = values.numpy()
    expected = (x - x.mean()) / np.sqrt(x.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(core.whiten(values).numpy(), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(core.whiten(values, shift_mean=False).numpy(), expected + x.mean(), rtol=1e-12,
                               atol=1e-12)


def test_masked_whiten_matches_numpy_on_selected_entries():
    values, mask = _data(seed=2)
    x = values.numpy()[mask.numpy()]
    whitened = core.masked_whiten(values, mask)
    np.testing.assert_allclose(whitened[mask].numpy(), (x - x.mean()) / np.sqrt(x.var(ddof=1) + 1e-8),
                               rtol=1e-12, atol=1e-12)
    assert bool((whitened[~mask] == 0).all())
    kept = core.masked_whiten(values, mask, shift_mean=False)[mask].numpy()
    np.testing.assert_allclose(kept, (x - x.mean()) / np.sqrt(x.var(ddof=1) + 1e-8) + x.mean(), rtol=1e-12)


def test_masked_mean_axis_keyword_and_masked_var():
    values, mask = _data(seed=3)
    x, m = values.numpy(), mask.numpy()
    rows = np.array([x[i][m[i]].mean() for i in range(len(x))])
    np.testing.assert_allclose(core.masked_mean(values, mask, axis=1).numpy(), rows, rtol=1e-12)
    np.testing.assert_allclose(core.masked_mean(values, mask, 1).numpy(), rows, rtol=1e-12)  # TRL passes it 3rd
    assert torch.equal(core.masked_mean(values, mask, axis=1), core.masked_mean(values, mask, dim=1))
    assert core.masked_mean(values, mask).item() == pytest.approx(x[m].mean(), rel=1e-12)
    assert core.masked_var(values, mask).item() == pytest.approx(x[m].var(ddof=1), rel=1e-12)
    assert core.masked_var(values, mask, unbiased=False).item() == pytest.approx(x[m].var(), rel=1e-12)
    with pytest.raises(ValueError, match="axis is another name for dim"):
        core.masked_mean(values, mask, dim=0, axis=1)


# ----- LengthSampler and set_seed ------------------------------------------------------------------------------
def test_length_sampler_bounds_distribution_and_trl_stream():
    sampler = core.LengthSampler(4, 9)
    np.random.seed(0)
    draws = [sampler() for _ in range(5000)]
    assert all(type(d) is int for d in draws[:10])
    assert set(draws) == set(range(4, 9))  # max excluded, every value reached
    counts = np.bincount(draws)[4:]
    # 5000 draws over 5 values: 1000 each, binomial std ~28; 5 std is a bound a fair sampler never crosses.
    assert np.abs(counts - 1000).max() < 140, counts
    # TRL's LengthSampler was np.random.choice(list(range(min, max))): the same numbers for the same seed.
    np.random.seed(123)
    ours = [sampler() for _ in range(50)]
    np.random.seed(123)
    assert ours == [int(np.random.choice(list(range(4, 9)))) for _ in range(50)]
    assert sampler.values == [4, 5, 6, 7, 8]
    with pytest.raises(ValueError, match="min_value < max_value"):
        core.LengthSampler(5, 5)


def test_set_seed_makes_python_numpy_and_torch_reproducible():
    def draw():
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    core.set_seed(42)
    first = draw()
    core.set_seed(42)
    assert draw() == first
    core.set_seed(43)
    assert draw() != first
    from transformers import set_seed as transformers_set_seed

    transformers_set_seed(42)  # tether's trainers seed with it: the same streams
    assert draw() == first
    from tether import set_seed

    assert set_seed is core.set_seed


def test_ppo_decorators_empty_the_cache_only_when_switched_on(monkeypatch):
    import tether.distributed

    calls = []
    monkeypatch.setattr(tether.distributed, "empty_device_cache", lambda: calls.append(1))
    with core.PPODecorators.empty_device_cache():
        pass
    assert calls == []
    monkeypatch.setattr(core.PPODecorators, "optimize_device_cache", True)

    @core.PPODecorators.empty_device_cache()
    def step():
        return "done"

    assert step() == "done" and calls == [1]
    with pytest.raises(RuntimeError), core.PPODecorators.empty_device_cache():
        raise RuntimeError("the cache is emptied on the way out anyway")
    assert calls == [1, 1]


def test_respond_to_batch_shape(tiny_decoder):
    queries = torch.tensor([[5, 6, 7], [8, 9, 10]])
    torch.manual_seed(0)
    out = core.respond_to_batch(tiny_decoder, queries, txt_len=4)
    assert out.shape == (2, 4)


# ----- RunningMoments --------------------------------------------------------------------------------------
def test_running_moments_match_numpy_over_updates():
    g = torch.Generator().manual_seed(7)
    running = RunningMoments()
    assert (running.mean, running.std, running.var) == (0.0, 1.0, 1.0)
    seen = []
    for size, scale, shift in ((5, 1.0, 0.0), (1, 2.0, 3.0), (17, 0.5, -2.0), (8, 3.0, 10.0), (2, 1.0, 0.0)):
        batch = torch.randn(size, generator=g) * scale + shift
        batch_mean, batch_std = running.update(batch)
        x = batch.double().numpy()
        seen.extend(x.tolist())
        assert batch_mean == pytest.approx(x.mean(), rel=1e-12, abs=1e-12)
        if size > 1:
            assert batch_std == pytest.approx(x.std(ddof=1), rel=1e-12)
        else:
            assert math.isnan(batch_std)
        everything = np.array(seen)
        assert running.count == len(everything)
        assert running.mean == pytest.approx(everything.mean(), rel=1e-12, abs=1e-12)
        assert running.var == pytest.approx(everything.var(), rel=1e-12)
        assert running.std == pytest.approx(everything.std(ddof=1), rel=1e-12)
    with pytest.raises(ValueError, match="non-empty"):
        running.update(torch.tensor([]))


def test_running_moments_single_sample_keeps_std_defined():
    running = RunningMoments()
    running.update(torch.tensor([3.0]))
    assert running.mean == 3.0 and running.std == 1.0  # undefined from one sample: scaling stays neutral
    running.update(torch.tensor([5.0]))
    assert running.mean == 4.0 and running.std == pytest.approx(math.sqrt(2.0), rel=1e-14)


class _Group:
    """n threads standing in for n processes: reduce(sum) over what each deposited."""

    def __init__(self, n: int) -> None:
        self.n, self.slots, self.barrier = n, [None] * n, threading.Barrier(n, timeout=30)


class _FakeAccelerator:
    def __init__(self, group: _Group, rank: int) -> None:
        self.group, self.rank, self.num_processes, self.device = group, rank, group.n, torch.device("cpu")

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        assert reduction == "sum"
        self.group.slots[self.rank] = tensor.clone()
        self.group.barrier.wait()
        total = sum(self.group.slots)
        self.group.barrier.wait()  # nobody overwrites a slot before everyone has summed
        return total


def _run_ranks(n: int, work) -> list:
    group, results, errors = _Group(n), [None] * n, []

    def target(rank: int) -> None:
        try:
            results[rank] = work(_FakeAccelerator(group, rank), rank)
        except Exception as error:  # surfaced below, not lost in the thread
            errors.append(error)
            group.barrier.abort()

    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


def test_running_moments_across_processes_equal_the_concatenated_stream():
    g = torch.Generator().manual_seed(11)
    batches = [[torch.randn(size, generator=g) * (step + 1) + step for size in (3, 6, 2)] for step in range(4)]

    def work(accelerator, rank):
        running = RunningMoments(accelerator)
        returned = [running.update(step_batches[rank]) for step_batches in batches]
        return running.mean, running.var, running.std, running.count, returned

    results = _run_ranks(3, work)
    everything = np.concatenate([b.double().numpy() for step in batches for b in step])
    for mean, var, std, count, returned in results:
        assert count == len(everything)
        assert mean == pytest.approx(everything.mean(), rel=1e-12, abs=1e-12)
        assert var == pytest.approx(everything.var(), rel=1e-12)
        assert std == pytest.approx(everything.std(ddof=1), rel=1e-12)
        last = np.concatenate([b.double().numpy() for b in batches[-1]])  # the last step, over all ranks
        assert returned[-1][0] == pytest.approx(last.mean(), rel=1e-12)
        assert returned[-1][1] == pytest.approx(last.std(ddof=1), rel=1e-12)


def test_get_global_statistics_with_mask():
    values, mask = _data(seed=5, b=4, t=6)

    def work(accelerator, rank):
        rows = slice(2 * rank, 2 * rank + 2)
        return get_global_statistics(accelerator, values[rows], mask[rows])

    selected = values.numpy()[mask.numpy()]
    for mean, var, count in _run_ranks(2, work):
        assert int(count) == len(selected)
        assert mean.item() == pytest.approx(selected.mean(), rel=1e-12)
        assert var.item() == pytest.approx(selected.var(), rel=1e-12)
