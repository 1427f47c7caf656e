"""`get_dataset`: load the datasets of a `DatasetMixtureConfig` and mix them into one training set
(plus a test split when asked), as TRL 1.x scripts do with `--datasets` / a `datasets:` YAML section."""

from __future__ import annotations

import logging
from typing import Any

from .arguments import DatasetConfig, DatasetMixtureConfig

logger = logging.getLogger(__name__)


def _load(config: DatasetConfig, streaming: bool) -> Any:
    import datasets

    dataset = datasets.load_dataset(path=config.path, name=config.name, data_dir=config.data_dir,
                                    data_files=config.data_files, split=config.split, streaming=streaming)
    if config.columns is not None:
        missing = [c for c in config.columns if c not in (dataset.column_names or [])]
        if missing:
            raise ValueError(f"DatasetConfig(path={config.path!r}).columns: {missing} not in the dataset's columns "
                             f"{dataset.column_names}.")
        dataset = dataset.select_columns(config.columns)
    return dataset


def mixture_row_counts(sizes: list[int], fractions: list[float]) -> list[int]:
    """Rows taken from each dataset for target shares `fractions` (normalised to sum to 1): the largest
    mixture that repeats no row has N = min over w_i > 0 of n_i / w_i rows, of which round(w_i * N) come
    from dataset i (so the dataset that binds is taken whole)."""
    total_share = sum(fractions)
    if total_share <= 0:
        raise ValueError(f"DatasetConfig.fraction: the shares {fractions} sum to {total_share}; at least one "
                         "dataset needs a positive share.")
    weights = [f / total_share for f in fractions]
    size = min(n / w for n, w in zip(sizes, weights) if w > 0)
    return [min(n, round(w * size)) for n, w in zip(sizes, weights)]


def _aligned(loaded: list[Any], configs: list[DatasetConfig]) -> list[Any]:
    """The datasets with the first one's feature types, so that the same columns read by different builders
    concatenate (e.g. json gives `large_string` where csv gives `string`)."""
    reference = loaded[0].features
    aligned = [loaded[0]]
    for dataset, config in zip(loaded[1:], configs[1:]):
        features = dataset.features
        if reference is not None and features is not None and features != reference:
            if set(features) != set(reference):
                raise ValueError(f"The mixture's datasets have different columns: {configs[0].path} has "
                                 f"{sorted(reference)}, {config.path} has {sorted(features)}. Select the same "
                                 "`columns` on each DatasetConfig.")
            try:
                dataset = dataset.cast(reference)
            except (ValueError, TypeError) as error:
                raise ValueError(f"The mixture's datasets cannot be concatenated: {config.path} has column types "
                                 f"{features}, {configs[0].path} has {reference} ({error}).") from error
        aligned.append(dataset)
    return aligned


def get_dataset(mixture_config: DatasetMixtureConfig) -> Any:
    """The mixture's datasets, loaded (`datasets.load_dataset` with each entry's path, name, data_dir,
    data_files, split, and the mixture's `streaming`), cut to their `columns`, sized by their `fraction`s
    (all set or none; see `mixture_row_counts`), and concatenated in order.

    Returns a `datasets.DatasetDict` with "train" (and "test" when `test_split_size` is set:
    `train_test_split(test_size=test_split_size)`, shuffled); with streaming, an `IterableDatasetDict`
    with "train".
    """
    import datasets

    configs = mixture_config.datasets
    if not configs:
        raise ValueError("No datasets were loaded from the mixture configuration: DatasetMixtureConfig.datasets "
                         "is empty. Add entries (path: ..., split: ...) or use ScriptArguments.dataset_name.")
    fractions = [c.fraction for c in configs]
    if any(f is not None for f in fractions):
        if any(f is None for f in fractions):
            raise ValueError("DatasetConfig.fraction must be set for either all datasets in the mixture or none "
                             f"of them; got {fractions}.")
        if mixture_config.streaming:
            raise ValueError("DatasetConfig.fraction is not supported with streaming datasets (a stream has no "
                             "length to take a share of). Set streaming: false or drop the fractions.")
    if mixture_config.streaming and mixture_config.test_split_size is not None:
        raise ValueError("DatasetMixtureConfig.test_split_size is not supported with streaming=True (a stream "
                         "cannot be split at random). Drop one of them.")

    loaded = []
    for config in configs:
        logger.info("Loading %s (name=%s, split=%s) for the mixture", config.path, config.name, config.split)
        loaded.append(_load(config, mixture_config.streaming))
    if fractions[0] is not None:
        counts = mixture_row_counts([len(d) for d in loaded], fractions)
        loaded = [d.select(range(count)) for d, count in zip(loaded, counts)]

    mixed = datasets.concatenate_datasets(_aligned(loaded, configs))
    if mixture_config.streaming:
        return datasets.IterableDatasetDict({"train": mixed})
    logger.info("Dataset mixture: %d rows", len(mixed))
    test_size = mixture_config.test_split_size
    if test_size is not None:
        # `--test_split_size 2` arrives as 2.0 (the field is a float), which train_test_split would reject
        # as a fraction > 1; a whole number >= 1 is a row count.
        if isinstance(test_size, float) and test_size >= 1 and test_size.is_integer():
            test_size = int(test_size)
        return mixed.train_test_split(test_size=test_size)
    return datasets.DatasetDict({"train": mixed})
