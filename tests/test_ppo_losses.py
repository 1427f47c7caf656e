"""Advantage estimators (GAE, group-relative, leave-one-out), KL estimators and controllers, the
KL-penalised reward, PPO's policy and value losses and the loss aggregation, each against a slow
reference written here in plain Python from the papers' formulas, plus direction checks and the
split-batch invariance the trainers rely on.

Notation: b = sequences, t = tokens, mask True where a token counts; r = pi / pi_old (PPO ratio).
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from tether.losses.advantages import gae, group_relative_advantages, leave_one_out_advantages
from tether.losses.kl import (
    KL_PENALTIES,
    AdaptiveKLController,
    FixedKLController,
    kl_penalized_rewards,
    kl_penalty,
)
from tether.losses.ppo import aggregate_loss, ppo_policy_loss, ppo_value_loss

TOL = dict(rtol=1e-12, atol=1e-12)
F64 = torch.float64


# ----- helpers --------------------------------------------------------------------------------------------
def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def ragged_mask(lengths: list[int], width: int, side: str) -> torch.Tensor:
    """Right padding: the response is the first L positions; left padding: the last L."""
    rows = []
    for length in lengths:
        if side == "right":
            rows.append([j < length for j in range(width)])
        else:
            rows.append([j >= width - length for j in range(width)])
    return torch.tensor(rows)


def holey_mask(b: int, width: int, seed: int) -> torch.Tensor:
    """Padding on both sides and holes in between (e.g. masked tool output)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, width, generator=g) < 0.6
    mask[:, 0] = False
    mask[:, -1] = False
    mask[:, width // 2] = True
    return mask


MASKS = {
    "right": ragged_mask([7, 1, 4, 9, 2], 9, "right"),
    "left": ragged_mask([7, 1, 4, 9, 2], 9, "left"),
    "holes": holey_mask(5, 9, seed=3),
}


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def response(row: list, mask_row: list) -> tuple[list[int], list]:
    """(positions, entries) of the mask-True positions of one row, in order."""
    idx = [j for j, m in enumerate(mask_row) if m]
    return idx, [row[j] for j in idx]


# ----- GAE ---------------------------------------------------------------------------------------------------
def ref_gae(rewards, values, mask, gamma, lam):
    """Per sequence, on the response tokens only, with V = 0 after the last one (GAE paper eq. 16):
    delta_k = r_k + gamma V_{k+1} - V_k,  A_k = sum_{l=0}^{m-1-k} (gamma lam)^l delta_{k+l},  R_k = A_k + V_k.
    The sum is written out in full (no recursion), so this shares nothing with the code under test."""
    b, width = len(rewards), len(rewards[0])
    adv = [[0.0] * width for _ in range(b)]
    ret = [[0.0] * width for _ in range(b)]
    for i in range(b):
        idx, r = response(rewards[i], mask[i])
        _, v = response(values[i], mask[i])
        v = v + [0.0]
        m = len(idx)
        delta = [r[k] + gamma * v[k + 1] - v[k] for k in range(m)]
        for k in range(m):
            a = math.fsum((gamma * lam) ** l_ * delta[k + l_] for l_ in range(m - k))
            adv[i][idx[k]], ret[i][idx[k]] = a, a + v[k]
    return t64(adv), t64(ret)


def _gae_inputs(kind: str, seed: int = 0):
    mask = MASKS[kind]
    rewards, values = randn(*mask.shape, seed=seed), randn(*mask.shape, seed=seed + 1)
    return rewards, values, mask


@pytest.mark.parametrize("kind", sorted(MASKS))
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (0.7, 0.0)])
def test_gae_matches_per_sequence_loop(kind, gamma, lam):
    rewards, values, mask = _gae_inputs(kind)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = ref_gae(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    torch.testing.assert_close(adv, ref_adv, **TOL)
    torch.testing.assert_close(ret, ref_ret, **TOL)


@pytest.mark.parametrize("kind", sorted(MASKS))
def test_gae_lambda_one_returns_are_discounted_reward_to_go(kind):
    # lam = 1: A_k = sum_l gamma^l delta_{k+l} telescopes to sum_l gamma^l r_{k+l} - V_k (V after the end
    # is 0), so R_k = A_k + V_k = sum_l gamma^l r_{k+l}, whatever the values.
    gamma = 0.9
    rewards, values, mask = _gae_inputs(kind, seed=5)
    _, ret = gae(rewards, values, mask, gamma, lam=1.0)
    expected = [[0.0] * mask.shape[1] for _ in range(mask.shape[0])]
    for i, (r_row, m_row) in enumerate(zip(rewards.tolist(), mask.tolist())):
        idx, r = response(r_row, m_row)
        for k in range(len(idx)):
            expected[i][idx[k]] = math.fsum(gamma**l_ * r[k + l_] for l_ in range(len(idx) - k))
    torch.testing.assert_close(ret, t64(expected), rtol=1e-12, atol=1e-11)


@pytest.mark.parametrize("kind", sorted(MASKS))
def test_gae_lambda_zero_is_the_td_error(kind):
    # lam = 0: A_k = delta_k = r_k + gamma V_{k+1} - V_k, the next response token's value (0 after the last)
    gamma = 0.8
    rewards, values, mask = _gae_inputs(kind, seed=7)
    adv, _ = gae(rewards, values, mask, gamma, lam=0.0)
    expected = [[0.0] * mask.shape[1] for _ in range(mask.shape[0])]
    for i in range(mask.shape[0]):
        idx, r = response(rewards[i].tolist(), mask[i].tolist())
        _, v = response(values[i].tolist(), mask[i].tolist())
        for k in range(len(idx)):
            expected[i][idx[k]] = r[k] + gamma * (v[k + 1] if k + 1 < len(idx) else 0.0) - v[k]
    torch.testing.assert_close(adv, t64(expected), **TOL)


def test_gae_padding_content_and_side_do_not_matter():
    rewards, values, mask = _gae_inputs("right", seed=9)
    adv, ret = gae(rewards, values, mask, 0.95, 0.9)
    # nan at padding must not leak into the response
    poisoned_r = rewards.masked_fill(~mask, float("nan"))
    poisoned_v = values.masked_fill(~mask, float("inf"))
    adv_p, ret_p = gae(poisoned_r, poisoned_v, mask, 0.95, 0.9)
    torch.testing.assert_close(adv_p, adv, **TOL)
    torch.testing.assert_close(ret_p, ret, **TOL)
    # the same responses left-padded: roll each row so its response ends at the last column
    width = mask.shape[1]
    shifts = [width - int(m.sum()) for m in mask]
    roll = lambda x: torch.stack([row.roll(s) for row, s in zip(x, shifts)])  # noqa: E731
    adv_l, ret_l = gae(roll(rewards), roll(values), roll(mask), 0.95, 0.9)
    torch.testing.assert_close(adv_l, roll(adv), **TOL)
    torch.testing.assert_close(ret_l, roll(ret), **TOL)


def test_gae_known_numbers():
    # one row, response [r=0, r=1] with V = [0.5, 0.25], then padding; gamma = 0.5, lam = 0.5:
    # delta_1 = 1 + 0.5 * 0 - 0.25 = 0.75;       A_1 = 0.75
    # delta_0 = 0 + 0.5 * 0.25 - 0.5 = -0.375;   A_0 = -0.375 + 0.25 * 0.75 = -0.1875
    # R = A + V = [0.3125, 1.0]
    adv, ret = gae(t64([[0.0, 1.0, 9.0]]), t64([[0.5, 0.25, 9.0]]), torch.tensor([[True, True, False]]), 0.5, 0.5)
    torch.testing.assert_close(adv, t64([[-0.1875, 0.75, 0.0]]), **TOL)
    torch.testing.assert_close(ret, t64([[0.3125, 1.0, 0.0]]), **TOL)


def test_gae_is_detached():
    rewards, values, mask = _gae_inputs("right")
    adv, ret = gae(rewards, values.requires_grad_(), mask, 1.0, 0.95)
    assert not adv.requires_grad and not ret.requires_grad


# ----- group-relative and leave-one-out advantages ------------------------------------------------------------
REWARDS = [0.5, 1.0, -2.0, 0.25, 3.0, 3.0, 3.0, 3.0, 0.0, 1.0, 0.0, 7.5]  # 3 groups of 4; the middle one is flat


def test_group_relative_matches_loop():
    eps = 1e-4
    out = group_relative_advantages(t64(REWARDS), group_size=4, eps=eps)
    expected = []
    for g in range(3):
        group = REWARDS[4 * g: 4 * g + 4]
        mean, std = statistics.mean(group), statistics.stdev(group)  # stdev: the n - 1 sample std
        expected += [(r - mean) / (std + eps) for r in group]
    torch.testing.assert_close(out, t64(expected), **TOL)
    assert out[4:8].abs().max().item() == 0.0  # equal rewards: no signal, no division by zero


def test_group_relative_without_std_is_dr_grpo():
    out = group_relative_advantages(t64(REWARDS), group_size=4, scale_by_std=False)
    expected = [r - statistics.mean(REWARDS[4 * (i // 4): 4 * (i // 4) + 4]) for i, r in enumerate(REWARDS)]
    torch.testing.assert_close(out, t64(expected), **TOL)


def test_leave_one_out_matches_loop():
    out = leave_one_out_advantages(t64(REWARDS), group_size=4)
    expected = []
    for g in range(3):
        group = REWARDS[4 * g: 4 * g + 4]
        for i, r in enumerate(group):
            others = [x for j, x in enumerate(group) if j != i]
            expected.append(r - math.fsum(others) / len(others))
    torch.testing.assert_close(out, t64(expected), **TOL)
    # r_i - (S - r_i)/(k-1) = (k r_i - S)/(k-1) = k/(k-1) (r_i - S/k): a rescaled mean-centring
    dr = group_relative_advantages(t64(REWARDS), 4, scale_by_std=False)
    torch.testing.assert_close(out, dr * 4 / 3, **TOL)


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_bookkeeping_follows_permutations(estimator):
    fn = {
        "grpo": lambda r, k: group_relative_advantages(r, k),
        "rloo": lambda r, k: leave_one_out_advantages(r, k),
    }[estimator]
    rewards = randn(24, seed=11)
    base = fn(rewards, 6)
    # shuffle the groups and, inside each, the completions: the advantages follow the same permutation
    g = torch.Generator().manual_seed(12)
    group_order = torch.randperm(4, generator=g)
    perm = torch.cat([6 * int(q) + torch.randperm(6, generator=g) for q in group_order])
    torch.testing.assert_close(fn(rewards[perm], 6), base[perm], **TOL)
    # a permutation that mixes groups changes them (the grouping is by consecutive blocks)
    mixed = torch.arange(24).view(6, 4).T.reshape(-1)
    assert not torch.allclose(fn(rewards[mixed], 6), base[mixed])


def test_group_estimators_check_sizes():
    with pytest.raises(ValueError, match="do not split"):
        group_relative_advantages(t64(REWARDS[:10]), 4)
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out_advantages(t64(REWARDS), 1)
    with pytest.raises(ValueError, match="1-D"):
        group_relative_advantages(t64([REWARDS]), 4)


# ----- KL estimators ------------------------------------------------------------------------------------------
def test_kl_kinds_match_formulas():
    logp, ref = randn(3, 5, seed=20), randn(3, 5, seed=21)
    formulas = {
        "kl": lambda a, b: a - b,
        "abs": lambda a, b: abs(a - b),
        "mse": lambda a, b: 0.5 * (a - b) ** 2,
        "k3": lambda a, b: (math.exp(b - a) - 1) - (b - a),  # s = q/p = exp(log q - log p): (s - 1) - log s
    }
    for kind, formula in formulas.items():
        expected = [[formula(a, b) for a, b in zip(ra, rb)] for ra, rb in zip(logp.tolist(), ref.tolist())]
        torch.testing.assert_close(kl_penalty(logp, ref, kind), t64(expected), **TOL)
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    assert kl_penalty(logp, logp, "k3").abs().max().item() == 0.0
    with pytest.raises(ValueError, match="Unknown KL penalty"):
        kl_penalty(logp, ref, "k4")


def test_full_kl_is_the_exact_divergence():
    logits_p, logits_q = randn(2, 3, 7, seed=22), randn(2, 3, 7, seed=23)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=logits_p), torch.distributions.Categorical(logits=logits_q)
    )  # [2, 3]
    logp, logq = logits_p.log_softmax(-1), logits_q.log_softmax(-1)
    torch.testing.assert_close(kl_penalty(logp, logq, "full"), expected, **TOL)
    torch.testing.assert_close(kl_penalty(logits_p, logits_q, "full"), expected, **TOL)  # logits are normalised
    # a token the policy never emits (p = 0) contributes 0 * log(0 / q) = 0
    logp_zero = logp.clone()
    logp_zero[..., 0] = float("-inf")
    logp_zero = logp_zero.log_softmax(-1)
    value = kl_penalty(logp_zero, logq, "full")
    assert torch.isfinite(value).all()
    by_hand = sum(math.exp(a) * (a - b) for a, b in zip(logp_zero[0, 0, 1:].tolist(), logq[0, 0, 1:].tolist()))
    assert value[0, 0].item() == pytest.approx(by_hand, rel=1e-12)


def test_k1_and_k3_are_unbiased_for_the_full_kl():
    # E_{x ~ p}[k(x)] over the whole vocabulary, computed exactly: sum_x p(x) k(x). For k1 this is KL(p||q)
    # by definition; for k3 the extra term E_p[q/p - 1] = sum_x q(x) - 1 = 0. k2 is biased.
    logp, logq = randn(1, 1, 6, seed=24).log_softmax(-1), randn(1, 1, 6, seed=25).log_softmax(-1)
    full = kl_penalty(logp, logq, "full")[0, 0].item()
    p = logp.exp()[0, 0]
    for kind, unbiased in (("kl", True), ("k3", True), ("mse", False)):
        per_token = kl_penalty(logp[0], logq[0], kind)[0]  # every vocabulary entry as if sampled, [v]
        expectation = (p * per_token).sum().item()
        assert (expectation == pytest.approx(full, rel=1e-12)) == unbiased, kind
    assert set(KL_PENALTIES) == {"kl", "abs", "mse", "k3", "full"}


def test_kl_penalty_is_differentiable():
    logp = randn(2, 4, seed=26).requires_grad_()
    ref = randn(2, 4, seed=27)
    kl_penalty(logp, ref, "k3").sum().backward()
    # d/dlogp [(exp(ref - logp) - 1) - (ref - logp)] = 1 - exp(ref - logp)
    torch.testing.assert_close(logp.grad, 1 - torch.exp(ref - logp.detach()), **TOL)


# ----- KL controllers -----------------------------------------------------------------------------------------
def test_adaptive_controller_trajectory():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    # KL 9: error = clip(9/6 - 1 = 0.5) = 0.2; beta = 0.2 * (1 + 0.2 * 256/10000) = 0.2 * 1.00512 = 0.201024
    assert ctl.update(9.0, 256) == pytest.approx(0.201024, rel=1e-14)
    # KL 6.6: error = 0.1 (inside the clip); beta = 0.201024 * 1.00256 = 0.20153862144
    assert ctl.update(torch.tensor(6.6, dtype=F64), 256) == pytest.approx(0.20153862144, rel=1e-14)
    # KL 3: error = clip(-0.5) = -0.2; beta = 0.20153862144 * (1 - 0.2 * 512/10000) = * 0.98976
    #       = 0.20153862144 - 0.0020637554835456 = 0.1994748659564544
    assert ctl.update(3.0, 512) == pytest.approx(0.1994748659564544, rel=1e-14)
    # KL on target: no change
    assert ctl.update(6.0, 512) == pytest.approx(0.1994748659564544, rel=1e-14)
    assert ctl.value == pytest.approx(0.1994748659564544, rel=1e-14)


def test_fixed_controller_is_constant():
    ctl = FixedKLController(0.05)
    for kl in (0.0, 100.0, -3.0):
        assert ctl.update(kl, 1000) == 0.05
    assert ctl.value == 0.05


@pytest.mark.parametrize("make", [lambda: AdaptiveKLController(0.1, 4.0, 1000), lambda: FixedKLController(0.1)])
def test_controller_state_round_trip(make):
    ctl = make()
    ctl.update(9.0, 64)
    ctl.update(5.0, 64)
    resumed = make()
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value
    for kl in (1.0, 7.0):
        assert resumed.update(kl, 32) == ctl.update(kl, 32)


# ----- KL-penalised reward ------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", ["kl", "k3"])
def test_kl_penalized_rewards_places_score_at_last_token(side, kind):
    mask = ragged_mask([3, 5, 1, 4], 5, side)
    logp, ref = randn(4, 5, seed=30), randn(4, 5, seed=31)
    scores, coef = t64([1.5, -2.0, 0.25, 4.0]), 0.1
    rewards, non_score, kl = kl_penalized_rewards(scores, logp, ref, mask, coef, kind)
    formula = (lambda a, b: a - b) if kind == "kl" else (lambda a, b: math.exp(b - a) - 1 - (b - a))
    exp_kl, exp_ns, exp_r = [], [], []
    for i in range(4):
        m = mask[i].tolist()
        last = max(j for j in range(5) if m[j])
        row_kl = [formula(logp[i, j].item(), ref[i, j].item()) if m[j] else 0.0 for j in range(5)]
        row_ns = [-coef * k for k in row_kl]
        row_r = [ns + (scores[i].item() if j == last else 0.0) for j, ns in enumerate(row_ns)]
        exp_kl.append(row_kl)
        exp_ns.append(row_ns)
        exp_r.append(row_r)
    torch.testing.assert_close(kl, t64(exp_kl), **TOL)
    torch.testing.assert_close(non_score, t64(exp_ns), **TOL)
    torch.testing.assert_close(rewards, t64(exp_r), **TOL)
    # the score sits at the last real token: column 4 for left padding, column length-1 for right padding
    last_cols = [4, 4, 4, 4] if side == "left" else [2, 4, 0, 3]
    torch.testing.assert_close((rewards - non_score)[torch.arange(4), last_cols], scores, **TOL)


def test_kl_penalized_rewards_full_kind_and_empty_rows():
    mask = ragged_mask([2, 3], 3, "right")
    logp, ref = randn(2, 3, 4, seed=32).log_softmax(-1), randn(2, 3, 4, seed=33).log_softmax(-1)
    rewards, _, kl = kl_penalized_rewards(t64([1.0, 2.0]), logp, ref, mask, 0.5, "full")
    torch.testing.assert_close(kl, kl_penalty(logp, ref, "full") * mask, **TOL)
    assert rewards.shape == (2, 3)
    with pytest.raises(ValueError, match="no response token"):
        kl_penalized_rewards(t64([1.0, 2.0]), logp[..., 0], ref[..., 0], ragged_mask([2, 0], 3, "right"), 0.5)


# ----- aggregation --------------------------------------------------------------------------------------------
def ref_aggregate(per_token, mask, mode, max_length=None):
    b = len(per_token)
    sums = [math.fsum(x for x, m in zip(rx, rm) if m) for rx, rm in zip(per_token, mask)]
    counts = [sum(rm) for rm in mask]
    if mode == "token":  # every token weighs 1 / (all tokens)
        return math.fsum(sums) / sum(counts)
    if mode == "sequence":  # mean over sequences of the sequence's token mean
        return math.fsum(s / c for s, c in zip(sums, counts)) / b
    return math.fsum(sums) / (b * max_length)  # fixed: a constant normaliser


@pytest.mark.parametrize("mode", ["token", "sequence", "fixed"])
def test_aggregate_loss_matches_reference(mode):
    mask = MASKS["holes"]
    per_token = randn(*mask.shape, seed=40)
    expected = ref_aggregate(per_token.tolist(), mask.tolist(), mode, max_length=16)
    out = aggregate_loss(per_token.masked_fill(~mask, float("nan")), mask, mode, max_length=16)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=F64), **TOL)


def test_aggregate_loss_arguments():
    per_token, mask = randn(2, 3, seed=41), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="max_length"):
        aggregate_loss(per_token, mask, "fixed")
    with pytest.raises(ValueError, match="Unknown loss aggregation"):
        aggregate_loss(per_token, mask, "seq")


@pytest.mark.parametrize("mode", ["token", "sequence", "fixed"])
def test_split_batch_with_global_normaliser_sums_to_whole(mode):
    mask = ragged_mask([9, 1, 4, 8, 2, 6, 3], 9, "right")  # parts of 14 and 19 tokens, 3 and 4 rows
    per_token = randn(*mask.shape, seed=42).requires_grad_()
    whole = aggregate_loss(per_token, mask, mode, max_length=12)
    (grad_whole,) = torch.autograd.grad(whole, per_token)
    n_tok, n_seq = mask.sum(), mask.shape[0]
    parts = [
        aggregate_loss(per_token[s], mask[s], mode, num_tokens=n_tok, num_sequences=n_seq, max_length=12)
        for s in (slice(0, 3), slice(3, 7))
    ]
    torch.testing.assert_close(parts[0] + parts[1], whole, **TOL)
    (grad_split,) = torch.autograd.grad(parts[0] + parts[1], per_token)
    torch.testing.assert_close(grad_split, grad_whole, **TOL)
    # the local normaliser is a different (mean-of-means) quantity here, so the check above has teeth
    local = [aggregate_loss(per_token[s], mask[s], mode, max_length=12) for s in (slice(0, 3), slice(3, 7))]
    assert not torch.allclose((local[0] + local[1]) / 2, whole)


# ----- PPO policy loss ----------------------------------------------------------------------------------------
def ref_policy(logp, old, adv, mask, eps_low, eps_high):
    """Per token: r = exp(logp - old), l = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)); token mean."""
    losses, clipped, log_ratios, ratios = [], [], [], []
    for lp_row, old_row, a_row, m_row in zip(logp, old, adv, mask):
        for lp, o, a, m in zip(lp_row, old_row, a_row, m_row):
            if not m:
                continue
            r = math.exp(lp - o)
            plain, clip = -a * r, -a * min(max(r, 1 - eps_low), 1 + eps_high)
            losses.append(max(plain, clip))
            clipped.append(1.0 if clip > plain else 0.0)
            log_ratios.append(lp - o)
            ratios.append(r)
    n = len(losses)
    return dict(
        loss=math.fsum(losses) / n,
        clipfrac=math.fsum(clipped) / n,
        approxkl=0.5 * math.fsum(x * x for x in log_ratios) / n,
        policykl=math.fsum(-x for x in log_ratios) / n,
        ratio_mean=math.fsum(ratios) / n,
    )


@pytest.mark.parametrize("cliprange_high", [None, 0.28])
def test_policy_loss_matches_loop(cliprange_high):
    mask = MASKS["left"]
    old = randn(*mask.shape, seed=50) - 2
    logp = old + 0.3 * randn(*mask.shape, seed=51)  # ratios spread over roughly [0.4, 2.5]
    adv = randn(*mask.shape, seed=52)
    out = ppo_policy_loss(logp, old, adv, mask, cliprange=0.2, cliprange_high=cliprange_high)
    ref = ref_policy(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, cliprange_high or 0.2)
    for name, value in ref.items():
        torch.testing.assert_close(getattr(out, name), torch.tensor(value, dtype=F64), **TOL, msg=name)
    assert 0 < ref["clipfrac"] < 1  # both clipped and unclipped tokens occur


def test_policy_loss_sequence_aggregation_and_broadcast_advantages():
    mask = MASKS["right"]
    old = randn(*mask.shape, seed=53)
    logp = old + 0.2 * randn(*mask.shape, seed=54)
    adv = randn(mask.shape[0], 1, seed=55)  # one advantage per sequence (GRPO)
    out = ppo_policy_loss(logp, old, adv, mask, aggregation="sequence")
    per_token = []
    for i in range(mask.shape[0]):
        row = []
        for j in range(mask.shape[1]):
            r, a = math.exp(logp[i, j].item() - old[i, j].item()), adv[i, 0].item()
            row.append(max(-a * r, -a * min(max(r, 0.8), 1.2)))
        per_token.append(row)
    expected = ref_aggregate(per_token, mask.tolist(), "sequence")
    torch.testing.assert_close(out.loss, torch.tensor(expected, dtype=F64), **TOL)
    expanded = ppo_policy_loss(logp, old, adv.expand_as(logp), mask, aggregation="sequence")
    torch.testing.assert_close(out.loss, expanded.loss, **TOL)
    with pytest.raises(ValueError, match="advantages must be"):
        ppo_policy_loss(logp, old, adv[:, 0], mask)


def test_higher_advantage_lowers_policy_loss():
    # ratios inside [0.8, 1.2]: loss = -mean(A r), r > 0, so raising every A lowers the loss
    mask = torch.ones(2, 3, dtype=torch.bool)
    old = randn(2, 3, seed=56)
    logp = old + 0.05 * torch.tanh(randn(2, 3, seed=57))
    adv = randn(2, 3, seed=58)
    low = ppo_policy_loss(logp, old, adv, mask).loss
    high = ppo_policy_loss(logp, old, adv + 1.0, mask).loss
    assert high < low
    # and gradient descent raises the log-prob of a positive-advantage token (d loss / d logp = -A r / N)
    logp = logp.clone().requires_grad_()
    ppo_policy_loss(logp, old, adv.abs(), mask).loss.backward()
    assert (logp.grad < 0).all()


def test_clipping_stops_gradient_outside_range_and_clipfrac_counts():
    # tokens (ratio, advantage): the clipped side is the one the advantage pushes towards
    cases = [
        (1.5, 1.0),  # A > 0 and r > 1 + eps: clipped, no gradient
        (0.5, -1.0),  # A < 0 and r < 1 - eps: clipped, no gradient
        (0.5, 2.0),  # A > 0 and r < 1 - eps: the unclipped term is the max, gradient flows
        (1.5, -2.0),  # A < 0 and r > 1 + eps: unclipped, gradient flows
        (1.1, 3.0),  # inside the range: gradient flows
        (1.5, 1.0),  # masked out: ignored
    ]
    ratios, adv = t64([[r for r, _ in cases]]), t64([[a for _, a in cases]])
    mask = torch.tensor([[True] * 5 + [False]])
    old = torch.zeros(1, 6, dtype=F64)
    logp = ratios.log().requires_grad_()
    out = ppo_policy_loss(logp, old, adv, mask, cliprange=0.2)
    out.loss.backward()
    # unclipped token: d(-A r)/d logp = -A r, over N = 5 tokens
    expected_grad = t64([[0.0, 0.0, -2.0 * 0.5 / 5, 2.0 * 1.5 / 5, -3.0 * 1.1 / 5, 0.0]])
    torch.testing.assert_close(logp.grad, expected_grad, **TOL)
    assert out.clipfrac.item() == pytest.approx(2 / 5, rel=1e-15)
    # loss = mean of [-1 * 1.2, 1 * 0.8, -2 * 0.5, 2 * 1.5, -3 * 1.1]
    assert out.loss.item() == pytest.approx((-1.2 + 0.8 - 1.0 + 3.0 - 3.3) / 5, rel=1e-13)


def test_clip_higher_widens_only_the_upper_edge():
    # r = 1.25, A > 0: clipped at 1.2 with the symmetric range, free under eps_high = 0.28.
    # r = 0.75, A < 0: clipped at 0.8 either way.
    old = torch.zeros(1, 2, dtype=F64)
    adv, mask = t64([[1.0, -1.0]]), torch.ones(1, 2, dtype=torch.bool)
    grads = {}
    for high in (None, 0.28):
        logp = t64([[math.log(1.25), math.log(0.75)]]).requires_grad_()
        ppo_policy_loss(logp, old, adv, mask, cliprange=0.2, cliprange_high=high).loss.backward()
        grads[high] = logp.grad
    torch.testing.assert_close(grads[None], t64([[0.0, 0.0]]), **TOL)
    torch.testing.assert_close(grads[0.28], t64([[-1.25 / 2, 0.0]]), **TOL)


def test_policy_loss_ignores_garbage_at_padding():
    mask = MASKS["right"]
    old = randn(*mask.shape, seed=59)
    logp = (old + 0.1 * randn(*mask.shape, seed=60)).requires_grad_()
    adv = randn(*mask.shape, seed=61)
    clean = ppo_policy_loss(logp, old, adv, mask)
    (grad_clean,) = torch.autograd.grad(clean.loss, logp)
    # padding holding -1e4 old log-probs (ratio e^1e4 = inf) and nan advantages
    dirty = ppo_policy_loss(logp, old.masked_fill(~mask, -1e4), adv.masked_fill(~mask, float("nan")), mask)
    (grad_dirty,) = torch.autograd.grad(dirty.loss, logp)
    torch.testing.assert_close(dirty.loss, clean.loss, **TOL)
    torch.testing.assert_close(grad_dirty, grad_clean, **TOL)
    for name in ("clipfrac", "approxkl", "policykl", "ratio_mean"):
        torch.testing.assert_close(getattr(dirty, name), getattr(clean, name), **TOL)


def test_policy_loss_split_batch_with_global_token_count():
    mask = MASKS["holes"]
    old = randn(*mask.shape, seed=62)
    logp = (old + 0.3 * randn(*mask.shape, seed=63)).requires_grad_()
    adv = randn(*mask.shape, seed=64)
    whole = ppo_policy_loss(logp, old, adv, mask).loss
    (grad_whole,) = torch.autograd.grad(whole, logp)
    n = mask.sum()
    split = sum(ppo_policy_loss(logp[s], old[s], adv[s], mask[s], num_tokens=n).loss
                for s in (slice(0, 2), slice(2, 5)))
    (grad_split,) = torch.autograd.grad(split, logp)
    torch.testing.assert_close(split, whole, **TOL)
    torch.testing.assert_close(grad_split, grad_whole, **TOL)


# ----- PPO value loss -----------------------------------------------------------------------------------------
def ref_value(values, old, returns, mask, eps):
    """Per token: 0.5 * max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2); token mean."""
    losses, clipped, errors = [], [], []
    for v_row, o_row, r_row, m_row in zip(values, old, returns, mask):
        for v, o, r, m in zip(v_row, o_row, r_row, m_row):
            if not m:
                continue
            plain = (v - r) ** 2
            clip = (min(max(v, o - eps), o + eps) - r) ** 2 if eps is not None else plain
            losses.append(0.5 * max(plain, clip))
            clipped.append(1.0 if clip > plain else 0.0)
            errors.append(plain)
    n = len(losses)
    return dict(loss=math.fsum(losses) / n, clipfrac=math.fsum(clipped) / n, value_error=math.fsum(errors) / n)


@pytest.mark.parametrize("eps", [0.2, None])
def test_value_loss_matches_loop(eps):
    mask = MASKS["right"]
    old = randn(*mask.shape, seed=70)
    values = old + 0.4 * randn(*mask.shape, seed=71)
    returns = old + randn(*mask.shape, seed=72)
    out = ppo_value_loss(values, old, returns, mask, cliprange_value=eps)
    ref = ref_value(values.tolist(), old.tolist(), returns.tolist(), mask.tolist(), eps)
    for name, value in ref.items():
        torch.testing.assert_close(getattr(out, name), torch.tensor(value, dtype=F64), **TOL, msg=name)
    if eps is not None:
        assert 0 < ref["clipfrac"] < 1


def test_value_clipping_gradients():
    # V_old = 0, eps = 0.2, all tokens at V = 0.5 (outside the trust region, V_clip = 0.2):
    #   R = 1.0: |V_clip - R| = 0.8 > |V - R| = 0.5 -> clipped term wins, its gradient in V is 0
    #   R = 0.0: |V - R| = 0.5 > |V_clip - R| = 0.2 -> unclipped, gradient (V - R) / N = 0.5 / 3
    #   R = 0.6: |V - R| = 0.1 < 0.4 -> clipped wins, gradient 0 (V may not chase R beyond the region)
    values = t64([[0.5, 0.5, 0.5, 0.5]]).requires_grad_()
    old, returns = torch.zeros(1, 4, dtype=F64), t64([[1.0, 0.0, 0.6, 7.0]])
    mask = torch.tensor([[True, True, True, False]])
    out = ppo_value_loss(values, old, returns, mask, cliprange_value=0.2)
    out.loss.backward()
    torch.testing.assert_close(values.grad, t64([[0.0, 0.5 / 3, 0.0, 0.0]]), **TOL)
    assert out.clipfrac.item() == pytest.approx(2 / 3, rel=1e-15)
    # loss = 0.5 * mean(0.64, 0.25, 0.16)
    assert out.loss.item() == pytest.approx(0.5 * (0.64 + 0.25 + 0.16) / 3, rel=1e-13)
