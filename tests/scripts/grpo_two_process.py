"""Run by tests/test_grpo_multiprocess.py under `accelerate launch` with 2 CPU processes: a short GRPO run
whose reward function records, per process and round, which prompts and completions it scored, and the
advantages the trainer computed from them. Writes <out>/rank<r>.json."""

import json
import sys

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from tether import GRPOConfig, GRPOTrainer

model_dir, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
rounds = []


def recorder(prompts, completions, completion_ids, row, **_):
    values = [float(sum(i % 2 == 0 for i in ids)) for ids in completion_ids]
    rounds.append({"prompts": list(prompts), "rows": list(row), "rewards": values})
    return values


tokenizer = AutoTokenizer.from_pretrained(model_dir)
dataset = Dataset.from_dict({"prompt": [f"prompt number {i}" for i in range(24)], "row": list(range(24))})
args = GRPOConfig(output_dir=out, per_device_train_batch_size=4, num_generations=2, max_completion_length=6,
                  max_steps=3, learning_rate=1e-3, report_to=[], save_strategy="no", seed=0, disable_tqdm=True,
                  logging_steps=1)
trainer = GRPOTrainer(AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=recorder, args=args,
                      train_dataset=dataset, processing_class=tokenizer)
advantages = []
generate = trainer._generate_round


def keep_advantages(batch, training=True):
    round_ = generate(batch, training)
    advantages.append(round_.advantages.tolist())
    return round_


trainer._generate_round = keep_advantages
trainer.train()
checksum = sum(float(p.double().sum()) for p in trainer.model.parameters())
rank = trainer.accelerator.process_index
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"processes": trainer.accelerator.num_processes, "rounds": rounds, "advantages": advantages,
               "checksum": checksum}, f)
