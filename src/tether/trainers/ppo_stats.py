"""The statistics a PPO step reports, under TRL's classic keys (`objective/*`, `ppo/*`, `tokens/*`).

Each is computed from its definition on the step's tensors. Shapes: b = batch, t = tokens; `mask` [b, t]
is True at response tokens. Scalars are reduced over processes by `reduce_stats`; distributions
(`*_dist`, advantages, ratios, per-token log-probs) stay per process as arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from ..ops.stats import masked_mean, masked_var


def step_stats(*, queries: list[torch.Tensor], responses: list[torch.Tensor], scores: torch.Tensor,
               mask: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
               non_score_reward: torch.Tensor, kl: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor,
               old_values: torch.Tensor, epoch_stats: dict[str, list[Any]], kl_coef: float, learning_rate: float,
               vf_coef: float, epochs_run: float) -> dict[str, Any]:
    """One step's stats. scores [b]; mask, log-probs, rewards, kl, advantages, returns, values [b, t];
    epoch_stats: per mini-batch values collected during the update (losses, clip fractions, ratios, ...)."""
    def mean(values: list[float]) -> float:
        return float(np.mean(values)) if values else float("nan")

    def length_std(lengths: torch.Tensor) -> torch.Tensor:
        return lengths.std() if len(lengths) > 1 else torch.tensor(0.0)

    unbiased = int(mask.sum()) > 1
    returns_var = masked_var(returns, mask, unbiased)
    query_lengths = torch.tensor([len(q) for q in queries], dtype=torch.float32)
    response_lengths = torch.tensor([len(r) for r in responses], dtype=torch.float32)
    return {
        "objective/kl": kl.sum(1).mean(),
        "objective/kl_dist": kl.sum(1),
        "objective/logprobs": old_logprobs,
        "objective/ref_logprobs": ref_logprobs,
        "objective/kl_coef": kl_coef,
        "objective/entropy": (-old_logprobs * mask).sum(1).mean(),
        "ppo/mean_non_score_reward": masked_mean(non_score_reward, mask),  # per response token
        "ppo/mean_scores": scores.mean(),
        "ppo/std_scores": scores.std() if len(scores) > 1 else torch.tensor(0.0),
        "ppo/loss/policy": mean(epoch_stats["policy_loss"]),
        "ppo/loss/value": mean(epoch_stats["value_loss"]),
        "ppo/loss/total": mean(epoch_stats["policy_loss"]) + vf_coef * mean(epoch_stats["value_loss"]),
        "ppo/policy/entropy": mean(epoch_stats["entropy"]),
        "ppo/policy/approxkl": mean(epoch_stats["approxkl"]),
        "ppo/policy/policykl": mean(epoch_stats["policykl"]),
        "ppo/policy/clipfrac": mean(epoch_stats["clipfrac"]),
        "ppo/policy/advantages": advantages[mask],
        "ppo/policy/advantages_mean": masked_mean(advantages, mask),
        "ppo/policy/ratio": torch.cat(epoch_stats["ratio"]),
        "ppo/returns/mean": masked_mean(returns, mask),
        "ppo/returns/var": returns_var,
        "ppo/val/vpred": mean(epoch_stats["vpred"]),
        "ppo/val/error": mean(epoch_stats["value_error"]),
        "ppo/val/clipfrac": mean(epoch_stats["vf_clipfrac"]),
        "ppo/val/mean": masked_mean(old_values, mask),
        "ppo/val/var": masked_var(old_values, mask, unbiased),
        # Share of the returns' variance the rollout values explain: 1 - Var(R - V) / Var(R).
        "ppo/val/var_explained": 1 - masked_var(returns - old_values, mask, unbiased) / returns_var.clamp(min=1e-8),
        "ppo/learning_rate": learning_rate,
        "ppo/epochs_run": epochs_run,
        "tokens/queries_len_mean": query_lengths.mean(),
        "tokens/queries_len_std": length_std(query_lengths),
        "tokens/queries_dist": query_lengths,
        "tokens/responses_len_mean": response_lengths.mean(),
        "tokens/responses_len_std": length_std(response_lengths),
        "tokens/responses_dist": response_lengths,
    }


def reduce_stats(stats: dict[str, Any], accelerator: Accelerator) -> dict[str, Any]:
    """0-d tensors -> floats averaged over processes; other tensors -> float32 numpy arrays (this process)."""
    out = {}
    for key, value in stats.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().float()
            if value.dim() == 0:
                value = accelerator.reduce(value.to(accelerator.device), reduction="mean")
            value = value.cpu().numpy() if value.dim() else float(value)
        out[key] = value
    return out
