"""Iterative SFT: the caller supplies the samples of each optimisation pass, and does what it likes
(generate, score, filter) in between (TRL's `IterativeSFTTrainer`).

Each `step(...)` call validates and tokenizes its samples, shuffles them, and runs one pass over them in
mini-batches of `per_device_train_batch_size`: one optimizer step per `gradient_accumulation_steps`
mini-batches, with SFT's loss (next-token cross-entropy summed over the target tokens of the optimizer
step and divided by their count), gradient clipping, the learning-rate schedule, and Trainer's logging
and evaluation every `logging_steps` / `eval_steps` optimizer steps.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, Trainer, TrainingArguments, get_scheduler, set_seed
from transformers.trainer_utils import IntervalStrategy

from ..data import LanguageModelingCollator, Seq2SeqCollator
from ..data.collate import IGNORE_INDEX, LabelsToLossMask, loss_mask_from_labels
from ..data.tokenize import tokenize_prompt, tokenize_prompt_completion, tokenize_text, with_eos
from ..data.validate import warn_if_no_eos
from ..distributed import empty_device_cache
from ..models.loading import ensure_pad_token, load_tokenizer, model_name
from .base import as_config
from .sft import SFTConfig, SFTTrainer

TRUNCATION_MODES = ("keep_end", "keep_start")


def _checked_list(name: str, values: Any, kind: type, length: int | None = None) -> list:
    """`values` as a non-empty list of `kind`, of `length` items when given; ValueError naming `name`."""
    what = "strings" if kind is str else "1-D tensors of token ids"
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"{name} must be a non-empty list of {what}, got {type(values).__name__}.")
    for i, value in enumerate(values):
        if not isinstance(value, kind) or (kind is torch.Tensor and value.dim() != 1):
            shape = f" of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else ""
            raise ValueError(f"{name}[{i}] is a {type(value).__name__}{shape}; {name} must be a list of {what}.")
    if length is not None and len(values) != length:
        raise ValueError(f"{name} has {len(values)} items but there are {length} samples; give one per sample.")
    return list(values)


class IterativeSFTTrainer(SFTTrainer):
    """Fine-tunes a causal or encoder-decoder LM on samples given to `step()` one call at a time.

    model: a model, or a name or path to load. args: TrainingArguments (an SFTConfig works too); the
    learning-rate schedule spans `max_steps` optimizer steps, and without max_steps (or a scheduler in
    `optimizers`) the learning rate stays constant after warmup. tokenizer: also accepted as the second
    positional argument, as TRL's docs call it. data_collator: tether's collators by default; a Hugging
    Face-style one (DataCollatorForLanguageModeling, DataCollatorForSeq2Seq) gets rows of input_ids,
    attention_mask (and labels for seq2seq) and makes the labels. max_length and truncation_mode
    ("keep_end": keep the last max_length tokens; "keep_start": the first) cut each sample's tokens
    (seq2seq targets keep their start). optimize_device_cache: empty the accelerator's memory cache after
    each step. eval_dataset is prepared as SFTTrainer prepares it; compute_metrics and
    preprocess_logits_for_metrics act in `evaluate()`.
    """

    config_suffix = "IterativeSFT"

    def __init__(
        self,
        model: nn.Module | str | None = None,
        args: TrainingArguments | PreTrainedTokenizerBase | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        optimizers: tuple = (None, None),
        data_collator: Callable | None = None,
        eval_dataset: Any = None,
        max_length: int | None = None,
        truncation_mode: str = "keep_end",
        preprocess_logits_for_metrics: Callable | None = None,
        compute_metrics: Callable | None = None,
        optimize_device_cache: bool = False,
        *,
        processing_class: PreTrainedTokenizerBase | None = None,
    ) -> None:
        if isinstance(args, PreTrainedTokenizerBase) and tokenizer is None:  # IterativeSFTTrainer(model, tokenizer)
            args, tokenizer = None, args
        if model is None:
            raise ValueError("IterativeSFTTrainer needs `model` (a model, or a name or path to load).")
        if truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}.")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens (or None: no truncation), got {max_length}.")
        args = as_config(SFTConfig, args, model, self.config_suffix)
        set_seed(args.seed)
        model = self._load(model, args)
        tokenizer = processing_class or tokenizer or load_tokenizer(model_name(model))
        ensure_pad_token(tokenizer, model)
        self.max_length, self.truncation_mode = max_length, truncation_mode
        self.optimize_device_cache = optimize_device_cache
        self._formatting_func, self._infinite, self._num_tokens_seen = None, None, 0
        self._hf_collator = data_collator is not None and not isinstance(
            data_collator, (LanguageModelingCollator, Seq2SeqCollator))
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        Trainer.__init__(self, model=model, args=args, data_collator=data_collator, processing_class=tokenizer,
                         eval_dataset=eval_dataset, compute_metrics=compute_metrics, optimizers=optimizers,
                         preprocess_logits_for_metrics=preprocess_logits_for_metrics)
        if isinstance(eval_dataset, dict):
            self.eval_dataset = {k: self._prepare(v, f"eval {k}") for k, v in eval_dataset.items()}
        elif eval_dataset is not None:
            self.eval_dataset = self._prepare(eval_dataset, "eval")
        if data_collator is None:
            self.data_collator = self._default_collator()
        elif self._hf_collator:
            self.data_collator = LabelsToLossMask(data_collator, tokenizer.pad_token_id, self._seq2seq)
        self._create_optimizer_and_schedule()
        self._loss_since_log, self._steps_since_log = 0.0, 0

    def _create_optimizer_and_schedule(self) -> None:
        args = self.args
        if self.optimizer is None:
            self.create_optimizer()
        if self.lr_scheduler is None:
            if args.max_steps > 0:
                self.create_scheduler(args.max_steps, self.optimizer)
            else:
                if args.lr_scheduler_type not in ("constant", "constant_with_warmup"):
                    warnings.warn(
                        f"lr_scheduler_type={args.lr_scheduler_type!r} needs the number of optimizer steps, and "
                        "max_steps is not set: the learning rate stays constant (after warmup). Fix: set max_steps.",
                        UserWarning, stacklevel=3)
                self.lr_scheduler = get_scheduler("constant_with_warmup", self.optimizer,
                                                  num_warmup_steps=int(args.warmup_steps))
        self.model_wrapped, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)

    # ----- samples ----------------------------------------------------------------------------------
    def _cut(self, values: list, mode: str | None = None) -> list:
        if self.max_length is None or len(values) <= self.max_length:
            return values
        keep_end = (mode or self.truncation_mode) == "keep_end"
        return values[-self.max_length:] if keep_end else values[: self.max_length]

    def _examples(self, input_ids: Sequence[torch.Tensor] | None, attention_mask: Sequence[torch.Tensor] | None,
                  labels: Sequence[torch.Tensor] | None, texts: Sequence[str] | None,
                  texts_labels: Sequence[str] | None) -> list[dict[str, list]]:
        """Validated samples as rows for the collator: causal {"input_ids", "loss_mask"}, seq2seq
        {"input_ids", "labels"}; with a Hugging Face-style collator, {"input_ids", "attention_mask"} (+ labels)."""
        if (input_ids is None) == (texts is None):
            raise ValueError("step() takes either input_ids (a list of 1-D token-id tensors, with optional "
                             "attention_mask and labels) or texts (a list of strings, with optional texts_labels); "
                             f"got {'both' if texts is not None else 'neither'}.")
        if texts is not None:
            if attention_mask is not None or labels is not None:
                raise ValueError("attention_mask and labels go with input_ids; with texts, pass target texts "
                                 "as texts_labels.")
            texts = _checked_list("texts", texts, str)
            if texts_labels is not None:
                texts_labels = _checked_list("texts_labels", texts_labels, str, len(texts))
            elif self._seq2seq:
                raise ValueError("An encoder-decoder model needs targets: pass texts_labels with texts.")
            warn_if_no_eos(self.processing_class, "the texts")  # once per call site (Python's warning filter)
            rows = [self._text_row(t, texts_labels[i] if texts_labels else None) for i, t in enumerate(texts)]
        else:
            if texts_labels is not None:
                raise ValueError("texts_labels go with texts; with input_ids, pass labels (token-id tensors).")
            input_ids = _checked_list("input_ids", input_ids, torch.Tensor)
            n = len(input_ids)
            masks = _checked_list("attention_mask", attention_mask, torch.Tensor, n) if attention_mask is not None \
                else [torch.ones_like(ids) for ids in input_ids]
            if labels is not None:
                labels = _checked_list("labels", labels, torch.Tensor, n)
            elif self._seq2seq:
                raise ValueError("An encoder-decoder model needs targets: pass labels with input_ids.")
            for i, (ids, mask) in enumerate(zip(input_ids, masks)):
                if mask.shape != ids.shape:
                    raise ValueError(f"attention_mask[{i}] has shape {tuple(mask.shape)} but input_ids[{i}] "
                                     f"{tuple(ids.shape)}; give one mask value per token.")
            rows = [self._ids_row(ids, mask, labels[i] if labels is not None else None)
                    for i, (ids, mask) in enumerate(zip(input_ids, masks))]
        if self._hf_collator:
            rows = [{**{k: v for k, v in r.items() if k != "loss_mask"}, "attention_mask": [1] * len(r["input_ids"])}
                    for r in rows]
        return rows

    def _text_row(self, text: str, target: str | None) -> dict[str, list]:
        tokenizer = self.processing_class
        if self._seq2seq:
            return {"input_ids": self._cut(tokenize_prompt(tokenizer, text)),
                    "labels": self._cut(with_eos(tokenizer, tokenizer(target)["input_ids"]), "keep_start")}
        if target is None:  # the text is the sample; every token after the first is a target
            row = tokenize_text(tokenizer, text)
        else:  # tether's reading of texts_labels for a causal LM: the completion of the text, the only target
            row = tokenize_prompt_completion(tokenizer, text, target)
            row.pop("prompt_length")
        return {key: self._cut(values) for key, values in row.items()}

    def _ids_row(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None) -> dict[str, list]:
        keep = mask.bool()  # positions with attention_mask 0 are padding: left out
        if self._seq2seq:
            targets = labels[labels != IGNORE_INDEX]  # -100 entries are padding of the targets
            return {"input_ids": self._cut(ids[keep].tolist()), "labels": self._cut(targets.tolist(), "keep_start")}
        if labels is None:
            counted = keep
        else:
            if labels.shape != ids.shape:
                raise ValueError(f"labels has a tensor of shape {tuple(labels.shape)} for input_ids of shape "
                                 f"{tuple(ids.shape)}; a causal LM's labels align with its input_ids.")
            counted = loss_mask_from_labels(ids[None], labels[None])[0]
        return {"input_ids": self._cut(ids[keep].tolist()), "loss_mask": self._cut(counted[keep].tolist())}

    # ----- the optimisation pass --------------------------------------------------------------------
    def step(
        self,
        input_ids: list[torch.Tensor] | None = None,
        attention_mask: list[torch.Tensor] | None = None,
        labels: list[torch.Tensor] | None = None,
        texts: list[str] | None = None,
        texts_labels: list[str] | None = None,
    ) -> dict[str, float]:
        """One pass over the given samples; returns {"loss": the pass's mean per-token loss}.

        input_ids: 1-D token-id tensors, one per sample; attention_mask: same shapes, 0 at padding;
        labels: for a causal LM, the input ids with -100 where a token is not a target (default: every
        token), for a seq2seq model the target ids. Or texts: strings; texts_labels: for a seq2seq model
        the target texts, for a causal LM a completion appended to each text and alone trained on.
        """
        examples = self._examples(input_ids, attention_mask, labels, texts, texts_labels)
        args, model = self.args, self.model_wrapped
        model.train()
        order = torch.randperm(len(examples)).tolist()
        size = args.per_device_train_batch_size
        batches = [[examples[i] for i in order[k:k + size]] for k in range(0, len(order), size)]
        step_losses = []
        try:
            for start in range(0, len(batches), args.gradient_accumulation_steps):
                group = [self._prepare_inputs(self.data_collator(b))
                         for b in batches[start:start + args.gradient_accumulation_steps]]
                step_losses.append(self._optimizer_step(model, group))
        finally:
            if self.optimize_device_cache:
                empty_device_cache()
        return {"loss": sum(step_losses) / len(step_losses)}

    def _optimizer_step(self, model: nn.Module, group: list[dict[str, torch.Tensor]]) -> float:
        """Accumulate gradients over the mini-batches of one optimizer step, then step."""
        args = self.args
        num_items = self._get_num_items_in_batch(group, self.args.device)  # the step's target tokens, all processes
        total = 0.0
        for i, batch in enumerate(group):
            # Gradients are synchronised across processes on the last mini-batch only.
            with nullcontext() if i == len(group) - 1 else self.accelerator.no_sync(model):
                with self.compute_loss_context_manager():
                    loss = self.compute_loss(model, batch, num_items_in_batch=num_items)
                self.accelerator.backward(loss)
            total += loss.item()
        grad_norm = None
        if args.max_grad_norm is not None and args.max_grad_norm > 0:
            grad_norm = float(self.accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm))
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        self.state.global_step += 1
        self._loss_since_log += total
        self._steps_since_log += 1
        self._maybe_log_and_evaluate(grad_norm)
        return total

    def _every(self, steps: float | None) -> int:
        """A logging/eval interval in optimizer steps (a value < 1 is a fraction of max_steps)."""
        if steps is None:
            return 0
        if steps >= 1:
            return int(steps)
        return max(1, math.ceil(self.args.max_steps * steps)) if self.args.max_steps > 0 else 1

    def _maybe_log_and_evaluate(self, grad_norm: float | None) -> None:
        args, step = self.args, self.state.global_step
        log_every = self._every(args.logging_steps)
        if args.logging_strategy == IntervalStrategy.STEPS and log_every and step % log_every == 0:
            logs = {"loss": round(self._loss_since_log / self._steps_since_log, 4),
                    "learning_rate": self._get_learning_rate()}
            if grad_norm is not None:
                logs["grad_norm"] = grad_norm
            self._loss_since_log, self._steps_since_log = 0.0, 0
            self.log(logs)
        eval_every = self._every(args.eval_steps if args.eval_steps is not None else args.logging_steps)
        if (args.eval_strategy == IntervalStrategy.STEPS and self.eval_dataset is not None and eval_every
                and step % eval_every == 0):
            self.evaluate()
            self.model_wrapped.train()
