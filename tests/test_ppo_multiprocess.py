"""PPO under `accelerate launch` with 2 CPU processes (gloo): it runs, and DDP keeps the two copies of
the weights identical after every update."""

from __future__ import annotations

import json
import os
import subprocess
import sys

OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
               # accelerate picks the multi-CPU (gloo) backend only when told to use the CPU
               "ACCELERATE_USE_CPU": "true"}


def test_ppo_train_with_two_processes(tiny_decoder_dir, tmp_path):
    script = os.path.join(os.path.dirname(__file__), "scripts", "ppo_two_process.py")
    # `--multi_gpu` selects accelerate's torchrun launcher; with no GPU and ACCELERATE_USE_CPU it runs gloo.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           script, tiny_decoder_dir, str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=OFFLINE_ENV, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["processes"] == 2 and r["steps"] == 3 for r in ranks)
    assert abs(ranks[0]["checksum"] - ranks[1]["checksum"]) < 1e-6 * max(1.0, abs(ranks[0]["checksum"]))
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "value_head.safetensors").is_file()
