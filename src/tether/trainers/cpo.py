"""CPO (Xu et al., 2024) and SimPO (Meng et al., 2024): reference-free preference losses."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..losses.preference import alpha_log_transform, cpo_loss, dpo_loss, simpo_loss
from .preference import PairwiseConfig, PairwiseTrainer

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")


@dataclass
class CPOConfig(PairwiseConfig):
    """Configuration of `CPOTrainer`."""

    loss_type: str = field(default="sigmoid", metadata={
        "help": "'sigmoid' (CPO), 'hinge' (SLiC), 'ipo' (on per-token averages), 'simpo' (SimPO), or 'alphapo' "
                "(shorthand for 'simpo' with cpo_alpha=0; set alpha for AlphaPO's reward shape)."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Assumed share of flipped preference labels "
                                                                    "(conservative losses)."})
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO's target reward margin gamma."})
    cpo_alpha: float = field(default=1.0, metadata={"help": "Weight of the NLL term on chosen completions "
                                                              "(CPO's behaviour cloning term; 0 for pure SimPO)."})
    alpha: float = field(default=0.0, metadata={
        "help": "AlphaPO's reward shape for every loss type: each completion's log-prob x (summed, or averaged for "
                "ipo/simpo) becomes (1 - e^(-alpha x)) / alpha; 0: x itself."})

    def __post_init__(self) -> None:
        if self.loss_type not in CPO_LOSS_TYPES:
            raise ValueError(f"CPOTrainer's loss_type is one of {', '.join(CPO_LOSS_TYPES)}, got {self.loss_type!r}.")
        if self.loss_type == "alphapo":  # as TRL: AlphaPO is SimPO without the NLL term, with alpha's rewards
            self.loss_type, self.cpo_alpha = "simpo", 0.0
        if self.loss_type in ("hinge", "ipo") and self.label_smoothing != 0.0:
            # TRL 1.16 goes on without it, so a TRL script keeps running: warn, and train without smoothing.
            warnings.warn(f"loss_type={self.loss_type!r} has no label smoothing; label_smoothing="
                          f"{self.label_smoothing} is not used. Set it to 0.0 to silence this.", UserWarning,
                          stacklevel=3)
        super().__post_init__()


class CPOTrainer(PairwiseTrainer):
    """loss = preference term + cpo_alpha * NLL of the chosen completions. The preference term is CPO's (DPO
    without a reference, summed log-probs), the hinge or IPO loss without a reference (IPO on per-token
    averages), or SimPO (averages); with `alpha`, on AlphaPO's rewards of those log-probs."""

    config_class = CPOConfig
    config_suffix = "CPO"

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor:
        args = self.args
        logps = self.pair_log_probs(model, inputs)
        chosen, rejected = logps["chosen"], logps["rejected"]  # [b] sums
        if args.loss_type in ("ipo", "simpo"):
            chosen, rejected = chosen / logps["chosen_tokens"], rejected / logps["rejected_tokens"]
        # AlphaPO (Gupta et al., 2025): the loss sees (1 - p^-alpha) / alpha instead of log p
        chosen, rejected = alpha_log_transform(chosen, args.alpha), alpha_log_transform(rejected, args.alpha)
        if args.loss_type == "simpo":
            out = simpo_loss(chosen, rejected, args.beta, args.simpo_gamma, args.label_smoothing)
        elif args.loss_type == "sigmoid":
            out = cpo_loss(chosen, rejected, args.beta, args.label_smoothing)
        else:  # hinge, ipo: the DPO losses with a reference giving every completion probability 1
            zeros = torch.zeros_like(chosen)
            out = dpo_loss(args.loss_type, chosen, rejected, zeros, zeros, args.beta)  # label_smoothing unused
        nll = -logps["chosen"].sum() / logps["chosen_tokens"].sum()
        loss = out.losses.mean() + args.cpo_alpha * nll
        self.record_pair_metrics(out.chosen_rewards, out.rejected_rewards, logps, nll_loss=nll.detach())
        return (loss, None) if return_outputs else loss
