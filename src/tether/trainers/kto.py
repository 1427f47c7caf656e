"""KTO (Ethayarajh et al., 2024): preference optimisation from unpaired desirable/undesirable examples."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..data.preference import UnpairedCollator, prepare_unpaired
from ..losses.preference import apo_zero_unpaired_loss, kto_loss, kto_reference_point
from ..models.forward import completion_log_probs
from ..models.reference import reference_context
from .dpo import DPOTrainer
from .preference import PairwiseConfig
from .ref_sync import ReferenceSyncFields

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


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
    precompute_ref_log_probs: bool = field(default=False, metadata={"help": "Not supported by KTO: the "
                                                                              "mismatched pairs change per batch."})
    precompute_ref_batch_size: int | None = field(default=None, metadata={
        "help": "Batch size of a reference precomputation pass; unused, since KTO's reference log-probs are "
                "computed per batch (see precompute_ref_log_probs)."})

    def __post_init__(self) -> None:
        if self.loss_type not in KTO_LOSS_TYPES:
            raise ValueError(f"KTOConfig.loss_type must be one of {', '.join(KTO_LOSS_TYPES)}, got {self.loss_type!r}.")
        if self.precompute_ref_log_probs:
            raise ValueError("KTO pairs prompts with other examples' completions per batch, so reference "
                             "log-probs cannot be precomputed; set precompute_ref_log_probs=False.")
        if self.loss_type == "kto" and self.per_device_train_batch_size < 2:
            raise ValueError("KTO estimates its KL reference point from mismatched pairs within a batch; "
                             "use per_device_train_batch_size >= 2.")
        super().__post_init__()


class KTOTrainer(DPOTrainer):
    """KTO on `prompt`/`completion`/`label` data, or on paired preference data (unpaired automatically).

    Shares DPOTrainer's reference handling (explicit, adapter-disabled PEFT, or frozen copy).
    """

    config_class = KTOConfig
    config_suffix = "KTO"

    def _prepare(self, dataset: Any, what: str) -> Any:
        return prepare_unpaired(dataset, self.processing_class, max_length=self.args.max_length,
                                max_prompt_length=self.args.max_prompt_length,
                                num_proc=self.args.dataset_num_proc, what=what)

    def _default_collator(self) -> Callable:
        return UnpairedCollator(self.processing_class.pad_token_id,
                                pad_to_multiple_of=self.args.pad_to_multiple_of)

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor:
        chunk = self.args.logprob_chunk_size
        b = inputs["label"].shape[0]
        sequences = {k: v for k, v in inputs.items() if k != "label"}  # [2b, t]: matched, then mismatched
        matched = {k: v[:b] for k, v in sequences.items()}
        policy, _, _ = completion_log_probs(model, matched, chunk_size=chunk)
        desirable = inputs["label"].bool()
        reference_model, context = reference_context(model, self.ref_model)
        if self.args.loss_type == "apo_zero_unpaired":  # no reference point: the mismatched half is not used
            with torch.no_grad(), context:
                ref, _, _ = completion_log_probs(reference_model, matched, chunk_size=chunk)  # [b]
            out = apo_zero_unpaired_loss(policy, ref, desirable, self.args.beta, self.args.desirable_weight,
                                         self.args.undesirable_weight)
            reference_point = torch.tensor(float("nan"))  # not logged
        else:
            with torch.no_grad():
                policy_mismatched, _, _ = completion_log_probs(model, {k: v[b:] for k, v in sequences.items()},
                                                               chunk_size=chunk)
                with context:
                    ref_all, _, _ = completion_log_probs(reference_model, sequences, chunk_size=chunk)  # [2b]
                ref, ref_mismatched = ref_all[:b], ref_all[b:]
                # gather concatenates along dim 0, so stack per example: [b, 2] -> [b * world, 2]
                gathered = self.accelerator.gather(torch.stack([policy_mismatched, ref_mismatched], dim=1))
                reference_point = kto_reference_point(gathered[:, 0], gathered[:, 1])
            out = kto_loss(policy, ref, desirable, reference_point, self.args.beta, self.args.desirable_weight,
                           self.args.undesirable_weight)
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
