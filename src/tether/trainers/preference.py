"""What the pairwise preference trainers (DPO, CPO/SimPO, ORPO) share: the config fields, preference data
through data/, and one concatenated forward pass giving each completion's log-prob."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, TrainingArguments

from ..data.preference import PreferenceCollator, prepare_preference
from ..models.forward import completion_log_probs
from ..models.loading import disable_dropout
from ..ops.logprobs import DEFAULT_CHUNK_SIZE
from .base import TetherTrainer, apply_legacy_kwargs, as_config


@dataclass
class PairwiseConfig(TrainingArguments):
    """Fields common to the pairwise preference methods."""

    model_init_kwargs: dict[str, Any] | None = field(
        default=None, metadata={"help": "Keyword arguments for from_pretrained when `model` is a name or path."})
    beta: float = field(default=0.1, metadata={"help": "Strength of the preference term (the method's beta)."})
    max_length: int | None = field(default=1024, metadata={"help": "Truncate prompt+completion to this many "
                                                                     "tokens."})
    max_prompt_length: int | None = field(default=512, metadata={"help": "Keep the last this many prompt "
                                                                           "tokens."})
    disable_dropout: bool = field(default=True, metadata={"help": "Turn dropout off in the model(s)."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    logprob_chunk_size: int = field(default=DEFAULT_CHUNK_SIZE, metadata={"help": "Tokens per chunk of the "
                                                                                    "vocabulary projection."})
    learning_rate: float = field(default=1e-6, metadata={"help": "Initial AdamW learning rate."})
    logging_steps: float = field(default=10, metadata={"help": "Log every this many steps."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: the collator needs the "
                                                                           "tokenized columns."})

    def __post_init__(self) -> None:
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
    legacy_renames: dict[str, str] = {}

    def __init__(
        self,
        model: nn.Module | str,
        args: TrainingArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        peft_config: Any = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        **legacy_kwargs: Any,
    ) -> None:
        name = type(self).__name__
        args = as_config(self.config_class, args, model, self.config_suffix)
        args = apply_legacy_kwargs(args, legacy_kwargs, self.legacy_renames, name)
        if train_dataset is None:
            raise ValueError(f"{name} needs a train_dataset of preference pairs (prompt/chosen/rejected).")
        super().__init__(model, args, processing_class or tokenizer, peft_config, compute_metrics=compute_metrics,
                         callbacks=callbacks, optimizers=optimizers, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, data_collator=data_collator)
        if args.disable_dropout:
            disable_dropout(self.model)
        self.train_dataset = self._prepare(train_dataset, "train")
        if eval_dataset is not None:
            self.eval_dataset = self._prepare(eval_dataset, "eval")
        if data_collator is None:
            self.data_collator = self._default_collator()

    def _default_collator(self) -> Callable:
        return PreferenceCollator(self.processing_class.pad_token_id)

    def _prepare(self, dataset: Any, what: str) -> Any:
        return prepare_preference(dataset, self.processing_class, max_length=self.args.max_length,
                                  max_prompt_length=self.args.max_prompt_length,
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
