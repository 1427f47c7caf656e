"""TR-DPO's reference-model update (Gorbatovski et al., 2024, "Learn Your Reference Model for Real Good
Alignment"): every `ref_model_sync_steps` optimizer steps the reference becomes
alpha * policy + (1 - alpha) * reference. The config fields, for the methods that keep a reference model."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ReferenceSyncFields:
    """Fields of the configs whose method keeps a reference model (DPO, KTO, GRPO, RLOO), named as in TRL."""

    sync_ref_model: bool = field(default=False, metadata={
        "help": "Move the reference model towards the policy every ref_model_sync_steps steps (TR-DPO)."})
    ref_model_mixup_alpha: float = field(default=0.6, metadata={
        "help": "Weight of the policy in that update: ref = alpha * policy + (1 - alpha) * ref."})
    ref_model_sync_steps: int = field(default=512, metadata={
        "help": "Optimizer steps between two reference updates."})
