"""Policy losses of the group-baseline methods: GRPO (and Dr. GRPO, DAPO) and RLOO.

Shapes: n = completions, t = completion tokens. logps, old_logps, ref_logps, mask: [n, t]; advantages:
[n], one per completion (the outcome reward's advantage applies to every token of its completion).
Advantages come from `losses.advantages`; the KL estimators from `losses.kl`; the reduction over tokens
from `losses.ppo.aggregate_loss` (so a split batch gets the whole batch's normaliser, see there).

Clip diagnostics (as TRL reports them): a token (or, for RLOO, a sequence) counts as
    low-clipped  when ratio < 1 - eps_low  and A < 0,
    high-clipped when ratio > 1 + eps_high and A > 0,
i.e. where the clip removed its gradient; "region" is either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.stats import masked_mean, masked_sum
from .kl import kl_penalty
from .ppo import Normaliser, clip_shares, clipped_surrogate, ppo_policy_loss


@dataclass
class GroupPolicyLossOutput:
    loss: torch.Tensor  # scalar, differentiable
    clip_ratio_low: torch.Tensor  # detached from here on; shares over this call's tokens (RLOO: sequences)
    clip_ratio_high: torch.Tensor
    clip_ratio_region: torch.Tensor
    kl: torch.Tensor  # mean per-token k3 KL to the reference; nan when no reference was given


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
    the plain policy gradient A * grad log pi. beta > 0 needs ref_logps.
    """
    mask = mask.bool()
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps: the reference model's log-probs of the same tokens.")
        kl = kl_penalty(logps, torch.where(mask, ref_logps, logps.detach()), "k3")  # [n, t]
    # PPO's clipped token loss with one advantage per completion, plus the KL term (losses.ppo)
    out = ppo_policy_loss(logps, old_logps, advantages[:, None], mask, epsilon_low, epsilon_high, aggregation,
                          num_tokens, num_sequences, max_length, per_token_penalty=None if kl is None else beta * kl)
    with torch.no_grad():
        kl_mean = masked_mean(kl, mask) if kl is not None else torch.tensor(float("nan"))
        return GroupPolicyLossOutput(out.loss, out.clip_ratio_low, out.clip_ratio_high, out.clipfrac, kl=kl_mean)


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
