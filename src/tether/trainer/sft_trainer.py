"""TRL's `trl.trainer.sft_trainer` module path: the SFT trainer and TRL 1.x's language modeling collator."""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "SFTConfig": "tether.trainers.sft",
    "SFTTrainer": "tether.trainers.sft",
    "DataCollatorForLanguageModeling": "tether.data.trl_collators",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
