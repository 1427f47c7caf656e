"""TRL 0.7's `trl.trainer.ddpo_config` module path."""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {"DDPOConfig": "tether.trainers.ddpo_config"}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
