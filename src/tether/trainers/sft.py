"""Supervised fine-tuning: next-token cross-entropy on the tokens that count."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..data import LanguageModelingCollator, Seq2SeqCollator, prepare_language_modeling, prepare_seq2seq
from ..models.forward import causal_lm_loss, seq2seq_token_log_probs
from ..models.loading import is_encoder_decoder
from ..ops.logprobs import DEFAULT_CHUNK_SIZE
from .base import TetherConfig, TetherTrainer


@dataclass
class SFTConfig(TetherConfig):
    """Configuration of `SFTTrainer`; every `TrainingArguments` field applies too."""

    dataset_text_field: str = field(default="text", metadata={"help": "Column holding the text of language "
                                                                        "modeling data."})
    max_length: int | None = field(default=1024, metadata={"help": "Truncate tokenized examples to this many "
                                                                     "tokens; the row length when packing."})
    packing: bool = field(default=False, metadata={"help": "Pack examples into rows of max_length (best fit "
                                                             "decreasing); packed sequences do not attend to "
                                                             "each other."})
    padding_free: bool = field(default=False, metadata={"help": "Put each batch in a single row with "
                                                                  "position_ids, no padding (best with flash "
                                                                  "attention)."})
    completion_only_loss: bool | None = field(default=None, metadata={"help": "On prompt-completion data, "
                                                                                "train on the completion only "
                                                                                "(default: yes)."})
    assistant_only_loss: bool = field(default=False, metadata={"help": "On conversations, train on assistant "
                                                                         "turns only."})
    logprob_chunk_size: int = field(default=DEFAULT_CHUNK_SIZE, metadata={"help": "Tokens per chunk of the "
                                                                                    "vocabulary projection."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Initial AdamW learning rate."})

    def __post_init__(self) -> None:
        if self.packing and self.max_length is None:
            raise ValueError("packing=True needs max_length (the packed row length).")
        if self.logprob_chunk_size < 1:
            raise ValueError("logprob_chunk_size must be positive.")
        super().__post_init__()


class SFTTrainer(TetherTrainer):
    """Supervised fine-tuning on language modeling, prompt-completion or conversational data.

    `SFTTrainer("path/or/id", train_dataset=ds)` is enough; see `SFTConfig` for the options.
    `formatting_func` turns each example (or a batch) into text first.
    """

    config_class = SFTConfig
    config_suffix = "SFT"
    legacy_renames = {"max_seq_length": "max_length"}
    # The loss divides by the step's global token count itself (see `_token_normalizer`).
    loss_is_scaled_for_ga = True

    def __init__(self, model: nn.Module | str, *args: Any, formatting_func: Callable | None = None,
                 **kwargs: Any) -> None:
        self._formatting_func = formatting_func
        self._num_tokens_seen = 0
        super().__init__(model, *args, **kwargs)

    @property
    def _seq2seq(self) -> bool:
        return is_encoder_decoder(self.model)

    def _prepare(self, dataset: Any, what: str) -> Any:
        args, tok = self.args, self.processing_class
        if self._seq2seq:
            return prepare_seq2seq(dataset, tok, max_length=args.max_length, num_proc=args.dataset_num_proc,
                                   what=what)
        return prepare_language_modeling(
            dataset, tok, text_field=args.dataset_text_field, formatting_func=self._formatting_func,
            max_length=args.max_length, packing=args.packing, completion_only_loss=args.completion_only_loss,
            assistant_only_loss=args.assistant_only_loss, num_proc=args.dataset_num_proc, what=what,
        )

    def _default_collator(self) -> Callable:
        pad_id = self.processing_class.pad_token_id
        if self._seq2seq:
            return Seq2SeqCollator(pad_id)
        attention = str(getattr(self.model.config, "_attn_implementation", ""))
        # Packed rows can always be one row per batch with flash attention's variable-length kernels;
        # with SDPA/eager one long row costs attention over all of it, so rows stay separate.
        flatten = self.args.padding_free or (self.args.packing and "flash" in attention)
        return LanguageModelingCollator(pad_id, flatten=flatten)

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor:
        normalizer = self._token_normalizer(inputs, num_items_in_batch)
        if self._seq2seq:
            token_logps = seq2seq_token_log_probs(model, inputs)
            loss, stats = -token_logps.logps.sum() / normalizer, token_logps.stats
            tokens = int(inputs["attention_mask"].sum() + inputs["decoder_attention_mask"].sum())
        else:
            loss, stats = causal_lm_loss(model, inputs, normalizer, self.args.logprob_chunk_size)
            tokens = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else inputs["input_ids"].numel()
        if self.model.training:
            self._num_tokens_seen += tokens * self.args.world_size
        self.record_metrics(
            entropy=stats.entropy.mean() if stats.entropy.numel() else 0.0,
            mean_token_accuracy=stats.correct.float().mean() if stats.correct.numel() else 0.0,
        )
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training:
            logs["num_tokens"] = float(self._num_tokens_seen)
        super().log(logs, start_time)
