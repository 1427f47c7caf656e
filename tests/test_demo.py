"""`tether demo` end to end, in a subprocess as a newcomer would run it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from launching import OFFLINE_ENV

EXPECTED_FILES = [
    "corpus.jsonl", "corpus_eval.jsonl", "tokenizer/tokenizer.json",
    "base/config.json", "base/model.safetensors", "base/tokenizer.json",
    "sft/config.json", "sft/model.safetensors", "sft/tokenizer.json",
    "reward/config.json", "reward/model.safetensors", "dpo/model.safetensors",
    "ppo/model.safetensors", "ppo/value_head.safetensors", "ppo/metrics.jsonl",
]


def run_demo(output_dir, *flags: str, timeout: int, cwd=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tether.cli", "demo", "--output_dir", str(output_dir), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, env=OFFLINE_ENV, timeout=timeout, cwd=cwd)


def check_run(result: subprocess.CompletedProcess, output_dir) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in EXPECTED_FILES:
        assert (output_dir / name).is_file(), f"{name} missing"
    out = result.stdout
    assert "Samples BEFORE training" in out and "Samples AFTER training" in out and "Summary" in out
    assert "Held-out pairwise accuracy" in out and "Scores of a few sentences" in out
    assert "Samples AFTER DPO" in out and "rewards/accuracies" in out
    assert "Samples AFTER PPO" in out and "Mean reward of rollouts" in out


def test_demo_quick(tmp_path):
    """`tether demo --quick` runs, and writes everything under --output_dir (run from an empty folder,
    that folder is all that appears)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = run_demo("out", "--quick", cwd=cwd, timeout=300)
    check_run(result, cwd / "out")
    assert sorted(os.listdir(cwd)) == ["out"]


def test_demo_is_reproducible(tmp_path, capsys):
    """Same seed, same run: identical samples and bit-identical fine-tuned weights (in process, --quick)."""
    from tether.demo.pipeline import run_demo as run_in_process

    samples, weights = [], []
    for name in ("a", "b"):
        run_in_process(tmp_path / name, quick=True, seed=0)
        out = capsys.readouterr().out
        samples.append([line for line in out.splitlines() if line.strip().startswith(("greedy", "sampled"))])
        weights.append((tmp_path / name / "sft" / "model.safetensors").read_bytes())
    assert samples[0] and samples[0] == samples[1]
    assert weights[0] == weights[1]


@pytest.mark.slow
def test_demo_full(tmp_path):
    """The real demo: after SFT, greedy samples are reviews (start with a verb, end with a period)."""
    output_dir = tmp_path / "demo"
    result = run_demo(output_dir, timeout=900)
    check_run(result, output_dir)
    after = result.stdout.split("Samples AFTER training")[1]
    greedy = [line.split("|", 1)[1] for line in after.splitlines() if line.strip().startswith("greedy")]
    assert greedy and all(text.rstrip().endswith(".") for text in greedy), greedy
    # Before training the held-out loss is about ln(vocab) ~ 6.7 nats/token; the corpus' own entropy is ~0.9.
    match = re.search(r"Held-out loss ([\d.]+) -> ([\d.]+)", result.stdout)
    assert match and float(match[1]) > 5.0 and float(match[2]) < 1.3, match
    accuracy = re.search(r"Held-out pairwise accuracy ([\d.]+) -> ([\d.]+)", result.stdout)
    assert accuracy and float(accuracy[2]) > 0.9, accuracy
    dpo = re.search(r"Held-out rewards/accuracies ([\d.]+), rewards/margins ([-\d.]+)", result.stdout)
    assert dpo and float(dpo[1]) >= 0.8 and float(dpo[2]) > 0, dpo
    ppo = re.search(r"Mean reward of rollouts ([-+\d.]+) -> ([-+\d.]+)", result.stdout)
    assert ppo and float(ppo[2]) > float(ppo[1]) + 0.5, ppo  # PPO raises the reward model's score clearly


def test_demo_method_grpo_quick(tmp_path, capsys):
    """`tether demo --method grpo --quick` (in process): setup, SFT, reward model, then GRPO, one report."""
    from tether.cli import main

    assert main(["demo", "--method", "grpo", "--quick", "--output_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Samples AFTER GRPO" in out and "Mean reward of sampled reviews" in out
    assert "Samples AFTER DPO" not in out and "Samples AFTER PPO" not in out
    assert (tmp_path / "grpo" / "metrics.jsonl").is_file() and (tmp_path / "report.html").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_demo_group_rl_full_raises_the_reward(method, tmp_path):
    """The full demo with GRPO / RLOO: the reward model's mean reward of sampled reviews rises clearly."""
    result = run_demo(tmp_path, "--method", method, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = re.search(r"Mean reward of sampled reviews ([+-][\d.]+) -> ([+-][\d.]+)", result.stdout)
    assert found, result.stdout[-3000:]
    before, after = float(found[1]), float(found[2])
    assert after > before + 0.3, (before, after)
