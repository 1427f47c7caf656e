"""TRL 0.7's `trl.trainer.ddpo_trainer` module path (DDPOTrainer needs diffusers: `pip install "tether[diffusion]"`)."""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {"DDPOTrainer": "tether.trainers.ddpo"}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
