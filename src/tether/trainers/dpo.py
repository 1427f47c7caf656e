"""Direct Preference Optimization and its family, against a frozen reference model (or none: reference_free)."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..callbacks import RefModelCallbackHandler
from ..data.collate import IGNORE_INDEX
from ..data.formats import is_stream
from ..data.preference import check_truncation_mode
from ..distributed import prepare_frozen_model
from ..losses.preference import (
    BATCH_SORTED_LOSSES,
    DPO_LOSSES,
    F_DIVERGENCES,
    dpo_loss,
    loss_type_list,
    wpo_weights,
)
from ..models.dropout import disable_dropout
from ..models.loading import is_peft_model, load_language_model
from ..models.reference import activate_trained_adapter, reference_context, select_reference
from .preference import PairwiseConfig, PairwiseTrainer, pair_sequence_log_probs
from .ref_sync import ReferenceSyncFields


@dataclass
class DPOConfig(PairwiseConfig, ReferenceSyncFields):
    """Configuration of `DPOTrainer`; every `TrainingArguments` field applies too."""

    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"], metadata={
        "help": f"One loss or a list of losses (summed with loss_weights, as MPO does); each one of: "
                f"{', '.join(sorted(DPO_LOSSES))}. A single name is stored as a one-element list."})
    loss_weights: list[float] | None = field(default=None, metadata={
        "help": "Weights of the losses in loss_type, one each (default: 1 each); the loss is sum_i w_i * loss_i."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Assumed share of flipped preference labels "
                                                                    "(conservative losses)."})
    f_divergence_type: str = field(default="reverse_kl", metadata={
        "help": "Divergence regularising policy against reference (f-DPO): reverse_kl (DPO), forward_kl, "
                "js_divergence or alpha_divergence; margin-based loss types only."})
    f_alpha_divergence_coef: float = field(default=0.5, metadata={
        "help": "alpha of f_divergence_type='alpha_divergence', whose score is (1 - u^-alpha) / alpha for the "
                "policy/reference probability ratio u."})
    ld_alpha: float | None = field(default=None, metadata={
        "help": "LD-DPO: weight in [0, 1] of the log-probs of the tokens by which the longer completion of a pair "
                "exceeds the shorter (None or 1: plain sums; 0: both cut to the shorter length)."})
    use_weighting: bool = field(default=False, metadata={
        "help": "WPO: weight each pair's loss by the product of its two completions' length-normalised, "
                "aligned probabilities under the policy (their normaliser comes from the same forward pass)."})
    discopop_tau: float = field(default=0.05, metadata={
        "help": "Temperature tau of loss_type='discopop' (how sharply it swaps logistic for exponential)."})
    pad_token: str | None = field(default=None, metadata={
        "help": "A token of the tokenizer's vocabulary to make its pad token (on tokenizer and model) before the "
                "data are prepared (TRL deprecates it: set tokenizer.pad_token instead)."})
    ref_model_init_kwargs: dict[str, Any] | str | None = field(
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
    label_pad_token_id: int = field(
        default=IGNORE_INDEX, metadata={
            "help": "Label value marking a token that is not a target, in batches from a custom data_collator that "
                    "give `labels` (e.g. TRL's DPODataCollatorWithPadding, whose rows then carry chosen_labels / "
                    "rejected_labels built with it). tether's own collator gives loss masks instead, so with it "
                    "this value changes nothing."})
    truncation_mode: str = field(
        default="keep_end", metadata={"help": "Which tokens a prompt longer than max_prompt_length keeps: "
                                              "'keep_end' (its last ones) or 'keep_start' (its first ones)."})

    def __post_init__(self) -> None:
        self.loss_type = loss_type_list(self.loss_type)  # as TRL 1.16: a name becomes a one-element list
        if self.loss_weights is not None:  # their count is checked by the dpo_loss call below
            self.loss_weights = [float(w) for w in self.loss_weights]
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(f"f_divergence_type must be one of {', '.join(F_DIVERGENCES)}, got "
                             f"{self.f_divergence_type!r}.")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ValueError(f"ld_alpha must lie in [0, 1] (or be None for no length desensitisation), got "
                             f"{self.ld_alpha}.")
        if self.use_weighting and BATCH_SORTED_LOSSES & set(self.loss_type):
            raise ValueError(f"use_weighting=True weights each pair, but loss types {sorted(BATCH_SORTED_LOSSES)} "
                             "sort the batch, so their entries are not pairs. Fix: drop one of them.")
        check_truncation_mode(self.truncation_mode)
        if isinstance(self.label_pad_token_id, bool) or not isinstance(self.label_pad_token_id, int):
            raise ValueError(f"label_pad_token_id must be an integer token id, got {self.label_pad_token_id!r}.")
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
        dpo_loss(self.loss_type, *torch.zeros(4, 1), beta=self.beta, label_smoothing=self.label_smoothing,
                 loss_weights=self.loss_weights, **self.loss_options)
        super().__post_init__()

    @property
    def loss_options(self) -> dict[str, Any]:
        """The losses' hyperparameters from this config, as `losses.preference.dpo_loss` options."""
        return {"f_divergence": self.f_divergence_type, "f_alpha": self.f_alpha_divergence_coef,
                "tau": self.discopop_tau}


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
            eval_sets = self.eval_dataset if isinstance(self.eval_dataset, dict) else {"": self.eval_dataset}
            if is_stream(self.train_dataset) or any(is_stream(e) for e in eval_sets.values()):
                raise ValueError("precompute_ref_log_probs=True is not supported with IterableDataset (streaming): it "
                                 "needs the whole dataset before training. Fix: set precompute_ref_log_probs=False "
                                 "(the reference model then scores each batch), or load the dataset without "
                                 "streaming.")
            self.train_dataset = self._add_reference_log_probs(self.train_dataset)
            if isinstance(self.eval_dataset, dict):  # several named eval sets: each gets its columns
                self.eval_dataset = {name: self._add_reference_log_probs(e) for name, e in self.eval_dataset.items()}
            elif self.eval_dataset is not None:
                self.eval_dataset = self._add_reference_log_probs(self.eval_dataset)
            self.ref_model = None
            self._reference_released = True
        # Callbacks receive ref_model=, as TRL's do (BEMACallback(update_ref_model=True) writes into it).
        RefModelCallbackHandler.install(self)

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
            ref_model = load_language_model(ref_model, **self.model_loading_kwargs(args.ref_model_init_kwargs))
        ref_model = select_reference(
            policy if policy is not None else self.model, ref_model, source=self._policy_source,
            copy_needed=not args.precompute_ref_log_probs,
            load=lambda source: load_language_model(source, **self.model_loading_kwargs(args.model_init_kwargs)))
        if ref_model is None:
            return None
        if args.disable_dropout:
            disable_dropout(ref_model)
        # Frozen and placed for the engine: not wrapped for training, partitioned under ZeRO-3.
        return prepare_frozen_model(self.accelerator, ref_model)

    def _set_up_model(self, model: nn.Module, processing_class: Any, args: Any) -> nn.Module:
        """DPOConfig.pad_token: that token becomes the tokenizer's pad token (and the model's pad id) before the data
        are prepared and collated."""
        pad_token = getattr(args, "pad_token", None)
        if pad_token is not None:
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            if pad_token not in tokenizer.get_vocab():
                raise ValueError(f"pad_token={pad_token!r} is not in the tokenizer's vocabulary. Fix: give one of its "
                                 "tokens (e.g. its EOS token), or add it to the tokenizer and resize the embeddings.")
            tokenizer.pad_token = pad_token
            for config in (getattr(model, "config", None), getattr(model, "generation_config", None)):
                if config is not None:
                    config.pad_token_id = tokenizer.pad_token_id
        return super()._set_up_model(model, processing_class, args)

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
                                              and not is_peft_model(self.accelerator.unwrap_model(model))):
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
            logps, _ = pair_sequence_log_probs(reference, inputs, self.args.logprob_chunk_size,
                                               self._option("ld_alpha"))
        return {"chosen": logps["chosen"], "rejected": logps["rejected"]}

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

    # ----- the loss ----------------------------------------------------------------------------------
    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor:
        """The DPOConfig.loss_type loss(es) on summed completion log-probs (LD-DPO-weighted with ld_alpha), with
        f_divergence_type's scores, each pair's loss weighted by WPO with use_weighting; rewards beta * r."""
        args = self.args
        policy = self.pair_log_probs(model, inputs, ld_alpha=args.ld_alpha, aligned=args.use_weighting)
        reference = self.reference_log_probs(model, inputs)
        pc, pr, rc, rr = policy["chosen"], policy["rejected"], reference["chosen"], reference["rejected"]
        options = {**args.loss_options, "chosen_tokens": policy["chosen_tokens"],
                   "rejected_tokens": policy["rejected_tokens"]}
        if args.ld_alpha is not None:
            options["unweighted_chosen_logps"] = policy["chosen_unweighted"]  # sft's NLL is on the plain sums
        if "bco_pair" in args.loss_type:
            options["delta"] = self._bco_delta(pc, pr, rc, rr)
        out = dpo_loss(args.loss_type, pc, pr, rc, rr, args.beta, args.label_smoothing,
                       loss_weights=args.loss_weights, **options)
        losses = out.losses  # [b]
        extra = {}
        if args.use_weighting:
            weights = wpo_weights(policy["chosen_aligned"], policy["rejected_aligned"], policy["chosen_tokens"],
                                  policy["rejected_tokens"])
            losses = losses * weights
            extra["wpo_weight"] = weights.mean()
        self.record_pair_metrics(out.chosen_rewards, out.rejected_rewards, policy, **extra)
        loss = losses.mean()
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
