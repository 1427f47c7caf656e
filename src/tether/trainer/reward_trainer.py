"""TRL's `trl.trainer.reward_trainer` module path: the reward trainer and TRL 1.x's reward collator (named
DataCollatorForPreference there, like the DPO one of trl.trainer.dpo_trainer)."""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "RewardConfig": "tether.trainers.reward",
    "RewardTrainer": "tether.trainers.reward",
    "DataCollatorForPreference": "tether.data.trl_collators:RewardDataCollatorForPreference",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
