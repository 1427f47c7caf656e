"""The GRPO-family loss variants of TRL 1.16 (`losses.group.group_policy_loss`), each against a slow
reference written here with Python loops from its paper's formula, gradients against hand-derived ones,
plus the sampler importance weights, the off-policy and high-entropy masks, GDPO advantages and the
adaptive entropy coefficient on hand-computed numbers.

Notation: n completions, t tokens; A_i the advantage of completion i; r = pi / pi_old.
"""

from __future__ import annotations

import math

import pytest
import torch

from tether.losses.advantages import normalize_then_sum_advantages
from tether.losses.group import (
    AdaptiveEntropyCoefficient,
    group_policy_loss,
    high_entropy_mask,
    off_policy_sequence_mask,
    sampler_importance_weights,
)

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)
LENGTHS = [3, 1, 4, 2]
WIDTH = 4


def batch(seed: int = 0, spread: float = 0.4):
    g = torch.Generator().manual_seed(seed)
    n = len(LENGTHS)
    mask = torch.tensor([[j < length for j in range(WIDTH)] for length in LENGTHS])
    logps = -torch.rand(n, WIDTH, generator=g, dtype=F64) - 0.2
    old = logps + spread * torch.randn(n, WIDTH, generator=g, dtype=F64)
    ref = logps + spread * torch.randn(n, WIDTH, generator=g, dtype=F64)
    advantages = torch.tensor([1.3, -0.7, -1.1, 0.4], dtype=F64)
    return logps.requires_grad_(), old, ref, advantages, mask


def real(mask, i):
    return [j for j in range(mask.shape[1]) if mask[i, j]]


def loss_and_grad(fn, logps):
    loss = fn(logps)
    (grad,) = torch.autograd.grad(loss, logps)
    return float(loss.detach()), grad


# ----- per-token objectives ----------------------------------------------------------------------------------
def test_cispo_against_loops():
    """CISPO: l_t = -min(r_t, eps_max) A log pi_t with the weight a constant; token mean (dapo-style).
    d l_t / d log pi_t = -min(r_t, eps_max) A."""
    logps, old, _, adv, mask = batch()
    eps_max = 1.1
    total, grads, count = 0.0, torch.zeros_like(logps), int(mask.sum())
    for i in range(4):
        for j in real(mask, i):
            w = min(math.exp(float(logps.detach()[i, j]) - float(old[i, j])), eps_max)
            total += -w * float(adv[i]) * float(logps.detach()[i, j])
            grads[i, j] = -w * float(adv[i]) / count
    loss, grad = loss_and_grad(lambda lp: group_policy_loss(lp, old, adv, mask, "cispo", 0.2, eps_max).loss, logps)
    assert loss == pytest.approx(total / count, rel=1e-12)
    torch.testing.assert_close(grad, grads, **TOL)


def test_sapo_against_loops():
    """SAPO: l_t = -(4 / tau) sigmoid(tau (r_t - 1)) A, tau = tau_pos if A > 0 else tau_neg; sequence mean
    (grpo-style). d l_t / d log pi_t = -4 s (1 - s) r_t A."""
    logps, old, _, adv, mask = batch(1)
    tp, tn = 1.0, 1.05
    total, grads = 0.0, torch.zeros_like(logps)
    for i in range(4):
        tau, a, rows = (tp if adv[i] > 0 else tn), float(adv[i]), real(mask, i)
        for j in rows:
            r = math.exp(float(logps.detach()[i, j]) - float(old[i, j]))
            sig = 1 / (1 + math.exp(-tau * (r - 1)))
            total += -(4 / tau) * sig * a / len(rows) / 4
            grads[i, j] = -4 * sig * (1 - sig) * r * a / len(rows) / 4
    loss, grad = loss_and_grad(lambda lp: group_policy_loss(
        lp, old, adv, mask, "sapo", sapo_temperature_pos=tp, sapo_temperature_neg=tn).loss, logps)
    assert loss == pytest.approx(total, rel=1e-12)
    torch.testing.assert_close(grad, grads, **TOL)


def test_sapo_gradient_is_plain_policy_gradient_on_policy():
    """At r = 1 the gate's slope is 1: the gradient is -A / (|o_i| n) per token, as GRPO's."""
    logps, _, _, adv, mask = batch(2)
    grad = torch.autograd.grad(group_policy_loss(logps, logps.detach(), adv, mask, "sapo").loss, logps)[0]
    expected = torch.stack([torch.where(mask[i], -adv[i] / LENGTHS[i] / 4, 0.0) for i in range(4)])
    torch.testing.assert_close(grad, expected, **TOL)


def test_vespo_against_loops():
    """VESPO: w_i = prod_t r_t (unnormalised), phi = exp(lam + k log w - lam w), (k, lam) by sign of A;
    l_t = -phi A log pi_t (phi constant), token mean."""
    logps, old, _, adv, mask = batch(3, spread=0.1)
    kp, lp_, kn, ln = 2.0, 3.0, 3.0, 2.0
    total, grads, count = 0.0, torch.zeros_like(logps), int(mask.sum())
    for i in range(4):
        log_w = sum(float(logps.detach()[i, j]) - float(old[i, j]) for j in real(mask, i))
        k, lam = (kp, lp_) if adv[i] >= 0 else (kn, ln)
        phi = math.exp(lam + k * log_w - lam * math.exp(log_w))
        for j in real(mask, i):
            total += -phi * float(adv[i]) * float(logps.detach()[i, j])
            grads[i, j] = -phi * float(adv[i]) / count
    loss, grad = loss_and_grad(lambda x: group_policy_loss(x, old, adv, mask, "vespo").loss, logps)
    assert loss == pytest.approx(total / count, rel=1e-10)
    torch.testing.assert_close(grad, grads, **TOL)


def test_vespo_weight_is_one_on_policy_and_smaller_off_it():
    logps, _, _, adv, mask = batch(4)
    on = group_policy_loss(logps, logps.detach(), adv, mask, "vespo")
    assert float(on.extra["vespo/phi_seq_mean"]) == pytest.approx(1.0, rel=1e-12)
    off = group_policy_loss(logps, logps.detach() - 0.3, adv, mask, "vespo")  # w > 1 everywhere
    assert float(off.extra["vespo/phi_seq_mean"]) < 1.0


def test_two_sided_clipping_caps_negative_advantage_ratio():
    """delta: l = -min(A min(r, delta), A clip(r, 1-eps, 1+eps)). With A < 0 and r = 5 > delta = 2, the loss
    is -A * 2 and its gradient is 0 (the cap is flat); without delta it is -A * 5 with gradient -A r."""
    mask = torch.tensor([[True]])
    adv = torch.tensor([-1.0], dtype=F64)
    logp = torch.tensor([[math.log(5.0)]], dtype=F64, requires_grad=True)
    old = torch.zeros(1, 1, dtype=F64)
    capped = group_policy_loss(logp, old, adv, mask, "dapo", delta=2.0).loss
    plain = group_policy_loss(logp, old, adv, mask, "dapo").loss
    assert float(capped) == pytest.approx(2.0) and float(plain) == pytest.approx(5.0)
    assert float(torch.autograd.grad(capped, logp)[0]) == 0.0
    assert float(torch.autograd.grad(plain, logp)[0]) == pytest.approx(5.0)


# ----- importance sampling level (GSPO) and LUSPO ----------------------------------------------------------------
def test_sequence_level_ratio_against_loops_and_gspo_token_form():
    """GSPO: s_i = exp(mean_t (log pi - log pi_old)); l_i = max(-A s_i, -A clip(s_i)), every token of o_i
    carries l_i; dapo reduction (sum over tokens / token count). The gradient equals that of GSPO-token's
    stop-gradient form s_it = sg[s_i] pi_t / sg[pi_t] (same values, same clip decisions)."""
    logps, old, _, adv, mask = batch(5, spread=0.15)
    count = int(mask.sum())
    total = 0.0
    for i in range(4):
        rows = real(mask, i)
        s = math.exp(sum(float(logps.detach()[i, j]) - float(old[i, j]) for j in rows) / len(rows))
        a = float(adv[i])
        total += max(-a * s, -a * min(max(s, 0.8), 1.2)) * len(rows)
    loss, grad = loss_and_grad(lambda x: group_policy_loss(
        x, old, adv, mask, "dapo", importance_sampling_level="sequence").loss, logps)
    assert loss == pytest.approx(total / count, rel=1e-12)

    def gspo_token(lp):
        log_s = (torch.where(mask, lp - old, 0.0).sum(-1) / mask.sum(-1)).detach()[:, None]
        s_token = torch.exp(log_s + lp - lp.detach())  # value s_i, gradient s_i d log pi_t
        clipped = torch.clamp(s_token, 0.8, 1.2)
        per = torch.maximum(-adv[:, None] * s_token, -adv[:, None] * clipped)
        return torch.where(mask, per, 0.0).sum() / count

    torch.testing.assert_close(grad, torch.autograd.grad(gspo_token(logps), logps)[0], **TOL)


def test_luspo_is_length_weighted_sequence_loss():
    """LUSPO: sum_i |o_i| l_i / n with GSPO's sequence-level l_i (token sum per sequence, mean over n)."""
    logps, old, _, adv, mask = batch(6, spread=0.1)
    total = 0.0
    for i in range(4):
        rows = real(mask, i)
        s = math.exp(sum(float(logps.detach()[i, j]) - float(old[i, j]) for j in rows) / len(rows))
        a = float(adv[i])
        total += len(rows) * max(-a * s, -a * min(max(s, 0.8), 1.2))
    out = group_policy_loss(logps, old, adv, mask, "luspo", importance_sampling_level="sequence")
    assert float(out.loss) == pytest.approx(total / 4, rel=1e-12)


# ----- KL bias correction -------------------------------------------------------------------------------------------
def test_bias_corrected_kl_gradient():
    """With A = 0 only the KL term remains: l_t = beta * k3_t * r_t (r differentiable). On-policy (r = 1):
    d/d lp_t [k3 r] = dk3/dlp + k3, with k3 = e^d - d - 1, d = ref - lp, dk3/dlp = 1 - e^d.
    Without the correction the second term is missing."""
    logps, _, ref, _, mask = batch(7)
    adv = torch.zeros(4, dtype=F64)
    beta, count = 0.1, int(mask.sum())
    expected_corr, expected_plain = torch.zeros_like(logps), torch.zeros_like(logps)
    for i in range(4):
        for j in real(mask, i):
            d = float(ref[i, j]) - float(logps.detach()[i, j])
            k3 = math.exp(d) - d - 1
            expected_plain[i, j] = beta * (1 - math.exp(d)) / count
            expected_corr[i, j] = beta * (1 - math.exp(d) + k3) / count
    for correct, expected in ((True, expected_corr), (False, expected_plain)):
        out = group_policy_loss(logps, logps.detach(), adv, mask, "dapo", beta=beta, ref_logps=ref,
                                use_bias_correction_kl=correct)
        torch.testing.assert_close(torch.autograd.grad(out.loss, logps)[0], expected, **TOL)


# ----- token factors ---------------------------------------------------------------------------------------------
def test_off_policy_sequence_mask_by_hand():
    """Drop o_i iff A_i < 0 and mean_t (log pi_sampler - log pi) > threshold."""
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    logps = torch.zeros(3, 2, dtype=F64)
    sampling = torch.tensor([[0.8, 0.4], [0.2, 9.0], [0.9, 0.9]], dtype=F64)  # mean KL 0.6, 0.2, 0.9
    adv = torch.tensor([[-1.0], [-1.0], [2.0]], dtype=F64)
    keep = off_policy_sequence_mask(adv, logps, sampling, mask, threshold=0.5)
    assert keep.flatten().tolist() == [0.0, 1.0, 1.0]  # high KL & A<0 dropped; low KL kept; A>0 kept


def test_off_policy_mask_removes_sequences_from_the_loss():
    logps, old, _, adv, mask = batch(8)
    sampling = logps.detach() + torch.tensor([2.0, 0.0, 0.0, 0.0], dtype=F64)[:, None]  # o_0: KL 2, but A_0 > 0
    sampling[2] += 2.0  # o_2: KL 2 and A_2 < 0 -> dropped
    out = group_policy_loss(logps, old, adv, mask, "dapo", off_policy_threshold=0.5, sampling_logps=sampling,
                            num_tokens=float(mask.sum()))
    mask_without_2 = mask.clone()
    mask_without_2[2] = False
    ref = group_policy_loss(logps, old, adv, mask_without_2, "dapo", num_tokens=float(mask.sum()))
    assert float(out.loss) == pytest.approx(float(ref.loss), rel=1e-12)


def test_high_entropy_mask_by_hand():
    """Real-token entropies 1..6; keep the top 1/2: quantile(0.5) of [1..6] = 3.5 -> keep 4, 5, 6."""
    entropy = torch.tensor([[1.0, 5.0, 9.0], [2.0, 6.0, 9.0], [3.0, 4.0, 9.0]])
    mask = torch.tensor([[True, True, False], [True, True, False], [True, True, False]])
    kept = high_entropy_mask(entropy, mask, 0.5)
    assert kept.tolist() == [[False, True, False], [False, True, False], [False, True, False]]
    assert high_entropy_mask(entropy, mask, 1.0).equal(mask)
    assert int(high_entropy_mask(entropy, mask, 0.0).sum()) == 1  # only the highest


@pytest.mark.parametrize("mode,expected", [
    # per-token ratios e^{0.5}=1.6487, e^{-2}=0.1353, e^{1.5}=4.4817; sequence: e^{0}=1
    ("token_truncate", [[1.6487212707, 0.5, 3.0]]),
    ("token_mask", [[1.6487212707, 0.0, 0.0]]),
    ("sequence_truncate", [[1.0]]),
    ("sequence_mask", [[1.0]]),
])
def test_sampler_importance_weights_by_hand(mode, expected):
    trainer = torch.tensor([[0.5, -2.0, 1.5]], dtype=F64)
    sampler = torch.zeros(1, 3, dtype=F64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    weights = sampler_importance_weights(trainer, sampler, mask, mode, clip_min=0.5, clip_max=3.0)
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=F64), rtol=1e-9, atol=1e-9)


def test_sampler_importance_weights_ignore_padding_and_nan():
    trainer = torch.tensor([[0.5, 7.0, 0.3]], dtype=F64)
    sampler = torch.tensor([[0.0, 0.0, float("nan")]], dtype=F64)
    mask = torch.tensor([[True, False, True]])
    w = sampler_importance_weights(trainer, sampler, mask, "sequence_truncate", None, 10.0)
    assert float(w) == pytest.approx(math.exp(0.5))  # padding and NaN contribute ratio 1


def test_sampler_weights_multiply_the_policy_term():
    logps, old, _, adv, mask = batch(9)
    weights = torch.tensor([[0.5], [1.0], [0.0], [2.0]], dtype=F64)
    out = group_policy_loss(logps, old, adv, mask, "grpo", sampler_weights=weights)
    parts = [group_policy_loss(logps[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1], "grpo").loss
             for i in range(4)]
    assert float(out.loss) == pytest.approx(sum(float(w) * float(p) for w, p in zip(weights, parts)) / 4, rel=1e-12)


def test_entropy_bonus_gradient_and_direction():
    """loss = policy - coef * mean_masked(H) / normaliser: d/dH_t = -coef / (tokens * normaliser)."""
    logps, old, _, adv, mask = batch(10)
    entropy = torch.rand(4, WIDTH, dtype=F64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    out = group_policy_loss(logps, old, adv, mask, "dapo", entropy=entropy, entropy_coef=0.3,
                            entropy_normaliser=2.0)
    grad = torch.autograd.grad(out.loss, entropy)[0]
    expected = torch.zeros(4, WIDTH, dtype=F64)
    expected[mask] = -0.3 / (int(mask.sum()) * 2.0)
    torch.testing.assert_close(grad, expected, **TOL)
    assert float(out.loss) < float(out.policy_loss)  # a bonus lowers the loss


# ----- advantages and the entropy controller ---------------------------------------------------------------------
def test_normalize_then_sum_advantages_by_hand():
    """Two functions, groups of 2. Per group and function: z = (r - mean) / (std + 1e-4), std unbiased;
    group 0: f0 [1, 3] -> z [-1, 1]/(1.41421+eps)...; then s = w . z, A = (s - mean(s)) / (std(s) + 1e-4)."""
    r = torch.tensor([[1.0, 10.0], [3.0, 30.0], [5.0, 0.0], [5.0, 20.0]], dtype=F64)
    w = torch.tensor([1.0, 0.5], dtype=F64)
    eps = 1e-4

    def z(a, b):
        std = abs(a - b) / math.sqrt(2)
        m = (a + b) / 2
        return (a - m) / (std + eps), (b - m) / (std + eps)

    z00, z10 = z(1.0, 3.0)
    z01, z11 = z(10.0, 30.0)
    z20, z30 = z(5.0, 5.0)
    z21, z31 = z(0.0, 20.0)
    s = [z00 + 0.5 * z01, z10 + 0.5 * z11, z20 + 0.5 * z21, z30 + 0.5 * z31]
    mean = sum(s) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in s) / 3)
    expected = torch.tensor([(x - mean) / (std + eps) for x in s], dtype=F64)
    torch.testing.assert_close(normalize_then_sum_advantages(r, w, 2), expected, **TOL)


def test_normalize_then_sum_decouples_scales():
    """A reward with 1000x the scale does not drown the other: each group's winner gets the same advantage
    (up to the 1e-4 added to each std, relatively larger for the small scale)."""
    r = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1000.0]], dtype=F64)
    a = normalize_then_sum_advantages(r, torch.ones(2, dtype=F64), 2)
    assert float(a[1]) == pytest.approx(float(a[3]), rel=1e-3)
    summed = r.sum(1)  # sum_then_normalize would see rewards 0, 1, 0, 1000: the first winner nearly ties
    assert float(summed[1] - summed.mean()) < 0.01 * float(summed[3] - summed.mean())


def test_adaptive_entropy_coefficient_by_hand():
    c = AdaptiveEntropyCoefficient(initial=0.01, target=0.5, step=0.005, minimum=0.0, maximum=0.012)
    assert c.applied == 0.0  # nothing measured yet
    c.update(0.4)  # below target: up, capped at the maximum
    assert c.coef == pytest.approx(0.012) and c.applied == pytest.approx(0.012)
    c.update(0.9)  # above: down, and not applied
    assert c.coef == pytest.approx(0.007) and c.applied == 0.0
    c.update(0.9)
    c.update(0.9)
    assert c.coef == 0.0  # floored at the minimum
