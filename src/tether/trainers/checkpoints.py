"""Checkpoints that are never half-written, finding the latest one, and the random state a resumed run
needs to continue exactly where the interrupted one stopped.

A checkpoint is written into `checkpoint-N.partial` and renamed to `checkpoint-N` once every process has
finished writing, so a run killed mid-save leaves the previous checkpoint as the latest one; the lookup
(here, and transformers' `get_last_checkpoint`) matches `checkpoint-N` exactly and skips `.partial` folders.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

PARTIAL_SUFFIX = ".partial"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class OutputWriteError(OSError):
    """A run's checkpoint, model or log could not be written (a full disk, a read-only folder...); the message
    says what happened, and which complete checkpoint the run can resume from."""


_WHY = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
        errno.EFBIG: "a file size limit was reached", errno.EROFS: "the file system is read-only",
        errno.EACCES: "the folder is not writable", errno.EPERM: "the folder is not writable"}


_TORCH_WRITE_FAILURES = ("basic_ios", "unexpected pos", "file write failed", "PytorchStreamWriter")


def is_write_failure(error: BaseException) -> bool:
    """Whether `error` is a file system write failing: an OSError, or how torch and safetensors report one."""
    return (isinstance(error, OSError) or type(error).__name__ == "SafetensorError"
            or isinstance(error, RuntimeError) and any(s in str(error) for s in _TORCH_WRITE_FAILURES))


def write_failure_message(path: str, error: BaseException, resume_from: str | None) -> str:
    """What went wrong writing `path`, in words (torch reports a full disk as "basic_ios::clear" or "unexpected
    pos"), the free space left, and how the run continues."""
    code = getattr(error, "errno", None)
    why = _WHY.get(code) or ("a write failed, most often because the disk is full"
                             if not isinstance(error, OSError) else None)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        space = f"{shutil.disk_usage(folder).free / 2**30:.2f} GiB free there"
    except OSError:
        space = "free space unknown"
    return (f"Could not write {path}: {why + ' (' if why else ''}{type(error).__name__}: {error}{')' if why else ''}; "
            f"{space}. " + (f"The last complete checkpoint is {resume_from}: once there is room (or the folder is "
                            "writable again), resume from it with resume_from_checkpoint=True (--resume)."
                            if resume_from else "No complete checkpoint of this run exists yet."))


@contextlib.contextmanager
def reporting_write_failures(path: str, run_dir: str) -> Iterator[None]:
    """Within the block, a failing write (see `is_write_failure`) becomes an OutputWriteError about `path` that
    names the last complete checkpoint of `run_dir`; other errors pass through."""
    try:
        yield
    except Exception as error:
        if isinstance(error, OutputWriteError) or not is_write_failure(error):
            raise
        raise OutputWriteError(write_failure_message(path, error, latest_checkpoint(run_dir))) from error


@contextlib.contextmanager
def atomic_directory(path: str, *, writer: bool = True, barrier: Callable[[], None] | None = None,
                     subfolder: str | None = None) -> Iterator[str]:
    """Yield the folder `path + ".partial"` to fill; once the block ends without error, it (or its
    `subfolder`, for writers such as transformers.Trainer that add the checkpoint name themselves)
    replaces `path` in one rename. A crash or an exception leaves the previous `path` (or none) and the
    partial folder, never a half-written `path`.

    With several processes every one enters the block and may write into the folder (e.g. its own RNG
    file); only the `writer` (one process per shared filesystem) creates, cleans and renames it, and
    `barrier` (e.g. `accelerator.wait_for_everyone`) orders those steps against the other processes' writes.
    """
    wait = barrier or (lambda: None)
    partial = path + PARTIAL_SUFFIX
    previous = latest_checkpoint(os.path.dirname(path) or ".")
    try:
        if writer:
            shutil.rmtree(partial, ignore_errors=True)  # a leftover of an earlier crash at this same step
            os.makedirs(partial)
        wait()  # the folder exists (and is empty) before anyone writes into it
        yield partial
        wait()  # every process has finished writing
        if writer:
            staged = os.path.join(partial, subfolder) if subfolder else partial
            shutil.rmtree(path, ignore_errors=True)
            os.replace(staged, path)
            if subfolder:
                shutil.rmtree(partial)
    except Exception as error:  # not a kill (KeyboardInterrupt...): that leaves the partial folder, harmlessly
        if writer:
            shutil.rmtree(partial, ignore_errors=True)  # gives back the space a full disk needs
        if isinstance(error, OutputWriteError) or not is_write_failure(error):
            raise
        raise OutputWriteError(write_failure_message(path, error, previous)) from error
    wait()  # nobody reads `path` before it is complete


def checkpoint_steps(output_dir: str) -> list[int]:
    """The N of every complete `checkpoint-N` folder of `output_dir`, ascending."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(int(m[1]) for name in os.listdir(output_dir)
                  if (m := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name)))


def latest_checkpoint(output_dir: str) -> str | None:
    """The `checkpoint-N` folder of `output_dir` with the largest N, or None; partial folders are skipped."""
    steps = checkpoint_steps(output_dir)
    return os.path.join(output_dir, f"checkpoint-{steps[-1]}") if steps else None


def rotate_checkpoints(output_dir: str, limit: int | None, keep: Sequence[str | None] = ()) -> None:
    """Delete the oldest complete checkpoints until at most `limit` remain, never one of `keep` (the one
    just written, the best one). Partial folders are neither counted nor kept as "the newest", unlike
    transformers' rotation, which globs `checkpoint-*`."""
    if not limit or limit <= 0:
        return
    paths = [os.path.join(output_dir, f"checkpoint-{step}") for step in checkpoint_steps(output_dir)]
    protected = {os.path.normpath(p) for p in keep if p is not None}
    excess = len(paths) - max(limit, len(protected))
    for path in paths:
        if excess <= 0:
            break
        if os.path.normpath(path) not in protected:
            shutil.rmtree(path, ignore_errors=True)
            excess -= 1


# ----- random state -----------------------------------------------------------------------------------------
def rng_file(checkpoint: str, process_index: int) -> str:
    """Each process saves and restores its own random state (its dropout masks and samples differ)."""
    return os.path.join(checkpoint, f"rng_state_{process_index}.pth")


def save_rng_state(path: str) -> None:
    """Every global random stream a training loop may draw from: python `random`, numpy, torch on the
    CPU and on each visible CUDA device. Stored as tensors and plain Python values, so it loads with
    `torch.load(weights_only=True)`."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(state, path)


def load_rng_state(path: str) -> bool:
    """Restore what `save_rng_state` wrote; False (with a warning) when the file is missing, e.g. when
    a run resumes with more processes than it was saved with."""
    if not os.path.isfile(path):
        warnings.warn(f"No random state at {path}: the resumed run continues from fresh random streams and "
                      "will not repeat the interrupted run exactly (was it saved with fewer processes?).",
                      UserWarning, stacklevel=2)
        return False
    state = torch.load(path, weights_only=True)
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["key"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["gauss"]))
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            warnings.warn(f"{path} holds the random state of {len(state['cuda'])} CUDA devices but "
                          f"{torch.cuda.device_count()} are visible; CUDA random streams were not restored.",
                          UserWarning, stacklevel=2)
    return True
