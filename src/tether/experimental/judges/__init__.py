"""TRL 1.0's `trl.experimental.judges`: the judge base classes and AllTrueJudge (tether.rollout.judges). TRL's
PairRMJudge, HfPairwiseJudge and OpenAIPairwiseJudge call outside services and are not provided."""

from __future__ import annotations

from tether._lazy import lazy_exports

_EXPORTS = {
    "BaseJudge": "tether.rollout.judges",
    "BaseBinaryJudge": "tether.rollout.judges",
    "BasePairwiseJudge": "tether.rollout.judges",
    "BaseRankJudge": "tether.rollout.judges",
    "AllTrueJudge": "tether.rollout.judges",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
