"""Checkpoint folders that are never half-written, and finding the latest one to resume from."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """Yield a temporary folder to fill; on success it replaces `path` in one rename, so a crash leaves
    the previous checkpoint (or none), never a partial one."""
    partial = path + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    yield partial
    shutil.rmtree(path, ignore_errors=True)
    os.replace(partial, path)


def latest_checkpoint(output_dir: str) -> str | None:
    """The `checkpoint-N` folder of `output_dir` with the largest N, or None."""
    if not os.path.isdir(output_dir):
        return None
    steps = [int(m[1]) for name in os.listdir(output_dir) if (m := _CHECKPOINT.match(name))]
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None
