"""TRL's `trl.experimental.gkd`: GKDConfig and GKDTrainer (tether.trainers.gkd)."""

from __future__ import annotations

from tether._lazy import lazy_exports

_EXPORTS = {
    "GKDConfig": "tether.trainers.gkd_config",
    "GKDTrainer": "tether.trainers.gkd",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
