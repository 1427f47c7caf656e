"""The group-baseline policy losses (GRPO's token-level loss with its three aggregations, RLOO's clipped
sequence-level loss), PPO's elementwise clipped surrogate, the sequence KL that RLOO puts in the reward,
and group-relative advantages with the batch std, each against a slow reference written here with Python
loops from the papers' formulas; gradients against hand-derived ones; clip diagnostics on hand-built
ratios; garbage at padding; split-batch invariance; direction checks.

Notation: n = completions, t = completion tokens, mask True at real tokens; A_i the advantage of
completion i; r = pi / pi_old (the PPO ratio); eps_low / eps_high the clip range.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from tether.losses.advantages import group_relative_advantages
from tether.losses.group import sequence_level_policy_loss, token_level_policy_loss
from tether.losses.kl import sequence_kl
from tether.losses.ppo import clipped_surrogate

TOL = dict(rtol=1e-12, atol=1e-12)
F64 = torch.float64
NAN, INF = float("nan"), float("inf")


# ----- inputs ------------------------------------------------------------------------------------------------
def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


LENGTHS = [5, 1, 3, 7, 2, 6]  # right-padded completions of different lengths
WIDTH = 7


def batch(seed: int = 0, spread: float = 0.3) -> dict[str, torch.Tensor]:
    """n = 6 completions: logps, old_logps = logps + noise of std `spread` (so many ratios leave
    [0.8, 1.2] and get clipped), ref_logps likewise, advantages of both signs, a right-padded mask. The
    old and reference log-probs hold nan / +inf / -inf at padding, as an unfilled buffer might."""
    n = len(LENGTHS)
    mask = torch.tensor([[j < length for j in range(WIDTH)] for length in LENGTHS])
    logps = -randn(n, WIDTH, seed=seed).abs() - 0.5
    old = logps + spread * randn(n, WIDTH, seed=seed + 1)
    ref = logps + spread * randn(n, WIDTH, seed=seed + 2)
    garbage = t64([NAN, INF, -INF]).repeat(n * WIDTH)[: n * WIDTH].view(n, WIDTH)
    old = torch.where(mask, old, garbage)
    ref = torch.where(mask, ref, garbage.flip(0))
    advantages = randn(n, seed=seed + 3)
    return dict(logps=logps, old_logps=old, ref_logps=ref, advantages=advantages, mask=mask)


# ----- slow references ---------------------------------------------------------------------------------------
def ref_token_terms(b, eps_low, eps_high, beta):
    """Per completion, the list of its real tokens' losses (DeepSeekMath eq. 3 as a loss, with eq. 4's k3):
        r = exp(lp - lp_old),  l = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)) + beta * k3,
        k3 = exp(lp_ref - lp) - (lp_ref - lp) - 1."""
    terms = []
    for i in range(len(b["advantages"])):
        a = float(b["advantages"][i])
        row = []
        for j in range(b["mask"].shape[1]):
            if not b["mask"][i, j]:
                continue
            lp, old = float(b["logps"][i, j]), float(b["old_logps"][i, j])
            r = math.exp(lp - old)
            loss = max(-a * r, -a * min(max(r, 1 - eps_low), 1 + eps_high))
            if beta:
                d = float(b["ref_logps"][i, j]) - lp
                loss += beta * (math.exp(d) - d - 1)
            row.append(loss)
        terms.append(row)
    return terms


def ref_aggregate(terms, aggregation, num_tokens=None, num_sequences=None, max_length=None):
    """'token': sum of all terms / N (N: token count); 'sequence': (1/B) sum_i mean of row i (an empty
    row adds 0 but counts in B); 'fixed': sum of all terms / (B * max_length)."""
    total = sum(sum(row) for row in terms)
    b = len(terms) if num_sequences is None else num_sequences
    if aggregation == "token":
        return total / (sum(len(row) for row in terms) if num_tokens is None else num_tokens)
    if aggregation == "sequence":
        return sum(sum(row) / len(row) if row else 0.0 for row in terms) / b
    return total / (b * max_length)


def ref_token_weights(mask, aggregation, max_length=None):
    """d loss / d l_ij of each real token under each aggregation (0 at padding)."""
    n, width = mask.shape
    total = int(mask.sum())
    weights = torch.zeros(n, width, dtype=F64)
    for i in range(n):
        length = int(mask[i].sum())
        for j in range(width):
            if mask[i, j]:
                weights[i, j] = {"token": 1 / total, "sequence": 1 / (length * n),
                                 "fixed": 1 / (n * max_length)}[aggregation]
    return weights


def ref_token_gradient(b, eps_low, eps_high, beta, aggregation, max_length=None):
    """Hand-derived d loss / d logps_ij = w_ij * (g_clip + beta * g_k3) at real tokens, 0 at padding:
    the surrogate's gradient is -A r (d r / d lp = r) where the unclipped term is the max, and 0 where the
    clipped, flat term is (exactly: r < 1 - eps_low with A < 0, or r > 1 + eps_high with A > 0);
    d k3 / d lp = -exp(lp_ref - lp) + 1."""
    weights = ref_token_weights(b["mask"], aggregation, max_length)
    grad = torch.zeros_like(weights)
    for i in range(grad.shape[0]):
        a = float(b["advantages"][i])
        for j in range(grad.shape[1]):
            if not b["mask"][i, j]:
                continue
            lp = float(b["logps"][i, j])
            r = math.exp(lp - float(b["old_logps"][i, j]))
            flat = (r < 1 - eps_low and a < 0) or (r > 1 + eps_high and a > 0)
            g = 0.0 if flat else -a * r
            if beta:
                g += beta * (1 - math.exp(float(b["ref_logps"][i, j]) - lp))
            grad[i, j] = weights[i, j] * g
    return grad


def ref_sequence_loss(b, eps_low, eps_high, num_sequences=None):
    """RLOO with a clipped sequence ratio: log r_i = sum over real tokens of (lp - lp_old),
    l_i = max(-A_i r_i, -A_i clip(r_i, 1 - eps_low, 1 + eps_high)), loss = sum_i l_i / N."""
    total = 0.0
    for i in range(len(b["advantages"])):
        a = float(b["advantages"][i])
        log_r = sum(float(b["logps"][i, j]) - float(b["old_logps"][i, j])
                    for j in range(b["mask"].shape[1]) if b["mask"][i, j])
        r = math.exp(log_r)
        total += max(-a * r, -a * min(max(r, 1 - eps_low), 1 + eps_high))
    return total / (len(b["advantages"]) if num_sequences is None else num_sequences)


def token_loss(b, **kwargs):
    return token_level_policy_loss(b["logps"], b["old_logps"], b["advantages"], b["mask"],
                                   ref_logps=b.get("ref_logps"), **kwargs)


# ----- clipped_surrogate -------------------------------------------------------------------------------------
def test_clipped_surrogate_elementwise_against_loops():
    log_ratio = torch.log(t64([0.5, 0.79, 0.8, 0.95, 1.0, 1.1, 1.2, 1.27, 1.29, 2.0]))[:, None].expand(10, 3)
    advantages = t64([-1.5, 0.0, 0.7])[None, :].expand(10, 3)
    loss, ratio, clipped = clipped_surrogate(log_ratio, advantages, 0.2, 0.28)
    for i in range(10):
        for j in range(3):
            r, a = math.exp(float(log_ratio[i, j])), float(advantages[i, j])
            unclipped, clip_term = -a * r, -a * min(max(r, 0.8), 1.28)
            assert float(ratio[i, j]) == pytest.approx(r, rel=1e-14)
            assert float(loss[i, j]) == pytest.approx(max(unclipped, clip_term), rel=1e-14, abs=1e-15)
            assert bool(clipped[i, j]) == (clip_term > unclipped)  # strictly: ties (A = 0, r in range) are not
    # The clip removed the gradient exactly where the diagnostics say: r < 0.8 with A < 0, r > 1.28 with A > 0.
    r = ratio[:, 0]
    assert clipped[:, 0].tolist() == (r < 0.8).tolist()
    assert clipped[:, 2].tolist() == (r > 1.28).tolist()
    assert not clipped[:, 1].any()


# ----- token_level_policy_loss: values and gradients ---------------------------------------------------------
@pytest.mark.parametrize("aggregation", ["token", "sequence", "fixed"])
@pytest.mark.parametrize("epsilon_high", [None, 0.28])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_token_level_loss_and_gradient_against_loops(aggregation, epsilon_high, beta):
    b = batch(seed=1)
    logps = b["logps"].clone().requires_grad_(True)
    out = token_loss({**b, "logps": logps}, epsilon_low=0.2, epsilon_high=epsilon_high, aggregation=aggregation,
                     beta=beta, max_length=9)
    eps_high = 0.2 if epsilon_high is None else epsilon_high
    expected = ref_aggregate(ref_token_terms(b, 0.2, eps_high, beta), aggregation, max_length=9)
    torch.testing.assert_close(out.loss, t64(expected), **TOL)
    (grad,) = torch.autograd.grad(out.loss, logps)
    torch.testing.assert_close(grad, ref_token_gradient(b, 0.2, eps_high, beta, aggregation, max_length=9), **TOL)
    assert torch.isfinite(grad).all() and (grad[~b["mask"]] == 0).all()  # the padding's nan/inf stayed out
    # Clip shares over the real tokens: low where r < 1 - eps_low and A < 0, high where r > 1 + eps_high and
    # A > 0 (float32 diagnostics). Non-vacuous: this batch clips some tokens on each side, not all.
    low = high = 0
    for i in range(6):
        a = float(b["advantages"][i])
        for j in range(LENGTHS[i]):
            r = math.exp(float(b["logps"][i, j] - b["old_logps"][i, j]))
            low, high = low + (r < 0.8 and a < 0), high + (r > 1 + eps_high and a > 0)
    assert 0 < low < 24 and 0 < high < 24
    assert float(out.clip_ratio_low) == pytest.approx(low / 24, rel=1e-6)
    assert float(out.clip_ratio_high) == pytest.approx(high / 24, rel=1e-6)
    assert float(out.clip_ratio_region) == pytest.approx((low + high) / 24, rel=1e-6)
    if beta:  # the mean per-token k3 over real tokens
        ks = [math.expm1(float(b["ref_logps"][i, j] - b["logps"][i, j])) - float(b["ref_logps"][i, j] - b["logps"][i, j])
              for i in range(6) for j in range(WIDTH) if b["mask"][i, j]]
        assert float(out.kl) == pytest.approx(sum(ks) / len(ks), rel=1e-12)
    else:
        assert math.isnan(float(out.kl))


@pytest.mark.parametrize("aggregation", ["token", "sequence", "fixed"])
def test_on_policy_gradient_is_minus_advantage_over_normaliser(aggregation):
    """One update per generation: old_logps == logps.detach(), so r = 1, nothing clips and
    l_ij = -A_i r_ij has d l_ij / d lp_ij = -A_i; the loss is -sum_ij w_ij A_i."""
    b = batch(seed=2)
    logps = b["logps"].clone().requires_grad_(True)
    old = torch.where(b["mask"], b["logps"], t64(NAN))
    out = token_level_policy_loss(logps, old, b["advantages"], b["mask"], aggregation=aggregation, max_length=8)
    (grad,) = torch.autograd.grad(out.loss, logps)
    lengths, n, total = b["mask"].sum(-1), len(LENGTHS), sum(LENGTHS)
    normaliser = {"token": torch.full((n,), float(total), dtype=F64), "sequence": n * lengths.to(F64),
                  "fixed": torch.full((n,), n * 8.0, dtype=F64)}[aggregation]  # [n]
    expected = torch.where(b["mask"], -b["advantages"][:, None] / normaliser[:, None], t64(0.0))
    torch.testing.assert_close(grad, expected, **TOL)
    if aggregation == "token":  # e.g. 'token': d loss / d lp_ij = -A_i / (total token count)
        assert float(grad[0, 0]) == pytest.approx(-float(b["advantages"][0]) / 24, rel=1e-12)
    torch.testing.assert_close(out.loss, (expected * b["mask"]).sum(), **TOL)
    assert float(out.clip_ratio_region) == 0.0


def test_empty_completion_counts_in_sequence_mean():
    """A completion with no real token adds 0 to the 'sequence' mean but still counts as one of B."""
    b = batch(seed=3)
    b["mask"] = b["mask"].clone()
    b["mask"][1] = False
    out = token_loss(b, aggregation="sequence")
    terms = ref_token_terms(b, 0.2, 0.2, 0.0)
    assert terms[1] == []
    torch.testing.assert_close(out.loss, t64(ref_aggregate(terms, "sequence")), **TOL)


def test_beta_without_reference_raises():
    b = batch(seed=0)
    with pytest.raises(ValueError, match="ref_logps"):
        token_level_policy_loss(b["logps"], b["old_logps"], b["advantages"], b["mask"], beta=0.1)


# ----- clip diagnostics and asymmetric clipping, by hand --------------------------------------------------------
def hand_batch():
    """Two completions with hand-picked ratios r = exp(lp - lp_old); lp = 0 so lp_old = -log r.
    row 0, A = -1: r = 0.5, 1.5, 1.0, [pad]   -> 0.5 < 0.8 with A < 0: low-clipped; 1.5 with A < 0: kept
    row 1, A = +2: r = 0.5, 1.5, 1.25, 1.1    -> 1.5 > 1 + eps_high with A > 0: high-clipped;
                                                 1.25: high-clipped iff eps_high = 0.2 (not with 0.28)"""
    ratios = t64([[0.5, 1.5, 1.0, 1.0], [0.5, 1.5, 1.25, 1.1]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    old = torch.where(mask, -ratios.log(), t64(NAN))
    return dict(logps=torch.zeros(2, 4, dtype=F64), old_logps=old, advantages=t64([-1.0, 2.0]), mask=mask)


@pytest.mark.parametrize("epsilon_high", [None, 0.28])
def test_clip_diagnostics_and_clip_higher_by_hand(epsilon_high):
    b = hand_batch()
    out = token_loss(b, epsilon_low=0.2, epsilon_high=epsilon_high, aggregation="token")
    high_clipped = 2 if epsilon_high is None else 1  # 1.5 always; 1.25 only when eps_high = 0.2
    # (the shares are float32 counts over the 7 real tokens)
    assert float(out.clip_ratio_low) == pytest.approx(1 / 7, rel=1e-7)
    assert float(out.clip_ratio_high) == pytest.approx(high_clipped / 7, rel=1e-7)
    assert float(out.clip_ratio_region) == pytest.approx((1 + high_clipped) / 7, rel=1e-7)
    # The loss by hand, l = max(-A r, -A clip(r)):
    #   row 0 (A = -1): r = 0.5 -> max(0.5, 0.8) = 0.8; r = 1.5 -> max(1.5, 1 + eps_high) = 1.5; r = 1 -> 1
    #   row 1 (A = 2):  r = 0.5 -> max(-1, -1.6) = -1; r = 1.5 -> -2 (1 + eps_high); r = 1.25 -> -2 min(1.25,
    #                   1 + eps_high); r = 1.1 -> -2.2
    e = 0.2 if epsilon_high is None else 0.28
    per_token = [0.8, 1.5, 1.0, -1.0, -2 * (1 + e), -2 * min(1.25, 1 + e), -2.2]
    torch.testing.assert_close(out.loss, t64(sum(per_token) / 7), **TOL)


def test_sequence_level_clip_diagnostics_by_hand():
    """RLOO clips the whole completion's ratio: r_i = exp(sum_t (lp - lp_old)) = product of token ratios.
    row 0: 0.5 * 1.5 * 1.0 = 0.75 < 0.8, A = -1: low-clipped; row 1: 0.5 * 1.5 * 1.25 * 1.1 = 1.03125, kept."""
    b = hand_batch()
    out = sequence_level_policy_loss(b["logps"], b["old_logps"], b["advantages"], b["mask"], 0.2)
    assert (float(out.clip_ratio_low), float(out.clip_ratio_high), float(out.clip_ratio_region)) == (0.5, 0.0, 0.5)
    # l_0 = max(0.75, 0.8) = 0.8; l_1 = -2 * 1.03125; loss = their mean
    torch.testing.assert_close(out.loss, t64((0.8 - 2 * 1.03125) / 2), **TOL)
    assert math.isnan(float(out.kl))
    # Raising row 1's ratio past 1 + eps_high (= 1.28 with clip-higher) clips it high.
    b["advantages"] = t64([-1.0, 2.0])
    b["logps"] = b["logps"] + torch.tensor([[0.0], [0.25]], dtype=F64) * b["mask"]  # row 1: r = 1.03125 e
    out = sequence_level_policy_loss(b["logps"], b["old_logps"], b["advantages"], b["mask"], 0.2, 0.28)
    assert float(out.clip_ratio_high) == 0.5  # 1.03125 * e = 2.80 > 1.28
    torch.testing.assert_close(out.loss, t64((0.8 - 2 * 1.28) / 2), **TOL)


# ----- sequence_level_policy_loss ----------------------------------------------------------------------------------
@pytest.mark.parametrize("epsilon_high", [None, 0.28])
@pytest.mark.parametrize("num_sequences", [None, 10])
def test_sequence_level_loss_and_gradient_against_loops(epsilon_high, num_sequences):
    b = batch(seed=4, spread=0.08)  # per-sequence log-ratios up to ~0.5: some sequences clip, some not
    logps = b["logps"].clone().requires_grad_(True)
    out = sequence_level_policy_loss(logps, b["old_logps"], b["advantages"], b["mask"], 0.2, epsilon_high,
                                     num_sequences=num_sequences)
    eps_high = 0.2 if epsilon_high is None else epsilon_high
    torch.testing.assert_close(out.loss, t64(ref_sequence_loss(b, 0.2, eps_high, num_sequences)), **TOL)
    # d loss / d lp_ij = -A_i r_i / N for every real token of an unclipped sequence (d r_i / d lp_ij = r_i),
    # 0 for a clipped one and at padding.
    (grad,) = torch.autograd.grad(out.loss, logps)
    n = 6 if num_sequences is None else num_sequences
    expected = torch.zeros_like(grad)
    clipped = 0
    for i in range(6):
        a = float(b["advantages"][i])
        r = math.exp(sum(float(b["logps"][i, j] - b["old_logps"][i, j]) for j in range(LENGTHS[i])))
        flat = (r < 0.8 and a < 0) or (r > 1 + eps_high and a > 0)
        clipped += flat
        for j in range(LENGTHS[i]):
            expected[i, j] = 0.0 if flat else -a * r / n
    torch.testing.assert_close(grad, expected, **TOL)
    assert 0 < clipped < 6
    assert float(out.clip_ratio_region) == pytest.approx(clipped / 6, rel=1e-7)


# ----- garbage at padding, split batch, direction ----------------------------------------------------------------
@pytest.mark.parametrize("aggregation", ["token", "sequence", "fixed"])
def test_padding_garbage_never_reaches_loss_or_gradient(aggregation):
    """The same real tokens with finite, with nan/inf, and with different finite values at padding (old and
    reference log-probs) give the same loss and gradient."""
    b = batch(seed=5)
    results = []
    for fill in (0.0, NAN, INF, -3.0):
        old = torch.where(b["mask"], b["old_logps"], t64(fill))
        ref = torch.where(b["mask"], b["ref_logps"], t64(-fill))
        logps = b["logps"].clone().requires_grad_(True)
        out = token_level_policy_loss(logps, old, b["advantages"], b["mask"], aggregation=aggregation, beta=0.1,
                                      ref_logps=ref, max_length=8)
        (grad,) = torch.autograd.grad(out.loss, logps)
        assert torch.isfinite(out.loss) and torch.isfinite(grad).all() and torch.isfinite(out.kl)
        results.append((out.loss, grad, out.kl, out.clip_ratio_region))
    for other in results[1:]:
        for x, y in zip(results[0], other):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    logps = b["logps"].clone().requires_grad_(True)
    old = torch.where(b["mask"], b["old_logps"], t64(NAN))
    out = sequence_level_policy_loss(logps, old, b["advantages"], b["mask"])
    (grad,) = torch.autograd.grad(out.loss, logps)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all() and (grad[~b["mask"]] == 0).all()


@pytest.mark.parametrize("aggregation", ["token", "sequence", "fixed"])
def test_split_batch_with_whole_normaliser_sums_to_whole(aggregation):
    """Two shards given the whole batch's token and sequence counts add up to the whole batch's loss and
    gradient (what gradient accumulation and data parallelism rely on)."""
    b = batch(seed=6)
    counts = dict(num_tokens=b["mask"].sum(), num_sequences=6, max_length=8)
    logps = b["logps"].clone().requires_grad_(True)
    whole = token_loss({**b, "logps": logps}, aggregation=aggregation, beta=0.05, **counts).loss
    (whole_grad,) = torch.autograd.grad(whole, logps)
    parts, grads = [], []
    for rows in (slice(0, 2), slice(2, 6)):  # unequal shards: 6 and 18 tokens
        shard = {key: value[rows] for key, value in b.items()}
        shard_logps = shard["logps"].clone().requires_grad_(True)
        part = token_loss({**shard, "logps": shard_logps}, aggregation=aggregation, beta=0.05, **counts).loss
        parts.append(part)
        grads.append(torch.autograd.grad(part, shard_logps)[0])
    torch.testing.assert_close(parts[0] + parts[1], whole, **TOL)
    torch.testing.assert_close(torch.cat(grads), whole_grad, **TOL)
    # ... while each shard's own normaliser (the default) gives a mean of means, a different number.
    if aggregation == "token":
        own = sum(token_loss({k: v[rows] for k, v in b.items()}, aggregation="token", beta=0.05).loss
                  for rows in (slice(0, 2), slice(2, 6))) / 2
        assert abs(float(own.detach() - whole.detach())) > 1e-3
    # RLOO's loss splits the same way with the whole batch's sequence count.
    seq = sequence_level_policy_loss(b["logps"], b["old_logps"], b["advantages"], b["mask"], num_sequences=6).loss
    seq_parts = sum(sequence_level_policy_loss(b["logps"][r], b["old_logps"][r], b["advantages"][r], b["mask"][r],
                                               num_sequences=6).loss for r in (slice(0, 2), slice(2, 6)))
    torch.testing.assert_close(seq_parts, seq, **TOL)


@pytest.mark.parametrize("aggregation", ["token", "sequence", "fixed"])
def test_raising_a_positive_advantage_completion_lowers_the_loss(aggregation):
    b = batch(seed=7)
    b["old_logps"] = torch.where(b["mask"], b["logps"], t64(NAN))  # on policy: r = 1, no clipping
    best, worst = int(b["advantages"].argmax()), int(b["advantages"].argmin())
    assert b["advantages"][best] > 0 > b["advantages"][worst]
    base = token_loss(b, aggregation=aggregation, max_length=8).loss
    for row, sign in ((best, -1), (worst, +1)):  # more likely: the loss goes down for A > 0, up for A < 0
        raised = b["logps"].clone()
        raised[row] += 0.05
        loss = token_loss({**b, "logps": raised}, aggregation=aggregation, max_length=8).loss
        assert sign * float(loss - base) > 1e-4
    seq_base = sequence_level_policy_loss(b["logps"], b["old_logps"], b["advantages"], b["mask"]).loss
    raised = b["logps"].clone()
    raised[best] += 0.02
    assert float(sequence_level_policy_loss(raised, b["old_logps"], b["advantages"], b["mask"]).loss) < float(seq_base)
    # The k3 term pulls back toward the reference: with A = 0, moving away from it raises the loss.
    b["advantages"] = torch.zeros(6, dtype=F64)
    b["ref_logps"] = torch.where(b["mask"], b["logps"], t64(NAN))
    at_ref = token_loss(b, aggregation=aggregation, beta=0.1, max_length=8).loss
    away = token_loss({**b, "logps": b["logps"] - 0.1}, aggregation=aggregation, beta=0.1, max_length=8).loss
    assert float(at_ref) == 0.0 and float(away) > 1e-5


# ----- sequence_kl -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["kl", "abs", "mse", "k3"])
def test_sequence_kl_against_loops(kind):
    """Sum over each completion's real tokens of the per-token estimate (d = lp - lp_ref):
    kl: d; abs: |d|; mse: d^2 / 2; k3: exp(-d) + d - 1."""
    b = batch(seed=8)
    logps = b["logps"].clone().requires_grad_(True)
    out = sequence_kl(logps, b["ref_logps"], b["mask"], kind)
    per_token = {"kl": lambda d: d, "abs": abs, "mse": lambda d: 0.5 * d * d, "k3": lambda d: math.exp(-d) + d - 1}
    expected = [sum(per_token[kind](float(b["logps"][i, j] - b["ref_logps"][i, j])) for j in range(LENGTHS[i]))
                for i in range(6)]
    torch.testing.assert_close(out, t64(expected), **TOL)
    assert out.shape == (6,) and not out.requires_grad
    if kind == "kl":  # log pi(o) - log pi_ref(o), the log-ratio of whole completions
        assert float(out[0]) == pytest.approx(float((b["logps"][0, :5] - b["ref_logps"][0, :5]).sum()), rel=1e-12)


# ----- group-relative advantages, std over the batch ------------------------------------------------------------
def test_group_relative_advantages_batch_std_against_loops():
    """std_over="batch" (TRL's scale_rewards="batch"): A_i = (r_i - mean of i's group) / (std of all n
    rewards + eps), the std unbiased; "group" divides by each group's own std."""
    rewards = [1.0, 0.0, 0.5, 0.25, 3.0, 2.0, 2.5, 4.0, -1.0, -1.0, -1.0, -1.0]
    k, eps = 4, 1e-4
    batch_std = statistics.stdev(rewards)
    expected_batch, expected_group = [], []
    for g in range(3):
        group = rewards[g * k:(g + 1) * k]
        mean = statistics.fmean(group)
        expected_batch += [(r - mean) / (batch_std + eps) for r in group]
        expected_group += [(r - mean) / (statistics.stdev(group) + eps) for r in group]
    by_batch = group_relative_advantages(t64(rewards), k, std_over="batch")
    torch.testing.assert_close(by_batch, t64(expected_batch), **TOL)
    torch.testing.assert_close(group_relative_advantages(t64(rewards), k), t64(expected_group), **TOL)
    # The two differ (a group's spread is no longer normalised away), and a constant group still gets 0.
    assert (by_batch - t64(expected_group)).abs().max() > 0.1
    assert (by_batch[8:] == 0).all()
    # One common scale: equal reward gaps give equal advantage gaps in groups 0 and 1 (whose stds differ).
    assert float(by_batch[4] - by_batch[5]) == pytest.approx(float(by_batch[0] - by_batch[1]), rel=1e-12)
    with pytest.raises(ValueError, match="std_over"):
        group_relative_advantages(t64(rewards), k, std_over="groups")
