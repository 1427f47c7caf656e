"""GRPO under `accelerate launch` with 2 CPU processes (gloo): each process samples whole groups for its
own prompts, the advantages compare exactly the completions of one prompt, the two processes never
share a prompt within a step, and DDP keeps their weights identical."""

from __future__ import annotations

import json

import torch

from launching import run_two_processes
from tether.losses.advantages import group_relative_advantages


def test_grpo_groups_with_two_processes(tiny_decoder_dir, tmp_path):
    run_two_processes("grpo_two_process.py", tiny_decoder_dir, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["processes"] == 2 and len(r["rounds"]) == 3 for r in ranks)
    seen = set()
    for step in range(3):
        step_rows = []
        for rank in ranks:
            scored = rank["rounds"][step]
            rows, prompts = scored["rows"], scored["prompts"]
            assert len(rows) == 4  # 2 prompts x 2 completions on each process
            for g in range(2):  # a group is two completions of one prompt, with that prompt's own row
                assert rows[2 * g] == rows[2 * g + 1] and prompts[2 * g] == prompts[2 * g + 1]
                assert prompts[2 * g] == f"prompt number {rows[2 * g]}"
            expected = group_relative_advantages(torch.tensor(scored["rewards"]), 2)
            torch.testing.assert_close(torch.tensor(rank["advantages"][step]), expected)
            step_rows += rows[::2]
        assert len(set(step_rows)) == 4  # the processes got different prompts
        assert not seen & set(step_rows)  # and no prompt came back within the epoch
        seen |= set(step_rows)
    assert abs(ranks[0]["checksum"] - ranks[1]["checksum"]) < 1e-6 * max(1.0, abs(ranks[0]["checksum"]))
