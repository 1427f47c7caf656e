"""RLOOTrainer: REINFORCE with a leave-one-out baseline (Ahmadian et al., 2024, "Back to Basics"). The
loop is the shared online core (trainers/online.py); this file is the method: the KL to the reference
subtracted from each completion's reward, leave-one-out advantages, and a clipped sequence-level ratio.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..losses.advantages import leave_one_out_advantages
from ..losses.group import GroupPolicyLossOutput, sequence_level_policy_loss
from .episodes import EnvironmentFields
from .online import OnlineTrainer, PolicyLossExtras
from .online_config import OnlineConfig


@dataclass
class RLOOConfig(OnlineConfig, EnvironmentFields):
    """Configuration of `RLOOTrainer` (TRL's names and defaults, except max_completion_length=256)."""

    num_generations: int = field(default=2, metadata={"help": "Completions sampled per prompt (k in RLOO)."})
    beta: float = field(default=0.05, metadata={"help": "KL coefficient: reward - beta * KL(policy || reference)."})
    normalize_advantages: bool = field(default=False, metadata={
        "help": "Whiten the advantages over the round (mean 0, std 1)."})
    reward_clip_range: tuple[float, float] | None = field(default=None, metadata={
        "help": "Clip rewards to [low, high] before the KL penalty."})


class RLOOTrainer(OnlineTrainer):
    """`RLOOTrainer(model, reward_funcs, args=RLOOConfig(...), train_dataset=prompts, ...)`, as in TRL."""

    config_class = RLOOConfig
    config_suffix = "RLOO"
    kl_in_reward = True

    def compute_advantages(self, rewards: torch.Tensor, sequence_kl: torch.Tensor | None,
                           group_size: int | None = None, per_function: torch.Tensor | None = None
                           ) -> torch.Tensor:
        args = self.args
        k = group_size or args.num_generations
        if args.reward_clip_range is not None:
            rewards = rewards.clamp(*args.reward_clip_range)
        if sequence_kl is not None:
            rewards = rewards - args.beta * sequence_kl  # the KL-regularised reward (RLOO paper, sec. 3)
        if k < 2:  # evaluation with num_generations_eval=1: no other sample to leave out
            return torch.zeros_like(rewards)
        advantages = leave_one_out_advantages(rewards, k)
        if args.normalize_advantages:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        return advantages

    def policy_loss(self, logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, ref_logps: torch.Tensor | None, num_tokens: float, num_sequences: float,
                    extras: PolicyLossExtras | None = None) -> GroupPolicyLossOutput:
        args = self.args
        return sequence_level_policy_loss(logps, old_logps, advantages, mask, args.epsilon, args.epsilon_high,
                                          num_sequences=num_sequences)
