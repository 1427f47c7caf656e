"""KTO (Ethayarajh et al., 2024): preference optimisation from unpaired desirable/undesirable examples."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..data.formats import is_stream
from ..data.preference import UNPAIRED_REFERENCE_COLUMNS, UnpairedCollator, prepare_unpaired
from ..losses.preference import apo_zero_unpaired_loss, kto_loss, kto_reference_point
from ..models.forward import completion_log_probs
from ..models.loading import is_peft_model
from ..models.reference import reference_context
from .base import TetherTrainer
from .dpo import DPOTrainer
from .preference import PairwiseConfig
from .ref_sync import ReferenceSyncFields

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
KL_COMPLETION_MODES = ("batch", "fixed")
# DPOTrainer's precomputation pass names its two columns after a pair's sides; KTO's are the matched pair's and
# the mismatched (KL) pair's reference log-probs.
_REFERENCE_COLUMN_NAMES = {"ref_chosen_logps": "ref_logps", "ref_rejected_logps": "ref_KL_logps"}


@dataclass
class KTOConfig(PairwiseConfig, ReferenceSyncFields):
    """Configuration of `KTOTrainer`; every `TrainingArguments` field applies too."""

    loss_type: str = field(default="kto", metadata={
        "help": "'kto' (KTO, with its KL reference point from mismatched pairs) or 'apo_zero_unpaired' (APO-zero "
                "on unpaired examples: no reference point, so no mismatched pairs)."})
    desirable_weight: float = field(default=1.0, metadata={"help": "Weight of desirable examples' losses."})
    undesirable_weight: float = field(default=1.0, metadata={"help": "Weight of undesirable examples' losses."})
    ref_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Keyword arguments for from_pretrained when `ref_model` is a name or path."})
    precompute_ref_log_probs: bool = field(default=False, metadata={
        "help": "Compute the reference log-probs of every example (and of its fixed mismatched pair, see "
                "kl_completions) in one pass before training and hold no reference model during training."})
    precompute_ref_batch_size: int | None = field(default=None, metadata={
        "help": "Batch size of that pass (default: per_device_eval_batch_size)."})
    kl_completions: str | None = field(default=None, metadata={
        "help": "Which other completion each prompt is paired with for KTO's KL reference point: 'batch' (in "
                "each batch as sampled, prompt i with completion i+1) or 'fixed' (once, when the data are "
                "prepared: within each run of per_device_train_batch_size consecutive rows, or "
                "per_device_eval_batch_size for eval data, prompt i with completion i-1, as TRL 1.16 does; "
                "with train_sampling_strategy='sequential' a batch's mismatched completions are then its own). "
                "None: 'fixed' with precompute_ref_log_probs (its reference log-probs need fixed pairs), else "
                "'batch'."})

    def __post_init__(self) -> None:
        if self.loss_type not in KTO_LOSS_TYPES:
            raise ValueError(f"KTOConfig.loss_type must be one of {', '.join(KTO_LOSS_TYPES)}, got {self.loss_type!r}.")
        if self.kl_completions is not None and self.kl_completions not in KL_COMPLETION_MODES:
            raise ValueError(f"KTOConfig.kl_completions must be 'batch', 'fixed' or None, got "
                             f"{self.kl_completions!r}.")
        if self.precompute_ref_log_probs and self.kl_completions == "batch":
            raise ValueError("kl_completions='batch' pairs prompts with other completions only once batches are "
                             "drawn, so their reference log-probs cannot be precomputed. Fix: kl_completions='fixed' "
                             "(or None), or precompute_ref_log_probs=False.")
        if self.loss_type == "kto" and self.per_device_train_batch_size < 2:
            raise ValueError("KTO estimates its KL reference point from mismatched pairs within a batch; "
                             "use per_device_train_batch_size >= 2.")
        super().__post_init__()

    @property
    def fixed_kl_completions(self) -> bool:
        """Whether the mismatched (KL) pairs are fixed when the data are prepared (see kl_completions)."""
        return self.loss_type == "kto" and (self.kl_completions or (
            "fixed" if self.precompute_ref_log_probs else "batch")) == "fixed"


class KTOTrainer(DPOTrainer):
    """KTO on `prompt`/`completion`/`label` data, or on paired preference data (unpaired automatically).

    Shares DPOTrainer's reference handling (explicit, adapter-disabled PEFT, or frozen copy) and its
    precomputation pass: with `precompute_ref_log_probs`, each row gets `ref_logps` (its own pair) and, for
    loss_type='kto', `ref_KL_logps` (its fixed mismatched pair) before training.
    """

    config_class = KTOConfig
    config_suffix = "KTO"

    def _prepare(self, dataset: Any, what: str) -> Any:
        args = self.args
        if args.precompute_ref_log_probs and is_stream(dataset):
            raise ValueError(f"precompute_ref_log_probs=True scores every row of the {what} dataset before it is "
                             "used, which is not supported with IterableDataset (a stream has no end to read to). "
                             "Fix: load the dataset without streaming, or set precompute_ref_log_probs=False.")
        chunk = None
        if args.fixed_kl_completions:
            chunk = args.per_device_train_batch_size if what == "train" else args.per_device_eval_batch_size
        return prepare_unpaired(dataset, self.processing_class, max_length=args.max_length,
                                max_prompt_length=args.max_prompt_length, num_proc=args.dataset_num_proc,
                                what=what, kl_chunk_size=chunk)

    def _default_collator(self) -> Callable:
        return UnpairedCollator(self.processing_class.pad_token_id,
                                pad_to_multiple_of=self.args.pad_to_multiple_of)

    # ----- the reference -----------------------------------------------------------------------------
    @torch.no_grad()
    def unpaired_reference_log_probs(self, model: nn.Module, inputs: dict[str, torch.Tensor]
                                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Summed completion log-probs of the reference on a KTO batch: ([b] matched pairs, [b] mismatched pairs
        or None for apo_zero_unpaired), from precomputed columns when the batch has them, else a forward pass."""
        kl = self.args.loss_type == "kto"
        if "ref_logps" in inputs:
            if kl and "ref_KL_logps" not in inputs:
                raise ValueError("This batch has precomputed ref_logps but no ref_KL_logps, which loss_type='kto' "
                                 "needs for its KL reference point. Fix: let KTOTrainer precompute both "
                                 "(precompute_ref_log_probs=True), or drop the ref_logps column.")
            return inputs["ref_logps"], inputs["ref_KL_logps"] if kl else None
        b = inputs["label"].shape[0]
        # [2b, t] when the mismatched half is needed, else the matched [b, t]
        sequences = {k: v if kl else v[:b] for k, v in self._sequences(inputs).items()}
        reference, context = reference_context(model, self.ref_model, **self._adapters)
        with context:
            logps, _, _ = completion_log_probs(reference, sequences, chunk_size=self.args.logprob_chunk_size,
                                               with_stats=False)
        return (logps[:b], logps[b:]) if kl else (logps, None)

    def reference_log_probs(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """DPOTrainer's hook for its precomputation pass, which stores "chosen" and "rejected" as columns
        ref_chosen_logps / ref_rejected_logps; here they are the matched and mismatched pairs' [b] log-probs
        (the matched ones twice for apo_zero_unpaired), renamed in `_add_reference_log_probs`."""
        matched, mismatched = self.unpaired_reference_log_probs(model, inputs)
        return {"chosen": matched, "rejected": matched if mismatched is None else mismatched}

    def _add_reference_log_probs(self, dataset: Any) -> Any:
        """DPOTrainer's pass over the data (batches of precompute_ref_batch_size), with KTO's column names;
        each dataset of a dict of eval sets is scored in turn."""
        if isinstance(dataset, dict):
            return {name: self._add_reference_log_probs(part) for name, part in dataset.items()}
        scored = super()._add_reference_log_probs(dataset)
        if self.args.loss_type != "kto":
            scored = scored.remove_columns("ref_rejected_logps")
        return scored.rename_columns({k: v for k, v in _REFERENCE_COLUMN_NAMES.items() if k in scored.column_names})

    def _can_score_reference(self) -> bool:
        """Whether reference log-probs can still be computed after the precomputation pass released the
        reference: not when a ref_model was given (it is gone); yes for a PEFT policy (its adapter disabled, or
        its reference adapter), and for the policy itself before its first step (it was its own reference)."""
        if self._ref_model_given:
            return False
        return (is_peft_model(self.accelerator.unwrap_model(self.model))
                or self._adapters["ref_adapter_name"] is not None or self.state.global_step == 0)

    def _prepare_eval_one(self, dataset: Any, what: str) -> Any:
        """A new eval set after the precomputation pass gets its reference log-probs now, while a reference
        can still give them (see `_can_score_reference`); else a ValueError. Sets given at construction keep
        the log-probs computed then."""
        if not getattr(self, "_reference_released", False):
            return super()._prepare_eval_one(dataset, what)
        prepared = TetherTrainer._prepare_eval_one(self, dataset, what)  # not DPO's: it refuses any new set
        if "ref_logps" in prepared.column_names:
            return prepared
        if not self._can_score_reference():
            raise ValueError(
                "Cannot compute reference log-probs for a dataset passed to evaluate() now: with "
                "precompute_ref_log_probs=True the reference was let go once it had scored the datasets given to "
                "KTOTrainer(...), and the policy can stand in for it only before training starts when no ref_model "
                "was given (or, for a PEFT policy, with its adapter disabled). Fix: pass this dataset as "
                "eval_dataset= when building the trainer (a dict for several), or set precompute_ref_log_probs=False.")
        # Not kept for a later evaluate(dataset): as TRL does, each call scores it again, so one after training
        # starts is refused even for a set scored before.
        return self._add_reference_log_probs(prepared)

    # ----- the loss ----------------------------------------------------------------------------------
    @staticmethod
    def _sequences(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The [2b, t] sequence tensors of a KTO batch (matched rows, then mismatched ones)."""
        return {k: v for k, v in inputs.items() if k != "label" and k not in UNPAIRED_REFERENCE_COLUMNS}

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor:
        chunk = self.args.logprob_chunk_size
        b = inputs["label"].shape[0]
        sequences = self._sequences(inputs)  # [2b, t]: matched, then mismatched
        matched = {k: v[:b] for k, v in sequences.items()}
        policy, _, _ = completion_log_probs(model, matched, chunk_size=chunk, with_stats=False)
        desirable = inputs["label"].bool()
        ref, ref_mismatched = self.unpaired_reference_log_probs(model, inputs)  # [b], [b] or None
        if self.args.loss_type == "apo_zero_unpaired":  # no reference point: the mismatched half is not used
            out = apo_zero_unpaired_loss(policy, ref, desirable, self.args.beta, self.args.desirable_weight,
                                         self.args.undesirable_weight)
            reference_point = torch.tensor(float("nan"))  # not logged
        else:
            with torch.no_grad():
                policy_mismatched, _, _ = completion_log_probs(model, {k: v[b:] for k, v in sequences.items()},
                                                               chunk_size=chunk, with_stats=False)
                # gather concatenates along dim 0, so stack per example: [b, 2] -> [b * world, 2]
                gathered = self.accelerator.gather(torch.stack([policy_mismatched, ref_mismatched.to(
                    policy_mismatched)], dim=1))
                reference_point = kto_reference_point(gathered[:, 0], gathered[:, 1])
            out = kto_loss(policy, ref.to(policy), desirable, reference_point, self.args.beta,
                           self.args.desirable_weight, self.args.undesirable_weight)
        chosen_rewards, rejected_rewards = out.rewards[desirable], out.rewards[~desirable]
        nan = torch.tensor(float("nan"))
        self.record_metrics(**{
            "kl": reference_point,
            "rewards/chosen": chosen_rewards.mean() if desirable.any() else nan,
            "rewards/rejected": rejected_rewards.mean() if (~desirable).any() else nan,
            "logps/chosen": policy.detach()[desirable].mean() if desirable.any() else nan,
            "logps/rejected": policy.detach()[~desirable].mean() if (~desirable).any() else nan,
            "rewards/margins": (chosen_rewards.mean() - rejected_rewards.mean())
            if desirable.any() and (~desirable).any() else nan,
            "count/chosen": desirable.sum(),
            "count/rejected": (~desirable).sum(),
        })
        loss = out.losses.mean()
        return (loss, None) if return_outputs else loss
