"""Direct Preference Optimization and its family, against a frozen reference model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..distributed import prepare_frozen_model
from ..losses.preference import AVERAGED_LOG_PROBS, DPO_LOSSES, dpo_loss
from ..models.dropout import disable_dropout
from ..models.forward import completion_log_probs
from ..models.loading import load_language_model, model_init_kwargs
from ..models.reference import reference_context, select_reference
from .preference import PairwiseConfig, PairwiseTrainer


@dataclass
class DPOConfig(PairwiseConfig):
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

    def __post_init__(self) -> None:
        if self.loss_type not in DPO_LOSSES:
            raise ValueError(f"Unknown loss_type {self.loss_type!r}; use one of {', '.join(sorted(DPO_LOSSES))}.")
        # Each loss checks its own hyperparameters (exo_pair needs label_smoothing > 0, hinge takes none, ...):
        # call it once on a dummy pair so a bad combination fails here rather than at the first step.
        dpo_loss(self.loss_type, *torch.zeros(4, 1), beta=self.beta, label_smoothing=self.label_smoothing)
        super().__post_init__()


class DPOTrainer(PairwiseTrainer):
    """DPO (Rafailov et al., 2023) and the losses of `DPOConfig.loss_type`.

    The reference is `ref_model` when given; else, for a PEFT policy, the same model with its adapter
    disabled; else a frozen copy of the policy. With `precompute_ref_log_probs`, reference log-probs are
    computed once before training and no reference is kept.
    """

    config_class = DPOConfig
    legacy_renames = {"max_target_length": "max_completion_length"}  # TRL 0.7's name
    config_suffix = "DPO"

    def __init__(self, model: nn.Module | str, ref_model: nn.Module | str | None = None, *args: Any,
                 **kwargs: Any) -> None:
        self._policy_source = model if isinstance(model, str) else None  # a ZeRO-3 reference reloads from it
        super().__init__(model, *args, **kwargs)
        self.ref_model = self._resolve_reference(ref_model)
        self._reward_shift = (0.0, 0)  # running mean of implicit rewards and its count, for bco_pair
        if self.args.precompute_ref_log_probs:
            self.train_dataset = self._add_reference_log_probs(self.train_dataset)
            if self.eval_dataset is not None:
                self.eval_dataset = self._add_reference_log_probs(self.eval_dataset)
            self.ref_model = None

    # ----- the reference -----------------------------------------------------------------------------
    def _resolve_reference(self, ref_model: nn.Module | str | None) -> nn.Module | None:
        """The reference module, or None when the adapter-disabled policy (or the initial policy itself,
        for precomputation) serves; see models.reference.select_reference."""
        if isinstance(ref_model, str):
            ref_model = load_language_model(ref_model, **model_init_kwargs(self.args.ref_model_init_kwargs))
        ref_model = select_reference(
            self.model, ref_model, source=self._policy_source, copy_needed=not self.args.precompute_ref_log_probs,
            load=lambda source: load_language_model(source, **(self.args.model_init_kwargs or {})))
        if ref_model is None:
            return None
        if self.args.disable_dropout:
            disable_dropout(ref_model)
        # Frozen and placed for the engine: not wrapped for training, partitioned under ZeRO-3.
        return prepare_frozen_model(self.accelerator, ref_model)

    @torch.no_grad()
    def reference_log_probs(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "ref_chosen_logps" in inputs:
            return {"chosen": inputs["ref_chosen_logps"], "rejected": inputs["ref_rejected_logps"]}
        reference, context = reference_context(model, self.ref_model)
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
        return (loss, {"chosen_rewards": out.chosen_rewards}) if return_outputs else loss

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
