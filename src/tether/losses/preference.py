"""Preference-optimisation losses on sequence log-probabilities: the DPO family, SimPO, CPO, ORPO, KTO.

Shapes: b = preference pairs (or, for KTO, unpaired examples). Every input is [b]: the log-probability
of a whole completion under the policy or the reference model, either summed over the completion's
tokens ("sum") or divided by its number of tokens ("avg"). Which one a loss expects:

    sum: the DPO_LOSSES table (sigmoid, robust, hinge, exo_pair, nca_pair, bco_pair, sppo_hard, aot,
         aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm, ipo), cpo, kto
    avg: simpo, orpo

ipo, sigmoid_norm and sft also take the completions' token counts (`chosen_tokens`, `rejected_tokens`) and
normalise by them themselves, as TRL 1.16's DPOTrainer does; without counts their inputs are taken as
per-token averages already. (TRL 1.16: CPOTrainer averages for SimPO and IPO; ORPOTrainer averages.)

f-divergences (Wang et al., 2023, "Beyond Reverse KL", arXiv 2309.16240): the losses of F_DIVERGENCE_LOSSES
take `f_divergence` and `f_alpha` and replace each log-ratio r by the score psi(r) = f'(e^r) - f'(1) of the
chosen divergence f (see `f_divergence_score`); reverse KL gives psi(r) = r, plain DPO. The implicit rewards
stay beta * r.

Notation used in the docstrings, per pair:
    r_w = log pi(y_w|x) - log pi_ref(y_w|x),  r_l = log pi(y_l|x) - log pi_ref(y_l|x)   (log-ratios)
    h   = r_w - r_l                                                                  (DPO's margin)
    sigma = logistic function, eps = label_smoothing.

Each loss returns per-pair losses [b] (differentiable; the trainer reduces them) and detached implicit
rewards beta * r_w, beta * r_l, or the reference-free method's analogue. The implicit reward is the
one the method optimises, so the logged rewards/margins/accuracies mean the same thing as in TRL.
`DPO_LOSSES` maps TRL's `loss_type` names to the functions; `dpo_loss` dispatches through it.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LN_HALF = -math.log(2.0)  # where log1mexp switches formulas (Maechler, 2012)
# exp(x) is capped at exp(80) (~5.5e34, finite in float32 and bfloat16) where a power transform could overflow.
EXP_CAP = 80.0
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


@dataclass
class PreferenceLossOutput:
    losses: torch.Tensor  # [b], differentiable
    chosen_rewards: torch.Tensor  # [b], detached from here on
    rejected_rewards: torch.Tensor  # [b]


@dataclass
class ORPOLossOutput(PreferenceLossOutput):
    log_odds_ratio: torch.Tensor  # [b]: log sigma(log odds_w - log odds_l), what TRL logs as log_odds_ratio
    log_odds_chosen: torch.Tensor  # [b]: log odds_w - log odds_l, what TRL logs as log_odds_chosen


@dataclass
class KTOLossOutput:
    losses: torch.Tensor  # [b], differentiable, already multiplied by the desirable/undesirable weights
    rewards: torch.Tensor  # [b], detached: beta * (log pi - log pi_ref)


PairwiseLoss = Callable[..., PreferenceLossOutput]


# ----- shared pieces ---------------------------------------------------------------------------------
def _output(losses: torch.Tensor, beta: float, chosen: torch.Tensor, rejected: torch.Tensor) -> PreferenceLossOutput:
    """Pack per-pair losses [b] with the detached rewards beta * chosen, beta * rejected ([b] each)."""
    return PreferenceLossOutput(losses, (beta * chosen).detach(), (beta * rejected).detach())


def _smoothed_logistic(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - eps) log sigma(z) - eps log sigma(-z), [b]: the logistic loss averaged over a label that is
    flipped with probability eps (conservative DPO, Mitchell, 2023). eps = 0 gives -log sigma(z)."""
    _check_smoothing(label_smoothing, high=0.5, high_inclusive=True)
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def _check_smoothing(label_smoothing: float, high: float, high_inclusive: bool) -> None:
    if not (0.0 <= label_smoothing and (label_smoothing <= high if high_inclusive else label_smoothing < high)):
        raise ValueError(f"label_smoothing must lie in [0, {high}{']' if high_inclusive else ')'}, got {label_smoothing}")


def _no_smoothing(loss_type: str, label_smoothing: float) -> None:
    """Losses without a label-smoothing form refuse a non-zero value rather than ignore it."""
    if label_smoothing != 0.0:
        raise ValueError(f"loss_type={loss_type!r} has no label smoothing; got label_smoothing={label_smoothing}, "
                         f"use 0.0 (smoothing exists for {', '.join(sorted(SMOOTHED_LOSSES))})")


def alpha_log_transform(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - exp(-alpha x)) / alpha elementwise, and x itself at alpha = 0 (the limit); [any shape].

    With x = log u this is (1 - u^-alpha) / alpha: the alpha-divergence's f'(u) - f'(1) (f-DPO, Wang et al.,
    2023, arXiv 2309.16240, Table 1) and AlphaPO's reward of a probability u (Gupta et al., 2025, arXiv
    2501.03884, eq. 6). alpha = 1 gives 1 - 1/u (forward KL). Computed in at least float32; exp(-alpha x) is
    capped at exp(EXP_CAP), so a huge negative x gives a large finite value (and no gradient), not inf.
    """
    if alpha == 0.0:
        return x
    exponent = (-alpha * x.to(torch.promote_types(x.dtype, torch.float32))).clamp(max=EXP_CAP)
    return -torch.expm1(exponent) / alpha


def f_divergence_score(logratios: torch.Tensor, f_divergence: str = "reverse_kl", f_alpha: float = 0.5
                       ) -> torch.Tensor:
    """psi(r) = f'(u) - f'(1) with u = exp(r) = pi(y|x) / pi_ref(y|x), elementwise ([b] in, [b] out).

    f-DPO (Wang et al., 2023, arXiv 2309.16240, Theorem 1 and Table 1) replaces DPO's log-ratio by f'(u) for a
    divergence f between policy and reference; subtracting f'(1) (a constant) makes every score 0 at the
    reference, which changes nothing in a chosen-minus-rejected margin and matches TRL 1.16 for the losses
    that divide the scores by completion lengths (ipo, sigmoid_norm):

        reverse_kl        f(u) = u log u             psi = r
        forward_kl        f(u) = -log u              psi = 1 - e^-r
        js_divergence     f(u) = u log u - (u + 1) log((u + 1) / 2)
                                                     psi = log(2u / (1 + u)) = log 2 + log sigma(r)
        alpha_divergence  f(u) = (u^(1-a) - (1-a) u - a) / (a (a - 1)),  a = f_alpha in (0, 1)
                                                     psi = (1 - u^-a) / a

    (TRL 1.16's code computes (u^(a-1) - 1) / (a - 1), the paper's form at 1 - a; the two agree at its default
    a = 0.5. Here f_alpha is the paper's a, as TRL's documentation states.)
    """
    if f_divergence == "reverse_kl":
        return logratios
    if f_divergence == "forward_kl":
        return alpha_log_transform(logratios, 1.0)
    if f_divergence == "js_divergence":
        return math.log(2.0) + F.logsigmoid(logratios)
    if f_divergence == "alpha_divergence":
        if f_alpha < 0:
            raise ValueError(f"f_alpha_divergence_coef must be >= 0 (the paper's alpha lies in (0, 1)), got {f_alpha}.")
        return alpha_log_transform(logratios, f_alpha)
    raise ValueError(f"Unknown f_divergence_type {f_divergence!r}; use one of {', '.join(F_DIVERGENCES)}.")


def _normalised(score: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    """score / tokens ([b] each), or score itself when no counts are given (inputs already per token)."""
    return score if tokens is None else score / tokens.clamp(min=1).to(score.dtype)


def _margins(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    f_divergence: str,
    f_alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(r_w, r_l, psi(r_w), psi(r_l)), [b] each: the log-ratios and their f-divergence scores."""
    chosen = policy_chosen_logps - ref_chosen_logps  # r_w, [b]
    rejected = policy_rejected_logps - ref_rejected_logps  # r_l, [b]
    return (chosen, rejected, f_divergence_score(chosen, f_divergence, f_alpha),
            f_divergence_score(rejected, f_divergence, f_alpha))


# ----- offline pairwise losses (policy and reference) -------------------------------------------------
# Every loss takes (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
# label_smoothing), [b] each, plus keyword-only options of its own (f_divergence/f_alpha, token counts, tau,
# delta); `dpo_loss` hands each loss the options it declares.
def sigmoid_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    *,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> PreferenceLossOutput:
    """DPO: -log sigma(beta * h) (Rafailov et al., 2023, eq. 7; arXiv 2305.18290).

    With eps = label_smoothing in [0, 0.5], conservative DPO (cDPO; Mitchell, 2023, "A note on DPO with
    noisy preferences"): -(1 - eps) log sigma(beta h) - eps log sigma(-beta h), the DPO loss averaged
    over a label flipped with probability eps. With an f-divergence, h = psi(r_w) - psi(r_l) (f-DPO,
    Wang et al., 2023, eq. 12). Inputs: summed log-probs, [b] each.
    """
    chosen, rejected, s_w, s_l = _margins(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                          ref_rejected_logps, f_divergence, f_alpha)
    return _output(_smoothed_logistic(beta * (s_w - s_l), label_smoothing), beta, chosen, rejected)


def robust_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    *,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> PreferenceLossOutput:
    """Robust DPO (rDPO; Chowdhury et al., 2024, arXiv 2403.00409), with eps = label_smoothing the flip
    rate in [0, 0.5):

        [(1 - eps) * l(h) - eps * l(-h)] / (1 - 2 eps),   l(h) = -log sigma(beta h).

    Unbiased: (1 - eps) * loss(y_w, y_l) + eps * loss(y_l, y_w) = l(h), the clean DPO loss, so under
    random flips its expectation is the noise-free loss (cDPO's is not). h = psi(r_w) - psi(r_l) with an
    f-divergence. Inputs: summed log-probs.
    """
    _check_smoothing(label_smoothing, high=0.5, high_inclusive=False)
    chosen, rejected, s_w, s_l = _margins(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                          ref_rejected_logps, f_divergence, f_alpha)
    logits = beta * (s_w - s_l)  # [b]
    losses = (-(1.0 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)) / (
        1.0 - 2.0 * label_smoothing
    )
    return _output(losses, beta, chosen, rejected)


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    *,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> PreferenceLossOutput:
    """SLiC's rank-calibration hinge, max(0, delta - log P(y_w) + log P(y_l)) (Zhao et al., 2023,
    arXiv 2305.10425, eq. 1), in TRL's form on reference log-ratios (as in RSO, Liu et al., 2023):

        max(0, 1 - beta * h)  =  beta * max(0, 1/beta - h),   i.e. margin delta = 1/beta,

    h = psi(r_w) - psi(r_l) with an f-divergence. Inputs: summed log-probs. No label smoothing.
    """
    _no_smoothing("hinge", label_smoothing)
    chosen, rejected, s_w, s_l = _margins(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                          ref_rejected_logps, f_divergence, f_alpha)
    return _output(torch.relu(1.0 - beta * (s_w - s_l)), beta, chosen, rejected)


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    *,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> PreferenceLossOutput:
    """IPO: (h - 1/(2 beta))^2 (Azar et al., 2023, arXiv 2310.12036, eq. 17; beta is the paper's tau), with h
    the margin PER TOKEN: h = psi(r_w) / n_w - psi(r_l) / n_l, n = completion token counts [b].

    With `chosen_tokens`/`rejected_tokens`, the inputs are summed log-probs and the scores are divided by
    the counts (TRL 1.16); without, the inputs are taken as per-token averages already (TRL 0.x, and CPO's
    IPO). Per token because with sums the squared loss grows with completion length and beta is not
    comparable across lengths. Rewards: beta * (the inputs' log-ratios). No label smoothing.
    """
    _no_smoothing("ipo", label_smoothing)
    chosen, rejected, s_w, s_l = _margins(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                          ref_rejected_logps, f_divergence, f_alpha)
    h = _normalised(s_w, chosen_tokens) - _normalised(s_l, rejected_tokens)  # [b]
    return _output((h - 1.0 / (2.0 * beta)) ** 2, beta, chosen, rejected)


def exo_pair_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 1e-3,
    *,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> PreferenceLossOutput:
    """EXO for pairwise preferences (Ji et al., 2024, arXiv 2402.00856, EXO-pref with K = 2, eq. 16 of
    the version TRL cites): KL(q || p) between the policy's distribution over the pair,
    q = softmax(beta * [r_w, r_l]) = [sigma(beta h), sigma(-beta h)], and the label distribution
    p = [1 - eps, eps]:

        q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps).

    eps = label_smoothing must lie in (0, 1) (p needs full support; the paper suggests 1e-3, which is
    this function's default). h = psi(r_w) - psi(r_l) with an f-divergence. Inputs: summed log-probs. The
    minimum is at beta h = log((1 - eps) / eps).
    """
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"'exo_pair' needs label_smoothing in (0, 1) (the paper suggests 1e-3), got {label_smoothing}")
    chosen, rejected, s_w, s_l = _margins(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                          ref_rejected_logps, f_divergence, f_alpha)
    logits = beta * (s_w - s_l)  # [b]
    log_q_w, log_q_l = F.logsigmoid(logits), F.logsigmoid(-logits)
    losses = log_q_w.exp() * (log_q_w - math.log1p(-label_smoothing)) + log_q_l.exp() * (
        log_q_l - math.log(label_smoothing)
    )
    return _output(losses, beta, chosen, rejected)


def discopop_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    *,
    tau: float = 0.05,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> PreferenceLossOutput:
    """DiscoPOP, the log-ratio modulated loss (Lu et al., 2024, arXiv 2406.08414, eq. 5), rho = beta * h:

        (1 - m) * (-log sigma(rho)) + m * exp(-rho),   m = sigma(rho / tau),

    a logistic (DPO) loss where the margin is small or negative and an exponential one where it is large;
    tau (TRL's discopop_tau, the paper's 0.05) sets how sharply they swap. m * exp(-rho) is computed as
    exp(log sigma(rho / tau) - rho), equal but finite where exp(-rho) alone would overflow. h = psi(r_w) -
    psi(r_l) with an f-divergence. Inputs: summed log-probs. No label smoothing.
    """
    _no_smoothing("discopop", label_smoothing)
    if tau <= 0:
        raise ValueError(f"discopop_tau must be positive, got {tau}.")
    chosen, rejected, s_w, s_l = _margins(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                          ref_rejected_logps, f_divergence, f_alpha)
    rho = beta * (s_w - s_l)  # [b]
    log_m = F.logsigmoid(rho / tau)
    losses = -(1.0 - log_m.exp()) * F.logsigmoid(rho) + torch.exp(log_m - rho)
    return _output(losses, beta, chosen, rejected)


def sigmoid_norm_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    *,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> PreferenceLossOutput:
    """Length-normalised DPO (the LN-DPO baseline of SimPO, Meng et al., 2024, arXiv 2405.14734, §4):

        -log sigma(beta * (psi(r_w) / n_w - psi(r_l) / n_l)),   n = completion token counts [b],

    DPO on per-token log-ratios, so a longer completion earns no larger margin. With the counts the inputs
    are summed log-probs; without, per-token averages already. Rewards: beta * (the inputs' log-ratios). No
    label smoothing.
    """
    _no_smoothing("sigmoid_norm", label_smoothing)
    chosen, rejected, s_w, s_l = _margins(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                          ref_rejected_logps, f_divergence, f_alpha)
    h = _normalised(s_w, chosen_tokens) - _normalised(s_l, rejected_tokens)  # [b]
    return _output(-F.logsigmoid(beta * h), beta, chosen, rejected)


def sft_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    *,
    chosen_tokens: torch.Tensor | None = None,
    unweighted_chosen_logps: torch.Tensor | None = None,
) -> PreferenceLossOutput:
    """Supervised NLL of the chosen completions, per token over the whole batch (MPO's SFT term, Wang et al.,
    2024, arXiv 2411.10442, eq. 7, there weighted against the preference losses through `loss_weights`):

        -(sum_b log pi(y_w,b | x_b)) / (sum_b n_w,b),   the same value in each of the [b] entries,

    so the batch mean is the token-mean NLL. Inputs: summed log-probs with `chosen_tokens` n_w (without: one
    token each). `unweighted_chosen_logps` [b] replaces policy_chosen_logps in the NLL when those are
    LD-DPO-weighted (the NLL is always on the plain log-probs). The reference plays no part. Rewards:
    beta * r as for the other losses. No label smoothing.
    """
    _no_smoothing("sft", label_smoothing)
    logps = policy_chosen_logps if unweighted_chosen_logps is None else unweighted_chosen_logps
    tokens = torch.ones_like(logps) if chosen_tokens is None else chosen_tokens.to(logps.dtype)
    nll = -logps.sum() / tokens.sum().clamp(min=1)
    return _output(nll.expand(logps.shape[0]), beta, policy_chosen_logps - ref_chosen_logps,
                   policy_rejected_logps - ref_rejected_logps)


def aot_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """AOT, paired (Melnyk et al., 2024, "Distributional preference alignment of LLMs via optimal transport",
    arXiv 2406.05882, §3): the policy's margins m = log pi(y_w) - log pi(y_l) should dominate the reference's
    m_ref in distribution. In one dimension the optimal transport plan matches sorted values, so with
    m_(k) and m_ref,(k) the k-th smallest of each over the batch:

        loss_k = -(1 - eps) log sigma(beta (m_(k) - m_ref,(k))) - eps log sigma(-beta (m_(k) - m_ref,(k))).

    Entry k belongs to the k-th quantile, not to pair k; only the batch mean is meaningful (and it depends on
    the batch, so split batches differ from whole ones). eps = label_smoothing in [0, 0.5]. Rewards: beta * r
    per pair. Inputs: summed log-probs.
    """
    policy_margins, _ = torch.sort(policy_chosen_logps - policy_rejected_logps)  # [b], ascending
    ref_margins, _ = torch.sort(ref_chosen_logps - ref_rejected_logps)
    losses = _smoothed_logistic(beta * (policy_margins - ref_margins), label_smoothing)
    return _output(losses, beta, policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps)


def aot_unpaired_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """AOT, unpaired (Melnyk et al., 2024, arXiv 2406.05882, §3): the chosen log-ratios r_w should dominate
    the rejected r_l in distribution, pairs ignored. Sorting each over the batch matches quantiles:

        loss_k = -(1 - eps) log sigma(beta (r_w,(k) - r_l,(k))) - eps log sigma(-beta (r_w,(k) - r_l,(k))).

    As for `aot_loss`, entry k is a quantile, only the batch mean is meaningful. eps = label_smoothing in
    [0, 0.5]. Rewards: beta * r per pair. Inputs: summed log-probs.
    """
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    chosen_sorted, _ = torch.sort(chosen)  # [b]
    rejected_sorted, _ = torch.sort(rejected)
    losses = _smoothed_logistic(beta * (chosen_sorted - rejected_sorted), label_smoothing)
    return _output(losses, beta, chosen, rejected)


def nca_pair_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """NCA for pairwise preferences (Chen et al., 2024, arXiv 2402.05369), rewards u = beta * r:

        -log sigma(u_w) - 1/2 log sigma(-u_w) - 1/2 log sigma(-u_l).

    Unlike DPO it scores each response against the reference on its own (not only the margin), so the
    chosen likelihood is not pushed down with the rejected one. Inputs: summed log-probs.
    """
    _no_smoothing("nca_pair", label_smoothing)
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    u_w, u_l = beta * chosen, beta * rejected
    losses = -F.logsigmoid(u_w) - 0.5 * F.logsigmoid(-u_w) - 0.5 * F.logsigmoid(-u_l)
    return _output(losses, beta, chosen, rejected)


def bco_pair_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    *,
    delta: torch.Tensor | float | None = None,
) -> PreferenceLossOutput:
    """BCO on pairs (Jung et al., 2024, arXiv 2404.04656): a binary classifier with logit u - delta,
    u = beta * r, chosen labelled 1 and rejected 0:

        -log sigma(u_w - delta) - log sigma(-(u_l - delta)).

    delta (scalar) is the reward shift; the paper uses a running mean of the rewards, which the caller
    keeps (for a multi-process run, of the gathered rewards) and passes in. Default: the batch mean of
    the detached rewards [u_w, u_l], which depends on how the batch is split. Gradients never flow into
    delta. Inputs: summed log-probs.
    """
    _no_smoothing("bco_pair", label_smoothing)
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    u_w, u_l = beta * chosen, beta * rejected
    if delta is None:
        delta = torch.cat([u_w, u_l]).mean()  # [2b] -> scalar
    shift = torch.as_tensor(delta, dtype=u_w.dtype, device=u_w.device).detach()
    losses = -F.logsigmoid(u_w - shift) - F.logsigmoid(-(u_l - shift))
    return _output(losses, beta, chosen, rejected)


def sppo_hard_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """SPPO with hard win probabilities (Wu et al., 2024, arXiv 2405.00675, Algorithm 1, eq. 4.7):
    (r - eta (P - 1/2))^2 with P = 1 for the winner and 0 for the loser, and eta = 1/beta (TRL's map):

        (r_w - 1/(2 beta))^2 + (r_l + 1/(2 beta))^2.

    The reference plays the paper's previous-iteration policy pi_t. Inputs: summed log-probs.
    """
    _no_smoothing("sppo_hard", label_smoothing)
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    target = 1.0 / (2.0 * beta)
    return _output((chosen - target) ** 2 + (rejected + target) ** 2, beta, chosen, rejected)


def apo_zero_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """APO-zero (D'Oosterlinck et al., 2024, arXiv 2408.06266, eq. 7): raise the chosen likelihood and
    lower the rejected one, each anchored at the reference (for chosen outputs better than the model's):

        (1 - sigma(beta r_w)) + sigma(beta r_l).

    (The paper's -sigma(beta r_w) + sigma(beta r_l) plus 1, so the loss lies in [0, 2].) Summed log-probs.
    """
    _no_smoothing("apo_zero", label_smoothing)
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    losses = 1.0 - torch.sigmoid(beta * chosen) + torch.sigmoid(beta * rejected)
    return _output(losses, beta, chosen, rejected)


def apo_down_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """APO-down (D'Oosterlinck et al., 2024, arXiv 2408.06266, eq. 8): lower the chosen likelihood and
    the rejected one more (for chosen outputs worse than the model's own):

        sigma(beta r_w) + (1 - sigma(beta (r_w - r_l))).

    (The paper's form plus 1, so the loss lies in [0, 2].) Inputs: summed log-probs.
    """
    _no_smoothing("apo_down", label_smoothing)
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    losses = torch.sigmoid(beta * chosen) + 1.0 - torch.sigmoid(beta * (chosen - rejected))
    return _output(losses, beta, chosen, rejected)


DPO_LOSSES: dict[str, PairwiseLoss] = {
    "sigmoid": sigmoid_loss,
    "robust": robust_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "exo_pair": exo_pair_loss,
    "nca_pair": nca_pair_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "aot": aot_loss,
    "aot_unpaired": aot_unpaired_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "discopop": discopop_loss,
    "sft": sft_loss,
    "sigmoid_norm": sigmoid_norm_loss,
}

# Losses with a label-smoothing form; in a list of losses, label_smoothing goes to these only.
SMOOTHED_LOSSES = frozenset({"sigmoid", "robust", "exo_pair", "aot", "aot_unpaired"})
# Losses built on the chosen-minus-rejected margin, where f-DPO's log Z(x) cancels, so a non-reverse-KL
# f-divergence is valid (sft does not use the reference at all). The others refuse one, as in TRL 1.16.
F_DIVERGENCE_LOSSES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"})
# Losses that compare each pair with the rest of the batch (sorting), so per-pair weights cannot apply.
BATCH_SORTED_LOSSES = frozenset({"aot", "aot_unpaired"})


@functools.cache
def _options_of(loss: PairwiseLoss) -> frozenset[str]:
    """The keyword-only options a loss declares (f_divergence, chosen_tokens, tau, delta, ...)."""
    return frozenset(name for name, p in inspect.signature(loss).parameters.items() if p.kind is p.KEYWORD_ONLY)


@functools.cache
def _all_options() -> frozenset[str]:
    """Every keyword-only option some DPO_LOSSES loss declares."""
    return frozenset().union(*(_options_of(fn) for fn in DPO_LOSSES.values()))


def loss_type_list(loss_type: str | Sequence[str]) -> list[str]:
    """loss_type as a list (TRL 1.16 takes one name or a list), each name checked against DPO_LOSSES."""
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not types:
        raise ValueError("loss_type is an empty list; give at least one of: " + ", ".join(sorted(DPO_LOSSES)))
    for name in types:
        if name not in DPO_LOSSES:
            raise ValueError(f"Unknown loss_type {name!r}; use one of {', '.join(sorted(DPO_LOSSES))}.")
    return types


def dpo_loss(
    loss_type: str | Sequence[str],
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    *,
    loss_weights: Sequence[float] | None = None,
    **options: torch.Tensor | float | str | None,
) -> PreferenceLossOutput:
    """One DPO_LOSSES loss, or a weighted sum of several (MPO, Wang et al., 2024, arXiv 2411.10442, eq. 5):

        losses = sum_i w_i * losses_i   ([b]; so mean(losses) = sum_i w_i * mean(losses_i)),

    w = loss_weights (default all 1). Inputs [b] each, summed log-probs (see each loss). `options` are the
    losses' keyword-only options (f_divergence, f_alpha, chosen_tokens, rejected_tokens, tau, delta,
    unweighted_chosen_logps); each loss receives those it declares. label_smoothing goes to the listed losses
    that have a smoothing form (SMOOTHED_LOSSES), or, if none has, to each (which then refuses a non-zero
    value). A non-default f_divergence needs every listed loss in F_DIVERGENCE_LOSSES. The rewards are
    those of the first listed loss (beta * r for every loss here).
    """
    types = loss_type_list(loss_type)
    weights = [1.0] * len(types) if loss_weights is None else [float(w) for w in loss_weights]
    if len(weights) != len(types):
        raise ValueError(f"loss_weights has {len(weights)} weights for {len(types)} loss types {types}; give one "
                         "weight per loss type (or None for weight 1 each).")
    known = _all_options()
    unknown = set(options) - known
    if unknown:
        raise TypeError(f"dpo_loss got unknown options {sorted(unknown)}; the losses take {sorted(known)}.")
    divergence = options.get("f_divergence", "reverse_kl")
    if divergence != "reverse_kl" and not set(types) <= F_DIVERGENCE_LOSSES:
        raise ValueError(f"f_divergence_type={divergence!r} applies to loss types {sorted(F_DIVERGENCE_LOSSES)} only "
                         f"(the others have no f-divergence form); got loss_type={types}. Fix: use "
                         "f_divergence_type='reverse_kl' or drop those loss types.")
    smoothing_used = any(name in SMOOTHED_LOSSES for name in types)
    total, first = None, None
    for name, weight in zip(types, weights, strict=True):
        fn = DPO_LOSSES[name]
        eps = label_smoothing if (name in SMOOTHED_LOSSES or not smoothing_used) else 0.0
        kwargs = {key: value for key, value in options.items() if key in _options_of(fn)}
        out = fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, eps,
                 **kwargs)
        first = out if first is None else first
        total = weight * out.losses if total is None else total + weight * out.losses
    return PreferenceLossOutput(total, first.chosen_rewards, first.rejected_rewards)


def wpo_weights(
    chosen_aligned_logps: torch.Tensor,
    rejected_aligned_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
) -> torch.Tensor:
    """WPO's pair weights (Zhou et al., 2024, "WPO: Enhancing RLHF with weighted preference optimization",
    arXiv 2406.11827, eq. 2 with the aligned per-token probabilities of §3.2), [b], detached:

        w(x, y) = exp( (1/|y|) sum_t log [ pi(y_t | x, y_<t) / sum_v pi(v | x, y_<t)^2 ] ),
        weight  = w(x, y_w) * w(x, y_l),

    so pairs the policy itself would likely sample count more (off-policy data is reweighted towards
    on-policy). Inputs [b]: per completion the sum over its tokens of log pi(y_t) - log sum_v pi(v)^2, and its
    token count. The per-pair losses are multiplied by the weight.
    """
    chosen = chosen_aligned_logps / chosen_tokens.clamp(min=1).to(chosen_aligned_logps.dtype)
    rejected = rejected_aligned_logps / rejected_tokens.clamp(min=1).to(rejected_aligned_logps.dtype)
    return torch.exp(chosen + rejected).detach()


def length_desensitised_log_probs(token_logps: torch.Tensor, sequence: torch.Tensor, num_pairs: int,
                                  alpha: float) -> torch.Tensor:
    """LD-DPO's sequence log-probs (Liu et al., 2024, "Length desensitization in direct preference
    optimization", arXiv 2409.06411, §4.1), [2b]: for a pair with completion lengths l_w, l_l and public
    length l_p = min(l_w, l_l),

        log pi_hat(y) = sum_{t <= l_p} log pi(y_t | ...) + alpha * sum_{t > l_p} log pi(y_t | ...),

    so the excess tokens of the longer completion count alpha-fold (alpha = 1: plain sums; 0: cut to l_p).
    token_logps [n]: completion-token log-probs; sequence [n]: the sequence of each token, k < b the chosen
    completion of pair k and b + k its rejected one, with each sequence's tokens in order (any interleaving
    of sequences). b = num_pairs.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"ld_alpha must lie in [0, 1], got {alpha}.")
    num = 2 * num_pairs
    counts = torch.zeros(num, dtype=torch.long, device=sequence.device).index_add_(0, sequence,
                                                                                  torch.ones_like(sequence))
    order = torch.sort(sequence, stable=True).indices  # tokens grouped by sequence, in order within each
    starts = counts.cumsum(0) - counts  # [2b] index of each sequence's first token in that order
    rank = torch.empty_like(sequence)
    rank[order] = torch.arange(sequence.numel(), device=sequence.device) - starts[sequence[order]]  # [n], from 0
    public = torch.minimum(counts[:num_pairs], counts[num_pairs:]).repeat(2)  # [2b]
    weights = torch.where(rank < public[sequence], 1.0, alpha).to(token_logps.dtype)  # [n]
    return token_logps.new_zeros(num).index_add(0, sequence, weights * token_logps)


# ----- reference-free ---------------------------------------------------------------------------------
def simpo_loss(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """SimPO (Meng et al., 2024, arXiv 2405.14734, eq. 6): -log sigma(beta * (a_w - a_l) - gamma), where
    a = per-token average log-prob under the policy ([b] each; no reference model).

    gamma is the paper's target reward margin, in reward units (the same as TRL CPOConfig.simpo_gamma).
    The SimPO repository's `gamma_beta_ratio` is gamma / beta. With label_smoothing eps in [0, 0.5]:
    -(1 - eps) log sigma(z) - eps log sigma(-z), as TRL's CPOTrainer does. Rewards: beta * a.
    """
    logits = beta * (chosen_avg_logps - rejected_avg_logps) - gamma  # [b]
    return _output(_smoothed_logistic(logits, label_smoothing), beta, chosen_avg_logps, rejected_avg_logps)


def cpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """The preference term of CPO (Xu et al., 2024, arXiv 2401.08417, eq. 3): DPO with the reference
    dropped, -log sigma(beta * (log pi(y_w) - log pi(y_l))); summed log-probs [b] each. With
    label_smoothing eps in [0, 0.5], the cDPO mixture. The trainer adds CPO's NLL term on y_w.
    Rewards: beta * log pi(y).
    """
    logits = beta * (chosen_logps - rejected_logps)  # [b]
    return _output(_smoothed_logistic(logits, label_smoothing), beta, chosen_logps, rejected_logps)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, elementwise, accurate everywhere (Maechler, 2012): log(-expm1(x)) for
    x > -log 2 and log1p(-exp(x)) below. Naive equivalent: torch.log(1 - torch.exp(x)), which is -inf
    once exp(x) rounds to 1 (|x| < 6e-8 in float32). The log1p branch sees x clamped to <= -log 2: near 0,
    where torch.where discards it, it would otherwise be -inf and put NaN into the gradient.
    log1mexp(0) = -inf."""
    upper = torch.log(-torch.expm1(x))  # used for x in (-log 2, 0]
    lower = torch.log1p(-torch.exp(x.clamp(max=LN_HALF)))  # used for x <= -log 2
    return torch.where(x > LN_HALF, upper, lower)


def orpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, beta: float) -> ORPOLossOutput:
    """ORPO's odds-ratio term (Hong et al., 2024, arXiv 2403.07691, eqs. 4, 6, 7), per pair [b]:

        odds(y) = P / (1 - P),  P = exp(a),  a = per-token average log-prob of y under the policy,
        log odds(y) = a - log(1 - exp(a)),
        losses = -beta * log sigma(log odds(y_w) - log odds(y_l)),

    with beta the paper's lambda (TRL ORPOConfig.beta). log(1 - exp(a)) goes through log1mexp, and a is
    clamped to at most -tiny so a probability of exactly 1 gives a large finite log-odds, not inf.
    The trainer adds the NLL on y_w: loss = nll + mean(losses). Rewards: beta * a.
    """
    tiny = torch.finfo(chosen_avg_logps.dtype).tiny
    a_w, a_l = chosen_avg_logps.clamp(max=-tiny), rejected_avg_logps.clamp(max=-tiny)
    log_odds = (a_w - a_l) - (log1mexp(a_w) - log1mexp(a_l))  # [b]
    log_sigma = F.logsigmoid(log_odds)  # [b]
    pair = _output(-beta * log_sigma, beta, chosen_avg_logps, rejected_avg_logps)
    return ORPOLossOutput(pair.losses, pair.chosen_rewards, pair.rejected_rewards,
                          log_odds_ratio=log_sigma.detach(), log_odds_chosen=log_odds.detach())


# ----- KTO --------------------------------------------------------------------------------------------
def kto_reference_point(policy_mismatched_logps: torch.Tensor, ref_mismatched_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 = max(0, mean(log pi - log pi_ref)) over mismatched (prompt, completion)
    pairs, a biased estimate of KL(pi || pi_ref) (Ethayarajh et al., 2024, arXiv 2402.01306, §4.2).

    Inputs [m], summed log-probs; returns a detached scalar. With several processes, call it on the
    gathered log-probs of all of them so the clamp applies to the global mean (as TRL does).
    """
    return (policy_mismatched_logps - ref_mismatched_logps).mean().clamp(min=0.0).detach()


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_reference_point: torch.Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLossOutput:
    """KTO (Ethayarajh et al., 2024, arXiv 2402.01306, eq. 7), per example [b], r = log pi - log pi_ref:

        desirable:    lambda_D * (1 - sigma(beta * (r - z0)))
        undesirable:  lambda_U * (1 - sigma(beta * (z0 - r)))

    policy_logps, ref_logps: summed log-probs [b]; desirable: bool [b]; kl_reference_point: z0, a
    scalar (see kto_reference_point), detached and clamped at 0 here; lambda_D = desirable_weight,
    lambda_U = undesirable_weight. Rewards: beta * r.
    """
    logratios = policy_logps - ref_logps  # [b]
    z0 = torch.as_tensor(kl_reference_point, dtype=logratios.dtype, device=logratios.device).detach().clamp(min=0.0)
    desirable_losses = desirable_weight * (1.0 - torch.sigmoid(beta * (logratios - z0)))
    undesirable_losses = undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - logratios)))
    losses = torch.where(desirable.bool(), desirable_losses, undesirable_losses)  # [b]
    return KTOLossOutput(losses=losses, rewards=(beta * logratios).detach())


def apo_zero_unpaired_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLossOutput:
    """APO-zero for unpaired data (D'Oosterlinck et al., 2024, arXiv 2408.06266, eq. 7 with its two terms
    applied to separate examples), per example [b], r = log pi - log pi_ref:

        desirable:    lambda_D * (1 - sigma(beta * r))
        undesirable:  lambda_U * sigma(beta * r)

    KTO's form without the reference point z0 (no mismatched pairs needed). Inputs as for `kto_loss`.
    """
    logratios = policy_logps - ref_logps  # [b]
    desirable_losses = desirable_weight * (1.0 - torch.sigmoid(beta * logratios))
    undesirable_losses = undesirable_weight * torch.sigmoid(beta * logratios)
    losses = torch.where(desirable.bool(), desirable_losses, undesirable_losses)  # [b]
    return KTOLossOutput(losses=losses, rewards=(beta * logratios).detach())
