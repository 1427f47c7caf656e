"""What every tether trainer shares, on top of `transformers.Trainer`.

- model and tokenizer from a name, a path, an object or a `model_init` (called again at each train(), as
  transformers' Trainer does); pad token handling; PEFT wrapping
- TRL's old keyword arguments mapped onto the config, with a deprecation warning
- token-count loss normalisation that does not depend on how a batch is split over accumulation
  steps or processes (the loss is a sum over tokens divided by the global token count)
- metrics accumulated between logging steps and averaged over processes; sample generations a trainer
  writes during the run (`write_samples`) kept in samples.jsonl for the report
- checkpoints written atomically (a folder renamed once complete), so a killed run resumes from a whole one
- TRL's options common to every trainer: trust_remote_code and quantization_config for what is loaded by name,
  activation_offloading, router_aux_loss_coef (MoE load balancing) and TR-DPO's reference sync
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..data.collate import resolve_pad_to_multiple_of
from ..distributed import default_ddp_backend, destroy_process_group_at_exit
from ..models.dropout import disable_dropout
from ..models.forward import capture_router_aux_loss, configure_router_aux_loss, supports_packed_rows
from ..models.loading import (
    apply_peft,
    check_quantized_for_training,
    ensure_pad_token,
    from_pretrained_kwargs,
    load_language_model,
    load_tokenizer,
    model_name,
    parse_json_kwargs,
)
from ..reports.callback import WRITE_THEIR_OWN_SAMPLES, RunReportCallback
from ..reports.page import write_report
from ..reports.runfiles import SAMPLES_FILE, write_jsonl
from .checkpoints import atomic_directory, latest_checkpoint, reporting_write_failures, rotate_checkpoints
from .finite_guard import NonFiniteGuard, check_finite_weights
from .hub_tags import card_tags, tag_model, trainer_tags
from .ref_sync import ReferenceSyncCallback, check_sync_config, load_synced_reference, save_synced_reference
from .run_identity import check_fresh_output_dir, check_resume, describe_run, new_run_id, write_run_file


def _init_values(args: TrainingArguments) -> dict[str, Any]:
    """The constructor arguments that rebuild `args` (its __post_init__ rewrites some fields)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}


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
    return type(args)(**{**_init_values(args), **updates})


def as_config(config_class: type[TrainingArguments], args: TrainingArguments | None, model: Any,
              suffix: str) -> Any:
    """`args` as `config_class`: kept if it is one, converted from plain TrainingArguments, or the
    defaults with an output dir named after the model (`<name>-<suffix>`, as TRL does)."""
    if isinstance(args, config_class):
        return args
    if args is None:
        name = model_name(model).rstrip("/").split("/")[-1] or "model"
        return config_class(output_dir=f"{name}-{suffix}")
    return config_class(**_init_values(args))


def check_training_lengths(config: Any) -> None:
    """The TrainingArguments fields whose bad values would otherwise surface mid-run (a ZeroDivisionError, a
    run that trains nothing, torch naming its optimizer instead of the field): a ValueError naming the field."""
    name = type(config).__name__
    if config.gradient_accumulation_steps < 1:
        raise ValueError(f"{name}.gradient_accumulation_steps must be at least 1, got "
                         f"{config.gradient_accumulation_steps}.")
    if config.learning_rate < 0:
        raise ValueError(f"{name}.learning_rate must be >= 0, got {config.learning_rate}.")
    if config.max_steps <= 0 and config.num_train_epochs <= 0:
        raise ValueError(f"{name}: num_train_epochs={config.num_train_epochs} with no max_steps trains nothing. Fix: "
                         "set num_train_epochs > 0 or max_steps > 0.")
    for field_name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
        if getattr(config, field_name) < 1:
            raise ValueError(f"{name}.{field_name} must be at least 1, got {getattr(config, field_name)}.")


_warned_inapplicable: set[tuple[str, str]] = set()


def warn_inapplicable(config: Any) -> None:
    """Warn once per (config class, field) that a field of `config.inapplicable_fields` set to a non-default
    value has no effect here, saying why."""
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    for name, why in type(config).inapplicable_fields.items():
        key = (type(config).__name__, name)
        if getattr(config, name) != defaults.get(name) and key not in _warned_inapplicable:
            _warned_inapplicable.add(key)
            warnings.warn(f"{type(config).__name__}.{name}={getattr(config, name)!r} has no effect in tether: {why}",
                          UserWarning, stacklevel=4)


@dataclass
class TetherConfig(TrainingArguments):
    """Fields every tether method has, on top of `TrainingArguments`."""

    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Keyword arguments for from_pretrained when `model` is a name or path "
                                        "(e.g. dtype, attn_implementation, trust_remote_code), or a JSON object "
                                        "string of them (command line)."})
    max_length: int | None = field(default=1024, metadata={"help": "Truncate tokenized sequences to this "
                                                                     "many tokens."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    logging_steps: float = field(default=10, metadata={"help": "Log every this many steps."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: the collator needs "
                                                                           "the tokenized columns."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Allow models and tokenizers given by name or path to run Python code they ship (off: only "
                "architectures transformers knows load)."})
    pad_to_multiple_of: int | str | None = field(default="auto", metadata={
        "help": "Pad batch lengths up to a multiple of this many tokens; 'auto' and None: no extra padding "
                "(TRL's 'auto' pads only on AWS Neuron)."})
    activation_offloading: bool = field(default=False, metadata={
        "help": "Keep the activations saved for the backward pass in CPU memory instead of the accelerator's."})
    max_nonfinite_steps: int = field(default=3, metadata={
        "help": "Optimizer steps in a row whose loss or gradients are not finite that are skipped (weights "
                "unchanged, a warning each) before training stops with an error; 0: stop at the first."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "A fresh run into an output_dir that holds checkpoints of an earlier run deletes them first "
                "(otherwise it stops before training: resuming would pick the latest checkpoint, maybe the old run's)."})
    router_aux_loss_coef: float | None = field(default=None, metadata={
        "help": "Mixture-of-experts models: weight of the router load-balancing loss added to the loss (None: the "
                "model config's value; 0: off). An error for a model without a router."})

    # Fields accepted for TRL compatibility that change nothing on this stack: field -> why. Setting one to
    # anything but its default warns once per process (never a TypeError, never silently).
    inapplicable_fields: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        parse_json_kwargs(self)
        warn_inapplicable(self)
        multiple = resolve_pad_to_multiple_of(self.pad_to_multiple_of)  # a bad value fails here, named
        if multiple is not None:
            self.pad_to_multiple_of = multiple  # "8" from a command line becomes 8
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens, got {self.max_length}.")
        check_training_lengths(self)
        if self.max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps must be >= 0, got {self.max_nonfinite_steps}.")
        if self.ddp_backend is None:  # gloo for DeepSpeed on CPU-only machines (see distributed.py)
            self.ddp_backend = default_ddp_backend()
        super().__post_init__()


class _SampleKeeper(TrainerCallback):
    """Sample rows a trainer wrote to samples.jsonl during this run (`TetherTrainer.write_samples`), put back
    after RunReportCallback replaces that file with its end-of-training samples, and the report rebuilt."""

    def __init__(self, method: str) -> None:
        self.rewritten = method not in WRITE_THEIR_OWN_SAMPLES  # whether RunReportCallback replaces the file
        self.rows: list[dict[str, Any]] = []
        self.started = False  # the first write of this trainer starts a new file, as metrics.jsonl does

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = True  # the file now holds this run's samples: later writes append
        if self.rewritten and self.rows and state.is_world_process_zero:
            write_jsonl(os.path.join(args.output_dir, SAMPLES_FILE), self.rows, append=True)
            write_report(args.output_dir)


class TetherTrainer(Trainer):
    """Base of the tether trainers. The constructor has TRL's shape; a method sets its config class,
    and overrides `_prepare` (raw dataset -> tokenized rows), `_default_collator` and `compute_loss`."""

    config_class: type[TetherConfig] = TetherConfig
    config_suffix = "tether"  # default output dir: <model name>-<suffix>
    legacy_renames: dict[str, str] = {}  # old TRL keyword -> config field
    dataset_description = "a dataset"

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
        model: nn.Module | str | None = None,
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
        model_init: Callable[..., nn.Module] | None = None,
        preprocess_logits_for_metrics: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
        quantization_config: Any = None,
        **legacy_kwargs: Any,
    ) -> None:
        name = type(self).__name__
        self._check_model_init(name, model, model_init, optimizers)
        args = as_config(self.config_class, args, "model" if model is None else model, self.config_suffix)
        args = apply_legacy_kwargs(args, legacy_kwargs, self.legacy_renames, name)
        if train_dataset is None:
            raise ValueError(f"`train_dataset` is required: {name} trains on {self.dataset_description}.")
        set_seed(args.seed)  # before loading and wrapping: fresh heads and adapters start the same each run
        self.model_init, self._peft_config = model_init, peft_config
        self._quantization_config = quantization_config
        model = self._load(Trainer.call_model_init(self) if model is None else model, args)
        processing_class = processing_class or tokenizer or load_tokenizer(
            model_name(model), trust_remote_code=from_pretrained_kwargs(args, args.model_init_kwargs)["trust_remote_code"])
        model = self._set_up_model(model, processing_class, args)
        if getattr(args, "sync_ref_model", False):
            check_sync_config(args, model)
        gives_predictions = type(self).prediction_step is not TetherTrainer.prediction_step
        if (compute_metrics or preprocess_logits_for_metrics) and not gives_predictions:
            warnings.warn(f"{name}'s evaluation gives a loss and logged metrics but no predictions, so "
                          "compute_metrics and preprocess_logits_for_metrics will not be called.", UserWarning,
                          stacklevel=2)
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._custom_collator = data_collator is not None  # _prepare may add columns such a collator reads
        super().__init__(model=model, args=args, processing_class=processing_class, compute_metrics=compute_metrics,
                         callbacks=callbacks, optimizers=optimizers, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, data_collator=data_collator,
                         preprocess_logits_for_metrics=preprocess_logits_for_metrics)
        destroy_process_group_at_exit(self.accelerator)
        if self.optimizer is not None:  # the user's own optimizer gets the non-finite check too
            self.nonfinite_guard.attach(self.optimizer)
        # Trainer (transformers 5) takes a model or a model_init, not both; with model_init, its train() builds a
        # fresh model at each call (hyperparameter search), which `call_model_init` prepares as this one.
        self.model_init = model_init
        # metrics.jsonl, and at the end the report (plots picked by method); report_to's loggers are untouched
        self.add_callback(RunReportCallback(method=self.config_suffix.lower()))
        # After the report callback, so that it can put back the samples that one rewrites at the end.
        self._sample_keeper = _SampleKeeper(method=self.config_suffix.lower())
        self.add_callback(self._sample_keeper)
        if getattr(args, "sync_ref_model", False):
            self.add_callback(ReferenceSyncCallback(self))
        if self.router_aux_loss_coef:  # the method's compute_loss, plus the router loss of its policy forwards
            self._method_compute_loss = self.compute_loss
            self.compute_loss = self._compute_loss_with_router_loss
        self.train_dataset = self._prepare(train_dataset, "train")
        # raw eval dataset id -> (raw, prepared): evaluate(eval_dataset=raw) prepares a raw set once (TRL does)
        self._prepared_eval: dict[int, tuple[Any, Any]] = {}
        self.eval_dataset = self._prepare_eval(eval_dataset)
        self.data_collator = (self._default_collator() if data_collator is None
                              else self._adapt_collator(data_collator))

    @staticmethod
    def _check_model_init(name: str, model: Any, model_init: Callable | None, optimizers: tuple) -> None:
        if model is None and model_init is None:
            raise ValueError(f"{name} needs `model` (a model, or a name or path to load) or `model_init` (a function "
                             "returning a fresh model).")
        if model is not None and model_init is not None:
            raise ValueError(f"{name} got both `model` and `model_init`; pass one. model_init builds the model, and "
                             "builds it afresh at each train() (as transformers' Trainer does): pass model=None to "
                             "use it, or drop it to train `model`.")
        if model_init is not None and any(o is not None for o in optimizers):
            raise ValueError(f"{name}: model_init builds a new model at each train(), which an optimizer made "
                             "beforehand would not update. Fix: drop `optimizers` (set the optimizer through the "
                             "config's optim fields), or pass the model itself instead of model_init.")

    def _set_up_model(self, model: nn.Module, processing_class: PreTrainedTokenizerBase, args: TetherConfig
                      ) -> nn.Module:
        """What every loaded model goes through: pad token, router aux loss (MoE), PEFT adapter, quantization
        check, dropout."""
        ensure_pad_token(processing_class, model)
        self.router_aux_loss_coef = configure_router_aux_loss(model, args.router_aux_loss_coef)
        if self._peft_config is not None:
            peft_config = self._adapt_peft_config(self._peft_config)
            model = apply_peft(model, peft_config, args.activation_checkpointing or False)
        check_quantized_for_training(model)
        if getattr(args, "disable_dropout", False):
            disable_dropout(model)
        tag_model(model, trainer_tags(type(self)))  # e.g. ["tether", "sft"]: push_to_hub puts them on the card
        return model

    def create_model_card(self, *args: Any, tags: str | list[str] | None = None, **kwargs: Any) -> None:
        """transformers' model card, with tether's and the method's tags besides the ones given."""
        return super().create_model_card(*args, tags=card_tags(self.model, trainer_tags(type(self)), tags), **kwargs)

    def call_model_init(self, trial: Any = None) -> nn.Module:
        """A fresh model from `model_init`, loaded and set up as the first one was. transformers' Trainer calls
        this at the start of each train() (and each hyperparameter-search trial) when model_init was given;
        args.seed is set just before, as it was before the first call."""
        model = self._load(super().call_model_init(trial), self.args)
        return self._set_up_model(model, self.processing_class, self.args)

    # What quantization_config= does when the model is already an object: "warn" (it is ignored; TRL's SFT,
    # Reward, GRPO and RLOO trainers) or "error" (TRL's DPO and KTO trainers).
    quantization_config_on_loaded_model = "warn"
    router_aux_loss_coef: float = 0.0  # set from the config and the model in _set_up_model

    @property
    def aux_loss_enabled(self) -> bool:
        """Whether the router load-balancing loss is added to the loss (MoE models; TRL's attribute name)."""
        return bool(self.router_aux_loss_coef)

    _quantization_config: Any = None  # the constructor's quantization_config= (IterativeSFTTrainer has none)

    def _load(self, model: nn.Module | str, args: TetherConfig) -> nn.Module:
        if isinstance(model, str):
            return self.load_model(model, from_pretrained_kwargs(args, args.model_init_kwargs, self._quantization_config))
        if args.model_init_kwargs:
            warnings.warn("model_init_kwargs is used only when `model` is a name or path; it was ignored.",
                          UserWarning, stacklevel=3)
        if self._quantization_config is not None:
            why = ("quantization_config applies when the trainer loads the model (given as a name or path); this "
                   "model is already loaded")
            if self.quantization_config_on_loaded_model == "error":
                raise ValueError(f"{why}. Fix: pass the model's name or path, or load it quantized yourself "
                                 "(from_pretrained(..., quantization_config=...)) and drop the keyword.")
            warnings.warn(f"{why}, so it was ignored.", UserWarning, stacklevel=3)
        return model

    def model_loading_kwargs(self, init_kwargs: dict[str, Any] | None) -> dict[str, Any]:
        """from_pretrained keywords for a model this trainer loads by name or path besides the policy (a
        reference, a reward model): `init_kwargs` with the config's trust_remote_code unless it sets its own."""
        return from_pretrained_kwargs(self.args, init_kwargs)

    def _adapt_peft_config(self, peft_config: Any) -> Any:
        """A method's chance to complete the user's PEFT config (e.g. the task type)."""
        return peft_config

    def _prepare(self, dataset: Any, what: str) -> Any:
        raise NotImplementedError

    def _prepare_eval(self, eval_dataset: Any) -> Any:
        """A raw eval dataset (or a dict of them) prepared as training data is, once per dataset object;
        prepared ones (and None) pass through."""
        if eval_dataset is None:
            return None
        if isinstance(eval_dataset, dict):
            return {k: self._prepare_eval_one(v, f"eval {k}") for k, v in eval_dataset.items()}
        return self._prepare_eval_one(eval_dataset, "eval")

    def _prepare_eval_one(self, dataset: Any, what: str) -> Any:
        if any(dataset is prepared for _, prepared in self._prepared_eval.values()):
            return dataset
        if id(dataset) not in self._prepared_eval:
            self._prepared_eval[id(dataset)] = (dataset, self._prepare(dataset, what))
        return self._prepared_eval[id(dataset)][1]

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """transformers' evaluate, on a raw `eval_dataset` too: it is prepared (tokenized, validated) as
        the training data is. A string names one of the eval datasets given at construction."""
        if eval_dataset is not None and not isinstance(eval_dataset, str):
            eval_dataset = self._prepare_eval(eval_dataset)
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def _packing_length(self) -> int | None:
        """Row length for packing each batch's sequences (padding_free), or None to pad them."""
        enabled = getattr(self.args, "padding_free", None)
        if enabled is None:
            enabled = supports_packed_rows(self.model)
        return (self.args.max_length or 0) if enabled else None

    def _default_collator(self) -> Callable:
        raise NotImplementedError

    def _adapt_collator(self, data_collator: Callable) -> Callable:
        """The user's data collator as this method's batches need it (a method may wrap it)."""
        return data_collator

    # ----- sample generations -----------------------------------------------------------------------
    def write_samples(self, rows: list[dict[str, Any]]) -> None:
        """Append sample generations ({"prompt", "completion", ...}) with the current step to the run's
        samples.jsonl (read by its report), from the main process; they stay there when the report callback
        rewrites that file at the end of training."""
        rows = [{"step": self.state.global_step, **row} for row in rows]
        self._sample_keeper.rows += rows
        if self.is_world_process_zero():
            path = os.path.join(self.args.output_dir, SAMPLES_FILE)
            write_jsonl(path, rows, append=self._sample_keeper.started)
        self._sample_keeper.started = True

    # ----- one training step: activation offloading, the MoE router loss -----------------------------
    @property
    def nonfinite_guard(self) -> NonFiniteGuard:
        if getattr(self, "_nonfinite_guard", None) is None:
            self._nonfinite_guard = NonFiniteGuard(getattr(self.args, "max_nonfinite_steps", 3),
                                                   lambda: self.state.global_step)
        return self._nonfinite_guard

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Trainer's optimizer, with the check that skips steps whose gradients are not finite."""
        optimizer = super().create_optimizer() if model is None else super().create_optimizer(model)
        self.nonfinite_guard.attach(optimizer)
        return optimizer

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        check_finite_weights(self.model, output_dir or self.args.output_dir)  # before anything is written
        if self._checkpoint_staging is not None:  # a checkpoint: atomic_directory reports a failure, with its name
            return super()._save(output_dir, state_dict)
        with reporting_write_failures(output_dir or self.args.output_dir, self.args.output_dir):
            super()._save(output_dir, state_dict)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
                      ) -> torch.Tensor:
        """Trainer's step (forward, loss, backward). With activation_offloading, the tensors autograd saves for
        the backward pass are kept in CPU memory (pinned on CUDA, so copies overlap compute) and brought back
        when the backward pass needs them: the same gradients, less accelerator memory, some transfer time."""
        if not self.args.activation_offloading:
            return super().training_step(model, inputs, num_items_in_batch)
        with torch.autograd.graph.save_on_cpu(pin_memory=self.accelerator.device.type == "cuda"):
            return super().training_step(model, inputs, num_items_in_batch)

    def _compute_loss_with_router_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                                       num_items_in_batch: Any = None) -> Any:
        """The method's loss plus router_aux_loss_coef * the load-balancing loss of the policy's forward(s) in
        it (their mean when a method runs several), for MoE models. The method's loss is a mean over the micro-
        batch, or, where the method normalises by the whole step itself (`loss_is_scaled_for_ga`), a share of
        the step's; in that case the router loss, a per-micro-batch mean, is divided by the accumulation steps
        so that it weighs the same either way (DDP averages it over processes like the rest)."""
        with capture_router_aux_loss(model) as found:
            result = self._method_compute_loss(model, inputs, return_outputs=return_outputs,
                                               num_items_in_batch=num_items_in_batch)
        if not found:  # no forward with grad (evaluation), or a model whose outputs carry no router loss
            return result
        loss, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, None)
        aux = torch.stack([a.to(loss.device, torch.float32) for a in found]).mean()
        steps = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        loss = loss + self.router_aux_loss_coef * aux / (steps if self.loss_is_scaled_for_ga else 1)
        self.record_metrics(aux_loss=aux.detach())
        return (loss, *rest) if rest is not None else loss

    # ----- loss normalisation -----------------------------------------------------------------------
    @staticmethod
    def _target_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """True at the tokens that are training targets: the decoder's labels for seq2seq batches, else
        loss-masked tokens after the first (nothing predicts a first token). None for other batches."""
        if "decoder_loss_mask" in batch:
            return batch["decoder_loss_mask"]
        return batch["loss_mask"][:, 1:] if "loss_mask" in batch else None

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Target tokens in this optimizer step, over all accumulation steps and processes."""
        if not batch_samples or self._target_mask(batch_samples[0]) is None:
            return super()._get_num_items_in_batch(batch_samples, device)
        count = torch.tensor(sum(int(self._target_mask(b).sum()) for b in batch_samples), device=device)
        if self.args.world_size > 1:
            count = self.accelerator.reduce(count, reduction="sum")
        return count

    def _token_normalizer(self, inputs: dict[str, torch.Tensor], num_items_in_batch: Any) -> torch.Tensor:
        """Divide a per-process token sum by this to get the global per-token mean once DDP averages
        gradients over processes: global count / world size."""
        if num_items_in_batch is None:
            return self._target_mask(inputs).sum().clamp(min=1).float()
        return torch.as_tensor(num_items_in_batch, dtype=torch.float32).clamp(min=1) / self.args.world_size

    # ----- metrics ----------------------------------------------------------------------------------
    @property
    def _mode(self) -> str:
        return "train" if self.model.training else "eval"

    def logs_this_step(self) -> bool:
        """Whether the metrics recorded now will be logged: always in evaluation (its log averages every batch),
        in training on the optimizer steps that log (logging_steps, logging_first_step, the last step). Metrics
        that cost real work per token (SFT's entropy and accuracy: passes over the vocabulary costing about a
        third of the LM head) are measured only then, so their logged value is that step's rather than the
        mean over the steps since the last log."""
        if self._mode != "train" or self.args.logging_strategy != "steps":
            return True
        state = self.state
        step = state.global_step + 1  # the optimizer step this forward pass belongs to
        return (step % max(1, int(state.logging_steps or 1)) == 0 or (step == 1 and self.args.logging_first_step)
                or step >= state.max_steps)

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
        if mode == "train" and self.nonfinite_guard.skipped:  # from the first skipped step on: how many so far
            logs["nonfinite/skipped_steps"] = self.nonfinite_guard.skipped
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

    # ----- checkpoints ------------------------------------------------------------------------------
    _checkpoint_staging: str | None = None  # set while Trainer writes a checkpoint (see _save_checkpoint)
    _run_id: str | None = None  # this run's id, recorded in its checkpoints (see run_identity.py)

    def run_description(self) -> dict[str, dict[str, Any]]:
        """What a checkpoint records of this run and a resumption must match (see run_identity.py)."""
        rows = len(self.train_dataset) if hasattr(self.train_dataset, "__len__") else None
        return describe_run(self.args, train_rows=rows, peft_config=self._peft_config)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None, **kwargs: Any) -> Any:
        """Trainer's train(), after checking that the output folder and checkpoint belong to this run: a fresh
        run refuses a folder holding an earlier run's checkpoints (unless overwrite_output_dir), and a resumed run
        refuses a checkpoint whose configuration differs in what changes the math."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = latest_checkpoint(self.args.output_dir)  # None: Trainer's own error follows
        if isinstance(checkpoint, str):
            self._run_id = check_resume(checkpoint, self.run_description())
        elif self._run_id is None:  # a second fresh train() of this trainer continues its own run
            check_fresh_output_dir(self.args.output_dir, self.args.overwrite_output_dir,
                                   main_process=self.args.should_save)
            self.accelerator.wait_for_everyone()
            self._run_id = new_run_id()
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def _get_output_dir(self, trial: Any) -> str:
        return self._checkpoint_staging or super()._get_output_dir(trial)

    def checkpoint_state(self) -> dict[str, Any]:
        """Trainer state that transformers' checkpoint does not hold, as {file name: object with state_dict()
        and load_state_dict()}: each state is written as JSON into every checkpoint and loaded back when
        training resumes from one (GRPO's adaptive entropy coefficient). None by default.

        A file of our own rather than transformers' stateful callbacks (`ExportableState`): those are
        restored only with restore_callback_states_from_checkpoint=True (off by default) and as new instances,
        and the file names can be TRL's, so a TRL checkpoint resumes with its state."""
        return {}

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)  # Trainer calls this once, on resume only
        if checkpoint is None:
            return
        for filename, owner in self.checkpoint_state().items():
            path = os.path.join(checkpoint, filename)
            if not os.path.isfile(path):
                warnings.warn(f"Resuming from {checkpoint}, which has no {filename}: that state starts afresh.",
                              UserWarning, stacklevel=2)
                continue
            with open(path, encoding="utf-8") as f:
                owner.load_state_dict(json.load(f))
        load_synced_reference(self, checkpoint)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Trainer's checkpoint, written atomically. transformers 5 writes straight into checkpoint-N, so a
        run killed mid-save left a half-written folder that resume_from_checkpoint=True then picked; here
        Trainer writes into checkpoint-N.partial (its output dir is redirected there while it saves) and
        the folder becomes checkpoint-N in one rename once every process has written its part."""
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        path = os.path.join(run_dir, name)
        with atomic_directory(path, writer=self.args.should_save, barrier=self.accelerator.wait_for_everyone,
                              subfolder=name) as partial:
            self._checkpoint_staging = partial
            try:
                super()._save_checkpoint(model, trial)  # -> partial/checkpoint-N
            finally:
                self._checkpoint_staging = None
            if self.args.should_save:
                write_run_file(os.path.join(partial, name), self._run_id or new_run_id(), self.run_description())
            save_synced_reference(self, os.path.join(partial, name))
            for filename, owner in self.checkpoint_state().items():
                if self.args.should_save:
                    with open(os.path.join(partial, name, filename), "w", encoding="utf-8") as f:
                        json.dump(owner.state_dict(), f)
            if self.state.best_model_checkpoint == os.path.join(partial, name):  # the best is this one
                self.state.best_model_checkpoint = path
                if self.args.should_save:
                    self.state.save_to_json(os.path.join(partial, name, TRAINER_STATE_NAME))
        # Trainer's own rotation ran inside the staging folder; rotate the real one, partial folders aside.
        if self.args.should_save:
            rotate_checkpoints(run_dir, self.args.save_total_limit, keep=(path, self.state.best_model_checkpoint))
