"""Reward modeling: a scalar score per sequence, trained so that chosen beats rejected."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, TrainingArguments

from ..data.preference import PreferenceCollator, prepare_preference
from ..losses.reward import bradley_terry_loss
from ..models.loading import disable_dropout, load_reward_model
from ..models.scoring import sequence_scores
from .base import TetherTrainer, apply_legacy_kwargs, as_config


@dataclass
class RewardConfig(TrainingArguments):
    """Configuration of `RewardTrainer`; every `TrainingArguments` field applies too."""

    model_init_kwargs: dict[str, Any] | None = field(
        default=None, metadata={"help": "Keyword arguments for from_pretrained when `model` is a name or path."})
    max_length: int | None = field(default=1024, metadata={"help": "Truncate each prompt+response to this "
                                                                     "many tokens."})
    center_rewards_coefficient: float | None = field(
        default=None, metadata={"help": "Weight of the mean squared reward added to the loss, pulling rewards "
                                        "toward zero (e.g. 0.01)."})
    disable_dropout: bool = field(default=True, metadata={"help": "Turn dropout off in the model."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Initial AdamW learning rate."})
    logging_steps: float = field(default=10, metadata={"help": "Log every this many steps."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: the collator needs the "
                                                                           "tokenized columns."})

    def __post_init__(self) -> None:
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens, got {self.max_length}.")
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise ValueError("center_rewards_coefficient must be >= 0.")
        super().__post_init__()


class RewardTrainer(TetherTrainer):
    """Trains a sequence-classification model with one label on preference pairs (Bradley-Terry).

    `RewardTrainer(model=model, tokenizer=tok, train_dataset=ds).train()` is enough; the dataset has
    `prompt`/`chosen`/`rejected` (or `chosen`/`rejected` with an implicit prompt) and optionally `margin`.
    """

    @staticmethod
    def load_model(name_or_path: str, init_kwargs: dict[str, Any]) -> nn.Module:
        return load_reward_model(name_or_path, **init_kwargs)

    def __init__(
        self,
        model: nn.Module | str,
        args: RewardConfig | TrainingArguments | None = None,
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
        args = apply_legacy_kwargs(as_config(RewardConfig, args, model, "Reward"), legacy_kwargs, {},
                                   "RewardTrainer")
        if train_dataset is None:
            raise ValueError("RewardTrainer needs a train_dataset of preference pairs.")
        if not isinstance(model, str) and getattr(model.config, "num_labels", 1) != 1:
            raise ValueError(
                f"The reward model has num_labels={model.config.num_labels}; a reward model outputs one score. "
                "Fix: load it with AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)."
            )
        super().__init__(model, args, processing_class or tokenizer, _sequence_classification(peft_config),
                         compute_metrics=compute_metrics, callbacks=callbacks, optimizers=optimizers,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, data_collator=data_collator)
        if args.disable_dropout:
            disable_dropout(self.model)
        self.train_dataset = self._prepare(train_dataset, "train")
        if eval_dataset is not None:
            self.eval_dataset = self._prepare(eval_dataset, "eval")
        if data_collator is None:
            self.data_collator = PreferenceCollator(self.processing_class.pad_token_id)

    def _prepare(self, dataset: Any, what: str) -> Any:
        return prepare_preference(dataset, self.processing_class, max_length=self.args.max_length,
                                  num_proc=self.args.dataset_num_proc, what=what)

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor:
        scores = sequence_scores(model, inputs["input_ids"], inputs["attention_mask"])  # [2b]
        chosen, rejected = scores.chunk(2)  # [b] each: the collator puts chosen first
        out = bradley_terry_loss(chosen, rejected, inputs.get("margin"), self.args.center_rewards_coefficient)
        self.record_metrics(accuracy=out.accuracy, margin=out.margin, mean_reward=out.mean_reward,
                            min_reward=out.min_reward, max_reward=out.max_reward)
        return (out.loss, {"rewards_chosen": chosen, "rewards_rejected": rejected}) if return_outputs else out.loss


def _sequence_classification(peft_config: Any) -> Any:
    """A LoRA config for a reward model must also train the freshly initialised score head."""
    if peft_config is None or getattr(peft_config, "task_type", None) == "SEQ_CLS":
        return peft_config
    warnings.warn("peft_config.task_type is not 'SEQ_CLS'; setting it so the score head is trained too.",
                  UserWarning, stacklevel=3)
    peft_config = copy.deepcopy(peft_config)
    peft_config.task_type = "SEQ_CLS"
    return peft_config
