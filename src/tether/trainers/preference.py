"""What the pairwise preference trainers (DPO, CPO/SimPO, ORPO) share: the config fields, preference data
through data/, and one concatenated forward pass giving each completion's log-prob."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..data.preference import PreferenceCollator, prepare_preference
from ..models.forward import completion_log_probs
from ..ops.logprobs import DEFAULT_CHUNK_SIZE
from .base import TetherConfig, TetherTrainer


@dataclass
class PairwiseConfig(TetherConfig):
    """Fields common to the pairwise preference methods."""

    beta: float = field(default=0.1, metadata={"help": "Strength of the preference term (the method's beta)."})
    max_length: int | None = field(default=1024, metadata={"help": "Truncate prompt+completion to this many "
                                                                     "tokens."})
    max_prompt_length: int | None = field(default=512, metadata={"help": "Keep the last this many prompt "
                                                                           "tokens."})
    max_completion_length: int | None = field(default=None, metadata={
        "help": "Keep the first this many tokens of each completion (None: only max_length limits it)."})
    disable_dropout: bool = field(default=True, metadata={"help": "Turn dropout off in the model(s)."})
    padding_free: bool | None = field(default=None, metadata={
        "help": "Pack each batch's sequences into rows of max_length (position_ids, no padding) instead of "
                "padding them; None: on for transformers' own decoder models."})
    logprob_chunk_size: int = field(default=DEFAULT_CHUNK_SIZE, metadata={"help": "Tokens per chunk of the "
                                                                                    "vocabulary projection."})
    learning_rate: float = field(default=1e-6, metadata={"help": "Initial AdamW learning rate."})

    def __post_init__(self) -> None:
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise ValueError(f"max_completion_length must be at least 1 (or None), got {self.max_completion_length}.")
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}.")
        if self.max_length is not None and self.max_prompt_length is not None and (
                self.max_prompt_length >= self.max_length):
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be below max_length "
                             f"({self.max_length}) to leave room for the completion.")
        super().__post_init__()


class PairwiseTrainer(TetherTrainer):
    """Base of DPOTrainer, CPOTrainer and ORPOTrainer; subclasses define `compute_loss`."""

    config_class: type[PairwiseConfig] = PairwiseConfig
    config_suffix = "Pairwise"
    dataset_description = "a train_dataset of preference pairs (prompt/chosen/rejected)"

    def _default_collator(self) -> Callable:
        return PreferenceCollator(self.processing_class.pad_token_id, pack_to=self._packing_length())

    def _prepare(self, dataset: Any, what: str) -> Any:
        return prepare_preference(dataset, self.processing_class, max_length=self.args.max_length,
                                  max_prompt_length=self.args.max_prompt_length,
                                  max_completion_length=self.args.max_completion_length,
                                  num_proc=self.args.dataset_num_proc, what=what)

    def pair_log_probs(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Summed completion log-probs and token counts for chosen and rejected, [b] each, from one
        forward pass over the [2b, t] batch (chosen rows first)."""
        sums, counts, _ = completion_log_probs(model, inputs, chunk_size=self.args.logprob_chunk_size)
        chosen, rejected = sums.chunk(2)
        chosen_tokens, rejected_tokens = counts.chunk(2)
        return {"chosen": chosen, "rejected": rejected,
                "chosen_tokens": chosen_tokens.clamp(min=1), "rejected_tokens": rejected_tokens.clamp(min=1)}

    def record_pair_metrics(self, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                            logps: dict[str, torch.Tensor], **extra: torch.Tensor | float) -> None:
        self.record_metrics(**{
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": logps["chosen"].detach().mean(),
            "logps/rejected": logps["rejected"].detach().mean(),
        }, **extra)
