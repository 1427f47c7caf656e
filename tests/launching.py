"""Subprocess helpers for the tests that run tether as a user would: offline, and under `accelerate launch`
with 2 CPU processes."""

from __future__ import annotations

import os
import subprocess
import sys

# Nothing may reach a hub.
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
# For several processes on the machine's few cores: one thread each.
ONE_THREAD_ENV = {**OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
# accelerate picks the multi-CPU (gloo) backend only when told to use the CPU.
CPU_ENV = {**ONE_THREAD_ENV, "ACCELERATE_USE_CPU": "true"}
SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")


def run_two_processes(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run tests/scripts/`script` with `args` as 2 gloo processes, and check it succeeded.

    `--multi_gpu` selects accelerate's torchrun launcher; with no GPU and ACCELERATE_USE_CPU it runs gloo
    (`--cpu --num_processes 2` would silently run one process)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           os.path.join(SCRIPTS, script), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=CPU_ENV, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result
