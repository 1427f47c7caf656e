"""Writing a step's statistics to accelerate's experiment trackers (TensorBoard, W&B, ...).

accelerate's `Accelerator.log` takes scalars and strings only; PPO's stats also hold distributions
(per-sequence KL, advantages, ratios, rewards) and a game log of texts with their rewards. Here each
kind goes where the tracker can show it: scalars as scalars, arrays as histograms, the game log as a
table (W&B) or a markdown table (TensorBoard's text tab). Trackers of other kinds get the scalars.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from accelerate import Accelerator

GAME_LOG = "game_log"


def _markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def split_logs(logs: dict[str, Any]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """(scalars, arrays): numbers and 0-d arrays as floats; arrays with one or more entries as float arrays."""
    scalars, arrays = {}, {}
    for key, value in logs.items():
        if isinstance(value, (bool, int, float, np.floating, np.integer)) or np.ndim(value) == 0:
            try:
                scalars[key] = float(value)
            except (TypeError, ValueError):
                continue
        else:
            array = np.asarray(value, dtype=np.float64).reshape(-1)
            if array.size:
                arrays[key] = array
    return scalars, arrays


def log_to_trackers(accelerator: Accelerator, logs: dict[str, Any],
                    table: tuple[Sequence[str], Sequence[Sequence[Any]]] | None, step: int) -> None:
    """Write `logs` (scalars and arrays) and an optional game-log `table` (columns, rows) to every tracker of
    `accelerator` at `step`. Call on the main process."""
    scalars, arrays = split_logs(logs)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            writer = tracker.writer
            for key, value in scalars.items():
                writer.add_scalar(key, value, global_step=step)
            for key, value in arrays.items():
                if np.isfinite(value).all():
                    writer.add_histogram(key, value, global_step=step)
            if table is not None:
                writer.add_text(GAME_LOG, _markdown_table(*table), global_step=step)
            writer.flush()
        elif tracker.name == "wandb":
            import wandb

            row: dict[str, Any] = dict(scalars)
            row.update({key: wandb.Histogram(value) for key, value in arrays.items()})
            if table is not None:
                row[GAME_LOG] = wandb.Table(columns=list(table[0]), rows=[list(r) for r in table[1]])
            tracker.run.log(row, step=step)
        else:
            tracker.log(scalars, step=step)
