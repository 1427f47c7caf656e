"""The files a training run leaves in its output dir for its report, and reading/writing them.

    metrics.jsonl      every log (train and eval), one JSON object per line, with its `step`
    samples.jsonl      sample generations: `prompt`, `completion`, and `step`/`reward` where known
    run_config.json    the method and the run's config (`tether_config.yaml` of a CLI run is shown instead)
    report.html        the report page; its plots are PNGs under plots/
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
RUN_CONFIG_FILE = "run_config.json"
CLI_CONFIG_FILE = "tether_config.yaml"  # written by `tether <method>`; the same name as cli.RESOLVED_CONFIG_NAME
REPORT_FILE = "report.html"
PLOTS_DIR = "plots"
RUNS_FILE = "report_runs.json"  # a report over several runs: their titles and folders, so a rebuild matches


def _json_value(value: Any) -> Any:
    """json.dumps fallback: numbers from numpy/torch scalars, text for anything else."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]], append: bool = True) -> None:
    """Write `rows` as JSON lines, appended to `path` or replacing it; creates the folder. A failing write (a full
    disk, a read-only folder) is an OutputWriteError saying so and naming the run's last complete checkpoint."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a" if append else "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, default=_json_value) + "\n")
    except OSError as error:
        from ..trainers.checkpoints import OutputWriteError, latest_checkpoint, write_failure_message

        raise OutputWriteError(write_failure_message(str(path), error, latest_checkpoint(str(Path(path).parent)))
                               ) from error


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file ([] when it does not exist). A last line cut short by a killed run
    is skipped; a broken line elsewhere is an error that names the file and line."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):
                break
            raise ValueError(f"{path}, line {number}: not JSON ({error}). Fix or delete that line.") from error
    return rows


def save_run_config(directory: str | os.PathLike, method: str | None, config: dict[str, Any]) -> None:
    """Record the run's method (which curves its report shows) and its config for the report page."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    with open(Path(directory) / RUN_CONFIG_FILE, "w", encoding="utf-8") as f:
        json.dump({"method": method, "config": config}, f, indent=2, default=_json_value)


def read_run_config(directory: str | os.PathLike) -> tuple[str | None, str | None, str]:
    """(method or None, the config file's name or None, the config as text) of a run's output dir."""
    directory = Path(directory)
    method, name, text = None, None, ""
    if (directory / RUN_CONFIG_FILE).is_file():
        with open(directory / RUN_CONFIG_FILE, encoding="utf-8") as f:
            saved = json.load(f)
        method, name = saved.get("method"), RUN_CONFIG_FILE
        text = json.dumps(saved.get("config"), indent=2, sort_keys=True)
    if (directory / CLI_CONFIG_FILE).is_file():  # also names the model and data set, so it is the better one
        name, text = CLI_CONFIG_FILE, (directory / CLI_CONFIG_FILE).read_text(encoding="utf-8")
    return method, name, text
