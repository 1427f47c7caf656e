"""Supervised fine-tuning: next-token cross-entropy on the tokens that count."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, Trainer, TrainingArguments

from ..data import LanguageModelingCollator, Seq2SeqCollator
from ..data.chat_format import TokenizerOptionFields, apply_tokenizer_options, peft_config_training_new_tokens
from ..data.collate import (
    IGNORE_INDEX,
    PACKING_STRATEGIES,
    DataCollatorForCompletionOnlyLM,
    LabelsToLossMask,
)
from ..data.constant_length import ConstantLengthDataset
from ..data.prepare import prepare_sft_dataset
from ..data.tokenize import TRUNCATION_MODES
from ..losses.lm import SFT_LOSSES
from ..models.forward import causal_lm_loss, causal_token_log_probs, seq2seq_token_log_probs
from ..models.loading import is_encoder_decoder, parse_json_kwargs
from ..ops.logprobs import DEFAULT_CHUNK_SIZE
from .base import TetherConfig, TetherTrainer

DATASET_KWARGS = ("add_special_tokens", "append_concat_token", "skip_prepare_dataset")


@dataclass
class SFTConfig(TetherConfig, TokenizerOptionFields):
    """Configuration of `SFTTrainer`; every `TrainingArguments` field applies too (NEFTune's
    `neftune_noise_alpha` among them: uniform noise on the input embeddings while training)."""

    dataset_text_field: str = field(default="text", metadata={"help": "Column holding the text of language "
                                                                        "modeling data."})
    max_length: int | None = field(default=1024, metadata={"help": "Truncate tokenized examples to this many "
                                                                     "tokens; the row length when packing."})
    truncation_mode: str = field(default="keep_start", metadata={
        "help": "Which end of an example longer than max_length to keep: keep_start or keep_end (not used when "
                "packing: packing_strategy decides)."})
    shuffle_dataset: bool = field(default=False, metadata={
        "help": "Shuffle the prepared dataset (with `seed`), and the examples before packing, so packed rows mix "
                "examples from across the dataset."})
    packing: bool = field(default=False, metadata={"help": "Pack examples into rows of max_length "
                                                             "(packing_strategy); packed sequences do not attend "
                                                             "to each other. A stream is packed by a "
                                                             "ConstantLengthDataset."})
    packing_strategy: str = field(default="bfd", metadata={
        "help": "bfd: best fit decreasing, examples whole, a long one cut to max_length; bfd_split: the same, a "
                "long one split into pieces; wrapped: everything concatenated and cut into rows of max_length, "
                "examples crossing rows."})
    eval_packing: bool | None = field(default=None, metadata={"help": "Pack the eval dataset (default: as "
                                                                        "`packing`)."})
    padding_free: bool = field(default=False, metadata={"help": "Put each batch in a single row with "
                                                                  "position_ids, no padding (best with flash "
                                                                  "attention)."})
    completion_only_loss: bool | None = field(default=None, metadata={"help": "On prompt-completion data, "
                                                                                "train on the completion only "
                                                                                "(default: yes)."})
    assistant_only_loss: bool = field(default=False, metadata={"help": "On conversations, train on assistant "
                                                                         "turns only."})
    num_of_sequences: int = field(default=1024, metadata={"help": "Packing a stream: rows of text buffered "
                                                                    "at a time (ConstantLengthDataset)."})
    chars_per_token: float = field(default=3.6, metadata={"help": "Packing a stream: characters per token, to "
                                                                    "size the buffer (ConstantLengthDataset)."})
    dataset_batch_size: int = field(default=1000, metadata={"help": "Examples per batch given to a batched "
                                                                      "formatting_func."})
    dataset_kwargs: dict[str, Any] | None = field(default=None, metadata={
        "help": "Dataset preparation options: add_special_tokens (default true), append_concat_token (packing a "
                "stream; default true), skip_prepare_dataset (pass the dataset to the collator as it is)."})
    loss_type: str = field(default="nll", metadata={
        "help": "nll: cross-entropy on the target tokens; dft: Dynamic Fine-Tuning, each token's cross-entropy "
                "weighted by the (detached) probability of the target token."})
    logprob_chunk_size: int = field(default=DEFAULT_CHUNK_SIZE, metadata={"help": "Tokens per chunk of the "
                                                                                    "vocabulary projection."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Initial AdamW learning rate."})

    def __post_init__(self) -> None:
        if self.packing and self.max_length is None:
            raise ValueError("packing=True needs max_length (the packed row length).")
        if self.logprob_chunk_size < 1:
            raise ValueError("logprob_chunk_size must be positive.")
        parse_json_kwargs(self, ("dataset_kwargs",))  # the CLI passes a dict as JSON
        unknown = set(self.dataset_kwargs or {}) - set(DATASET_KWARGS)
        if unknown:
            raise ValueError(f"dataset_kwargs has unknown key(s) {sorted(unknown)}; the options are "
                             f"{DATASET_KWARGS}.")
        if self.loss_type == "chunked_nll":  # TRL's deprecated alias: the same loss
            warnings.warn("loss_type='chunked_nll' is the same loss as 'nll' (which never builds the full logits "
                          "either); use 'nll'.", FutureWarning, stacklevel=3)
            self.loss_type = "nll"
        if self.loss_type not in SFT_LOSSES:
            raise ValueError(f"loss_type={self.loss_type!r}; use one of {sorted(SFT_LOSSES)}.")
        if self.packing_strategy == "bfd-requeue":  # TRL's former name
            warnings.warn("packing_strategy='bfd-requeue' is now called 'bfd_split'.", FutureWarning, stacklevel=3)
            self.packing_strategy = "bfd_split"
        if self.packing_strategy not in PACKING_STRATEGIES:
            raise ValueError(f"packing_strategy={self.packing_strategy!r}; use one of {PACKING_STRATEGIES}.")
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation_mode={self.truncation_mode!r}; use one of {TRUNCATION_MODES}.")
        super().__post_init__()


class SFTTrainer(TetherTrainer):
    """Supervised fine-tuning on language modeling, prompt-completion or conversational data.

    `SFTTrainer("path/or/id", train_dataset=ds)` is enough; see `SFTConfig` for the options. TRL 0.7's
    keywords (dataset_text_field, packing, max_seq_length, num_of_sequences, ...) set the config fields of
    the same name; None means "the config's value". `formatting_func` turns each example (or a batch) into
    text first; `model_init` builds the model when `model` is None (and again at each train()).

    train_dataset: a `datasets.Dataset` (tokenized here), a streaming `datasets.IterableDataset`
    (tokenized on the fly; needs max_steps), or a torch dataset of tokenized rows, e.g. a
    ConstantLengthDataset. A `data_collator` of Hugging Face's kind (DataCollatorForCompletionOnlyLM,
    DataCollatorForLanguageModeling) gets rows of input_ids and attention_mask and decides the labels.
    """

    config_class = SFTConfig
    config_suffix = "SFT"
    legacy_renames = {"max_seq_length": "max_length"}
    # The loss divides by the step's global token count itself (see `_token_normalizer`).
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: nn.Module | str | None = None,
        args: TrainingArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        model_init: Callable[[], nn.Module] | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        preprocess_logits_for_metrics: Callable | None = None,
        peft_config: Any = None,
        *,
        formatting_func: Callable | None = None,
        infinite: bool | None = None,
        **kwargs: Any,
    ) -> None:
        if infinite is not None:
            warnings.warn("`infinite` is deprecated (as in TRL): max_steps or num_train_epochs set the length of "
                          "training. It still makes a packed stream restart at its end.", FutureWarning, stacklevel=2)
        packing = kwargs.get("packing", getattr(args, "packing", False))
        if packing and isinstance(data_collator, DataCollatorForCompletionOnlyLM):
            raise ValueError("DataCollatorForCompletionOnlyLM cannot find completions in packed rows. Fix: set "
                             "packing=False, or drop the collator (prompt-completion data trains on completions).")
        self._formatting_func = formatting_func
        self._infinite = infinite
        self._num_tokens_seen = 0
        # A Hugging Face-style collator reads model rows (input_ids, attention_mask) and makes labels.
        self._hf_collator = data_collator is not None and not isinstance(
            data_collator, (LanguageModelingCollator, Seq2SeqCollator))
        kwargs = {k: v for k, v in kwargs.items() if v is not None}  # TRL's None = "the default"
        super().__init__(model, args, data_collator, train_dataset, eval_dataset, processing_class,
                         compute_metrics, callbacks, optimizers, peft_config, model_init=model_init,
                         preprocess_logits_for_metrics=preprocess_logits_for_metrics, **kwargs)
        if self._hf_collator:
            self.data_collator = LabelsToLossMask(data_collator, self.processing_class.pad_token_id, self._seq2seq)
        if isinstance(self.train_dataset, ConstantLengthDataset) and self.args.packing:
            self.train_dataset.infinite = self.args.max_steps > 0  # as TRL: iterate until max_steps

    @property
    def _seq2seq(self) -> bool:
        return is_encoder_decoder(self.model)

    def _prepare(self, dataset: Any, what: str) -> Any:
        args, options = self.args, self.args.dataset_kwargs or {}
        if options.get("skip_prepare_dataset", False):
            return dataset
        packing = args.packing if what == "train" or args.eval_packing is None else args.eval_packing
        # shuffle_dataset, as TRL: the examples are shuffled before packing (so rows mix the whole dataset) and the
        # prepared rows after it. Shuffling the raw rows orders the tokenized ones the same way.
        row_numbers = self._shuffle_order(dataset)  # errors about a row name the user's index of it
        dataset = self._shuffled(dataset)
        prepared = prepare_sft_dataset(
            dataset, self.processing_class, seq2seq=self._seq2seq, packing=packing,
            text_field=args.dataset_text_field, formatting_func=self._formatting_func, max_length=args.max_length,
            completion_only_loss=args.completion_only_loss, assistant_only_loss=args.assistant_only_loss,
            add_special_tokens=options.get("add_special_tokens", True),
            append_concat_token=options.get("append_concat_token", True), num_of_sequences=args.num_of_sequences,
            chars_per_token=args.chars_per_token,
            infinite=self._infinite if self._infinite is not None else what == "train" and args.max_steps > 0,
            model_rows=self._hf_collator, num_proc=args.dataset_num_proc, batch_size=args.dataset_batch_size,
            what=what, truncation_mode=args.truncation_mode, packing_strategy=args.packing_strategy,
            row_numbers=row_numbers,
        )
        return self._shuffled(prepared) if packing else prepared

    def _shuffle_order(self, dataset: Any) -> Any:
        """The original row index of each position of `_shuffled(dataset)` (datasets' shuffle(seed) selects the
        rows in numpy's default_rng(seed).permutation order), or None when it does not reorder a Dataset."""
        import datasets

        if not self.args.shuffle_dataset or not isinstance(dataset, datasets.Dataset):
            return None
        return np.random.default_rng(self.args.seed).permutation(len(dataset))

    def _shuffled(self, dataset: Any) -> Any:
        """`dataset` shuffled with the run's seed when shuffle_dataset is set (a stream through a buffer); torch
        datasets as they are."""
        if not self.args.shuffle_dataset or not hasattr(dataset, "shuffle"):
            return dataset
        return dataset.shuffle(seed=self.args.seed)

    def _set_up_model(self, model: nn.Module, processing_class: PreTrainedTokenizerBase, args: SFTConfig
                      ) -> nn.Module:
        model, added = apply_tokenizer_options(
            model, processing_class, eos_token=args.eos_token, pad_token=args.pad_token,
            chat_template_path=args.chat_template_path)
        if self._peft_config is not None:  # tokens added by chat_template_path: LoRA trains their rows and the head
            self._peft_config = peft_config_training_new_tokens(self._peft_config, model, added)
        return super()._set_up_model(model, processing_class, args)

    def _default_collator(self) -> Callable:
        pad_id = self.processing_class.pad_token_id
        if self._seq2seq:
            return Seq2SeqCollator(pad_id)
        attention = str(getattr(self.model.config, "_attn_implementation", ""))
        # Packed rows can always be one row per batch with flash attention's variable-length kernels;
        # with SDPA/eager one long row costs attention over all of it, so rows stay separate.
        flatten = self.args.padding_free or (self.args.packing and "flash" in attention)
        return LanguageModelingCollator(pad_id, flatten=flatten, pad_to_multiple_of=self.args.pad_to_multiple_of)

    def _set_signature_columns_if_needed(self) -> None:
        # With remove_unused_columns=True, keep what the model's forward takes (Trainer's rule: torch datasets
        # and streams have no column names), the loss mask, and the columns of a prepared train set.
        if self._signature_columns is None:
            Trainer._set_signature_columns_if_needed(self)
            columns = getattr(self.train_dataset, "column_names", None) or []
            self._signature_columns = list(dict.fromkeys([*self._signature_columns, "loss_mask", *columns]))

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor:
        normalizer = self._token_normalizer(inputs, num_items_in_batch)
        token_loss = SFT_LOSSES[self.args.loss_type]
        with_stats = self.logs_this_step()  # entropy and accuracy: measured on the steps that log them
        if self._seq2seq:
            token_logps = seq2seq_token_log_probs(model, inputs)
            loss, stats = token_loss(token_logps.logps, normalizer), token_logps.stats
            tokens = int(inputs["attention_mask"].sum() + inputs["decoder_attention_mask"].sum())
        else:
            chunk = self.args.logprob_chunk_size
            if self.args.loss_type == "nll":  # fused: the gradient is formed in the forward pass
                loss, stats = causal_lm_loss(model, inputs, normalizer, chunk, with_stats=with_stats)
            else:  # a weight that depends on the log-probs needs them first
                token_logps = causal_token_log_probs(model, inputs, chunk_size=chunk, with_stats=with_stats)
                loss, stats = token_loss(token_logps.logps, normalizer), token_logps.stats
            tokens = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else inputs["input_ids"].numel()
        if self.model.training:
            self._num_tokens_seen += tokens * self.args.world_size
        if stats is not None:
            self.record_metrics(
                entropy=stats.entropy.mean() if stats.entropy.numel() else 0.0,
                mean_token_accuracy=stats.correct.float().mean() if stats.correct.numel() else 0.0,
            )
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[torch.Tensor, Any, Any]:
        """The loss; with `compute_metrics`, also the logits [b, t, V] and Hugging Face-style labels [b, t]
        (the input ids, -100 where a token does not count) for it (and `preprocess_logits_for_metrics`)."""
        loss, _, _ = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        if prediction_loss_only or self.compute_metrics is None or self._seq2seq:
            return loss, None, None
        inputs = self._prepare_inputs(inputs)
        forward = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
        with torch.no_grad(), self.compute_loss_context_manager():
            logits = model(**forward, use_cache=False).logits
        mask = inputs["loss_mask"].bool().clone()
        mask[:, 0] = False
        return loss, logits, inputs["input_ids"].masked_fill(~mask, IGNORE_INDEX)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training:
            logs["num_tokens"] = float(self._num_tokens_seen)
        super().log(logs, start_time)
