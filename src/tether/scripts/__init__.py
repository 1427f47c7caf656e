"""What TRL 1.x training scripts import besides trainers and configs (TRL's `trl.scripts`): the script
arguments, dataset mixtures and `get_dataset`, and `TrlParser` (dataclass flags + a `--config` YAML file).

    from tether import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser, get_dataset

    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig))
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config()
    dataset = get_dataset(dataset_args) if dataset_args.datasets else load_dataset(script_args.dataset_name)
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "DatasetConfig": "tether.scripts.arguments",
    "DatasetMixtureConfig": "tether.scripts.arguments",
    "ScriptArguments": "tether.scripts.arguments",
    "get_dataset": "tether.scripts.mixture",
    "TrlParser": "tether.scripts.parser",
    "init_zero_verbose": "tether.scripts.parser",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
