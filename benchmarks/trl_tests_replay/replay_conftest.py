"""conftest.py of the staged TRL test folder (copied there by run.py as tests/conftest.py).

Identical for the TRL run and the tether run. It
- routes ``datasets.load_dataset("trl-internal-testing/<name>", config, split=..., streaming=...)`` to the local
  parquet stand-ins (models need no patch: HF_HOME points at a hub-cache layout and HF_HUB_OFFLINE=1);
- forces ``use_cpu=True`` on every TrainingArguments (TRL's own conftest does the same for its configs on a
  machine without an accelerator; configs default to bf16, which transformers refuses on CPU without it);
- skips, with a ``replay:`` reason, tests that are out of scope: vision / VLM, ids with no stand-in, network;
- keeps only the tests listed in REPLAY_SELECT (one node id a line) when set, else at most REPLAY_MAX tests
  chosen by a stable hash of their node id (a reproducible sample);
- stops a test after REPLAY_TIMEOUT seconds (SIGALRM; pytest-timeout is not installed here);
- appends one JSON line per test phase to REPLAY_RESULTS: node id, phase, outcome, first error line, and the
  innermost frame in tether's or TRL's source.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import signal
import traceback
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and the machine is shared

_MANIFEST = json.loads(Path(os.environ["REPLAY_MANIFEST"]).read_text())
_KNOWN_IDS = set(_MANIFEST["models"]) | set(_MANIFEST["datasets"])
_DATASETS_DIR = Path(os.environ["REPLAY_DATASETS_DIR"])
_RESULTS = os.environ.get("REPLAY_RESULTS")
_TIMEOUT = int(os.environ.get("REPLAY_TIMEOUT", "300"))

VISION_MARKERS = ("ForConditionalGeneration", "zen-image", "zen-multi-image", "AutoProcessor", "pixel_values",
                  "ImageTextToText", "PIL.", "Image.new")
NETWORK_IDS = ("stanfordnlp/", "openai/", "Qwen/", "meta-llama/", "HuggingFaceTB/")
_ID_RE = re.compile(r"""["']((?:trl-internal-testing|stanfordnlp|openai|Qwen|meta-llama|HuggingFaceTB)/[\w.\-]+)["']""")


# ---------------------------------------------------------------- datasets.load_dataset -> local parquet
def _install_dataset_route() -> None:
    import datasets

    original = datasets.load_dataset

    def load_dataset(path, name=None, *args, split=None, streaming=False, **kwargs):
        if isinstance(path, str) and path.startswith("trl-internal-testing/"):
            if path not in _KNOWN_IDS:
                raise FileNotFoundError(f"replay: no stand-in for dataset {path}")
            folder = _DATASETS_DIR / path / (name or "default")
            if not folder.is_dir():
                raise FileNotFoundError(f"replay: no config {name!r} in the stand-in of {path}")
            files = {p.stem: str(p) for p in sorted(folder.glob("*.parquet"))}
            return original("parquet", data_files=files, split=split, streaming=streaming, **kwargs)
        return original(path, name, *args, split=split, streaming=streaming, **kwargs)

    datasets.load_dataset = load_dataset


_install_dataset_route()


# ---------------------------------------------------------------- use_cpu on CPU-only machines
def _force_cpu() -> None:
    import transformers

    if torch.cuda.is_available():
        return
    original = transformers.TrainingArguments.__post_init__

    def __post_init__(self, *args, **kwargs):
        self.use_cpu = True
        return original(self, *args, **kwargs)

    transformers.TrainingArguments.__post_init__ = __post_init__


_force_cpu()


# ---------------------------------------------------------------- scope and selection
def _body_source(function) -> str:
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return ""
    match = re.search(r"^\s*(async\s+)?def ", source, re.M)  # drop decorators (parametrize lists)
    return source[match.start():] if match else source


def _out_of_scope(item) -> str | None:
    for mark in item.iter_markers("skipif"):
        if "vision" in str(mark.kwargs.get("reason", "")):
            return "replay: vision (require_vision)"
    body = _body_source(getattr(item, "function", None))
    params = item.nodeid.split("[", 1)[1] if "[" in item.nodeid else ""
    for marker in VISION_MARKERS:
        if marker in params or marker in body:
            return f"replay: vision ({marker})"
    for ident in set(_ID_RE.findall(body)) | {p for p in re.findall(r"[\w.\-]+/[\w.\-]+", params)}:
        if ident.startswith("trl-internal-testing/"):
            if ident not in _KNOWN_IDS:
                return f"replay: no stand-in for {ident}"
        elif ident.startswith(NETWORK_IDS):
            return f"replay: network ({ident})"
    return None


def _skips_itself(item) -> bool:
    if any(True for _ in item.iter_markers("skip")):
        return True
    return any(mark.args and mark.args[0] is True for mark in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    select_file = os.environ.get("REPLAY_SELECT")
    selected = set(Path(select_file).read_text().split("\n")) if select_file else None
    max_tests = int(os.environ.get("REPLAY_MAX", "0"))
    keep, drop, runnable = [], [], []
    for item in items:
        if selected is not None:
            (keep if item.nodeid in selected else drop).append(item)
            continue
        reason = _out_of_scope(item)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
            keep.append(item)
        elif _skips_itself(item):
            keep.append(item)  # GPU-only and the like: kept (they report their own skip), not sampled
        else:
            runnable.append(item)
    if selected is None:
        if max_tests and len(runnable) > max_tests:
            runnable.sort(key=lambda it: hashlib.sha1(it.nodeid.encode()).hexdigest())
            drop.extend(runnable[max_tests:])
            runnable = runnable[:max_tests]
        keep.extend(runnable)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = [it for it in items if it in set(keep)]


# ---------------------------------------------------------------- fixtures of plugins not installed here
@pytest.fixture()
def lazy_shared_datadir(tmp_path, request):
    """pytest-datadir's fixture: a temporary copy of the `data` folder next to the test module."""
    import shutil

    source = Path(request.fspath).parent / "data"
    target = tmp_path / "shared_data"
    shutil.copytree(source, target)
    return target


# ---------------------------------------------------------------- per-test timeout
class ReplayTimeout(Exception):
    pass


@pytest.fixture(autouse=True)
def _replay_timeout():
    def on_alarm(signum, frame):
        raise ReplayTimeout(f"test exceeded {_TIMEOUT}s (replay timeout)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(_TIMEOUT)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- outcome recording
_SRC_RE = re.compile(r"/(tether|trl)/")


def _first_line(exc: BaseException) -> str:
    """`Type: first line`; for pytest.raises/warns mismatches, which say only "did not match" on their first line,
    the expected pattern and actual message lines are kept too."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines()]
    text = lines[0] if lines else ""
    if text.startswith(("Regex pattern did not match", "DID NOT WARN")) or text.endswith(":"):
        text = " ".join(lines[:3])
    return f"{type(exc).__name__}: {text}"[:400]


def _where(tb) -> str:
    """Innermost frame in tether's or TRL's own source, else in the test module, else the innermost frame."""
    frames = traceback.extract_tb(tb)
    lib = [f for f in frames if _SRC_RE.search(f.filename) and "/tests/" not in f.filename]
    own = [f for f in frames if "/tests/test_" in f.filename]
    frame = (lib or own or frames or [None])[-1]
    if frame is None:
        return ""
    path = frame.filename
    for anchor in ("/tether/", "/trl/", "/tests/"):
        if anchor in path:
            path = anchor.strip("/") + "/" + path.split(anchor, 1)[1]
            break
    return f"{path}:{frame.lineno} in {frame.name}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not _RESULTS:
        return
    record = {"nodeid": item.nodeid, "when": call.when, "outcome": report.outcome,
              "duration": round(call.duration, 2)}
    if hasattr(report, "wasxfail"):
        record["xfail"] = True
    if report.skipped and isinstance(report.longrepr, tuple):
        record["reason"] = str(report.longrepr[2])
    elif report.failed and call.excinfo is not None:
        record["error"] = _first_line(call.excinfo.value)
        record["where"] = _where(call.excinfo.tb)
    with open(_RESULTS, "a") as fh:
        fh.write(json.dumps(record) + "\n")
    if call.when == "call" and call.excinfo is not None:  # release model references held by the traceback
        traceback.clear_frames(call.excinfo.tb)
