"""Direct Preference Optimization and its family, against a frozen reference model (or none: reference_free)."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.collate import IGNORE_INDEX
from ..data.preference import check_truncation_mode
from ..distributed import prepare_frozen_model
from ..losses.preference import AVERAGED_LOG_PROBS, DPO_LOSSES, dpo_loss
from ..models.dropout import disable_dropout
from ..models.forward import completion_log_probs, unwrap_model
from ..models.loading import is_peft_model, load_language_model, model_init_kwargs
from ..models.reference import activate_trained_adapter, reference_context, select_reference
from ..reports.callback import generate_samples
from .preference import PairwiseConfig, PairwiseTrainer
from .ref_sync import ReferenceSyncFields

EVAL_SAMPLES = 4  # generate_during_eval: prompts completed at each evaluation
EVAL_SAMPLE_TOKENS = 48  # and their new tokens, unless max_completion_length is set


@dataclass
class DPOConfig(PairwiseConfig, ReferenceSyncFields):
    """Configuration of `DPOTrainer`; every `TrainingArguments` field applies too."""

    loss_type: str = field(default="sigmoid", metadata={"help": f"One of: {', '.join(sorted(DPO_LOSSES))}."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Assumed share of flipped preference labels "
                                                                    "(conservative losses)."})
    ref_model_init_kwargs: dict[str, Any] | None = field(
        default=None, metadata={"help": "Keyword arguments for from_pretrained when `ref_model` is a name or path."})
    precompute_ref_log_probs: bool = field(
        default=False, metadata={"help": "Compute the reference log-probs in one pass before training and hold "
                                         "no reference model during training."})
    precompute_ref_batch_size: int | None = field(
        default=None, metadata={"help": "Batch size of that pass (default: per_device_eval_batch_size)."})
    reference_free: bool = field(
        default=False, metadata={"help": "Use no reference model: its log-probs are taken as 0, as for a reference "
                                         "giving every completion the same probability, so the loss depends on the "
                                         "policy alone (and the implicit rewards are beta * policy log-probs)."})
    ref_adapter_name: str | None = field(
        default=None, metadata={"help": "For a PEFT policy holding several adapters: the adapter that serves as "
                                        "the reference (switched on for reference log-probs, then back)."})
    model_adapter_name: str | None = field(
        default=None, metadata={"help": "For a PEFT policy holding several adapters: the adapter to train (made "
                                        "active and trainable; default: the active one)."})
    padding_value: int | None = field(
        default=None, metadata={"help": "Token id written in the padding of input batches (default: the tokenizer's "
                                        "pad id). Padding is masked, so it changes no loss."})
    label_pad_token_id: int = field(
        default=IGNORE_INDEX, metadata={
            "help": "Label value marking a token that is not a target, in batches from a custom data_collator that "
                    "give `labels` (e.g. TRL's DPODataCollatorWithPadding, whose rows then carry chosen_labels / "
                    "rejected_labels built with it). tether's own collator gives loss masks instead, so with it "
                    "this value changes nothing."})
    truncation_mode: str = field(
        default="keep_end", metadata={"help": "Which tokens a prompt longer than max_prompt_length keeps: "
                                              "'keep_end' (its last ones) or 'keep_start' (its first ones)."})
    is_encoder_decoder: bool | None = field(
        default=None, metadata={"help": "Whether the model is an encoder-decoder; read from the model, so it needs "
                                        "no setting; when given, it must agree with the model. DPO here trains "
                                        "decoder-only models."})
    generate_during_eval: bool = field(
        default=False, metadata={"help": "At each evaluation, write greedy completions of a few eval prompts by the "
                                         "policy and by the reference to output_dir/samples.jsonl (shown in the "
                                         "run report)."})

    def __post_init__(self) -> None:
        if self.loss_type not in DPO_LOSSES:
            raise ValueError(f"Unknown loss_type {self.loss_type!r}; use one of {', '.join(sorted(DPO_LOSSES))}.")
        check_truncation_mode(self.truncation_mode)
        for name in ("padding_value", "label_pad_token_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be an integer token id, got {value!r}.")
        if self.reference_free and self.precompute_ref_log_probs:
            raise ValueError("reference_free=True uses no reference, so precompute_ref_log_probs has nothing to "
                             "compute. Fix: set one of them to False.")
        if self.reference_free and self.ref_adapter_name is not None:
            raise ValueError("reference_free=True uses no reference, so ref_adapter_name would not be used. Fix: drop "
                             "one of them.")
        if self.ref_adapter_name is not None and self.ref_adapter_name == self.model_adapter_name:
            raise ValueError(f"ref_adapter_name and model_adapter_name are both {self.ref_adapter_name!r}; the "
                             "reference adapter must be a different one from the trained adapter.")
        # Each loss checks its own hyperparameters (exo_pair needs label_smoothing > 0, hinge takes none, ...):
        # call it once on a dummy pair so a bad combination fails here rather than at the first step.
        dpo_loss(self.loss_type, *torch.zeros(4, 1), beta=self.beta, label_smoothing=self.label_smoothing)
        super().__post_init__()


class DPOTrainer(PairwiseTrainer):
    """DPO (Rafailov et al., 2023) and the losses of `DPOConfig.loss_type`.

    The reference is `ref_model` when given; else, for a PEFT policy, the same model with its adapter
    disabled, or with its `ref_adapter_name` adapter switched on; else a frozen copy of the policy. With
    `precompute_ref_log_probs`, reference log-probs are computed once before training and no reference is
    kept; with `reference_free`, there is none (its log-probs are 0).
    """

    config_class = DPOConfig
    legacy_renames = {"max_target_length": "max_completion_length"}  # TRL 0.7's name
    config_suffix = "DPO"

    def __init__(self, model: nn.Module | str | None = None, ref_model: nn.Module | str | None = None, *args: Any,
                 **kwargs: Any) -> None:
        self._policy_source = model if isinstance(model, str) else None  # a ZeRO-3 reference reloads from it
        super().__init__(model, *args, **kwargs)
        self._activate_adapters(self.model)
        self._ref_model_given = ref_model is not None
        self.ref_model = self._resolve_reference(ref_model)
        self._reward_shift = (0.0, 0)  # running mean of implicit rewards and its count, for bco_pair
        if self.args.precompute_ref_log_probs:
            self.train_dataset = self._add_reference_log_probs(self.train_dataset)
            if self.eval_dataset is not None:
                self.eval_dataset = self._add_reference_log_probs(self.eval_dataset)
            self.ref_model = None
            self._reference_released = True

    def _prepare_eval_one(self, dataset: Any, what: str) -> Any:
        prepared = super()._prepare_eval_one(dataset, what)
        if getattr(self, "_reference_released", False) and "ref_chosen_logps" not in prepared.column_names:
            raise ValueError("precompute_ref_log_probs=True released the reference model once it had scored the "
                             "datasets given to DPOTrainer(...); a new eval set has no reference log-probs. Pass it "
                             "as eval_dataset= when building the trainer (a dict for several).")
        return prepared

    # ----- the reference -----------------------------------------------------------------------------
    def _option(self, name: str) -> Any:
        # KTOTrainer reuses this class with a config that lacks DPO's reference options: they take their defaults.
        return getattr(self.args, name, DPOConfig.__dataclass_fields__[name].default)

    @property
    def _adapters(self) -> dict[str, str | None]:
        """reference_context's adapter keywords (TRL's ref_adapter_name / model_adapter_name)."""
        return {"ref_adapter_name": self._option("ref_adapter_name"),
                "model_adapter_name": self._option("model_adapter_name")}

    def _activate_adapters(self, model: nn.Module) -> None:
        adapters = self._adapters
        if any(name is not None for name in adapters.values()):
            activate_trained_adapter(model, adapters["model_adapter_name"], adapters["ref_adapter_name"])

    def _resolve_reference(self, ref_model: nn.Module | str | None, policy: nn.Module | None = None
                           ) -> nn.Module | None:
        """The reference module, or None when the adapter-disabled policy, its reference adapter, no reference
        (reference_free) or the initial policy itself (for precomputation) serves; see
        models.reference.select_reference."""
        args = self.args
        if self._option("reference_free"):
            if ref_model is not None:
                warnings.warn("reference_free=True: the ref_model given is not used (nor loaded); the reference "
                              "log-probs are 0.", UserWarning, stacklevel=3)
            return None
        if self._adapters["ref_adapter_name"] is not None:
            if ref_model is not None:
                raise ValueError("Both ref_model and ref_adapter_name were given; the reference is one or the other. "
                                 "Fix: pass ref_model=None to use the adapter, or drop ref_adapter_name.")
            return None  # the policy with its reference adapter switched on (reference_context)
        if isinstance(ref_model, str):
            ref_model = load_language_model(ref_model, **model_init_kwargs(args.ref_model_init_kwargs))
        ref_model = select_reference(
            policy if policy is not None else self.model, ref_model, source=self._policy_source,
            copy_needed=not args.precompute_ref_log_probs,
            load=lambda source: load_language_model(source, **(args.model_init_kwargs or {})))
        if ref_model is None:
            return None
        if args.disable_dropout:
            disable_dropout(ref_model)
        # Frozen and placed for the engine: not wrapped for training, partitioned under ZeRO-3.
        return prepare_frozen_model(self.accelerator, ref_model)

    def call_model_init(self, trial: Any = None) -> nn.Module:
        """The fresh model train() builds with model_init; a reference that was a copy of the policy is copied
        again from it (reference log-probs precomputed at construction stay those of the first model)."""
        model = super().call_model_init(trial)
        self._activate_adapters(model)
        if self.ref_model is not None and not self._ref_model_given:
            self.ref_model = self._resolve_reference(None, policy=model)
        return model

    def _live_reference(self, model: nn.Module) -> tuple[nn.Module, contextlib.AbstractContextManager] | None:
        """(module, context) that computes as the reference (see models.reference.reference_context), or None
        when there is no live reference: reference_free, or log-probs precomputed for a policy that is not PEFT
        (its starting weights are gone)."""
        if self._option("reference_free") or (self.ref_model is None and self._adapters["ref_adapter_name"] is None
                                              and not is_peft_model(unwrap_model(model))):
            return None
        return reference_context(model, self.ref_model, **self._adapters)

    @torch.no_grad()
    def reference_log_probs(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Summed completion log-probs of the reference, [b] chosen and [b] rejected: precomputed columns, zeros
        (reference_free), or a forward pass of the reference."""
        if "ref_chosen_logps" in inputs:
            return {"chosen": inputs["ref_chosen_logps"], "rejected": inputs["ref_rejected_logps"]}
        if self._option("reference_free"):
            sequences = int(inputs["sequence_ids"].max()) + 1 if "sequence_ids" in inputs else len(inputs["input_ids"])
            zeros = torch.zeros(sequences // 2, device=inputs["input_ids"].device)  # [b]
            return {"chosen": zeros, "rejected": zeros}
        reference, context = reference_context(model, self.ref_model, **self._adapters)
        with context:
            sums, _, _ = completion_log_probs(reference, inputs, chunk_size=self.args.logprob_chunk_size)
        chosen, rejected = sums.chunk(2)
        return {"chosen": chosen, "rejected": rejected}

    def _add_reference_log_probs(self, dataset: Any) -> Any:
        """One pass over the data with the reference; the log-probs become dataset columns."""
        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
        model = self.model.to(self.args.device)
        was_training = model.training
        model.eval()
        chosen, rejected = [], []
        for start in tqdm(range(0, len(dataset), batch_size), desc="Reference log-probs",
                          disable=self.args.disable_tqdm):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = self._prepare_inputs(self.data_collator(rows))
            ref = self.reference_log_probs(model, batch)
            chosen += ref["chosen"].tolist()
            rejected += ref["rejected"].tolist()
        model.train(was_training)
        return dataset.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)

    # ----- evaluation --------------------------------------------------------------------------------
    def evaluation_loop(self, dataloader: Any, description: str, prediction_loss_only: bool | None = None,
                        ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval") -> Any:
        if self._option("generate_during_eval"):
            self._write_eval_samples(dataloader.dataset, metric_key_prefix)
        return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)

    def _write_eval_samples(self, dataset: Any, split: str) -> None:
        """generate_during_eval: greedy completions of the first few distinct prompts of `dataset`, by the policy
        and (when there is a live one) by the reference, appended to samples.jsonl as {"step", "split", "prompt",
        "completion", "reference_completion"}. Runs on every process (ZeRO-3 generation needs them all)."""
        max_new_tokens = self.args.max_completion_length or EVAL_SAMPLE_TOKENS
        policy = generate_samples(self.model, self.processing_class, dataset, EVAL_SAMPLES, max_new_tokens)
        live = self._live_reference(self.model)
        if live is not None:
            reference, context = live
            with context:
                from_reference = generate_samples(reference, self.processing_class, dataset, EVAL_SAMPLES,
                                                  max_new_tokens)
            for row, ref_row in zip(policy, from_reference):
                row["reference_completion"] = ref_row["completion"]
        self.write_samples([{"split": split, **row} for row in policy])

    # ----- the loss ----------------------------------------------------------------------------------
    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor:
        policy = self.pair_log_probs(model, inputs)
        reference = self.reference_log_probs(model, inputs)
        pc, pr, rc, rr = policy["chosen"], policy["rejected"], reference["chosen"], reference["rejected"]
        if self.args.loss_type in AVERAGED_LOG_PROBS:
            pc, rc = pc / policy["chosen_tokens"], rc / policy["chosen_tokens"]
            pr, rr = pr / policy["rejected_tokens"], rr / policy["rejected_tokens"]
        extra = {"delta": self._bco_delta(pc, pr, rc, rr)} if self.args.loss_type == "bco_pair" else {}
        out = dpo_loss(self.args.loss_type, pc, pr, rc, rr, self.args.beta, self.args.label_smoothing, **extra)
        self.record_pair_metrics(out.chosen_rewards, out.rejected_rewards, policy)
        loss = out.losses.mean()
        if return_outputs:
            return loss, {"chosen_rewards": out.chosen_rewards, "rejected_rewards": out.rejected_rewards}
        return loss

    def _bco_delta(self, pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
        """BCO's reward shift: the running mean of all implicit rewards seen so far, over processes."""
        rewards = self.args.beta * torch.cat([pc - rc, pr - rr]).detach()
        total = torch.stack([rewards.sum(), torch.tensor(float(rewards.numel()), device=rewards.device)])
        if self.args.world_size > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        mean, count = self._reward_shift
        if self.model.training:
            mean = (mean * count + float(total[0])) / (count + int(total[1]))
            self._reward_shift = (mean, count + int(total[1]))
        elif count == 0:  # evaluating before any training step: the batch itself is all we have
            mean = float(total[0] / total[1])
        return torch.tensor(mean, device=rewards.device)
