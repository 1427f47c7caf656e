"""TRL 0.7's `trl.extras` names, pointing at tether's implementations (imported on first use)."""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {"BestOfNSampler": "tether.rollout.best_of_n"}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
