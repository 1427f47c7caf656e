"""What the pairwise preference trainers (DPO, CPO/SimPO, ORPO) share: the config fields, preference data
through data/, and one concatenated forward pass giving each completion's log-prob."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..data.collate import IGNORE_INDEX
from ..data.preference import PairBatch, PreferenceCollator, prepare_preference
from ..models.forward import completion_log_probs
from ..models.loading import is_encoder_decoder
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
            # As in TRL, not an error (e.g. DPOConfig(max_length=512) keeps the default max_prompt_length=512):
            # only prompts that long lose their completion, and data preparation drops those rows, saying how many.
            warnings.warn(f"max_prompt_length ({self.max_prompt_length}) >= max_length ({self.max_length}): a prompt "
                          "of max_prompt_length tokens leaves no room for its completion; such pairs are dropped "
                          "when the data is prepared. Lower max_prompt_length to keep them.", UserWarning,
                          stacklevel=3)
        super().__post_init__()


class PairwiseTrainer(TetherTrainer):
    """Base of DPOTrainer, CPOTrainer and ORPOTrainer; subclasses define `compute_loss`, and return the
    implicit rewards as {"chosen_rewards", "rejected_rewards"} ([b] each) when asked for outputs, which
    evaluation hands to compute_metrics (see `prediction_step`).

    The data options of TRL 0.7's DPOTrainer (`padding_value`, `truncation_mode`, `label_pad_token_id`,
    `is_encoder_decoder`) are DPOConfig fields; a config without them gets their defaults here.
    """

    config_class: type[PairwiseConfig] = PairwiseConfig
    config_suffix = "Pairwise"
    dataset_description = "a train_dataset of preference pairs (prompt/chosen/rejected)"
    _warned_no_predictions = False

    def _load(self, model: nn.Module | str, args: Any) -> nn.Module:
        model = super()._load(model, args)
        declared, actual = getattr(args, "is_encoder_decoder", None), is_encoder_decoder(model)
        if declared is not None and bool(declared) != actual:
            raise ValueError(f"is_encoder_decoder={declared} but the model ({type(model).__name__}) is "
                             f"{'an encoder-decoder' if actual else 'decoder-only'}. Fix: drop is_encoder_decoder "
                             "(it is read from the model) or pass the model it describes.")
        if actual:
            raise ValueError(f"{type(self).__name__} trains decoder-only (causal) language models; "
                             f"{type(model).__name__} is an encoder-decoder. Fix: use a causal LM.")
        return model

    @property
    def padding_value(self) -> int:
        """The id written in the padding of input batches: the config's `padding_value`, else the tokenizer's."""
        value = getattr(self.args, "padding_value", None)
        return self.processing_class.pad_token_id if value is None else value

    def _default_collator(self) -> Callable:
        return PreferenceCollator(self.padding_value, pack_to=self._packing_length())

    def _adapt_collator(self, data_collator: Callable) -> Callable:
        # A collator written for TRL's rows returns labels with label_pad_token_id where nothing counts.
        return PairBatch(data_collator, self.padding_value, getattr(self.args, "label_pad_token_id", IGNORE_INDEX))

    def _prepare(self, dataset: Any, what: str) -> Any:
        label_pad = getattr(self.args, "label_pad_token_id", IGNORE_INDEX) if self._custom_collator else None
        return prepare_preference(dataset, self.processing_class, max_length=self.args.max_length,
                                  max_prompt_length=self.args.max_prompt_length,
                                  max_completion_length=self.args.max_completion_length,
                                  truncation_mode=getattr(self.args, "truncation_mode", "keep_end"),
                                  label_pad_token_id=label_pad, num_proc=self.args.dataset_num_proc, what=what)

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(loss, predictions, labels): predictions are the implicit rewards [b, 2] (chosen, rejected) of each
        pair and labels zeros [b] (column 0 is the preferred one), so `compute_accuracy` and
        `preprocess_logits_for_metrics` work as for the reward trainer; (loss, None, None) when only the loss is
        wanted or the method returns no rewards."""
        if prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if not outputs or "rejected_rewards" not in outputs:
            if (self.compute_metrics or self.preprocess_logits_for_metrics) and not self._warned_no_predictions:
                warnings.warn(f"{type(self).__name__}'s evaluation gives no predictions, so compute_metrics and "
                              "preprocess_logits_for_metrics are not called.", UserWarning, stacklevel=2)
                self._warned_no_predictions = True
            return loss.detach(), None, None
        rewards = torch.stack([outputs["chosen_rewards"], outputs["rejected_rewards"]], dim=1).detach()  # [b, 2]
        return loss.detach(), rewards, torch.zeros(rewards.shape[0], dtype=torch.long, device=rewards.device)

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
