"""CPO (Xu et al., 2024) and SimPO (Meng et al., 2024): reference-free preference losses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..losses.preference import cpo_loss, simpo_loss
from .preference import PairwiseConfig, PairwiseTrainer


@dataclass
class CPOConfig(PairwiseConfig):
    """Configuration of `CPOTrainer`."""

    loss_type: str = field(default="sigmoid", metadata={"help": "'sigmoid' (CPO) or 'simpo' (SimPO)."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Assumed share of flipped preference labels "
                                                                    "(conservative losses)."})
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO's target reward margin gamma."})
    cpo_alpha: float = field(default=1.0, metadata={"help": "Weight of the NLL term on chosen completions "
                                                              "(CPO's behaviour cloning term; 0 for pure SimPO)."})

    def __post_init__(self) -> None:
        if self.loss_type not in ("sigmoid", "simpo"):
            raise ValueError(f"CPOTrainer's loss_type is 'sigmoid' (CPO) or 'simpo', got {self.loss_type!r}.")
        super().__post_init__()


class CPOTrainer(PairwiseTrainer):
    """loss = preference term (CPO on summed log-probs, or SimPO on per-token averages) + cpo_alpha * NLL."""

    config_class = CPOConfig
    config_suffix = "CPO"

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor:
        args = self.args
        logps = self.pair_log_probs(model, inputs)
        if args.loss_type == "simpo":
            out = simpo_loss(logps["chosen"] / logps["chosen_tokens"], logps["rejected"] / logps["rejected_tokens"],
                             args.beta, args.simpo_gamma, args.label_smoothing)
        else:
            out = cpo_loss(logps["chosen"], logps["rejected"], args.beta, args.label_smoothing)
        nll = -logps["chosen"].sum() / logps["chosen_tokens"].sum()
        loss = out.losses.mean() + args.cpo_alpha * nll
        self.record_pair_metrics(out.chosen_rewards, out.rejected_rewards, logps, nll_loss=nll.detach())
        return (loss, None) if return_outputs else loss
