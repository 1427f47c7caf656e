"""PPO's clipped policy and value losses (Schulman et al., 2017, "Proximal Policy Optimization
Algorithms", eqs. 7 and 9), and `aggregate_loss`, the one reduction from per-token losses to a scalar.

Shapes: b = sequences, t = tokens. `mask` [b, t] is True at the tokens that count (the response).

Splitting a batch. Every reduction here is a sum of per-token terms divided by a normaliser that
depends only on the whole batch (its token count, its sequence count, a fixed length). Give each shard
(a process, or a micro-batch of gradient accumulation) the normaliser of the WHOLE batch and the
shards' losses add up to the whole batch's loss, and so do their gradients:

    aggregate_loss(x, m, mode, num_tokens=N) == sum_s aggregate_loss(x[s], m[s], mode, num_tokens=N)

with N the global count (e.g. an all-reduced mask.sum()). Left at None, the normaliser is the shard's
own, which is right for one shard but weights shards unequally when their token counts differ (a
mean of means). Under DDP, which averages gradients over W processes, multiply the loss by W (or pass
N / W) to keep the sum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tether.ops.stats import masked_mean, masked_sum

Normaliser = float | int | torch.Tensor | None


# ----- the reduction ------------------------------------------------------------------------------------
def _token_mean(per_token: torch.Tensor, mask: torch.Tensor, num_tokens: Normaliser,
                num_sequences: Normaliser, max_length: int | None) -> torch.Tensor:
    if num_tokens is None:
        num_tokens = mask.sum().clamp(min=1)
    return masked_sum(per_token, mask) / num_tokens


def _sequence_mean(per_token: torch.Tensor, mask: torch.Tensor, num_tokens: Normaliser,
                   num_sequences: Normaliser, max_length: int | None) -> torch.Tensor:
    lengths = mask.sum(-1).clamp(min=1)  # [b]; an empty row contributes 0 but still counts as a sequence
    per_sequence = masked_sum(per_token, mask, dim=-1) / lengths  # [b]
    return per_sequence.sum() / (per_token.shape[0] if num_sequences is None else num_sequences)


def _fixed_length(per_token: torch.Tensor, mask: torch.Tensor, num_tokens: Normaliser,
                  num_sequences: Normaliser, max_length: int | None) -> torch.Tensor:
    if max_length is None:
        raise ValueError("aggregation 'fixed' needs max_length (e.g. the maximum completion length)")
    b = per_token.shape[0] if num_sequences is None else num_sequences
    return masked_sum(per_token, mask) / (b * max_length)


AGGREGATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "token": _token_mean,
    "sequence": _sequence_mean,
    "fixed": _fixed_length,
}


def aggregate_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token",
    num_tokens: Normaliser = None,
    num_sequences: Normaliser = None,
    max_length: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss [b, t] over the tokens where mask [b, t] is True to a scalar.

    - "token" (DAPO's token-level loss, Yu et al., 2025; TRL's loss_type="dapo"): sum_{i,j} m_ij l_ij / N,
      N = num_tokens (default: mask.sum() here). Every token weighs the same, long or short sequence.
    - "sequence" (GRPO, Shao et al., 2024, eq. 3; TRL's "grpo"): (1/B) sum_i (sum_j m_ij l_ij / |o_i|),
      B = num_sequences (default b), |o_i| the row's token count. Every sequence weighs the same.
    - "fixed" (Dr. GRPO, Liu et al., 2025; TRL's "dr_grpo"): sum_{i,j} m_ij l_ij / (B * max_length),
      B = num_sequences (default b), max_length a constant (e.g. max_completion_length), not the
      padded width, which changes between micro-batches.

    num_tokens / num_sequences: the WHOLE batch's counts when the batch is split (module docstring).
    Masked-out entries never reach the result, even if inf or nan.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"Unknown loss aggregation {mode!r}; choose from {sorted(AGGREGATIONS)}")
    return AGGREGATIONS[mode](per_token, mask.bool(), num_tokens, num_sequences, max_length)


# ----- the losses -----------------------------------------------------------------------------------------
@dataclass
class PolicyLossOutput:
    loss: torch.Tensor  # scalar, differentiable
    clipfrac: torch.Tensor  # detached from here on; masked means over this call's tokens
    approxkl: torch.Tensor  # 0.5 * mean (log pi - log pi_old)^2
    policykl: torch.Tensor  # mean (log pi_old - log pi)
    ratio_mean: torch.Tensor  # mean pi / pi_old
    clip_ratio_low: torch.Tensor  # share of tokens with ratio < 1 - eps_low and A < 0 (clipped from below)
    clip_ratio_high: torch.Tensor  # share with ratio > 1 + eps_high and A > 0; clipfrac is either of the two


@dataclass
class ValueLossOutput:
    loss: torch.Tensor  # scalar, differentiable
    clipfrac: torch.Tensor  # detached: fraction of tokens where the clipped error is the larger one
    value_error: torch.Tensor  # detached: mean (V - R)^2, unclipped


def _zero_outside(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Constant inputs at padding may hold anything; a nan there would turn the (masked, zero) upstream
    gradient of the loss into nan gradients for the model. Replace them with 0 first."""
    return torch.where(mask, x.detach(), torch.zeros((), dtype=x.dtype, device=x.device))


def clip_shares(ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float,
                weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high): shares of the counted entries clipped from below (ratio < 1 - eps_low, A < 0) and from
    above (ratio > 1 + eps_high, A > 0), where the clip removed the gradient; their sum is the clip fraction."""
    low = ((ratio < 1.0 - eps_low) & (advantages < 0)).float()
    high = ((ratio > 1.0 + eps_high) & (advantages > 0)).float()
    return masked_mean(low, weights), masked_mean(high, weights)


def clipped_surrogate(
    log_ratio: torch.Tensor, advantages: torch.Tensor, epsilon_low: float, epsilon_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate as a loss, elementwise (Schulman et al., 2017, eq. 7):

        r = exp(log_ratio),   l = max(-A * r, -A * clip(r, 1 - eps_low, 1 + eps_high))

    log_ratio = log pi - log pi_old, advantages: same shape (tokens [b, t], or sequences [n]). The max is
    the pessimistic bound: once r has moved past the clip edge in the direction A favours, l is flat.
    Returns (l, ratio, clipped): `clipped` (detached, bool) where the clipped term is strictly larger,
    i.e. where clipping removed the gradient.
    """
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    return torch.maximum(unclipped, clipped), ratio, (clipped > unclipped).detach()


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float = 0.2,
    cliprange_high: float | None = None,
    aggregation: str = "token",
    num_tokens: Normaliser = None,
    num_sequences: Normaliser = None,
    max_length: int | None = None,
    per_token_penalty: torch.Tensor | None = None,
) -> PolicyLossOutput:
    """Clipped surrogate (PPO, Schulman et al., 2017, eq. 7), as a loss to minimise:

        r_ij = exp(logprobs_ij - old_logprobs_ij)
        l_ij = max(-A_ij * r_ij, -A_ij * clip(r_ij, 1 - eps_low, 1 + eps_high)) + penalty_ij
        loss = aggregate_loss(l, mask, aggregation, ...)

    `per_token_penalty` [b, t] (differentiable, optional) is added to every token's term before the
    reduction: GRPO's beta * KL to the reference (`losses.group.token_level_policy_loss`).

    eps_low = cliprange; eps_high = cliprange_high, defaulting to cliprange (DAPO's "clip-higher",
    Yu et al., 2025, sets it larger, e.g. 0.28 with cliprange 0.2).

    logprobs (differentiable), old_logprobs [b, t]; advantages [b, t] or [b, 1] (one per sequence,
    broadcast), treated as constants; mask [b, t]. Aggregation arguments as in `aggregate_loss`.
    Diagnostics (as TRL's classic PPO stats) are masked means over this call's tokens: clipfrac counts
    tokens where clipping removed the gradient (see `clipped_surrogate`).
    """
    mask = mask.bool()
    if advantages.dim() != 2:
        raise ValueError(f"advantages must be [b, t] or [b, 1], got shape {tuple(advantages.shape)}")
    log_ratio = torch.where(mask, logprobs - old_logprobs.detach(), 0.0)  # [b, t]; ratio 1 at padding
    advantages = _zero_outside(advantages.expand_as(mask), mask)  # [b, t]
    eps_high = cliprange if cliprange_high is None else cliprange_high
    per_token, ratio, clipped = clipped_surrogate(log_ratio, advantages, cliprange, eps_high)  # [b, t] each
    if per_token_penalty is not None:
        per_token = per_token + per_token_penalty
    loss = aggregate_loss(per_token, mask, aggregation, num_tokens, num_sequences, max_length)
    with torch.no_grad():
        low, high = clip_shares(ratio, advantages, cliprange, eps_high, mask)
        return PolicyLossOutput(
            loss=loss,
            clipfrac=masked_mean(clipped.to(per_token.dtype), mask),
            approxkl=0.5 * masked_mean(log_ratio.square(), mask),
            policykl=masked_mean(-log_ratio, mask),
            ratio_mean=masked_mean(ratio, mask),
            clip_ratio_low=low,
            clip_ratio_high=high,
        )


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float | None = 0.2,
    aggregation: str = "token",
    num_tokens: Normaliser = None,
    num_sequences: Normaliser = None,
    max_length: int | None = None,
) -> ValueLossOutput:
    """Clipped value loss (PPO, Schulman et al., 2017, eq. 9's L^VF with the clipping of the OpenAI
    baselines implementation, as in TRL's classic PPO):

        V_clip = clip(V, V_old - eps, V_old + eps)
        l_ij   = 0.5 * max((V_ij - R_ij)^2, (V_clip_ij - R_ij)^2)
        loss   = aggregate_loss(l, mask, aggregation, ...)

    values (differentiable), old_values, returns: [b, t]; mask [b, t]. cliprange_value=None gives
    the plain 0.5 * (V - R)^2.
    """
    mask = mask.bool()
    old_values, returns = _zero_outside(old_values, mask), _zero_outside(returns, mask)
    unclipped = (values - returns).square()  # [b, t]
    if cliprange_value is None:
        clipped = unclipped
    else:
        v_clip = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
        clipped = (v_clip - returns).square()
    per_token = 0.5 * torch.maximum(unclipped, clipped)  # [b, t]
    loss = aggregate_loss(per_token, mask, aggregation, num_tokens, num_sequences, max_length)
    with torch.no_grad():
        return ValueLossOutput(
            loss=loss,
            clipfrac=masked_mean((clipped > unclipped).to(per_token.dtype), mask),
            value_error=masked_mean(unclipped, mask),
        )
