"""TRL's `trl.trainer.distillation_trainer` module path."""

from __future__ import annotations

from tether._lazy import lazy_exports

_EXPORTS = {
    "DistillationTrainer": "tether.trainers.gkd",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
