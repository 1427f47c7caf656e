"""TRL 0.x's `trl.trainer.judges` module path: the same names as `tether.experimental.judges` (TRL 1.0's path)."""

from __future__ import annotations

from tether._lazy import lazy_exports
from tether.experimental.judges import _EXPORTS

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
