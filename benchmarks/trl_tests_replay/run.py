"""Replay TRL's own trainer tests against TRL 1.16 and against tether, offline, and compare.

    python benchmarks/trl_tests_replay/run.py                       # sft dpo reward kto grpo rloo, full
    python benchmarks/trl_tests_replay/run.py --files sft dpo --max-tests 60
    python benchmarks/trl_tests_replay/run.py --files grpo --reuse-trl   # re-run tether only

Steps, per test file of TRL's git mirror (HEAD):
1. build the stand-ins once (build_standins.py: tiny models in a hub-cache layout, zen & co. as parquet);
2. stage the file twice under _build/, with its trl imports made per-name (rewrite_imports.py) and pointing
   at trl (TRL run) or at tether (tether run), each with replay_conftest.py as its conftest;
3. run it with TRL 1.16's interpreter; out-of-scope tests (vision, no stand-in, network) are skipped by the
   conftest and not counted; GPU-only tests skip themselves;
4. run the tests that passed on TRL with tether's interpreter;
5. print, per file, the counts and tether's failures grouped by their first error line, and write
   RESULTS.md (summary table + causes) next to this script. Raw per-test records: _build/results/.

Everything generated goes under benchmarks/trl_tests_replay/_build/ (git-ignored by the .gitignore here).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD = HERE / "_build"
RESULTS_DIR = BUILD / "results"
TRL_MIRROR = Path("/work/.mirror/huggingface+trl/repo")
TRL_PYTHON = "/work/.venv-trl116/bin/python"
TETHER_PYTHON = sys.executable
ALL_FILES = ["sft", "dpo", "reward", "kto", "grpo", "rloo"]
SUPPORT = ["tests/__init__.py", "tests/testing_utils.py", "tests/testing_constants.py", "tests/data"]

sys.path.insert(0, str(HERE))
from rewrite_imports import rewrite  # noqa: E402


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(TRL_MIRROR), *args], check=True, capture_output=True, text=True).stdout


def ensure_standins() -> None:
    if not (BUILD / "standins.json").exists():
        subprocess.run([TETHER_PYTHON, str(HERE / "build_standins.py"), "--out", str(BUILD)], check=True)


def stage(files: list[str]) -> tuple[Path, Path]:
    """Two copies of TRL's test folder: _build/stage_trl (verbatim) and _build/stage_tether (rewritten)."""
    src = BUILD / "trl_tests"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    paths = SUPPORT + [f"tests/test_{f}_trainer.py" for f in files]
    archive = subprocess.run(["git", "-C", str(TRL_MIRROR), "archive", "HEAD", *paths], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    (src / "REVISION").write_text(_git("log", "-1", "--format=%H %cd"))
    stages = []
    for mode in ("trl", "tether"):
        dst = BUILD / f"stage_{mode}"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
        shutil.copy(HERE / "replay_conftest.py", dst / "tests" / "conftest.py")
        (dst / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
        shutil.copy(HERE / "replay_compat.py", dst / "tests" / "_replay_compat.py")
        for py in [dst / "tests" / "testing_utils.py", *(dst / "tests").glob("test_*_trainer.py")]:
            py.write_text(rewrite(py.read_text(), package=mode))
        stages.append(dst)
    return stages[0], stages[1]


def run_pytest(mode: str, stage_dir: Path, name: str, select: list[str] | None, args) -> Path:
    out = RESULTS_DIR / f"{name}.{mode}.jsonl"
    out.unlink(missing_ok=True)
    env = dict(os.environ)
    env.update(
        HF_HOME=str(BUILD / "hf_home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_CACHE=str(BUILD / "hf_datasets_cache"), REPLAY_MANIFEST=str(BUILD / "standins.json"),
        REPLAY_DATASETS_DIR=str(BUILD / "datasets"), REPLAY_RESULTS=str(out),
        REPLAY_STUBS=str(RESULTS_DIR / f"{name}.{mode}.stubs.jsonl"), REPLAY_TIMEOUT=str(args.timeout),
        REPLAY_MAX=str(args.max_tests or 0), WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONDONTWRITEBYTECODE="1",
    )
    env.pop("REPLAY_SELECT", None)
    if select is not None:
        sel = RESULTS_DIR / f"{name}.select.txt"
        sel.write_text("\n".join(select))
        env["REPLAY_SELECT"] = str(sel)
    python = TRL_PYTHON if mode == "trl" else TETHER_PYTHON
    cmd = ["timeout", str(args.file_timeout), "nice", "-n", "10", python, "-m", "pytest", "-q", "-rN",
           "--tb=no", "-W", "ignore", f"tests/test_{name}_trainer.py"]
    if args.k:
        cmd += ["-k", args.k]
    start = time.time()
    proc = subprocess.run(cmd, cwd=stage_dir, env=env, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    print(f"  [{mode}] {name}: rc={proc.returncode} {time.time() - start:.0f}s  {tail[0][:150]}", flush=True)
    if proc.returncode not in (0, 1, 5):  # 5: nothing collected
        (RESULTS_DIR / f"{name}.{mode}.log").write_text(proc.stdout[-20000:] + proc.stderr[-20000:])
    return out


def load(path: Path) -> dict[str, dict]:
    """node id -> final outcome ('passed' | 'failed' | 'skipped') with the first failure's error and where."""
    tests: dict[str, dict] = {}
    if not path.exists():
        return tests
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        t = tests.setdefault(rec["nodeid"], {"outcome": "passed", "duration": 0.0})
        t["duration"] += rec.get("duration", 0.0)
        if rec["outcome"] == "failed" and t["outcome"] != "failed":
            t.update(outcome="failed", error=rec.get("error", ""), where=rec.get("where", ""), when=rec["when"])
        elif rec["outcome"] == "skipped" and t["outcome"] == "passed":
            t.update(outcome="skipped", reason=rec.get("reason", ""))
        if rec.get("xfail"):
            t["outcome"] = "skipped" if t["outcome"] != "failed" else "failed"
            t.setdefault("reason", "xfail")
    return tests


_NORMALIZE = [
    (re.compile(r"/tmp/[^\s'\"]+"), "<tmp>"),
    (re.compile(r"0x[0-9a-f]+"), "0x…"),
    (re.compile(r"tensor\(\[.*"), "tensor([…"),
    (re.compile(r"(?<![\w.])-?\d+(\.\d+)?(e-?\d+)?(?![\w])"), "N"),
]


def cause_of(error: str) -> str:
    """The first error line with paths, addresses and numbers blanked, so equal causes group together."""
    text = error
    for pattern, repl in _NORMALIZE:
        text = pattern.sub(repl, text)
    return text[:220]


def _skip_kind(reason: str) -> str:
    """'vision', 'no stand-in', 'network' (out of scope here), or 'own marker' (GPU-only, extras, xfail)."""
    reason = reason.removeprefix("Skipped: ")
    if reason.startswith("replay: "):
        return reason.removeprefix("replay: ").split(" (")[0].split(" for ")[0]
    return "own marker (GPU, extras)"


def summarize(names: list[str], write: bool, note: str) -> None:
    rows, all_failures = [], []
    for name in names:
        trl = load(RESULTS_DIR / f"{name}.trl.jsonl")
        tether = load(RESULTS_DIR / f"{name}.tether.jsonl")
        if not trl:
            continue
        passed_trl = sorted(k for k, v in trl.items() if v["outcome"] == "passed")
        failed_trl = sum(v["outcome"] == "failed" for v in trl.values())
        skipped = collections.Counter(
            _skip_kind(v.get("reason", "")) for v in trl.values() if v["outcome"] == "skipped"
        )
        passed_both = [k for k in passed_trl if tether.get(k, {}).get("outcome") == "passed"]
        failures = [(k, tether.get(k, {"error": "not run (tether run stopped before it)", "where": ""}))
                    for k in passed_trl if tether.get(k, {}).get("outcome") != "passed"]
        for k, v in failures:
            all_failures.append((name, k, v))
        rows.append((name, len(trl), failed_trl, dict(skipped), len(passed_trl), len(passed_both)))
        print(f"\n== test_{name}_trainer.py: collected {len(trl)}, passing on TRL 1.16: {len(passed_trl)}, "
              f"of those passing on tether: {len(passed_both)}")
        groups = collections.defaultdict(list)
        for k, v in failures:
            groups[cause_of(v.get("error") or v.get("reason", "skipped"))].append((k, v))
        for cause, members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            print(f"  {len(members):3d}  {cause}\n        e.g. {members[0][0]}  [{members[0][1].get('where', '')}]")
    if write:
        write_results(rows, all_failures, note)


def write_results(rows, failures, note: str) -> None:
    revision = (BUILD / "trl_tests" / "REVISION").read_text().strip()
    lines = [
        "# TRL's trainer tests replayed against tether",
        "",
        f"Generated by `python benchmarks/trl_tests_replay/run.py` on {time.strftime('%Y-%m-%d %H:%M')}. "
        f"Tests: TRL git mirror HEAD ({revision}); reference: TRL 1.16 (/work/.venv-trl116). Offline stand-ins "
        "(tiny models, zen datasets) from build_standins.py. Only tests passing on TRL 1.16 with the stand-ins "
        "are compared; vision/VLM, network and ids without a stand-in are skipped and not counted.",
        "",
    ]
    if note:
        lines += [note, ""]
    lines += ["| file | collected | failing on TRL | skipped (why) | passing on TRL | passing on tether | share |",
              "|---|---:|---:|---|---:|---:|---:|"]
    tot = [0, 0, 0, 0]
    for name, n, f_trl, skipped, p_trl, p_both in rows:
        share = f"{100 * p_both / p_trl:.0f}%" if p_trl else "-"
        why = ", ".join(f"{v} {k}" for k, v in sorted(skipped.items()))
        lines.append(f"| test_{name}_trainer.py | {n} | {f_trl} | {why} | {p_trl} | {p_both} | {share} |")
        for i, x in enumerate((n, f_trl, p_trl, p_both)):
            tot[i] += x
    if tot[2]:
        lines.append(f"| **total** | {tot[0]} | {tot[1]} | | {tot[2]} | {tot[3]} | {100 * tot[3] / tot[2]:.0f}% |")
    groups = collections.defaultdict(list)
    for name, k, v in failures:
        groups[cause_of(v.get("error") or v.get("reason", "skipped"))].append((name, k, v))
    lines += ["", "## Why tests that pass on TRL fail on tether (ranked by tests broken)", "",
              "| tests | first error line (normalized) | files | example test | where |", "|---:|---|---|---|---|"]
    for cause, members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        files = ",".join(sorted({m[0] for m in members}))
        name, k, v = members[0]
        cell = cause.replace("|", "\\|")
        lines.append(f"| {len(members)} | `{cell}` | {files} | `{k.split('::', 1)[1]}` | {v.get('where', '')} |")
    (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print(f"\nwrote {HERE / 'RESULTS.md'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", nargs="+", default=ALL_FILES, choices=ALL_FILES)
    parser.add_argument("--max-tests", type=int, default=0,
                        help="per file, run at most this many in-scope tests (a stable hash-ordered sample)")
    parser.add_argument("-k", default=None, help="pytest -k expression, passed to both runs")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per test")
    parser.add_argument("--file-timeout", type=int, default=3600, help="seconds per pytest run")
    parser.add_argument("--reuse-trl", action="store_true", help="keep the TRL results of a previous run")
    parser.add_argument("--summary-only", action="store_true", help="only summarize the stored results")
    parser.add_argument("--note", default="", help="a line added to RESULTS.md (e.g. how the run was sampled)")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite RESULTS.md")
    args = parser.parse_args()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    if not args.summary_only:
        ensure_standins()
        trl_stage, tether_stage = stage(args.files)
        for name in args.files:
            if not (args.reuse_trl and (RESULTS_DIR / f"{name}.trl.jsonl").exists()):
                run_pytest("trl", trl_stage, name, None, args)
            passed = [k for k, v in load(RESULTS_DIR / f"{name}.trl.jsonl").items() if v["outcome"] == "passed"]
            if passed:
                run_pytest("tether", tether_stage, name, passed, args)
    summarize(ALL_FILES, write=not args.no_write, note=args.note)


if __name__ == "__main__":
    main()
