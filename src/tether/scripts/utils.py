"""TRL's `trl.scripts.utils` names, pointing at tether's implementations in this package."""

from __future__ import annotations

from .arguments import DatasetConfig, DatasetMixtureConfig, ScriptArguments
from .mixture import get_dataset
from .parser import TrlParser, init_zero_verbose

__all__ = ["DatasetConfig", "DatasetMixtureConfig", "ScriptArguments", "TrlParser", "get_dataset", "init_zero_verbose"]
