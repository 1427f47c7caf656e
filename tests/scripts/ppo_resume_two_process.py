"""Run by tests/test_resume.py under `accelerate launch --num_processes 2` (gloo on CPU): an uninterrupted
PPO run, a run killed at rollout 3 after checkpoint-2, and its resumption by a new trainer; each process
writes what it generated after the checkpoint in both runs and a checksum of both final weights."""

from __future__ import annotations

import json
import os
import random
import sys

import torch
from datasets import Dataset
from transformers import AutoTokenizer

from tether import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer


class Killed(BaseException):
    pass


class Reward:
    """Vowel share plus python-random noise (different on each process: each restores its own state)."""

    def __init__(self, kill_at: int | None = None) -> None:
        self.kill_at, self.completions, self.__name__ = kill_at, [], "reward"

    def __call__(self, prompts: list[str], completions: list[str], **_: list) -> list[float]:
        if len(self.completions) + 1 == self.kill_at:
            raise Killed  # on both processes at the same rollout, as a kill of the whole job
        self.completions.append(completions)
        return [sum(c.count(v) for v in "aeiou") / max(1, len(c)) + 0.1 * random.random() for c in completions]


def run(model_dir: str, out: str, reward: Reward, resume: bool = False) -> PPOTrainer:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = Dataset.from_dict({"prompt": ["this movie", "the plot", "the film", "the acting", "i think", "so"]})
    config = PPOConfig(batch_size=2, mini_batch_size=1, learning_rate=1e-3, total_steps=4, max_new_tokens=5,
                       output_dir=out, ppo_epochs=2, save_steps=2)
    torch.manual_seed(0)
    random.seed(1)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir, attention_dropout=0.1)
    trainer = PPOTrainer(config, model, None, tokenizer, dataset=prompts, reward_funcs=reward)
    random.seed(2 + trainer.accelerator.process_index)  # each process its own python stream
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def checksum(trainer: PPOTrainer) -> float:
    weights = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    return float(sum(v.double().sum() for v in weights.values()))


def main(model_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    full_reward = Reward()
    full = run(model_dir, os.path.join(out_dir, "full"), full_reward)
    try:
        run(model_dir, os.path.join(out_dir, "run"), Reward(kill_at=3))
    except Killed:
        pass
    resumed_reward = Reward()
    resumed = run(model_dir, os.path.join(out_dir, "run"), resumed_reward, resume=True)
    rank = full.accelerator.process_index
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump({"processes": full.accelerator.num_processes, "full": full_reward.completions[2:],
                   "resumed": resumed_reward.completions, "full_checksum": checksum(full),
                   "resumed_checksum": checksum(resumed)}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
