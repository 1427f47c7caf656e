"""Advantage estimators: GAE for PPO, group-relative (GRPO, Dr. GRPO) and leave-one-out (RLOO).

Shapes: b = batch, t = tokens, n = completions (prompts x group_size). Advantages are constants of the
policy-gradient step, so every estimator here runs under torch.no_grad() and returns detached tensors.

Groups: the n completions come in consecutive blocks of `group_size` completions of one prompt,
rewards[g * group_size : (g + 1) * group_size] for prompt g (the order the rollout produces them).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016, "High-Dimensional Continuous Control
    Using Generalized Advantage Estimation", sec. 3 and eq. 16; restated in PPO, Schulman et al., 2017,
    eqs. 11-12).

    rewards, values, mask: [b, t] -> (advantages [b, t], returns [b, t]), both 0 where mask is False.

    Each row's response is the ordered list of its mask-True positions s_0 < s_1 < ... < s_{m-1}; padding
    (left, right, or holes between, e.g. masked tool output) is skipped, so step k+1 follows step k
    whatever lies between them. With V(s_m) = 0 (nothing after the last response token):

        delta_k = r_k + gamma * V(s_{k+1}) - V(s_k)                                  (TD residual)
        A_k     = sum_{l=0}^{m-1-k} (gamma * lam)^l * delta_{k+l}                    (eq. 16)
                = delta_k + gamma * lam * A_{k+1}          (computed here, right to left)
        R_k     = A_k + V(s_k)                             (the value target, TD(lambda) return)

    lam = 1 gives R_k = sum_l gamma^l r_{k+l} (discounted reward-to-go); lam = 0 gives A_k = delta_k.
    The loop runs over t in reverse and is vectorised over the batch.
    """
    mask = mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    next_value = torch.zeros_like(values[:, 0])  # V of the next response token, [b]
    next_advantage = torch.zeros_like(values[:, 0])  # A of the next response token, [b]
    advantages = torch.zeros_like(values)
    for i in reversed(range(values.shape[1])):
        delta = rewards[:, i] + gamma * next_value - values[:, i]  # [b]
        advantage = delta + gamma * lam * next_advantage  # [b]
        counts = mask[:, i]  # [b]
        advantages[:, i] = torch.where(counts, advantage, zero)
        # A padding position leaves the carried state untouched, so it is skipped.
        next_value = torch.where(counts, values[:, i], next_value)
        next_advantage = torch.where(counts, advantage, next_advantage)
    returns = torch.where(mask, advantages + values, zero)
    return advantages, returns


def _grouped(rewards: torch.Tensor, group_size: int, min_size: int) -> torch.Tensor:
    """rewards [n] -> [n / group_size, group_size], checking the bookkeeping."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [n], got shape {tuple(rewards.shape)}")
    if group_size < min_size:
        raise ValueError(f"group_size must be at least {min_size} here, got {group_size}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of {group_size}")
    return rewards.view(-1, group_size)  # [g, k]


@torch.no_grad()
def group_relative_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale_by_std: bool = True,
    eps: float = 1e-4,
    std_over: str = "group",
) -> torch.Tensor:
    """Group-relative advantages, rewards [n] -> advantages [n].

    GRPO (Shao et al., 2024, "DeepSeekMath", sec. 4.1.2, outcome supervision):
        A_i = (r_i - mean_group(r)) / (std_group(r) + eps)
    with the unbiased (n - 1) group std and eps added to the std, as TRL's GRPOTrainer does, so a group
    whose rewards are all equal gets A = 0. scale_by_std=False drops the division (Dr. GRPO; Liu et al.,
    2025, "Understanding R1-Zero-Like Training"): A_i = r_i - mean_group(r).
    std_over="batch" divides by the unbiased std of all n rewards instead (TRL's scale_rewards="batch");
    the mean stays the group's.
    """
    if std_over not in ("group", "batch"):
        raise ValueError(f"std_over must be 'group' or 'batch', got {std_over!r}")
    grouped = _grouped(rewards, group_size, min_size=2 if scale_by_std else 1)  # [g, k]
    centered = grouped - grouped.mean(dim=1, keepdim=True)  # [g, k]
    if scale_by_std:
        std = grouped.std(dim=1, keepdim=True) if std_over == "group" else rewards.std()  # [g, 1] or []
        centered = centered / (std + eps)
    return centered.reshape(-1)  # [n]


@torch.no_grad()
def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out baseline (RLOO; Ahmadian et al., 2024, "Back to Basics";
    Kool et al., 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!"), rewards [n] -> advantages [n]:

        A_i = r_i - 1/(k-1) * sum_{j != i} r_j,   k = group_size,

    computed as r_i - (sum_group - r_i) / (k - 1). Each baseline is independent of its own sample, so
    the estimator stays unbiased; it equals k/(k-1) * (r_i - mean_group(r)).
    """
    grouped = _grouped(rewards, group_size, min_size=2)  # [g, k]
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)  # [g, k]
    return (grouped - others).reshape(-1)  # [n]


def _nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Unbiased (n - 1) std over the non-NaN entries along `dim` (all entries when None); NaN where fewer
    than two."""
    if dim is None:
        x, dim = x.reshape(-1), 0
    valid = ~torch.isnan(x)
    count = valid.sum(dim=dim, keepdim=True)
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    squares = torch.where(valid, (x - mean) ** 2, 0.0).sum(dim=dim, keepdim=True)
    std = torch.where(count > 1, squares / (count - 1).clamp(min=1), float("nan")).sqrt()
    return std if keepdim else std.squeeze(dim)


@torch.no_grad()
def normalize_then_sum_advantages(
    rewards_per_function: torch.Tensor,
    weights: torch.Tensor,
    group_size: int,
    eps: float = 1e-4,
) -> torch.Tensor:
    """GDPO-style multi-reward advantages (TRL's multi_objective_aggregation="normalize_then_sum"):
    rewards_per_function [n, f] (NaN where a function did not score a completion), weights [f] -> [n].

    Each reward function is normalised within its group first, so one with a large scale cannot drown
    the others (Liu et al., 2026, "GDPO: Group reward-Decoupled Normalization Policy Optimization"):

        z_if = (r_if - mean_group(r_f)) / (std_group(r_f) + eps)           per function f, group of i
        s_i  = sum_f w_f z_if                                              (NaN entries count 0)
        A_i  = (s_i - mean_batch(s)) / (std_batch(s) + eps)                over all n completions

    Stds are the unbiased ones over the entries that are not NaN. A completion no function scored gets A = 0;
    a group where a function's rewards have no spread (std 0) gets z = 0 for it.
    """
    if rewards_per_function.dim() != 2 or rewards_per_function.shape[1] != weights.shape[0]:
        raise ValueError(f"rewards_per_function must be [n, {weights.shape[0]}] (one column per reward function), "
                         f"got shape {tuple(rewards_per_function.shape)}")
    n, f = rewards_per_function.shape
    if group_size < 2 or n % group_size:
        raise ValueError(f"{n} completions do not split into groups of {group_size} (at least 2)")
    grouped = rewards_per_function.view(-1, group_size, f)  # [g, k, f]
    mean = torch.nanmean(grouped, dim=1, keepdim=True)  # [g, 1, f]
    std = _nanstd(grouped, dim=1, keepdim=True)  # [g, 1, f]
    z = ((grouped - mean) / (std + eps)).view(n, f)  # [n, f]; NaN where unscored (or std undefined)
    summed = (z * weights.to(z.dtype)[None, :]).nansum(dim=1)  # [n]
    unscored = torch.isnan(rewards_per_function).all(dim=1)  # [n]
    summed = summed.masked_fill(unscored, float("nan"))
    advantages = (summed - torch.nanmean(summed)) / (_nanstd(summed) + eps)
    return advantages.nan_to_num(nan=0.0)
