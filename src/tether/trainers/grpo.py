"""GRPOTrainer: Group Relative Policy Optimization (Shao et al., 2024, "DeepSeekMath", sec. 4), with the
Dr. GRPO (Liu et al., 2025) and DAPO (Yu et al., 2025) variants as options. The loop is the shared online
core (trainers/online.py); this file is the method: group-normalised advantages and a token-level
clipped loss with an optional k3 KL term, reduced as `loss_type` says.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..losses.advantages import group_relative_advantages
from ..losses.group import GroupPolicyLossOutput, token_level_policy_loss
from .online import OnlineConfig, OnlineTrainer

# loss_type -> (aggregate_loss mode, normaliser): how TRL's names reduce the per-token loss.
LOSS_TYPES = {
    "grpo": "sequence",  # the paper: mean over completions of each completion's token mean
    "dapo": "token",  # every token of the optimizer step weighs the same (global token count)
    "bnpo": "token",  # the same, normalised by the micro-batch's own token count
    "dr_grpo": "fixed",  # sum over tokens / (completions x max_completion_length)
}
SCALE_REWARDS = {"group": "group", "batch": "batch", "none": None, "True": "group", "False": None}


@dataclass
class GRPOConfig(OnlineConfig):
    """Configuration of `GRPOTrainer` (TRL's names and defaults, except max_completion_length=256)."""

    loss_type: str = field(default="dapo", metadata={"help": f"One of: {', '.join(LOSS_TYPES)}."})
    scale_rewards: str = field(default="group", metadata={
        "help": "Divide advantages by the reward std of the 'group' (GRPO), of the 'batch', or 'none' (Dr. GRPO)."})

    def __post_init__(self) -> None:
        self.scale_rewards = str(self.scale_rewards)
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {self.scale_rewards!r}.")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"Unknown loss_type {self.loss_type!r}; choose from {', '.join(LOSS_TYPES)}.")
        super().__post_init__()


class GRPOTrainer(OnlineTrainer):
    """`GRPOTrainer(model, reward_funcs, args=GRPOConfig(...), train_dataset=prompts, ...)`, as in TRL."""

    config_class = GRPOConfig
    config_suffix = "GRPO"

    def compute_advantages(self, rewards: torch.Tensor, sequence_kl: torch.Tensor | None) -> torch.Tensor:
        scale = SCALE_REWARDS[self.args.scale_rewards]
        return group_relative_advantages(rewards, self.args.num_generations, scale_by_std=scale is not None,
                                         std_over=scale or "group")

    def policy_loss(self, logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, ref_logps: torch.Tensor | None, num_tokens: float,
                    num_sequences: float) -> GroupPolicyLossOutput:
        args = self.args
        if args.loss_type == "bnpo":  # the micro-batch's own tokens; Trainer-style mean over accumulation
            num_tokens = float(mask.sum().clamp(min=1)) * args.gradient_accumulation_steps
        return token_level_policy_loss(
            logps, old_logps, advantages, mask, args.epsilon, args.epsilon_high, LOSS_TYPES[args.loss_type],
            args.beta, ref_logps, num_tokens=num_tokens, num_sequences=num_sequences,
            max_length=args.max_completion_length)
