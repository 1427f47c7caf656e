"""The metrics an online round logs (GRPO, RLOO): rewards per function, completion lengths, advantages, and
how far an external sampler's log-probs are from the trainer's. Pure functions of the round's tensors.

Shapes: n = completions in the round, k = completions per prompt, c = completion tokens.
"""

from __future__ import annotations

from typing import Any

import torch


def round_metrics(rewards: torch.Tensor, per_function: dict[str, torch.Tensor], sampled: Any,
                  advantages: torch.Tensor, sequence_kl: torch.Tensor | None, k: int, world_size: int
                  ) -> dict[str, torch.Tensor | float]:
    """rewards [n] (weighted sum), per_function {name: [n]} (NaN where a function did not score), sampled
    (completion_mask [n, c], truncated [n]), advantages [n], sequence_kl [n] or None -> TRL's metric names.
    Groups are rows [g * k, (g + 1) * k); num_tokens counts all processes (each holds as many)."""
    lengths = sampled.completion_mask.sum(-1).float()  # [n]
    ended = ~sampled.truncated
    grouped_std = rewards.view(-1, k).std(-1) if k > 1 else None  # [n / k]
    metrics = {
        "reward": rewards.mean(),
        "reward_std": grouped_std.mean() if k > 1 else torch.tensor(0.0),
        "frac_reward_zero_std": (grouped_std < 1e-6).float().mean() if k > 1 else 1.0,
        "completions/mean_length": lengths.mean(), "completions/min_length": lengths.min(),
        "completions/max_length": lengths.max(), "completions/clipped_ratio": sampled.truncated.float().mean(),
        "completions/mean_terminated_length": lengths[ended].mean() if ended.any() else float("nan"),
        "advantages/abs_mean": advantages.abs().mean(),
        "num_tokens": float(sampled.completion_mask.sum()) * world_size,
    }
    for name, values in per_function.items():  # over the completions the function scored (not None)
        scored = values[~torch.isnan(values)]
        metrics[f"rewards/{name}/mean"] = scored.mean() if len(scored) else torch.tensor(float("nan"))
        metrics[f"rewards/{name}/std"] = scored.std() if len(scored) > 1 else torch.tensor(0.0)
    if sequence_kl is not None:
        metrics["kl"] = sequence_kl.mean()
    return metrics


def sampler_mismatch_metrics(sampled: Any, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """How far the external sampler's log-probs (sampled.sampler_logps [n, c], NaN where missing) are from the
    trainer's (sampled.logps [n, c]) over the completion tokens, and the importance weights [n, c] or [n, 1]
    that result: min / mean / max."""
    mask = sampled.completion_mask
    gap = (sampled.logps.cpu() - sampled.sampler_logps).abs()[mask & ~torch.isnan(sampled.sampler_logps)]
    flat = weights.flatten() if weights.shape[-1] == 1 else weights[mask]
    nan = torch.tensor(float("nan"))
    return {
        "sampling/sampling_logp_difference/mean": gap.mean() if gap.numel() else nan,
        "sampling/sampling_logp_difference/max": gap.max() if gap.numel() else nan,
        "sampling/importance_sampling_ratio/min": flat.min() if flat.numel() else nan,
        "sampling/importance_sampling_ratio/mean": flat.mean() if flat.numel() else nan,
        "sampling/importance_sampling_ratio/max": flat.max() if flat.numel() else nan,
    }
