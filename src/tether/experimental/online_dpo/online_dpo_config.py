"""TRL's `trl.experimental.online_dpo.online_dpo_config` module path."""

from __future__ import annotations

from tether._lazy import lazy_exports

_EXPORTS = {
    "OnlineDPOConfig": "tether.trainers.online_dpo",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
