"""Policy losses of the group-baseline methods: GRPO and its variants (Dr. GRPO, DAPO, GSPO, CISPO, SAPO,
LUSPO, VESPO, two-sided clipping) and RLOO.

Shapes: n = completions, t = completion tokens. logps, old_logps, ref_logps, mask: [n, t]; advantages:
[n], one per completion (the outcome reward's advantage applies to every token of its completion).
Advantages come from `losses.advantages`; the KL estimators from `losses.kl`; the token reductions
"token" / "sequence" / "fixed" from `losses.ppo.aggregate_loss` (a split batch given the whole batch's
normaliser sums to the whole batch's loss, see there).

The GRPO family (`group_policy_loss`) is one pipeline with one replaceable step, the per-token objective
chosen by `loss_type` from `OBJECTIVES` (and its reduction from `LOSS_AGGREGATION`):

    1. importance weight  w = exp(log pi - log pi_old), per token, or per sequence (GSPO)
    2. objective          l = OBJECTIVES[loss_type](w, A, ...)                       [n, t]
    3. token factors      l *= off-policy sequence mask * high-entropy mask * sampler IS weight
    4. KL                 l += beta * k3 (times w with the bias correction)
    5. reduction          loss = reduce(l, mask) - entropy_coef * mean entropy

Clip diagnostics (as TRL reports them): a token (for sequence-level weights, a sequence) counts as
    low-clipped  when ratio < 1 - eps_low  and A < 0,
    high-clipped when ratio > 1 + eps_high and A > 0,
i.e. where the clip removed its gradient; "region" is either.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..ops.stats import masked_mean, masked_sum
from .kl import kl_penalty
from .ppo import Normaliser, aggregate_loss, clip_shares, clipped_surrogate


@dataclass
class GroupPolicyLossOutput:
    loss: torch.Tensor  # scalar, differentiable
    clip_ratio_low: torch.Tensor  # detached from here on; shares over this call's tokens (RLOO: sequences)
    clip_ratio_high: torch.Tensor
    clip_ratio_region: torch.Tensor
    kl: torch.Tensor  # mean per-token k3 KL to the reference; nan when no reference was given
    policy_loss: torch.Tensor | None = None  # the loss without the entropy bonus
    entropy: torch.Tensor | None = None  # mean entropy over the tokens the bonus acts on (when given)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # loss-type diagnostics, e.g. cispo_clip_ratio


# ----- 1. importance weights ------------------------------------------------------------------------------
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def log_importance_weights(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor,
                           level: str = "token") -> torch.Tensor:
    """log w, [n, t] for level "token" (PPO/GRPO: log pi_t - log pi_old,t; 0 at padding) or [n, 1] for
    "sequence" (GSPO, Zheng et al., 2025, "Group Sequence Policy Optimization", eq. 7):

        log s_i = 1/|o_i| sum_t (log pi(o_i,t) - log pi_old(o_i,t))       (length-normalised sequence ratio)

    The [n, 1] weight broadcast over the tokens of o_i has the value and gradient of GSPO-token's stop-
    gradient form (eq. 13) s_i,t = sg[s_i] * pi(o_i,t) / sg[pi(o_i,t)] once summed over the tokens of a
    sequence with one advantage: d s_i = s_i * 1/|o_i| sum_t d log pi_t, and |o_i| equal token copies of it
    sum to s_i * sum_t d log pi_t, which is what the per-token form gives. (Only a per-token factor, e.g. an
    entropy mask, tells them apart; this broadcast form is the sequence objective itself, as TRL uses.)
    """
    mask = mask.bool()
    log_ratio = torch.where(mask, logps - old_logps.detach(), 0.0)  # [n, t]; 0 at padding, whatever it holds
    if level == "token":
        return log_ratio
    if level == "sequence":
        return (log_ratio.sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1)  # [n, 1]
    raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, got {level!r}.")


# ----- 2. per-token objectives: (ratio, advantages, context) -> loss per token -------------------------------
@dataclass
class ObjectiveInputs:
    """What an objective may read. ratio = exp(log_ratio): [n, t] or [n, 1] (differentiable, at the importance
    sampling level); advantages [n, 1]; logps,
    log_ratio_tokens (token-level log pi - log pi_old, whatever the level), mask: [n, t]; sampler_weights:
    [n, t] / [n, 1] or None (truncated IS weights of the sampler, see `sampler_importance_weights`)."""

    ratio: torch.Tensor
    log_ratio: torch.Tensor
    advantages: torch.Tensor
    logps: torch.Tensor
    log_ratio_tokens: torch.Tensor
    mask: torch.Tensor
    sampler_weights: torch.Tensor | None
    epsilon_low: float
    epsilon_high: float
    delta: float | None = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0


def clipped_objective(x: ObjectiveInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (GRPO eq. 3; `losses.ppo.clipped_surrogate`), with INTELLECT-2's two-sided
    clipping when delta is set (Prime Intellect, 2025, "INTELLECT-2", sec. 3.3): the unclipped ratio is
    capped at delta, so a negative-advantage token whose ratio has grown huge cannot push unboundedly,

        l = -min(A * min(r, delta), A * clip(r, 1 - eps_low, 1 + eps_high))

    (for A > 0 the cap changes nothing as long as delta > 1 + eps_high, as the report recommends)."""
    if x.delta is None:
        loss, _, _ = clipped_surrogate(x.log_ratio, x.advantages, x.epsilon_low, x.epsilon_high)
        return loss, {}
    clipped = torch.clamp(x.ratio, 1.0 - x.epsilon_low, 1.0 + x.epsilon_high)
    capped = torch.clamp(x.ratio, max=x.delta)
    return -torch.minimum(capped * x.advantages, clipped * x.advantages), {}


def cispo_objective(x: ObjectiveInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO (MiniMax, 2025, "MiniMax-M1", eq. 4-5): clip the importance weight, not the update, and keep
    every token's gradient; the clipped weight is a constant (stop-gradient):

        l_t = -sg[min(r_t, eps_max)] * A * log pi(o_t)          eps_max = epsilon_high (e.g. 5.0)

    Diagnostic cispo_clip_ratio: share of tokens with r > eps_max and A > 0."""
    weight = torch.clamp(x.ratio, max=x.epsilon_high).detach()
    loss = -weight * x.advantages * x.logps
    with torch.no_grad():
        clipped = ((x.ratio > x.epsilon_high) & (x.advantages > 0)).float()
    return loss, {"cispo_clip_ratio": _share(clipped, x.mask)}


def sapo_objective(x: ObjectiveInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SAPO (Gao et al., 2025, "Soft Adaptive Policy Optimization", eq. 5-6): a smooth gate instead of the
    hard clip, with temperature tau_pos for A > 0 and tau_neg otherwise,

        l_t = -(4 / tau) * sigmoid(tau * (r_t - 1)) * A

    whose gradient, -4 sigmoid(.)(1 - sigmoid(.)) * A * d r, equals the plain policy gradient -A d r at
    r = 1 and decays smoothly as r leaves 1."""
    tau = _pick(x.advantages > 0, x.sapo_temperature_pos, x.sapo_temperature_neg, x.ratio)
    return -torch.sigmoid(tau * (x.ratio - 1.0)) * 4.0 / tau * x.advantages, {}


# log(1e-8): the floor of VESPO's log weights, as its reference implementation clamps
_VESPO_LOG_FLOOR = math.log(1e-8)


@torch.no_grad()
def vespo_weights(advantages: torch.Tensor, log_ratio_tokens: torch.Tensor, mask: torch.Tensor,
                  sampler_weights: torch.Tensor | None, k_pos: float, lambda_pos: float, k_neg: float,
                  lambda_neg: float) -> torch.Tensor:
    """VESPO's sequence weight phi(w) (Shen et al., 2026, "VESPO", the Gamma-shaped weighting), [n, 1],
    detached. With w the UNnormalised sequence ratio prod_t pi/pi_old (times the sampler's IS weights),

        phi(w) = exp(lambda) * w^k * exp(-lambda * w)          (k, lambda) by the sign of A (A >= 0: pos)

    normalised so phi(1) = 1, computed in log space: log phi = lambda + k log w - lambda w, with the token
    log ratios clamped to [-20, 20] and log w to [log 1e-8, 20] against overflow."""
    log_w = (log_ratio_tokens.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True)  # [n, 1]
    if sampler_weights is not None:
        log_w = log_w + torch.log(sampler_weights).clamp(_VESPO_LOG_FLOOR, 20.0).sum(-1, keepdim=True)
    log_w = log_w.clamp(_VESPO_LOG_FLOOR, 20.0)
    nonneg = advantages >= 0
    k = _pick(nonneg, k_pos, k_neg, log_w)
    lam = _pick(nonneg, lambda_pos, lambda_neg, log_w).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def vespo_objective(x: ObjectiveInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """VESPO: l_t = -phi(w) * A * log pi(o_t) with phi from `vespo_weights` (a constant), so the gradient is
    phi(w) A d log pi: a soft, asymmetric trust region on the whole sequence's weight instead of a clip.
    The sampler's IS weights enter phi, not a separate factor."""
    phi = vespo_weights(x.advantages, x.log_ratio_tokens, x.mask, x.sampler_weights, x.vespo_k_pos,
                        x.vespo_lambda_pos, x.vespo_k_neg, x.vespo_lambda_neg)  # [n, 1]
    return -phi * x.advantages * x.logps, {"vespo/phi_seq_mean": phi.mean()}


Objective = Callable[[ObjectiveInputs], tuple[torch.Tensor, dict[str, torch.Tensor]]]

# loss_type -> the per-token objective
OBJECTIVES: dict[str, Objective] = {
    "grpo": clipped_objective, "bnpo": clipped_objective, "dr_grpo": clipped_objective,
    "dapo": clipped_objective, "luspo": clipped_objective,
    "cispo": cispo_objective, "sapo": sapo_objective, "vespo": vespo_objective,
}
# loss_type -> reduction of the per-token loss: aggregate_loss's modes, plus LUSPO's "sequence_sum"
LOSS_AGGREGATION: dict[str, str] = {
    "grpo": "sequence",  # the paper: mean over completions of each completion's token mean
    "sapo": "sequence",
    "dapo": "token",  # every token of the optimizer step weighs the same (global token count)
    "cispo": "token",
    "vespo": "token",
    "bnpo": "token",  # the same, normalised by the micro-batch's own token count (the trainer's normaliser)
    "dr_grpo": "fixed",  # sum over tokens / (completions x max_completion_length)
    # LUSPO (2026, "Length-Unbiased Sequence Policy Optimization"): a sequence's loss is its token sum, i.e.
    # GSPO's sequence loss scaled by its length; mean over completions
    "luspo": "sequence_sum",
}
# the loss types whose diagnostics are the clip shares
CLIPPED_LOSS_TYPES = tuple(k for k, v in OBJECTIVES.items() if v is clipped_objective)


# ----- 3. token factors ---------------------------------------------------------------------------------------
@torch.no_grad()
def off_policy_sequence_mask(advantages: torch.Tensor, logps: torch.Tensor, sampling_logps: torch.Tensor,
                             mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """Off-policy sequence masking (DeepSeek-AI, 2025, "DeepSeek-V3.2", eq. 9), [n, 1] float, 1 = keep:

        drop o_i  iff  A_i < 0  and  1/|o_i| sum_t (log pi_sampler(o_t) - log pi(o_t)) > threshold

    A sequence the current policy has drifted far from (mean forward-KL estimate above the threshold) is
    a poor negative example: pushing it down further mostly adds noise. advantages [n, 1]. Sampler
    log-probs that are NaN (unscored by the engine) count as no evidence (0)."""
    mask = mask.bool()
    kl = torch.where(mask, sampling_logps - logps.detach(), 0.0).nan_to_num(nan=0.0)  # [n, t]
    mean_kl = kl.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)  # [n, 1]
    return ((advantages >= 0) | (mean_kl <= threshold)).to(logps.dtype)


@torch.no_grad()
def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, keep_quantile: float,
                      population: torch.Tensor | None = None) -> torch.Tensor:
    """Keep only the tokens whose entropy is in the top `keep_quantile` share (Wang et al., 2025, "Beyond
    the 80/20 Rule", the forking tokens): [n, t] bool, True where entropy >= the (1 - keep_quantile)
    quantile (linear interpolation, torch.quantile) of the real tokens' entropies. `population` (1-D)
    replaces those entropies when the threshold must come from more tokens (e.g. gathered over processes).
    keep_quantile 1.0 keeps every real token; 0.0 keeps only the highest."""
    mask = mask.bool()
    values = entropy[mask].float() if population is None else population.float()
    if values.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(values, 1.0 - keep_quantile)
    return (entropy >= threshold.to(entropy.dtype)) & mask


SAMPLER_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


@torch.no_grad()
def sampler_importance_weights(trainer_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor,
                               mode: str = "sequence_mask", clip_min: float | None = None,
                               clip_max: float | None = 3.0) -> torch.Tensor:
    """Truncated / masked importance weights correcting for a sampler whose distribution differs from the
    trainer's (a vLLM engine: other kernels, precision, weights a step behind) (Yao et al., 2025, "Your
    Efficient RL Framework Secretly Brings You Off-Policy RL Training"; TIS / MIS):

        token_*:    rho_t = pi_train(o_t) / pi_sampler(o_t)                                  [n, t]
        sequence_*: rho   = prod_t pi_train(o_t) / pi_sampler(o_t)                           [n, 1]
        *_truncate: rho <- clamp(rho, clip_min, clip_max)                  (either bound may be None)
        *_mask:     rho <- 0 where rho < clip_min or rho > clip_max

    The per-token loss is multiplied by rho. Padding and NaN sampler log-probs contribute log-ratio 0
    (ratio 1: no correction). trainer_logps, sampler_logps, mask: [n, t]."""
    if mode not in SAMPLER_IS_MODES:
        raise ValueError(f"vllm_importance_sampling_mode must be one of {SAMPLER_IS_MODES}, got {mode!r}.")
    diff = torch.where(mask.bool(), trainer_logps - sampler_logps, 0.0).nan_to_num(nan=0.0)  # [n, t]
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)  # [n, 1]
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


# ----- the GRPO family ----------------------------------------------------------------------------------------
def group_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    num_tokens: Normaliser = None,
    num_sequences: Normaliser = None,
    max_length: int | None = None,
    importance_sampling_level: str = "token",
    delta: float | None = None,
    use_bias_correction_kl: bool = False,
    sampler_weights: torch.Tensor | None = None,
    off_policy_threshold: float | None = None,
    sampling_logps: torch.Tensor | None = None,
    entropy_mask: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    entropy_normaliser: float = 1.0,
    **objective_options: float,
) -> GroupPolicyLossOutput:
    """The GRPO family's loss (the module docstring's five steps), one scalar to minimise.

    logps [n, t] (differentiable), old_logps [n, t] (the sampling policy's, constants), advantages [n],
    mask [n, t]; ref_logps [n, t] when beta != 0. Normalisers as `losses.ppo.aggregate_loss`; "sequence_sum"
    (LUSPO) is sum_i sum_t l_it / num_sequences.
    - importance_sampling_level: "token" or "sequence" (GSPO), see `log_importance_weights`.
    - delta: two-sided clipping of the clipped family (see `clipped_objective`).
    - use_bias_correction_kl: the k3 KL term times the (differentiable) importance weight, so that its
      gradient is that of the reverse KL under the current policy even when the tokens came from
      pi_old (DeepSeek-V3.2, sec. 3.1, "unbiased KL estimate").
    - sampler_weights [n, t] or [n, 1]: `sampler_importance_weights`, multiplied in (VESPO folds them into phi).
    - off_policy_threshold with sampling_logps [n, t]: `off_policy_sequence_mask`.
    - entropy_mask [n, t] bool: `high_entropy_mask`; tokens outside it lose their policy term (the normaliser
      still counts them, as TRL's).
    - entropy [n, t] (differentiable) with entropy_coef: the bonus -coef * H, H the mean entropy over mask
      (and entropy_mask) divided by entropy_normaliser (the micro-batches per optimizer step), whatever the
      loss type's normalisation (so coef means the same for every loss type).
    objective_options: sapo_temperature_pos/neg, vespo_k_pos/lambda_pos/k_neg/lambda_neg.
    """
    if loss_type not in OBJECTIVES:
        raise ValueError(f"Unknown loss_type {loss_type!r}; choose from {', '.join(OBJECTIVES)}.")
    mask = mask.bool()
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    advantages = torch.where(torch.isfinite(advantages), advantages, 0.0).to(logps.dtype)[:, None]  # [n, 1]
    log_ratio_tokens = log_importance_weights(logps, old_logps, mask, "token")  # [n, t]
    if importance_sampling_level == "token":
        log_w = log_ratio_tokens
    else:  # [n, 1] (or the level's ValueError)
        log_w = log_importance_weights(logps, old_logps, mask, importance_sampling_level)
    ratio = torch.exp(log_w)
    inputs = ObjectiveInputs(ratio, log_w, advantages, logps, log_ratio_tokens, mask, sampler_weights, epsilon_low,
                             eps_high, delta, **objective_options)
    per_token, extra = OBJECTIVES[loss_type](inputs)  # 2.
    per_token = per_token.expand(mask.shape)  # [n, t]
    if off_policy_threshold is not None:  # 3.
        if sampling_logps is None:
            raise ValueError("off_policy_threshold needs sampling_logps (the sampler's log-probs, [n, t]).")
        per_token = per_token * off_policy_sequence_mask(advantages, logps, sampling_logps, mask, off_policy_threshold)
    if entropy_mask is not None:
        per_token = per_token * entropy_mask.to(per_token.dtype)
    if sampler_weights is not None and loss_type != "vespo":
        per_token = per_token * sampler_weights.to(per_token.dtype)
    kl = None
    if beta != 0.0:  # 4.
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps: the reference model's log-probs of the same tokens.")
        kl = kl_penalty(logps, torch.where(mask, ref_logps, logps.detach()), "k3")  # [n, t]
        weighted_kl = kl * ratio if use_bias_correction_kl else kl
        per_token = per_token + beta * weighted_kl
    aggregation = LOSS_AGGREGATION[loss_type]  # 5.
    if aggregation == "sequence_sum":
        loss = masked_sum(per_token, mask) / (per_token.shape[0] if num_sequences is None else num_sequences)
    else:
        loss = aggregate_loss(per_token, mask, aggregation, num_tokens, num_sequences, max_length)
    policy_loss = loss
    entropy_mean = None
    if entropy is not None:
        acting = mask if entropy_mask is None else mask & entropy_mask.bool()
        mean_entropy = masked_sum(entropy, acting) / acting.sum().clamp(min=1)
        entropy_mean = mean_entropy.detach()
        if entropy_coef != 0.0:
            loss = loss - entropy_coef * mean_entropy / entropy_normaliser
    with torch.no_grad():
        # shares over tokens, or over sequences for sequence-level weights ([n, 1])
        weights = mask if ratio.shape == mask.shape else torch.ones_like(ratio, dtype=torch.bool)
        adv = advantages.expand_as(ratio)
        if loss_type in CLIPPED_LOSS_TYPES:
            low, high = clip_shares(ratio, adv, epsilon_low, eps_high, weights)
        else:
            low = high = torch.tensor(float("nan"))
        kl_mean = masked_mean(kl, mask) if kl is not None else torch.tensor(float("nan"))
        return GroupPolicyLossOutput(loss, low, high, low + high, kl=kl_mean, policy_loss=policy_loss.detach(),
                                     entropy=entropy_mean, extra=extra)


def _pick(condition: torch.Tensor, if_true: float, if_false: float, like: torch.Tensor) -> torch.Tensor:
    """torch.where of two Python numbers in `like`'s dtype (not float32 first, which would round 1.05)."""
    return torch.where(condition, torch.tensor(if_true, dtype=like.dtype, device=like.device),
                       torch.tensor(if_false, dtype=like.dtype, device=like.device))


def _share(flags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of 0/1 flags [n, t] or [n, 1] over the real tokens (over rows for [n, 1])."""
    if flags.shape != mask.shape:
        return flags.mean()
    return masked_mean(flags, mask)


def token_level_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    aggregation: str = "token",
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    num_tokens: Normaliser = None,
    num_sequences: Normaliser = None,
    max_length: int | None = None,
) -> GroupPolicyLossOutput:
    """GRPO's objective as a loss (Shao et al., 2024, "DeepSeekMath", eq. 3, outcome supervision):

        r_it = exp(logps_it - old_logps_it)
        l_it = max(-A_i r_it, -A_i clip(r_it, 1 - eps_low, 1 + eps_high)) + beta * k3_it
        k3_it = exp(ref_logps_it - logps_it) - (ref_logps_it - logps_it) - 1        (eq. 4)
        loss = aggregate_loss(l, mask, aggregation, ...)

    aggregation "sequence" is the paper's 1/G sum_i 1/|o_i| sum_t; "token" is DAPO's (Yu et al., 2025,
    eq. 8), "fixed" Dr. GRPO's (Liu et al., 2025). eps_high defaults to eps_low (DAPO's clip-higher sets
    it larger). With one update per generation old_logps == logps.detach(): r = 1 and the gradient is
    the plain policy gradient A * grad log pi. beta > 0 needs ref_logps. The KL term is not weighted by
    r (see `group_policy_loss` for that and the other variants).
    """
    loss_type = {"token": "dapo", "sequence": "grpo", "fixed": "dr_grpo"}.get(aggregation)
    if loss_type is None:
        raise ValueError(f"Unknown loss aggregation {aggregation!r}; choose from token, sequence, fixed")
    return group_policy_loss(logps, old_logps, advantages, mask, loss_type, epsilon_low, epsilon_high, beta,
                             ref_logps, num_tokens, num_sequences, max_length)


def sequence_level_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    num_sequences: Normaliser = None,
) -> GroupPolicyLossOutput:
    """RLOO's loss with a clipped sequence-level ratio (REINFORCE with the leave-one-out baseline,
    Ahmadian et al., 2024, "Back to Basics", eq. 5 for the estimator, plus PPO clipping of the whole
    completion's probability ratio, as TRL's RLOOTrainer):

        log r_i = sum_t mask_it (logps_it - old_logps_it)        (log pi(o_i) - log pi_old(o_i))
        l_i     = max(-A_i r_i, -A_i clip(r_i, 1 - eps_low, 1 + eps_high))
        loss    = sum_i l_i / N,   N = num_sequences (default n)

    The KL to the reference enters RLOO through the reward (`losses.kl.sequence_kl`), not here.
    """
    mask = mask.bool()
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    log_ratio = masked_sum(logps - old_logps.detach(), mask, dim=-1)  # [n]
    per_sequence, ratio, _ = clipped_surrogate(log_ratio, advantages, epsilon_low, eps_high)  # [n]
    loss = per_sequence.sum() / (per_sequence.shape[0] if num_sequences is None else num_sequences)
    with torch.no_grad():
        low, high = clip_shares(ratio, advantages, epsilon_low, eps_high, torch.ones_like(ratio, dtype=torch.bool))
        return GroupPolicyLossOutput(loss, low, high, low + high, kl=torch.tensor(float("nan")))


class AdaptiveEntropyCoefficient:
    """Skywork-OR1's adaptive entropy control (He et al., 2025, "Skywork Open Reasoner 1", sec. 3.2.2): the
    entropy bonus's coefficient c follows the measured entropy H of each optimizer step,

        c <- min(c + delta, c_max)  if H <= target,   else  max(c - delta, c_min)

    and the bonus is applied (with the c of the previous step's end) only while the last measured H is at
    or below the target; before any measurement nothing is applied."""

    def __init__(self, initial: float, target: float, step: float, minimum: float, maximum: float) -> None:
        self.coef, self.target, self.step, self.minimum, self.maximum = initial, target, step, minimum, maximum
        self.last_entropy = math.inf

    @property
    def applied(self) -> float:
        """The coefficient the loss uses now (0 while the last entropy is above the target)."""
        return self.coef if self.last_entropy <= self.target else 0.0

    def update(self, entropy: float) -> float:
        """Record one optimizer step's mean entropy and move the coefficient; returns the new coefficient."""
        if entropy <= self.target:
            self.coef = min(self.coef + self.step, self.maximum)
        else:
            self.coef = max(self.coef - self.step, self.minimum)
        self.last_entropy = entropy
        return self.coef

    def state_dict(self) -> dict[str, float]:
        return {"entropy_coef": self.coef, "last_world_entropy": self.last_entropy}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coef, self.last_entropy = float(state["entropy_coef"]), float(state["last_world_entropy"])
