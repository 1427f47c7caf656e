"""PPO under `accelerate launch` with 2 CPU processes (gloo): it runs, and DDP keeps the two copies of
the weights identical after every update."""

from __future__ import annotations

import json

from launching import run_two_processes


def test_ppo_train_with_two_processes(tiny_decoder_dir, tmp_path):
    run_two_processes("ppo_two_process.py", tiny_decoder_dir, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["processes"] == 2 and r["steps"] == 3 for r in ranks)
    assert abs(ranks[0]["checksum"] - ranks[1]["checksum"]) < 1e-6 * max(1.0, abs(ranks[0]["checksum"]))
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "value_head.safetensors").is_file()
