"""Run reports: metrics as JSON lines in the output dir, and at the end PNG plots of the curves that matter
for the method plus a small HTML page with them, the config and sample generations.

- runfiles.py: the files of a run's output dir (metrics.jsonl, samples.jsonl, run_config.json)
- plots.py:    which curves each method shows (a table), drawing them (matplotlib)
- page.py:     `write_report(DIR)`: the HTML page over one run or several; `tether report DIR` calls it
- callback.py: the `transformers.Trainer` callback every tether trainer adds

Names are imported on first use: `tether report` needs neither torch nor transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RunReportCallback": "callback", "generate_samples": "callback",
    "Report": "page", "write_report": "page",
    "METRICS_FILE": "runfiles", "REPORT_FILE": "runfiles", "SAMPLES_FILE": "runfiles", "read_jsonl": "runfiles",
    "save_run_config": "runfiles", "write_jsonl": "runfiles",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
