"""The dataclasses TRL 1.x training scripts parse besides the method's config and `ModelConfig`: what data
to train on (`ScriptArguments`: one dataset by name; `DatasetMixtureConfig`: several, mixed), field for field
as in TRL 1.16, so a TRL YAML config or command line parses unchanged.

    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig))
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config()

These are plain settings read by the script that parses them (e.g. `dataset_streaming` goes to its
`load_dataset` call, `ignore_bias_buffers` to its DDP set-up); `get_dataset` builds the mixture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ScriptArguments:
    """One dataset to train (and evaluate) on, by hub id or local path. A script that is also given a
    non-empty `DatasetMixtureConfig.datasets` uses the mixture and ignores these dataset fields."""

    dataset_name: str | None = field(default=None, metadata={
        "help": "Hub id or local path of the dataset (ignored when a `datasets` mixture is given)."})
    dataset_config: str | None = field(default=None, metadata={
        "help": "Configuration (subset) name of the dataset: `name` of datasets.load_dataset."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split to evaluate on."})
    dataset_streaming: bool = field(default=False, metadata={
        "help": "Load the dataset as a stream (datasets' IterableDataset) instead of downloading it whole."})
    ignore_bias_buffers: bool = field(default=False, metadata={
        "help": "Multi-process (DDP) work-around: make DDP skip the model's boolean buffers (causal masks), "
                "whose broadcast fails with 'invalid scalar type' for some models."})


@dataclass
class DatasetConfig:
    """One dataset of a mixture; the first five fields are `datasets.load_dataset` arguments.

    `fraction` is this dataset's target share of the mixture. Shares are normalised to sum to 1 and the
    mixture is made as large as possible without repeating rows: with shares w_i and sizes n_i, the mixture
    has N = min_i n_i / w_i rows and takes the first round(w_i * N) rows of dataset i.
    """

    path: str
    name: str | None = None
    data_dir: str | None = None
    data_files: str | list[str] | dict[str, str] | None = None
    split: str = "train"
    columns: list[str] | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        if self.fraction is not None and self.fraction < 0:
            raise ValueError(f"DatasetConfig(path={self.path!r}).fraction={self.fraction}: a share of the "
                             "mixture is >= 0.")


def _as_dataset_config(value: Any, index: int) -> DatasetConfig:
    if isinstance(value, DatasetConfig):
        return value
    if isinstance(value, str):  # `--datasets a b` on the command line: paths
        return DatasetConfig(path=value)
    if isinstance(value, dict):
        try:
            return DatasetConfig(**value)
        except TypeError as error:
            raise ValueError(f"datasets[{index}]: {error}. A dataset entry takes path, name, data_dir, "
                             "data_files, split, columns and fraction.") from error
    raise ValueError(f"datasets[{index}]: expected a mapping (path: ..., split: ...), got {type(value).__name__}.")


@dataclass
class DatasetMixtureConfig:
    """Several datasets concatenated into one training set (see `get_dataset`). In a YAML config:

        datasets:
          - path: json
            data_files: a.jsonl
            columns: [prompt, completion]
            fraction: 0.7
          - path: b.csv
            fraction: 0.3
        streaming: false
        test_split_size: 0.1
    """

    datasets: list[DatasetConfig] = field(default_factory=list, metadata={
        "help": "The datasets of the mixture (entries of path, name, data_dir, data_files, split, columns, "
                "fraction); on the command line, paths."})
    streaming: bool = field(default=False, metadata={"help": "Load every dataset of the mixture as a stream."})
    test_split_size: float | None = field(default=None, metadata={
        "help": "Split the mixture into train and test: a fraction (0-1) or a number of rows for test "
                "(train_test_split's test_size). None: train only."})

    def __post_init__(self) -> None:
        # YAML and parse_dict give plain mappings; the command line gives paths.
        self.datasets = [_as_dataset_config(d, i) for i, d in enumerate(self.datasets or [])]
