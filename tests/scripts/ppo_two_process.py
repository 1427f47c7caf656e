"""Run by tests/test_ppo_multiprocess.py under `accelerate launch --multi_gpu --num_processes 2` with
ACCELERATE_USE_CPU=true (gloo): a few PPO steps through `train()`, then each process writes a checksum of its weights."""

from __future__ import annotations

import json
import os
import sys

import torch
from datasets import Dataset
from transformers import AutoTokenizer

from tether import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer


def vowel_share(prompts: list[str], completions: list[str], **_: list) -> list[float]:
    return [sum(c.count(v) for v in "aeiou") / max(1, len(c)) for c in completions]


def main(model_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = Dataset.from_dict({"prompt": ["this movie", "the plot", "the film", "the acting"] * 4})
    config = PPOConfig(batch_size=4, mini_batch_size=2, learning_rate=1e-3, total_steps=3, max_new_tokens=6,
                       output_dir=out_dir, ppo_epochs=2)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
    trainer = PPOTrainer(config, model, None, tokenizer, dataset=prompts, reward_funcs=vowel_share)
    history = trainer.train()
    rank = trainer.accelerator.process_index
    weights = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    checksum = float(sum(v.double().sum() for v in weights.values()))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump({"processes": trainer.accelerator.num_processes, "checksum": checksum,
                   "steps": len(history), "reward": history[-1]["env/reward_mean"]}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
