"""Run by tests/test_kill_resume.py under `accelerate launch` with 2 CPU processes (gloo): GRPO with rounds of
generation spanning 2 optimizer steps (num_iterations=2), an uninterrupted run, a run killed after step 4 (its
last checkpoint, checkpoint-3, falls inside a round), and its resumption by a new trainer. Each process writes
<out>/rank<r>.json: the completions it scored after the checkpoint in both runs, whether checkpoint-3 holds its
round, and a checksum of both final weights."""

import json
import os
import random
import sys

import torch
from datasets import Dataset
from transformers import AutoTokenizer, TrainerCallback

from tether import GRPOConfig, GRPOTrainer


class Killed(BaseException):
    pass


class KillAfterStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 4:
            raise Killed  # on both processes after the same step, as a kill of the whole job


class Reward:
    """Length plus python-random noise (each process its own stream: each restores its own state)."""

    def __init__(self) -> None:
        self.completions, self.__name__ = [], "reward"

    def __call__(self, completions, **_):
        self.completions.append(list(completions))
        return [len(c) / 10 + 0.1 * random.random() for c in completions]


def run(model_dir: str, out: str, reward: Reward, callbacks=None, resume: bool = False) -> GRPOTrainer:
    args = GRPOConfig(output_dir=out, per_device_train_batch_size=4, num_generations=2, max_completion_length=5,
                      max_steps=5, save_steps=3, num_iterations=2, learning_rate=1e-3, report_to=[], seed=0,
                      disable_tqdm=True, logging_steps=1, model_init_kwargs={"attention_dropout": 0.1})
    dataset = Dataset.from_dict({"prompt": [f"prompt number {i}" for i in range(12)]})
    trainer = GRPOTrainer(model_dir, reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=callbacks)
    random.seed(2 + trainer.accelerator.process_index)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def checksum(trainer: GRPOTrainer) -> float:
    return float(sum(p.double().sum() for p in trainer.accelerator.unwrap_model(trainer.model).parameters()))


def main(model_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    full_reward = Reward()
    full = run(model_dir, os.path.join(out_dir, "full"), full_reward)
    try:
        run(model_dir, os.path.join(out_dir, "run"), Reward(), callbacks=[KillAfterStep()])
    except Killed:
        pass
    rank = full.accelerator.process_index
    saved_round = os.path.isfile(os.path.join(out_dir, "run", "checkpoint-3", f"rollout_round_{rank}.pt"))
    resumed_reward = Reward()
    resumed = run(model_dir, os.path.join(out_dir, "run"), resumed_reward, resume=True)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump({"processes": full.accelerator.num_processes, "saved_round": saved_round,
                   "full": full_reward.completions[2:], "resumed": resumed_reward.completions,
                   "full_checksum": checksum(full), "resumed_checksum": checksum(resumed)}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
