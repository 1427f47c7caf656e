"""Run a script as `__main__`, then summarise some of its globals to a JSON file.

Usage: python runner.py DUMP_FILE NAME,NAME,... SCRIPT [ARGS...]. The script sees sys.argv = [SCRIPT, ARGS...],
exactly as `python SCRIPT ARGS...` would give it; an exception in it ends this process with its traceback.
"""

from __future__ import annotations

import json
import math
import os
import runpy
import sys


def summarise(value, depth: int = 0):
    """A JSON-able summary: numbers as floats (NaN/inf kept as strings), tensors by shape and finiteness,
    mappings by key, sequences by length (and their first item), frames by shape and columns."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if isinstance(value, bool | int | float):
        number = float(value)
        return number if math.isfinite(number) else str(number)
    if isinstance(value, str):
        return value[:200]
    if torch is not None and isinstance(value, torch.Tensor):
        if value.numel() == 1:
            return summarise(value.item())
        return {"tensor_shape": list(value.shape), "all_finite": bool(torch.isfinite(value.float()).all())}
    if hasattr(value, "shape") and hasattr(value, "dtype") and hasattr(value, "tolist"):  # numpy
        if getattr(value, "size", 2) == 1:
            return summarise(value.item())
        return {"array_shape": list(value.shape)}
    if hasattr(value, "columns") and hasattr(value, "shape"):  # pandas DataFrame
        return {"frame_shape": list(value.shape), "columns": [str(c) for c in value.columns]}
    if isinstance(value, dict):
        if depth > 1:
            return {"keys": sorted(map(str, value))}
        return {str(k): summarise(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return {"len": len(value), "first": summarise(value[0], depth + 1) if value else None}
    return {"type": type(value).__name__}


def main() -> None:
    dump_file, names, script, *args = sys.argv[1:]
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python SCRIPT` sets it
    namespace = runpy.run_path(script, run_name="__main__")
    wanted = [n for n in names.split(",") if n]
    summary = {name: summarise(namespace[name]) for name in wanted if name in namespace}
    summary["_missing"] = [name for name in wanted if name not in namespace]
    with open(dump_file, "w") as handle:
        json.dump(summary, handle, indent=1)


if __name__ == "__main__":
    main()
