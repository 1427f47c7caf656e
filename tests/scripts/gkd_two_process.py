"""Two gloo processes of GKDTrainer (every completion source in play, gradient accumulation) and DistillationTrainer:
training must not hang (the same source on every process, the collective metric and token-count calls matched) and
both processes must end with the same weights (DDP averaged the gradients). Run by tests/test_gkd.py."""

from __future__ import annotations

import sys

import torch
from accelerate import PartialState
from datasets import Dataset

from tether import DistillationConfig, DistillationTrainer, GKDConfig, GKDTrainer

student, teacher, out = sys.argv[1:4]
rows = [{"prompt": f"the film number {i} was", "completion": f" good, {i} stars."} for i in range(16)]
common = dict(report_to="none", save_strategy="no", max_steps=3, per_device_train_batch_size=2, logging_steps=1,
              learning_rate=1e-3, seed=3, disable_tqdm=True)
runs = [
    (GKDTrainer, GKDConfig(output_dir=f"{out}/gkd", lmbda=0.5, seq_kd=True, max_new_tokens=4,
                           gradient_accumulation_steps=2, **common), Dataset.from_list(rows)),
    (DistillationTrainer, DistillationConfig(output_dir=f"{out}/distill", max_completion_length=4, **common),
     Dataset.from_dict({"prompt": [r["prompt"] for r in rows]})),
]
state = PartialState()
for trainer_class, args, data in runs:
    trainer = trainer_class(student, teacher, args=args, train_dataset=data)
    trainer.train()
    flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(state.num_processes)]
    torch.distributed.all_gather(gathered, flat)
    assert state.num_processes == 2 and torch.equal(gathered[0], gathered[1]), "the processes' weights differ"
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(loss == loss for loss in losses), losses
    if state.is_main_process:
        print(type(trainer).__name__, "ok", losses)
