"""Load a dataset given by hub id, local folder, or a json/jsonl/csv/parquet file."""

from __future__ import annotations

import os
from typing import Any

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def load_any_dataset(name_or_path: str, split: str = "train", config: str | None = None) -> Any:
    """A `datasets.Dataset` for one split."""
    import datasets

    if os.path.isfile(name_or_path):
        ext = os.path.splitext(name_or_path)[1].lower()
        if ext not in _FILE_BUILDERS:
            raise ValueError(f"Cannot read {name_or_path!r}: supported files are {sorted(_FILE_BUILDERS)}.")
        return datasets.load_dataset(_FILE_BUILDERS[ext], data_files={split: name_or_path}, split=split)
    if os.path.isdir(name_or_path) and os.path.exists(os.path.join(name_or_path, "dataset_info.json")):
        loaded = datasets.load_from_disk(name_or_path)
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    return datasets.load_dataset(name_or_path, config, split=split)
