"""Pairwise reward-model loss (Bradley-Terry), as in InstructGPT (Ouyang et al., 2022, eq. 1).

Shapes: b = preference pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class RewardLossOutput:
    loss: torch.Tensor  # scalar, differentiable
    accuracy: torch.Tensor  # detached diagnostics from here on
    margin: torch.Tensor
    mean_reward: torch.Tensor
    min_reward: torch.Tensor
    max_reward: torch.Tensor


def bradley_terry_loss(
    rewards_chosen: torch.Tensor,
    rewards_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> RewardLossOutput:
    """mean_b[-log sigmoid(r_chosen - r_rejected - margin)] + c * mean_b[(r_chosen + r_rejected)^2].

    rewards_chosen, rewards_rejected, margin: [b]. The margin asks the chosen reward to exceed the
    rejected one by at least that much (Llama 2, Touvron et al., 2023, eq. 2). The centering term
    (c = center_rewards_coefficient) keeps rewards near zero, since the pairwise loss only fixes
    differences (Eisenstein et al., 2023).
    """
    difference = rewards_chosen - rewards_rejected
    if margin is not None:
        difference = difference - margin
    loss = -F.logsigmoid(difference).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((rewards_chosen + rewards_rejected) ** 2).mean()
    with torch.no_grad():
        both = torch.cat([rewards_chosen, rewards_rejected]).float()
        return RewardLossOutput(
            loss=loss,
            accuracy=(rewards_chosen > rewards_rejected).float().mean(),
            margin=(rewards_chosen - rewards_rejected).float().mean(),
            mean_reward=both.mean(),
            min_reward=both.min(),
            max_reward=both.max(),
        )
