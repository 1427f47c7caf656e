"""TRL's `trl.trainer.dpo_trainer` module path: the DPO trainer and TRL 1.x's preference collator."""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "DPOConfig": "tether.trainers.dpo",
    "DPOTrainer": "tether.trainers.dpo",
    "DataCollatorForPreference": "tether.data.trl_collators",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
