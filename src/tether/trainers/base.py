"""What every tether trainer shares, on top of `transformers.Trainer`.

- model and tokenizer from a name, a path or an object; pad token handling; PEFT wrapping
- TRL's old keyword arguments mapped onto the config, with a deprecation warning
- token-count loss normalisation that does not depend on how a batch is split over accumulation
  steps or processes (the loss is a sum over tokens divided by the global token count)
- metrics accumulated between logging steps and averaged over processes
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, Trainer, TrainingArguments

from ..models.loading import apply_peft, ensure_pad_token, load_language_model, load_tokenizer, model_name


def apply_legacy_kwargs(args: TrainingArguments, legacy: dict[str, Any], renames: dict[str, str],
                        trainer_name: str) -> TrainingArguments:
    """Move TRL-era trainer keywords (e.g. `max_seq_length=512`) onto the config, warning once each.

    `renames` maps an old keyword to its config field; config fields given as keywords map to themselves.
    """
    fields = {f.name for f in dataclasses.fields(args)}
    updates = {}
    for key, value in legacy.items():
        target = renames.get(key, key)
        if target not in fields:
            raise TypeError(f"{trainer_name}() got an unexpected keyword argument {key!r}.")
        warnings.warn(
            f"Passing `{key}` to {trainer_name}() is deprecated; set `{target}` on {type(args).__name__} instead.",
            FutureWarning,
            stacklevel=3,
        )
        updates[target] = value
    if not updates:
        return args
    # TrainingArguments.__post_init__ rewrites some fields, so rebuild from the user-given init values.
    init_values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
    init_values.update(updates)
    return type(args)(**init_values)


def as_config(config_class: type[TrainingArguments], args: TrainingArguments | None, model: Any,
              suffix: str) -> Any:
    """`args` as `config_class`: kept if it is one, converted from plain TrainingArguments, or the
    defaults with an output dir named after the model (`<name>-<suffix>`, as TRL does)."""
    if isinstance(args, config_class):
        return args
    if args is None:
        name = model_name(model).rstrip("/").split("/")[-1] or "model"
        return config_class(output_dir=f"{name}-{suffix}")
    return config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init})


class TetherTrainer(Trainer):
    """Base of the tether trainers: subclasses prepare datasets and define `compute_loss`."""

    # Losses are means over the micro-batch unless a trainer normalises by the global token count itself
    # (SFT): Trainer must then divide by the accumulation steps. Left to Trainer, it would not, because our
    # batches carry a loss_mask, and it would assume normalisation by a token count.
    loss_is_scaled_for_ga = False

    @staticmethod
    def load_model(name_or_path: str, init_kwargs: dict[str, Any]) -> nn.Module:
        """How this method loads a model given by name or path (a language model by default)."""
        return load_language_model(name_or_path, **init_kwargs)

    def __init__(
        self,
        model: nn.Module | str,
        args: TrainingArguments,
        processing_class: PreTrainedTokenizerBase | None = None,
        peft_config: Any = None,
        **trainer_kwargs: Any,
    ) -> None:
        if isinstance(model, str):
            model = self.load_model(model, getattr(args, "model_init_kwargs", None) or {})
        elif getattr(args, "model_init_kwargs", None):
            warnings.warn("model_init_kwargs is used only when `model` is a name or path; it was ignored.",
                          UserWarning, stacklevel=2)
        if processing_class is None:
            processing_class = load_tokenizer(model_name(model))
        ensure_pad_token(processing_class, model)
        if peft_config is not None:
            model = apply_peft(model, peft_config, args.activation_checkpointing or False)
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        super().__init__(model=model, args=args, processing_class=processing_class, **trainer_kwargs)

    # ----- loss normalisation -----------------------------------------------------------------------
    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Target tokens in this optimizer step, over all accumulation steps and processes."""
        if not batch_samples or "loss_mask" not in batch_samples[0]:
            return super()._get_num_items_in_batch(batch_samples, device)
        count = sum(int(b["loss_mask"][:, 1:].sum()) for b in batch_samples)
        count = torch.tensor(count, device=device)
        if self.args.world_size > 1:
            count = self.accelerator.reduce(count, reduction="sum")
        return count

    def _token_normalizer(self, inputs: dict[str, torch.Tensor], num_items_in_batch: Any) -> torch.Tensor:
        """Divide a per-process token sum by this to get the global per-token mean once DDP averages
        gradients over processes: global count / world size."""
        if num_items_in_batch is None:
            return inputs["loss_mask"][:, 1:].sum().clamp(min=1).float()
        return torch.as_tensor(num_items_in_batch, dtype=torch.float32).clamp(min=1) / self.args.world_size

    # ----- metrics ----------------------------------------------------------------------------------
    @property
    def _mode(self) -> str:
        return "train" if self.model.training else "eval"

    def record_metrics(self, **values: torch.Tensor | float) -> None:
        """Store scalar metrics for the next log, averaged over processes and steps. A NaN value means
        "nothing to measure here" (e.g. no rejected example in the batch) and is left out of averages."""
        names = list(values)
        stacked = torch.tensor([float(values[n]) for n in names], device=self.accelerator.device)
        if self.args.world_size > 1:
            stacked = self.accelerator.gather(stacked[None]).nanmean(0)  # [world, k] -> [k]
        for name, value in zip(names, stacked.tolist()):
            self._metrics[self._mode][name].append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = self._mode
        prefix = "eval_" if mode == "eval" else ""
        for name, values in self._metrics[mode].items():
            measured = [v for v in values if v == v]
            if measured:
                logs[prefix + name] = sum(measured) / len(measured)
        self._metrics[mode].clear()
        super().log(logs, start_time)

    def _set_signature_columns_if_needed(self) -> None:
        # With remove_unused_columns=True (a plain TrainingArguments) Trainer keeps only the columns
        # model.forward takes; our prepared datasets hold exactly what the collator reads, so keep them all.
        if self._signature_columns is None:
            self._signature_columns = list(self.train_dataset.column_names)

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[torch.Tensor, None, None]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
