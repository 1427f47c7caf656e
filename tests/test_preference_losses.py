"""Preference losses (DPO family, SimPO, CPO, ORPO, KTO) against slow references written here from the
papers' formulas in plain Python `math`, one float at a time, plus known points, direction checks and
the numerics of ORPO's log-odds.

Notation as in the module: r_w = log pi(y_w) - log pi_ref(y_w), r_l likewise, h = r_w - r_l."""

from __future__ import annotations

import math

import pytest
import torch

from tether.losses.preference import (
    DPO_LOSSES,
    bco_pair_loss,
    cpo_loss,
    dpo_loss,
    kto_loss,
    kto_reference_point,
    log1mexp,
    orpo_loss,
    robust_loss,
    sigmoid_loss,
    simpo_loss,
)

TOL = dict(rtol=1e-10, atol=1e-10)


# ----- plain-math helpers -----------------------------------------------------------------------------
def log_sigmoid(x: float) -> float:
    # log(1 / (1 + e^-x)), written on the side where the exponential cannot overflow
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ----- references for the pairwise losses, from the papers ------------------------------------------------
# Each takes lists pc, pr, rc, rr (policy/ref, chosen/rejected) and returns the per-pair losses.
def ref_sigmoid(pc, pr, rc, rr, beta, eps):
    # DPO eq. 7: -log sigma(beta h). cDPO: the expectation of that loss when the label is flipped with
    # probability eps, i.e. (1 - eps) * [-log sigma(beta h)] + eps * [-log sigma(-beta h)].
    out = []
    for a, b, c, d in zip(pc, pr, rc, rr, strict=True):
        h = (a - c) - (b - d)
        out.append((1 - eps) * -log_sigmoid(beta * h) + eps * -log_sigmoid(-beta * h))
    return out


def ref_robust(pc, pr, rc, rr, beta, eps):
    # rDPO: with l(w, l) = -log sigma(beta h) and l(l, w) the loss with the labels swapped (h -> -h),
    # loss = [(1 - eps) l(w, l) - eps l(l, w)] / (1 - 2 eps).
    out = []
    for a, b, c, d in zip(pc, pr, rc, rr, strict=True):
        h = (a - c) - (b - d)
        clean, swapped = -log_sigmoid(beta * h), -log_sigmoid(-beta * h)
        out.append(((1 - eps) * clean - eps * swapped) / (1 - 2 * eps))
    return out


def ref_hinge(pc, pr, rc, rr, beta, eps):
    # SLiC rank calibration max(0, delta - h) with delta = 1/beta, scaled by beta: max(0, 1 - beta h)
    return [max(0.0, 1.0 - beta * ((a - c) - (b - d))) for a, b, c, d in zip(pc, pr, rc, rr, strict=True)]


def ref_ipo(pc, pr, rc, rr, beta, eps):
    # IPO eq. 17 with tau = beta: (h - 1/(2 tau))^2, h from per-token averaged log-probs
    return [((a - c) - (b - d) - 1 / (2 * beta)) ** 2 for a, b, c, d in zip(pc, pr, rc, rr, strict=True)]


def ref_exo_pair(pc, pr, rc, rr, beta, eps):
    # EXO, K = 2: q = softmax(beta [r_w, r_l]) = [e^{beta r_w}, e^{beta r_l}] / (sum), p = [1 - eps, eps],
    # loss = KL(q || p) = sum_i q_i log(q_i / p_i)
    out = []
    for a, b, c, d in zip(pc, pr, rc, rr, strict=True):
        ew, el = math.exp(beta * (a - c)), math.exp(beta * (b - d))
        qw, ql = ew / (ew + el), el / (ew + el)
        out.append(qw * math.log(qw / (1 - eps)) + ql * math.log(ql / eps))
    return out


def ref_nca_pair(pc, pr, rc, rr, beta, eps):
    # NCA (pairwise): -log sigma(u_w) - 1/2 [log sigma(-u_w) + log sigma(-u_l)], u = beta r;
    # log sigma(-u) = log(1 - sigma(u))
    out = []
    for a, b, c, d in zip(pc, pr, rc, rr, strict=True):
        uw, ul = beta * (a - c), beta * (b - d)
        out.append(-math.log(sigmoid(uw)) - 0.5 * math.log(1 - sigmoid(uw)) - 0.5 * math.log(1 - sigmoid(ul)))
    return out


def ref_bco_pair(pc, pr, rc, rr, beta, eps, delta=None):
    # BCO: classifier with logit u - delta, chosen -> 1, rejected -> 0:
    # -log sigma(u_w - delta) - log(1 - sigma(u_l - delta)); default delta = mean of all 2b rewards
    uw = [beta * (a - c) for a, c in zip(pc, rc, strict=True)]
    ul = [beta * (b - d) for b, d in zip(pr, rr, strict=True)]
    if delta is None:
        delta = sum(uw + ul) / (len(uw) + len(ul))
    return [-math.log(sigmoid(w - delta)) - math.log(1 - sigmoid(v - delta)) for w, v in zip(uw, ul, strict=True)]


def ref_sppo_hard(pc, pr, rc, rr, beta, eps):
    # SPPO eq. 4.7: (r - eta (P - 1/2))^2, P(winner) = 1, P(loser) = 0, eta = 1/beta
    eta = 1 / beta
    return [((a - c) - eta * (1 - 0.5)) ** 2 + ((b - d) - eta * (0 - 0.5)) ** 2
            for a, b, c, d in zip(pc, pr, rc, rr, strict=True)]


def ref_apo_zero(pc, pr, rc, rr, beta, eps):
    # APO-zero eq. 7 (+1): 1 - sigma(beta r_w) + sigma(beta r_l)
    return [1 - sigmoid(beta * (a - c)) + sigmoid(beta * (b - d)) for a, b, c, d in zip(pc, pr, rc, rr, strict=True)]


def ref_apo_down(pc, pr, rc, rr, beta, eps):
    # APO-down eq. 8 (+1): sigma(beta r_w) + 1 - sigma(beta (r_w - r_l))
    return [sigmoid(beta * (a - c)) + 1 - sigmoid(beta * ((a - c) - (b - d)))
            for a, b, c, d in zip(pc, pr, rc, rr, strict=True)]


def ref_aot(pc, pr, rc, rr, beta, eps):
    # AOT (paired): the k-th smallest policy margin log pi(y_w) - log pi(y_l) against the k-th smallest
    # reference margin, through the cDPO logistic
    policy = sorted(a - b for a, b in zip(pc, pr, strict=True))
    ref = sorted(c - d for c, d in zip(rc, rr, strict=True))
    return [(1 - eps) * -log_sigmoid(beta * (m - n)) + eps * -log_sigmoid(-beta * (m - n))
            for m, n in zip(policy, ref, strict=True)]


def ref_aot_unpaired(pc, pr, rc, rr, beta, eps):
    # AOT (unpaired): the k-th smallest chosen log-ratio against the k-th smallest rejected one
    chosen = sorted(a - c for a, c in zip(pc, rc, strict=True))
    rejected = sorted(b - d for b, d in zip(pr, rr, strict=True))
    return [(1 - eps) * -log_sigmoid(beta * (w - v)) + eps * -log_sigmoid(-beta * (w - v))
            for w, v in zip(chosen, rejected, strict=True)]


def ref_discopop(pc, pr, rc, rr, beta, eps, tau=0.05):
    # DiscoPOP eq. 5: rho = beta h, m = sigma(rho / tau): (1 - m) * -log sigma(rho) + m * exp(-rho)
    out = []
    for a, b, c, d in zip(pc, pr, rc, rr, strict=True):
        rho = beta * ((a - c) - (b - d))
        m = sigmoid(rho / tau)
        out.append((1 - m) * -log_sigmoid(rho) + m * math.exp(-rho))
    return out


def ref_sft(pc, pr, rc, rr, beta, eps, chosen_tokens=None):
    # NLL of the chosen completions per token over the batch, the same number in every entry
    tokens = chosen_tokens or [1.0] * len(pc)
    nll = -sum(pc) / sum(tokens)
    return [nll] * len(pc)


def ref_sigmoid_norm(pc, pr, rc, rr, beta, eps, chosen_tokens=None, rejected_tokens=None):
    # DPO on per-token log-ratios: -log sigma(beta (r_w / n_w - r_l / n_l))
    n_w = chosen_tokens or [1.0] * len(pc)
    n_l = rejected_tokens or [1.0] * len(pc)
    return [-log_sigmoid(beta * ((a - c) / x - (b - d) / y)) for a, b, c, d, x, y in zip(pc, pr, rc, rr, n_w, n_l,
                                                                                       strict=True)]


REFERENCES = {
    "sigmoid": ref_sigmoid, "robust": ref_robust, "hinge": ref_hinge, "ipo": ref_ipo,
    "exo_pair": ref_exo_pair, "nca_pair": ref_nca_pair, "bco_pair": ref_bco_pair,
    "sppo_hard": ref_sppo_hard, "apo_zero": ref_apo_zero, "apo_down": ref_apo_down,
    "aot": ref_aot, "aot_unpaired": ref_aot_unpaired, "discopop": ref_discopop, "sft": ref_sft,
    "sigmoid_norm": ref_sigmoid_norm,
}
SMOOTHING_CASES = {"sigmoid": [0.0, 0.1, 0.5], "robust": [0.0, 0.2, 0.45], "exo_pair": [1e-3, 0.1],
                   "aot": [0.0, 0.2], "aot_unpaired": [0.0, 0.2]}
DIRECTION_SMOOTHING = {"sigmoid": 0.1, "robust": 0.2, "exo_pair": 1e-3, "aot": 0.1,
                       "aot_unpaired": 0.1}  # eps < 1/2 keeps the label's side
PER_TOKEN_INPUTS = {"ipo", "sigmoid_norm", "sft"}  # without token counts their inputs are per-token averages


def random_logps(seed: int, b: int = 16, averaged: bool = False) -> list[list[float]]:
    """pc, pr, rc, rr as float lists: summed log-probs in [-80, -10] (or averaged ones in [-3, -0.1]),
    the reference a few nats (tenths for averages) away from the policy."""
    g = torch.Generator().manual_seed(seed)
    low, high, spread = (-3.0, -0.1, 0.3) if averaged else (-80.0, -10.0, 4.0)
    pc, pr = (low + (high - low) * torch.rand(2, b, generator=g, dtype=torch.float64)).unbind(0)
    noise = spread * torch.randn(2, b, generator=g, dtype=torch.float64)  # [2, b]
    rc, rr = pc + noise[0], pr + noise[1]
    return [x.tolist() for x in (pc, pr, rc, rr)]


def test_table_has_each_documented_name():
    assert set(DPO_LOSSES) == set(REFERENCES)


@pytest.mark.parametrize("loss_type", sorted(REFERENCES))
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_pairwise_losses_match_reference_on_random_logps(loss_type, beta):
    pc, pr, rc, rr = random_logps(seed=len(loss_type), averaged=loss_type in PER_TOKEN_INPUTS)
    for eps in SMOOTHING_CASES.get(loss_type, [0.0]):
        out = dpo_loss(loss_type, t(pc), t(pr), t(rc), t(rr), beta=beta, label_smoothing=eps)
        expected = REFERENCES[loss_type](pc, pr, rc, rr, beta, eps)
        torch.testing.assert_close(out.losses, t(expected), **TOL)
        # implicit rewards: beta * (policy - reference) for every loss in the table
        torch.testing.assert_close(out.chosen_rewards, t([beta * (a - c) for a, c in zip(pc, rc, strict=True)]), **TOL)
        torch.testing.assert_close(out.rejected_rewards, t([beta * (b - d) for b, d in zip(pr, rr, strict=True)]),
                                   **TOL)


# Known points, worked by hand. Each row: loss, beta, eps, (r_w, r_l), expected loss.
KNOWN_POINTS = [
    # beta h = 0.5 * 2 = 1: -log sigma(1) = log(1 + e^-1)
    ("sigmoid", 0.5, 0.0, (1.0, -1.0), math.log1p(math.exp(-1.0))),
    # h = 0: any smoothing gives log 2 ((1 - eps) log 2 + eps log 2)
    ("sigmoid", 0.5, 0.3, (0.4, 0.4), math.log(2.0)),
    # rDPO at h = 0: [(1 - eps) log 2 - eps log 2] / (1 - 2 eps) = log 2
    ("robust", 0.5, 0.2, (0.0, 0.0), math.log(2.0)),
    # hinge: beta h = 1 sits exactly on the margin -> 0; beta h = 0.5 -> 0.5
    ("hinge", 0.5, 0.0, (1.0, -1.0), 0.0),
    ("hinge", 0.5, 0.0, (0.5, -0.5), 0.5),
    # IPO target 1/(2 beta) = 1: h = 1 -> 0, h = 0 -> 1, h = 3 -> 4 (past the target is penalised too)
    ("ipo", 0.5, 0.0, (0.5, -0.5), 0.0),
    ("ipo", 0.5, 0.0, (0.0, 0.0), 1.0),
    ("ipo", 0.5, 0.0, (2.0, -1.0), 4.0),
    # EXO: KL(q || p) = 0 where q_w = 1 - eps, i.e. beta h = log((1 - eps) / eps)
    ("exo_pair", 1.0, 0.1, (math.log(9.0), 0.0), 0.0),
    # NCA at u = 0: -log(1/2) - 1/2 log(1/2) - 1/2 log(1/2) = 2 log 2
    ("nca_pair", 0.5, 0.0, (0.0, 0.0), 2 * math.log(2.0)),
    # SPPO targets r_w = +1/(2 beta) = 1, r_l = -1: zero; at r = 0: 1 + 1 = 2
    ("sppo_hard", 0.5, 0.0, (1.0, -1.0), 0.0),
    ("sppo_hard", 0.5, 0.0, (0.0, 0.0), 2.0),
    # APO at r = 0: zero: 1 - 1/2 + 1/2 = 1; down: 1/2 + 1 - 1/2 = 1
    ("apo_zero", 0.5, 0.0, (0.0, 0.0), 1.0),
    ("apo_down", 0.5, 0.0, (0.0, 0.0), 1.0),
    # AOT with one pair: the sorts are identities, so it is DPO: -log sigma(0.5 * 2)
    ("aot", 0.5, 0.0, (1.0, -1.0), math.log1p(math.exp(-1.0))),
    ("aot_unpaired", 0.5, 0.0, (1.0, -1.0), math.log1p(math.exp(-1.0))),
    # DiscoPOP at rho = 0: m = 1/2, so 1/2 log 2 + 1/2 * 1
    ("discopop", 0.5, 0.0, (0.3, 0.3), 0.5 * math.log(2.0) + 0.5),
    # sigmoid_norm without counts is DPO on the given (per-token) log-ratios
    ("sigmoid_norm", 0.5, 0.0, (1.0, -1.0), math.log1p(math.exp(-1.0))),
]


@pytest.mark.parametrize(("loss_type", "beta", "eps", "ratios", "expected"), KNOWN_POINTS)
def test_known_points(loss_type, beta, eps, ratios, expected):
    r_w, r_l = ratios
    ref_c, ref_r = -10.0, -12.0  # the reference log-probs cancel; only the ratios matter
    out = dpo_loss(loss_type, t([ref_c + r_w]), t([ref_r + r_l]), t([ref_c]), t([ref_r]), beta, eps)
    assert out.losses.item() == pytest.approx(expected, abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(beta * r_w, abs=1e-12)
    assert out.rejected_rewards.item() == pytest.approx(beta * r_l, abs=1e-12)


# ----- directions, gradients, diagnostics --------------------------------------------------------------------
def _grads(loss_type: str, eps: float):
    # At r_w = r_l = 0 every loss in the table is on the side of its target where it should still push
    # the chosen log-prob up and the rejected one down (IPO/SPPO/EXO/NCA have finite targets).
    pc = torch.tensor([-20.0, -5.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-22.0, -6.0], dtype=torch.float64, requires_grad=True)
    out = dpo_loss(loss_type, pc, pr, pc.detach().clone(), pr.detach().clone(), beta=0.3, label_smoothing=eps)
    out.losses.sum().backward()
    return pc.grad, pr.grad, out


# sft ignores the rejected completion (checked below); DiscoPOP has a small bump at rho = 0 (its loss is not
# monotone there: d loss / d rho = 0.78 at beta = 1, tau = 0.05), so its direction is checked off zero below.
@pytest.mark.parametrize("loss_type", sorted(set(DPO_LOSSES) - {"sft", "discopop"}))
def test_direction_rejected_up_raises_loss(loss_type):
    _, grad_rejected, out = _grads(loss_type, DIRECTION_SMOOTHING.get(loss_type, 0.0))
    assert (grad_rejected > 0).all(), grad_rejected
    assert out.losses.shape == (2,) and out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


@pytest.mark.parametrize("loss_type", sorted(set(DPO_LOSSES) - {"apo_down", "discopop"}))
def test_direction_chosen_up_lowers_loss(loss_type):
    grad_chosen, _, _ = _grads(loss_type, DIRECTION_SMOOTHING.get(loss_type, 0.0))
    assert (grad_chosen < 0).all(), grad_chosen


def test_apo_down_pushes_chosen_down_once_the_margin_is_won():
    # d/dr_w [sigma(beta r_w) - sigma(beta (r_w - r_l))] = beta [sigma'(beta r_w) - sigma'(beta (r_w - r_l))]:
    # zero at r_l = 0, positive when r_l << 0 (the margin term saturates, the anchor term does not).
    pc = torch.tensor([-10.0], dtype=torch.float64, requires_grad=True)
    dpo_loss("apo_down", pc, t([-40.0]), t([-10.0]), t([-10.0]), beta=0.5).losses.sum().backward()
    assert pc.grad.item() > 0


def test_dpo_loss_decreases_with_a_step_on_chosen_and_increases_with_one_on_rejected():
    pc, pr, rc, rr = t([-10.0, -30.0]), t([-12.0, -25.0]), t([-11.0, -28.0]), t([-11.0, -26.0])
    base = sigmoid_loss(pc, pr, rc, rr, beta=0.1).losses
    assert (sigmoid_loss(pc + 0.5, pr, rc, rr, beta=0.1).losses < base).all()
    assert (sigmoid_loss(pc, pr + 0.5, rc, rr, beta=0.1).losses > base).all()


def test_cdpo_at_one_half_is_symmetric_in_the_label():
    # eps = 1/2: -(1/2)[log sigma(z) + log sigma(-z)] is even in z, so swapping chosen and rejected changes nothing
    pc, pr, rc, rr = (t(x) for x in random_logps(seed=3))
    a = sigmoid_loss(pc, pr, rc, rr, beta=0.2, label_smoothing=0.5).losses
    b = sigmoid_loss(pr, pc, rr, rc, beta=0.2, label_smoothing=0.5).losses
    torch.testing.assert_close(a, b, **TOL)


def test_robust_dpo_is_unbiased_under_label_flips():
    # (1 - eps) * loss(w, l) + eps * loss(l, w) = [(1 - eps)^2 l(h) - (1 - eps) eps l(-h)
    #   + eps (1 - eps) l(-h) - eps^2 l(h)] / (1 - 2 eps) = l(h): the clean DPO loss
    pc, pr, rc, rr = (t(x) for x in random_logps(seed=4))
    eps = 0.3
    kept = robust_loss(pc, pr, rc, rr, beta=0.2, label_smoothing=eps).losses
    flipped = robust_loss(pr, pc, rr, rc, beta=0.2, label_smoothing=eps).losses
    clean = sigmoid_loss(pc, pr, rc, rr, beta=0.2).losses
    torch.testing.assert_close((1 - eps) * kept + eps * flipped, clean, **TOL)


def test_smoothing_zero_reduces_robust_to_dpo():
    pc, pr, rc, rr = (t(x) for x in random_logps(seed=5))
    torch.testing.assert_close(robust_loss(pc, pr, rc, rr, 0.2).losses, sigmoid_loss(pc, pr, rc, rr, 0.2).losses, **TOL)


@pytest.mark.parametrize(("loss_type", "eps"), [
    ("sigmoid", 0.6), ("sigmoid", -0.1), ("robust", 0.5), ("exo_pair", 0.0), ("exo_pair", 1.0),
    ("hinge", 0.1), ("ipo", 0.1), ("nca_pair", 0.1), ("bco_pair", 0.1), ("sppo_hard", 0.1), ("apo_zero", 0.1),
    ("apo_down", 0.1), ("discopop", 0.1), ("sft", 0.1), ("sigmoid_norm", 0.1), ("aot", 0.6),
])
def test_label_smoothing_out_of_range_or_unsupported_is_refused(loss_type, eps):
    x = t([-1.0])
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(loss_type, x, x, x, x, beta=0.1, label_smoothing=eps)


def test_bco_pair_delta_given_and_default():
    pc, pr, rc, rr = random_logps(seed=6)
    given = dpo_loss("bco_pair", t(pc), t(pr), t(rc), t(rr), beta=0.2, delta=0.37).losses
    torch.testing.assert_close(given, t(ref_bco_pair(pc, pr, rc, rr, 0.2, 0.0, delta=0.37)), **TOL)
    # a tensor delta that requires grad receives none
    delta = torch.tensor(0.37, dtype=torch.float64, requires_grad=True)
    policy_chosen = t(pc).requires_grad_()
    bco_pair_loss(policy_chosen, t(pr), t(rc), t(rr), 0.2, delta=delta).losses.sum().backward()
    assert delta.grad is None and policy_chosen.grad is not None


def test_bco_pair_default_delta_is_a_constant_for_the_gradient():
    # the batch-mean shift is detached: the gradient equals that with the same number passed as a constant
    pc, pr, rc, rr = random_logps(seed=7)
    batch_mean = sum(0.2 * (a - c) for a, c in zip(pc + pr, rc + rr, strict=True)) / (2 * len(pc))
    grads = []
    for delta in (None, batch_mean):
        p = t(pc).requires_grad_()
        bco_pair_loss(p, t(pr), t(rc), t(rr), 0.2, delta=delta).losses.sum().backward()
        grads.append(p.grad)
    torch.testing.assert_close(grads[0], grads[1], **TOL)


def test_dispatch_errors():
    x = t([-1.0])
    with pytest.raises(ValueError, match="Unknown loss_type 'dpo'") as info:
        dpo_loss("dpo", x, x, x, x, beta=0.1)
    for name in DPO_LOSSES:
        assert repr(name)[1:-1] in str(info.value)
    with pytest.raises(TypeError, match="dlta"):  # an option no loss declares is a typo
        dpo_loss("sigmoid", x, x, x, x, beta=0.1, dlta=0.5)
    # an option of another loss (bco_pair's shift) changes nothing for the losses listed
    torch.testing.assert_close(dpo_loss("sigmoid", x, x, x, x, beta=0.1, delta=0.5).losses,
                               dpo_loss("sigmoid", x, x, x, x, beta=0.1).losses, **TOL)
    with pytest.raises(ValueError, match="loss_weights"):
        dpo_loss(["sigmoid", "sft"], x, x, x, x, beta=0.1, loss_weights=[1.0])
    with pytest.raises(ValueError, match="empty"):
        dpo_loss([], x, x, x, x, beta=0.1)


# ----- SimPO and CPO -----------------------------------------------------------------------------------------
def test_simpo_known_point_and_trl_gamma_convention():
    # a_w - a_l = 1, beta = 2, gamma = 0.5: z = 2 * 1 - 0.5 = 1.5, loss = -log sigma(1.5).
    # TRL's CPOConfig.simpo_gamma is this gamma; the SimPO repository's gamma_beta_ratio is gamma / beta = 0.25,
    # giving the same z = beta * (1 - 0.25).
    out = simpo_loss(t([-1.0]), t([-2.0]), beta=2.0, gamma=0.5)
    assert out.losses.item() == pytest.approx(-log_sigmoid(1.5), abs=1e-12)
    assert out.losses.item() == pytest.approx(-log_sigmoid(2.0 * (1.0 - 0.25)), abs=1e-12)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == (-2.0, -4.0)  # beta * average log-prob


@pytest.mark.parametrize("eps", [0.0, 0.15])
def test_simpo_and_cpo_match_reference(eps):
    pc, pr, _, _ = random_logps(seed=8, averaged=True)
    beta, gamma = 2.5, 1.4
    # SimPO eq. 6: -log sigma(beta a_w - beta a_l - gamma), mixed over a flipped label with weight eps
    simpo_ref = [-(1 - eps) * log_sigmoid(beta * a - beta * b - gamma) - eps * log_sigmoid(-(beta * a - beta * b - gamma))
                 for a, b in zip(pc, pr, strict=True)]
    out = simpo_loss(t(pc), t(pr), beta, gamma, label_smoothing=eps)
    torch.testing.assert_close(out.losses, t(simpo_ref), **TOL)
    torch.testing.assert_close(out.chosen_rewards, beta * t(pc), **TOL)

    pc, pr, _, _ = random_logps(seed=9)
    beta = 0.1
    # CPO eq. 3: -log sigma(beta log pi(y_w) - beta log pi(y_l)), no reference model
    cpo_ref = [-(1 - eps) * log_sigmoid(beta * (a - b)) - eps * log_sigmoid(-beta * (a - b))
               for a, b in zip(pc, pr, strict=True)]
    out = cpo_loss(t(pc), t(pr), beta, label_smoothing=eps)
    torch.testing.assert_close(out.losses, t(cpo_ref), **TOL)
    torch.testing.assert_close(out.rejected_rewards, beta * t(pr), **TOL)


def test_simpo_and_cpo_directions():
    c = t([-1.0, -2.0]).requires_grad_()
    r = t([-1.5, -1.0]).requires_grad_()
    (simpo_loss(c, r, 2.0, 0.5).losses.sum() + cpo_loss(c, r, 0.5).losses.sum()).backward()
    assert (c.grad < 0).all() and (r.grad > 0).all()
    # a larger target margin asks for more separation
    assert (simpo_loss(c, r, 2.0, 1.0).losses > simpo_loss(c, r, 2.0, 0.5).losses).all()


# ----- ORPO and log1mexp -------------------------------------------------------------------------------------
def naive_log_odds(avg_logp: float) -> float:
    p = math.exp(avg_logp)
    return math.log(p / (1 - p))  # odds = P / (1 - P), Hong et al. eq. 4


def test_orpo_matches_naive_odds_ratio_where_finite():
    g = torch.Generator().manual_seed(10)
    chosen = (-4.0 * torch.rand(12, generator=g, dtype=torch.float64) - 1e-3).tolist()  # in [-4.001, -0.001]
    rejected = (-4.0 * torch.rand(12, generator=g, dtype=torch.float64) - 1e-3).tolist()
    beta = 0.25
    out = orpo_loss(t(chosen), t(rejected), beta)
    log_odds = [naive_log_odds(a) - naive_log_odds(b) for a, b in zip(chosen, rejected, strict=True)]
    # L_OR = -log sigma(log(odds_w / odds_l)) (eq. 7), weighted by lambda = beta
    torch.testing.assert_close(out.losses, t([-beta * log_sigmoid(z) for z in log_odds]), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.log_odds_chosen, t(log_odds), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.log_odds_ratio, t([log_sigmoid(z) for z in log_odds]), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.chosen_rewards, beta * t(chosen), **TOL)
    assert not out.log_odds_chosen.requires_grad


def test_orpo_direction():
    c, r = t([-1.0, -0.2]).requires_grad_(), t([-0.5, -0.3]).requires_grad_()
    orpo_loss(c, r, 0.1).losses.sum().backward()
    assert (c.grad < 0).all() and (r.grad > 0).all()


def test_log1mexp_equals_naive_formula_where_naive_is_accurate():
    x = -torch.logspace(-3, math.log10(30.0), 200, dtype=torch.float64)  # -0.001 ... -30
    torch.testing.assert_close(log1mexp(x), torch.log(1 - torch.exp(x)), rtol=1e-10, atol=1e-12)


def test_log1mexp_near_zero_matches_series_and_naive_fails():
    # 1 - e^x = -x (1 + x/2 + x^2/6 + ...), so log(1 - e^x) = log(-x) + x/2 + O(x^2) for small |x|
    for dtype, xs in [(torch.float64, [-1e-9, -1e-15, -1e-100, -1e-300]), (torch.float32, [-1e-8, -1e-20, -1e-37])]:
        x = torch.tensor(xs, dtype=dtype)
        expected = torch.tensor([math.log(-v) + v / 2 for v in xs], dtype=torch.float64)
        got = log1mexp(x)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), expected, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0.0)
    naive32 = torch.log(1 - torch.exp(torch.tensor([-1e-8, -1e-20], dtype=torch.float32)))
    assert torch.isinf(naive32).all()  # e^x rounds to 1: the naive form loses everything


def test_log1mexp_gradient_is_finite_on_both_branches():
    # d/dx log(1 - e^x) = -e^x / (1 - e^x) = 1 / (1 - e^-x); torch.where must not leak the unused branch's inf
    xs = [-50.0, -2.0, -math.log(2.0), -0.5, -1e-6, -1e-30]
    x = torch.tensor(xs, dtype=torch.float32, requires_grad=True)
    log1mexp(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    expected = torch.tensor([-1.0 / math.expm1(-v) for v in xs], dtype=torch.float64)
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orpo_stays_finite_as_avg_logp_goes_to_zero(dtype):
    chosen = torch.tensor([-1e-7, 0.0, -1e-30, -0.7], dtype=dtype, requires_grad=True)
    rejected = torch.tensor([-0.5, -1e-9, 0.0, -1e-12], dtype=dtype, requires_grad=True)
    out = orpo_loss(chosen, rejected, beta=0.1)
    out.losses.sum().backward()
    for value in (out.losses, out.log_odds_chosen, out.log_odds_ratio, chosen.grad, rejected.grad):
        assert torch.isfinite(value).all(), value
    # P -> 1 makes the odds huge: a near-certain chosen answer wins, a near-certain rejected one loses
    assert out.log_odds_chosen[0] > 10 and out.log_odds_chosen[3] < -10


# ----- KTO ---------------------------------------------------------------------------------------------------
def ref_kto(policy, ref, desirable, z0, beta, w_d, w_u):
    # KTO eq. 7: v = lambda_D sigma(beta (r - z0)) if desirable else lambda_U sigma(beta (z0 - r));
    # loss = lambda_y - v, z0 = max(0, KL estimate)
    z0 = max(0.0, z0)
    out = []
    for p, q, good in zip(policy, ref, desirable, strict=True):
        r = p - q
        out.append(w_d * (1 - sigmoid(beta * (r - z0))) if good else w_u * (1 - sigmoid(beta * (z0 - r))))
    return out


def test_kto_matches_reference_with_weights():
    pc, _, rc, _ = random_logps(seed=11)
    desirable = [i % 3 != 0 for i in range(len(pc))]
    for z0, w_d, w_u in [(0.4, 1.0, 1.0), (2.5, 1.33, 0.7), (0.0, 0.5, 2.0)]:
        out = kto_loss(t(pc), t(rc), torch.tensor(desirable), t([z0])[0], beta=0.1, desirable_weight=w_d,
                       undesirable_weight=w_u)
        torch.testing.assert_close(out.losses, t(ref_kto(pc, rc, desirable, z0, 0.1, w_d, w_u)), **TOL)
        torch.testing.assert_close(out.rewards, 0.1 * (t(pc) - t(rc)), **TOL)


def test_kto_weights_scale_only_their_own_examples():
    policy, ref, desirable = t([-5.0, -6.0]), t([-5.5, -5.0]), torch.tensor([True, False])
    base = kto_loss(policy, ref, desirable, 0.2, beta=0.5).losses
    heavier = kto_loss(policy, ref, desirable, 0.2, beta=0.5, desirable_weight=3.0).losses
    assert heavier[0].item() == pytest.approx(3 * base[0].item(), abs=1e-12)
    assert heavier[1].item() == base[1].item()


def test_kto_reference_point_is_clamped_and_detached():
    policy, ref, desirable = t([-5.0, -6.0]), t([-5.5, -5.0]), torch.tensor([True, False])
    negative = kto_loss(policy, ref, desirable, -0.8, beta=0.5).losses
    zero = kto_loss(policy, ref, desirable, 0.0, beta=0.5).losses
    torch.testing.assert_close(negative, zero, rtol=0.0, atol=0.0)
    z0 = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    kto_loss(policy.requires_grad_(), ref, desirable, z0, beta=0.5).losses.sum().backward()
    assert z0.grad is None and policy.grad is not None


def test_kto_directions():
    policy = t([-5.0, -6.0]).requires_grad_()
    out = kto_loss(policy, t([-5.0, -6.0]), torch.tensor([True, False]), 0.1, beta=0.5)
    out.losses.sum().backward()
    assert policy.grad[0] < 0 < policy.grad[1]  # raise desirable, lower undesirable likelihood
    # a higher reference point makes desirable examples harder and undesirable ones easier
    higher = kto_loss(policy.detach(), t([-5.0, -6.0]), torch.tensor([True, False]), 1.0, beta=0.5).losses
    assert higher[0] > out.losses[0] and higher[1] < out.losses[1]


def test_kto_reference_point_helper():
    policy = t([-10.0, -12.0, -9.0]).requires_grad_()
    ref = t([-11.0, -11.5, -9.0])
    # mean(policy - ref) = (1 - 0.5 + 0) / 3 = 1/6
    z0 = kto_reference_point(policy, ref)
    assert z0.item() == pytest.approx(1 / 6, abs=1e-12) and z0.shape == () and not z0.requires_grad
    # mean(ref - policy) = -1/6 < 0 -> clamped to 0
    assert kto_reference_point(ref, policy.detach()).item() == 0.0


# ----- TRL 1.16's DPO options: f-divergences, token counts, loss lists, LD-DPO, WPO ---------------------------
# f(u) of each divergence, from Table 1 of the f-DPO paper (Wang et al., 2023); psi(r) = f'(e^r) - f'(1) is
# checked against a central finite difference of f, so the test does not restate the derivative.
F_OF_U = {
    "reverse_kl": lambda u, a: u * math.log(u),
    "forward_kl": lambda u, a: -math.log(u),
    "js_divergence": lambda u, a: u * math.log(u) - (u + 1) * math.log((u + 1) / 2),
    "alpha_divergence": lambda u, a: (u ** (1 - a) - (1 - a) * u - a) / (a * (a - 1)),
}


def ref_psi(r: float, divergence: str, a: float = 0.5) -> float:
    def derivative(u: float) -> float:
        step = 1e-5 * u
        return (F_OF_U[divergence](u + step, a) - F_OF_U[divergence](u - step, a)) / (2 * step)
    return derivative(math.exp(r)) - derivative(1.0)


@pytest.mark.parametrize("divergence", sorted(F_OF_U))
@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.8])
def test_f_divergence_score_is_f_prime_from_the_paper(divergence, alpha):
    from tether.losses.preference import f_divergence_score

    ratios = [-3.0, -0.7, 0.0, 0.4, 2.5]
    got = f_divergence_score(t(ratios), divergence, alpha)
    torch.testing.assert_close(got, t([ref_psi(r, divergence, alpha) for r in ratios]), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "robust", "exo_pair", "discopop"])
@pytest.mark.parametrize("divergence", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_margin_losses_use_the_f_divergence_scores(loss_type, divergence):
    # the loss on (pc, pr, rc, rr) with divergence f equals the reverse-KL loss on log-ratios replaced by psi
    pc, pr, rc, rr = random_logps(seed=11, b=6, averaged=True)
    psi_w = [ref_psi(a - c, divergence, 0.3) for a, c in zip(pc, rc, strict=True)]
    psi_l = [ref_psi(b - d, divergence, 0.3) for b, d in zip(pr, rr, strict=True)]
    eps = {"robust": 0.2, "exo_pair": 1e-3}.get(loss_type, 0.0)
    expected = REFERENCES[loss_type](psi_w, psi_l, [0.0] * 6, [0.0] * 6, 0.4, eps)
    out = dpo_loss(loss_type, t(pc), t(pr), t(rc), t(rr), beta=0.4, label_smoothing=eps, f_divergence=divergence,
                   f_alpha=0.3)
    torch.testing.assert_close(out.losses, t(expected), rtol=1e-6, atol=1e-7)
    # the rewards stay beta * log-ratio, whatever the divergence (as TRL 1.16 logs them)
    torch.testing.assert_close(out.chosen_rewards, t([0.4 * (a - c) for a, c in zip(pc, rc, strict=True)]), **TOL)


def test_ipo_and_sigmoid_norm_divide_the_scores_by_the_token_counts():
    # TRL 1.16: psi of the SUMMED log-ratio, divided by the completion length (not psi of the average)
    pc, pr, rc, rr = random_logps(seed=12, b=5)
    n_w, n_l = [3.0, 7.0, 1.0, 12.0, 5.0], [4.0, 2.0, 9.0, 12.0, 6.0]
    counts = {"chosen_tokens": t(n_w), "rejected_tokens": t(n_l)}
    for divergence in ("reverse_kl", "js_divergence"):
        psi_w = [ref_psi(a - c, divergence) / x for a, c, x in zip(pc, rc, n_w, strict=True)]
        psi_l = [ref_psi(b - d, divergence) / y for b, d, y in zip(pr, rr, n_l, strict=True)]
        ipo = dpo_loss("ipo", t(pc), t(pr), t(rc), t(rr), beta=0.2, f_divergence=divergence, **counts)
        expected = [(w - v - 1 / (2 * 0.2)) ** 2 for w, v in zip(psi_w, psi_l, strict=True)]
        torch.testing.assert_close(ipo.losses, t(expected), rtol=1e-6, atol=1e-7)
        norm = dpo_loss("sigmoid_norm", t(pc), t(pr), t(rc), t(rr), beta=0.2, f_divergence=divergence, **counts)
        torch.testing.assert_close(norm.losses, t([-log_sigmoid(0.2 * (w - v)) for w, v in zip(psi_w, psi_l)]),
                                   rtol=1e-6, atol=1e-7)


def test_sft_is_the_token_mean_nll_of_the_chosen_and_ignores_the_rest():
    pc, pr, rc, rr = random_logps(seed=13, b=4)
    n_w = [3.0, 8.0, 2.0, 5.0]
    policy_chosen, policy_rejected = t(pc).requires_grad_(), t(pr).requires_grad_()
    out = dpo_loss("sft", policy_chosen, policy_rejected, t(rc), t(rr), beta=0.1, chosen_tokens=t(n_w))
    torch.testing.assert_close(out.losses, t(ref_sft(pc, pr, rc, rr, 0.1, 0.0, chosen_tokens=n_w)), **TOL)
    out.losses.mean().backward()
    torch.testing.assert_close(policy_chosen.grad, t([-1.0 / sum(n_w)] * 4), **TOL)  # d/dpc of -sum(pc)/sum(n)
    assert policy_rejected.grad is None or (policy_rejected.grad == 0).all()
    # LD-DPO-weighted inputs: the NLL uses the plain sums given as unweighted_chosen_logps
    plain = t([x - 1.0 for x in pc])
    out = dpo_loss("sft", t(pc), t(pr), t(rc), t(rr), beta=0.1, chosen_tokens=t(n_w), unweighted_chosen_logps=plain)
    torch.testing.assert_close(out.losses, t([-sum(x - 1.0 for x in pc) / sum(n_w)] * 4), **TOL)


def test_discopop_direction_off_the_bump():
    # for a negative or a clearly positive margin a larger chosen log-prob lowers DiscoPOP, a larger rejected
    # one raises it
    for margin in (-2.0, -0.5, 0.5, 3.0):
        pc = torch.tensor([-10.0 + margin], dtype=torch.float64, requires_grad=True)
        pr = torch.tensor([-10.0], dtype=torch.float64, requires_grad=True)
        dpo_loss("discopop", pc, pr, t([-10.0]), t([-10.0]), beta=1.0).losses.sum().backward()
        assert pc.grad.item() < 0 < pr.grad.item(), margin


def test_discopop_tau_changes_the_blend():
    pc, pr, rc, rr = random_logps(seed=14, b=6)
    for tau in (0.05, 0.5):
        out = dpo_loss("discopop", t(pc), t(pr), t(rc), t(rr), beta=0.05, tau=tau)
        torch.testing.assert_close(out.losses, t(ref_discopop(pc, pr, rc, rr, 0.05, 0.0, tau=tau)), **TOL)


def test_discopop_is_finite_for_huge_negative_margins():
    x = t([-1000.0])
    out = dpo_loss("discopop", x, t([0.0]), t([0.0]), t([0.0]), beta=1.0)
    assert torch.isfinite(out.losses).all() and out.losses.item() == pytest.approx(1000.0)  # -log sigma(-1000)


def test_a_loss_list_is_the_weighted_sum_of_its_losses():
    pc, pr, rc, rr = (t(x) for x in random_logps(seed=15, b=6))
    counts = {"chosen_tokens": t([4.0, 2.0, 9.0, 3.0, 3.0, 7.0]), "rejected_tokens": t([5.0, 2.0, 1.0, 8.0, 6.0, 2.0])}
    types, weights = ["sigmoid", "bco_pair", "sft", "ipo"], [0.8, 0.2, 1.0, 0.5]
    out = dpo_loss(types, pc, pr, rc, rr, beta=0.1, loss_weights=weights, delta=0.1, **counts)
    singles = [dpo_loss(name, pc, pr, rc, rr, beta=0.1, delta=0.1, **counts).losses for name in types]
    torch.testing.assert_close(out.losses, sum(w * x for w, x in zip(weights, singles, strict=True)), **TOL)
    assert out.losses.mean().item() == pytest.approx(sum(w * x.mean().item() for w, x in zip(weights, singles)))
    # default weights: 1 each
    torch.testing.assert_close(dpo_loss(types, pc, pr, rc, rr, beta=0.1, delta=0.1, **counts).losses,
                               sum(singles), **TOL)


def test_label_smoothing_goes_to_the_listed_losses_that_have_it():
    pc, pr, rc, rr = (t(x) for x in random_logps(seed=16, b=4))
    out = dpo_loss(["exo_pair", "hinge"], pc, pr, rc, rr, beta=0.1, label_smoothing=1e-3)
    expected = (dpo_loss("exo_pair", pc, pr, rc, rr, beta=0.1, label_smoothing=1e-3).losses
                + dpo_loss("hinge", pc, pr, rc, rr, beta=0.1).losses)
    torch.testing.assert_close(out.losses, expected, **TOL)
    with pytest.raises(ValueError, match="label_smoothing"):  # no listed loss has smoothing
        dpo_loss(["hinge", "sft"], pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)


@pytest.mark.parametrize("loss_type", ["nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero",
                                       "apo_down"])
def test_f_divergence_is_refused_where_it_has_no_form(loss_type):
    x = t([-1.0])
    with pytest.raises(ValueError, match="f_divergence_type"):
        dpo_loss(["sigmoid", loss_type], x, x, x, x, beta=0.1, f_divergence="js_divergence")
    dpo_loss(["sigmoid", "sft"], x, x, x, x, beta=0.1, f_divergence="js_divergence")  # sft: no reference, fine


def test_length_desensitised_log_probs_weight_the_longer_completions_excess():
    from tether.losses.preference import length_desensitised_log_probs

    # b = 2 pairs; sequences 0, 1 chosen, 2, 3 rejected. Lengths: chosen 3, 1; rejected 2, 4. Public: 2, 1.
    tokens = {0: [-1.0, -2.0, -3.0], 1: [-0.5], 2: [-4.0, -5.0], 3: [-0.1, -0.2, -0.3, -0.4]}
    alpha = 0.25
    expected = [-1.0 - 2.0 + alpha * -3.0, -0.5, -4.0 - 5.0, -0.1 + alpha * (-0.2 - 0.3 - 0.4)]
    # interleave the sequences' tokens (as packed rows may) while keeping each sequence's order
    order = [(3, 0), (0, 0), (0, 1), (2, 0), (3, 1), (1, 0), (3, 2), (0, 2), (2, 1), (3, 3)]
    logps = t([tokens[s][i] for s, i in order])
    sequence = torch.tensor([s for s, _ in order])
    got = length_desensitised_log_probs(logps, sequence, num_pairs=2, alpha=alpha)
    torch.testing.assert_close(got, t(expected), **TOL)
    plain = length_desensitised_log_probs(logps, sequence, num_pairs=2, alpha=1.0)
    torch.testing.assert_close(plain, t([sum(tokens[s]) for s in range(4)]), **TOL)
    with pytest.raises(ValueError, match="ld_alpha"):
        length_desensitised_log_probs(logps, sequence, num_pairs=2, alpha=1.5)


def test_wpo_weights_are_the_product_of_length_normalised_aligned_probabilities():
    from tether.losses.preference import wpo_weights

    # per completion: mean over tokens of log p(y_t) - log sum_v p(v)^2, exponentiated; pair weight = product
    chosen_aligned, rejected_aligned = [-1.2, -0.3], [-2.0, -0.9]
    n_w, n_l = [3.0, 1.0], [4.0, 2.0]
    expected = [math.exp(a / x) * math.exp(b / y) for a, b, x, y in zip(chosen_aligned, rejected_aligned, n_w, n_l)]
    got = wpo_weights(t(chosen_aligned).requires_grad_(), t(rejected_aligned), t(n_w), t(n_l))
    torch.testing.assert_close(got, t(expected), **TOL)
    assert not got.requires_grad


def test_alpha_log_transform_is_alphapo_reward():
    from tether.losses.preference import alpha_log_transform

    # AlphaPO: r(p) = (1 - p^-alpha) / alpha for a probability p = e^x; alpha -> 0 gives log p
    xs = [-5.0, -1.0, -0.01]
    for alpha in (0.25, -0.5, 1.0):
        torch.testing.assert_close(alpha_log_transform(t(xs), alpha),
                                   t([(1 - math.exp(x) ** -alpha) / alpha for x in xs]), **TOL)
    torch.testing.assert_close(alpha_log_transform(t(xs), 0.0), t(xs), **TOL)
    assert torch.isfinite(alpha_log_transform(torch.tensor([-1e4]), 0.5)).all()  # capped, not inf


def test_apo_zero_unpaired_loss():
    from tether.losses.preference import apo_zero_unpaired_loss

    # desirable: w_D (1 - sigma(beta r)); undesirable: w_U sigma(beta r)
    policy, ref = [-3.0, -5.0, -2.0], [-4.0, -4.5, -2.5]
    desirable = torch.tensor([True, False, True])
    out = apo_zero_unpaired_loss(t(policy), t(ref), desirable, beta=0.5, desirable_weight=2.0, undesirable_weight=0.7)
    expected = [2.0 * (1 - sigmoid(0.5 * 1.0)), 0.7 * sigmoid(0.5 * -0.5), 2.0 * (1 - sigmoid(0.5 * 0.5))]
    torch.testing.assert_close(out.losses, t(expected), **TOL)
    torch.testing.assert_close(out.rewards, t([0.5, -0.25, 0.25]), **TOL)
