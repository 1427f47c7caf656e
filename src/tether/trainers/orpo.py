"""ORPO (Hong et al., 2024): supervised NLL on the chosen completion plus an odds-ratio preference
term; no reference model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..losses.preference import orpo_loss
from .preference import PairwiseConfig, PairwiseTrainer


@dataclass
class ORPOConfig(PairwiseConfig):
    """Configuration of `ORPOTrainer`; `beta` is the paper's lambda, the weight of the odds-ratio term."""

    learning_rate: float = field(default=1e-6, metadata={"help": "Initial AdamW learning rate."})


class ORPOTrainer(PairwiseTrainer):
    """loss = mean NLL per token of the chosen completion + mean_b(-beta * log sigma(log odds ratio))."""

    config_class = ORPOConfig
    config_suffix = "ORPO"

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor:
        logps = self.pair_log_probs(model, inputs)
        chosen_avg = logps["chosen"] / logps["chosen_tokens"]  # [b]
        rejected_avg = logps["rejected"] / logps["rejected_tokens"]
        out = orpo_loss(chosen_avg, rejected_avg, self.args.beta)
        nll = -logps["chosen"].sum() / logps["chosen_tokens"].sum()
        loss = nll + out.losses.mean()
        self.record_pair_metrics(out.chosen_rewards, out.rejected_rewards, logps, nll_loss=nll.detach(),
                                 log_odds_ratio=out.log_odds_ratio.mean(), log_odds_chosen=out.log_odds_chosen.mean())
        return (loss, None) if return_outputs else loss
