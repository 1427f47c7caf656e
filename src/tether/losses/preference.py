"""Preference-optimisation losses on sequence log-probabilities: the DPO family, SimPO, CPO, ORPO, KTO.

Shapes: b = preference pairs (or, for KTO, unpaired examples). Every input is [b]: the log-probability
of a whole completion under the policy or the reference model, either summed over the completion's
tokens ("sum") or divided by its number of tokens ("avg"). Which one a loss expects:

    sum: sigmoid, robust, hinge, exo_pair, nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, cpo, kto
    avg: ipo, simpo, orpo

(These match TRL 1.16: DPOTrainer sums except for IPO, which it divides by the completion length;
CPOTrainer averages for SimPO; ORPOTrainer averages.)

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

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LN_HALF = -math.log(2.0)  # where log1mexp switches formulas (Maechler, 2012)


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
                         "use 0.0 (smoothing exists for 'sigmoid', 'robust' and 'exo_pair')")


# ----- offline pairwise losses (policy and reference) -------------------------------------------------
def sigmoid_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """DPO: -log sigma(beta * h) (Rafailov et al., 2023, eq. 7; arXiv 2305.18290).

    With eps = label_smoothing in [0, 0.5], conservative DPO (cDPO; Mitchell, 2023, "A note on DPO with
    noisy preferences"): -(1 - eps) log sigma(beta h) - eps log sigma(-beta h), the DPO loss averaged
    over a label flipped with probability eps. Inputs: summed log-probs, [b] each.
    """
    chosen = policy_chosen_logps - ref_chosen_logps  # r_w, [b]
    rejected = policy_rejected_logps - ref_rejected_logps  # r_l, [b]
    return _output(_smoothed_logistic(beta * (chosen - rejected), label_smoothing), beta, chosen, rejected)


def robust_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """Robust DPO (rDPO; Chowdhury et al., 2024, arXiv 2403.00409), with eps = label_smoothing the flip
    rate in [0, 0.5):

        [(1 - eps) * l(h) - eps * l(-h)] / (1 - 2 eps),   l(h) = -log sigma(beta h).

    Unbiased: (1 - eps) * loss(y_w, y_l) + eps * loss(y_l, y_w) = l(h), the clean DPO loss, so under
    random flips its expectation is the noise-free loss (cDPO's is not). Inputs: summed log-probs.
    """
    _check_smoothing(label_smoothing, high=0.5, high_inclusive=False)
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    logits = beta * (chosen - rejected)  # [b]
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
) -> PreferenceLossOutput:
    """SLiC's rank-calibration hinge, max(0, delta - log P(y_w) + log P(y_l)) (Zhao et al., 2023,
    arXiv 2305.10425, eq. 1), in TRL's form on reference log-ratios (as in RSO, Liu et al., 2023):

        max(0, 1 - beta * h)  =  beta * max(0, 1/beta - h),   i.e. margin delta = 1/beta.

    Inputs: summed log-probs. No label smoothing.
    """
    _no_smoothing("hinge", label_smoothing)
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    return _output(torch.relu(1.0 - beta * (chosen - rejected)), beta, chosen, rejected)


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """IPO: (h - 1/(2 beta))^2 (Azar et al., 2023, arXiv 2310.12036, eq. 17; beta is the paper's tau).

    Inputs are PER-TOKEN AVERAGES (each sequence's summed log-prob divided by its completion length),
    as TRL 1.16 does for IPO: with sums the squared loss grows with completion length and beta is not
    comparable across lengths. The rewards are then beta * (averaged log-ratios). No label smoothing.
    """
    _no_smoothing("ipo", label_smoothing)
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    return _output((chosen - rejected - 1.0 / (2.0 * beta)) ** 2, beta, chosen, rejected)


def exo_pair_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 1e-3,
) -> PreferenceLossOutput:
    """EXO for pairwise preferences (Ji et al., 2024, arXiv 2402.00856, EXO-pref with K = 2, eq. 16 of
    the version TRL cites): KL(q || p) between the policy's distribution over the pair,
    q = softmax(beta * [r_w, r_l]) = [sigma(beta h), sigma(-beta h)], and the label distribution
    p = [1 - eps, eps]:

        q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps).

    eps = label_smoothing must lie in (0, 1) (p needs full support; the paper suggests 1e-3, which is
    this function's default). Inputs: summed log-probs. The minimum is at beta h = log((1 - eps) / eps).
    """
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"'exo_pair' needs label_smoothing in (0, 1) (the paper suggests 1e-3), got {label_smoothing}")
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    logits = beta * (chosen - rejected)  # [b]
    log_q_w, log_q_l = F.logsigmoid(logits), F.logsigmoid(-logits)
    losses = log_q_w.exp() * (log_q_w - math.log1p(-label_smoothing)) + log_q_l.exp() * (
        log_q_l - math.log(label_smoothing)
    )
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
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
}


# The losses whose inputs are per-token averages rather than sums (see the module docstring).
AVERAGED_LOG_PROBS = frozenset({"ipo", "simpo", "orpo"})


def dpo_loss(
    loss_type: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    **loss_kwargs: torch.Tensor | float | None,
) -> PreferenceLossOutput:
    """Look `loss_type` up in DPO_LOSSES and call it; inputs [b] each, as that loss documents (sums,
    or averages for 'ipo'). loss_kwargs go to the loss only (e.g. delta= for 'bco_pair'); a loss that
    does not take one raises TypeError."""
    try:
        fn = DPO_LOSSES[loss_type]
    except KeyError:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(sorted(DPO_LOSSES))}") from None
    return fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
              label_smoothing, **loss_kwargs)


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
