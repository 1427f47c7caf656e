"""Reward modeling: a scalar score per sequence, trained so that chosen beats rejected."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.chat_format import TokenizerOptionFields, apply_tokenizer_options
from ..data.preference import PreferenceCollator, prepare_preference
from ..losses.reward import bradley_terry_loss
from ..models.loading import load_reward_model
from ..models.scoring import batch_sequence_scores
from .base import TetherConfig, TetherTrainer


@dataclass
class RewardConfig(TetherConfig, TokenizerOptionFields):
    """Configuration of `RewardTrainer`; every `TrainingArguments` field applies too."""

    center_rewards_coefficient: float | None = field(
        default=None, metadata={"help": "Weight of the mean squared reward added to the loss, pulling rewards "
                                        "toward zero (e.g. 0.01)."})
    disable_dropout: bool = field(default=True, metadata={"help": "Turn dropout off in the model."})
    padding_free: bool | None = field(default=None, metadata={
        "help": "Pack each batch's sequences into rows of max_length (position_ids, no padding) instead of "
                "padding them; None: on for transformers' own decoder models."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Initial AdamW learning rate."})

    def __post_init__(self) -> None:
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise ValueError("center_rewards_coefficient must be >= 0.")
        super().__post_init__()


class RewardTrainer(TetherTrainer):
    """Trains a sequence-classification model with one label on preference pairs (Bradley-Terry).

    `RewardTrainer(model=model, tokenizer=tok, train_dataset=ds).train()` is enough; the dataset has
    `prompt`/`chosen`/`rejected` (or `chosen`/`rejected` with an implicit prompt) and optionally `margin`.
    """

    config_class = RewardConfig
    config_suffix = "Reward"
    dataset_description = "preference pairs"

    @staticmethod
    def load_model(name_or_path: str, init_kwargs: dict[str, Any]) -> nn.Module:
        return load_reward_model(name_or_path, **init_kwargs)

    def _load(self, model: nn.Module | str, args: Any) -> nn.Module:
        model = super()._load(model, args)
        if getattr(model.config, "num_labels", 1) != 1:
            raise ValueError(
                f"The reward model has num_labels={model.config.num_labels}; a reward model outputs one score. "
                "Fix: load it with AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)."
            )
        return model

    def _adapt_peft_config(self, peft_config: Any) -> Any:
        """A LoRA config for a reward model must also train the freshly initialised score head."""
        if getattr(peft_config, "task_type", None) == "SEQ_CLS":
            return peft_config
        warnings.warn("peft_config.task_type is not 'SEQ_CLS'; setting it so the score head is trained too.",
                      UserWarning, stacklevel=4)
        peft_config = copy.deepcopy(peft_config)
        peft_config.task_type = "SEQ_CLS"
        return peft_config

    def _set_up_model(self, model: nn.Module, processing_class: Any, args: RewardConfig) -> nn.Module:
        model, _ = apply_tokenizer_options(model, processing_class, eos_token=args.eos_token,
                                           pad_token=args.pad_token, chat_template_path=args.chat_template_path)
        return super()._set_up_model(model, processing_class, args)

    def _default_collator(self) -> Callable:
        return PreferenceCollator(self.processing_class.pad_token_id, pack_to=self._packing_length(),
                                  pad_to_multiple_of=self.args.pad_to_multiple_of)

    def _prepare(self, dataset: Any, what: str) -> Any:
        return prepare_preference(dataset, self.processing_class, max_length=self.args.max_length,
                                  num_proc=self.args.dataset_num_proc, what=what)

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor:
        scores = batch_sequence_scores(model, inputs)  # [2b]
        chosen, rejected = scores.chunk(2)  # [b] each: the collator puts chosen first
        out = bradley_terry_loss(chosen, rejected, inputs.get("margin"), self.args.center_rewards_coefficient)
        self.record_metrics(accuracy=out.accuracy, margin=out.margin, mean_reward=out.mean_reward,
                            min_reward=out.min_reward, max_reward=out.max_reward)
        return (out.loss, {"rewards_chosen": chosen, "rewards_rejected": rejected}) if return_outputs else out.loss

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(loss, predictions, labels) as TRL's reward trainer gives them: predictions [b, 2] are the softmax over
        (chosen reward, rejected reward) of each pair, labels zeros [b] (column 0 is the preferred one), for
        `compute_accuracy` and `preprocess_logits_for_metrics`."""
        if prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, rewards = self.compute_loss(model, inputs, return_outputs=True)
        pairs = torch.stack([rewards["rewards_chosen"], rewards["rewards_rejected"]], dim=1).float()  # [b, 2]
        return loss.detach(), pairs.softmax(dim=1), torch.zeros(len(pairs), dtype=torch.long, device=pairs.device)


def compute_accuracy(eval_pred: Any) -> dict[str, float]:
    """Pairwise accuracy for `Trainer(compute_metrics=...)`, as TRL's reward trainer reports it.

    eval_pred: an `EvalPrediction` (or a (predictions, labels) pair) whose predictions are [n, 2] rewards
    (chosen, rejected) per pair and whose labels are [n] indices of the preferred column (0: chosen).
    Returns {"accuracy": share of pairs whose argmax column equals the label}. A tie counts for column 0
    (numpy's argmax), so a warning says how many pairs tied.
    """
    predictions, labels = (eval_pred.predictions, eval_pred.label_ids) if hasattr(eval_pred, "label_ids") \
        else eval_pred
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.ndim != 2 or predictions.shape[1] != 2:
        raise ValueError(f"compute_accuracy: predictions must be [n, 2] (chosen, rejected rewards), got shape "
                         f"{predictions.shape}.")
    ties = int((predictions[:, 0] == predictions[:, 1]).sum())
    if ties:
        warnings.warn(f"compute_accuracy: {ties} of {len(predictions)} pairs have equal rewards for both "
                      "completions; they count as choosing the first column, so the accuracy may mislead.",
                      UserWarning, stacklevel=2)
    return {"accuracy": float((predictions.argmax(axis=1) == labels).mean())}
