"""TRL's `trl.experimental.distillation` (the path DistillationTrainer had before TRL made it top-level)."""

from __future__ import annotations

from tether._lazy import lazy_exports

_EXPORTS = {
    "DistillationConfig": "tether.trainers.gkd_config",
    "DistillationTrainer": "tether.trainers.gkd",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
