"""DPO and PPO on a fixed global batch of 4, for tests/test_scale_out.py.

Run under `accelerate launch --num_processes 2` (each process takes 2 of the 4 rows per step) and in the
test process itself with 1 process (all 4 rows; PPO accumulates two micro-batches of 2): the final weights
go to OUT_DIR/<method>.safetensors, and the test compares them. SGD, so the weights are the initial ones
minus the learning rate times the summed gradients, and any difference in how a loss is normalised over
processes shows directly (Adam would rescale it away per coordinate).

    python tests/scripts/scale_out_train.py MODEL_DIR OUT_DIR dpo,ppo
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from datasets import Dataset
from safetensors.torch import save_file
from transformers import AutoTokenizer

from tether import AutoModelForCausalLMWithValueHead, DPOConfig, DPOTrainer, PPOConfig, PPOTrainer
from tether.distributed import zero_stage
from tether.models.forward import unwrap_model
from tether.models.reference import is_partitioned
from tether.rollout.generation import generate_responses

GLOBAL_BATCH = 4


def _save(state: dict[str, torch.Tensor] | None, path: str, is_main: bool) -> None:
    if is_main:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, path)


def preference_pairs() -> Dataset:
    """Eight pairs whose prompts and completions all differ in length (so do the processes' token counts)."""
    words = "the film was a quiet and lovely story about two old friends".split()
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for i in range(8):
        rows["prompt"].append(" ".join(words[: 2 + i % 5]))
        rows["chosen"].append(" " + " ".join(["good"] * (1 + i)) + " movie")
        rows["rejected"].append(" " + " ".join(["bad"] * (8 - i)))
    return Dataset.from_dict(rows)


def run_dpo(model_dir: str, out_dir: str, processes: int) -> dict[str, Any]:
    """Two DPO steps on global batches of 4 pairs (4 per process alone, 2 each with 2 processes)."""
    config = DPOConfig(output_dir=os.path.join(out_dir, "dpo-run"), max_steps=2,
                       per_device_train_batch_size=GLOBAL_BATCH // processes, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", seed=0,
                       max_length=48, max_prompt_length=16, logging_steps=1, save_strategy="no", report_to="none",
                       disable_tqdm=True)
    trainer = DPOTrainer(model_dir, args=config, train_dataset=preference_pairs())
    trainer.train()
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # a collective under ZeRO-3
    _save(state, os.path.join(out_dir, "dpo.safetensors"), trainer.accelerator.is_main_process)
    return {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "reference": type(trainer.ref_model).__name__, "reference_partitioned": is_partitioned(trainer.ref_model)}


def ppo_rows(tokenizer: Any) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Four (query, response, score) rows of different lengths."""
    texts = [("this movie", " was good and fun"), ("the plot of the film", " dragged"),
             ("acting", " was fine but the ending was weak"), ("the music", " soared")]
    queries = [torch.tensor(tokenizer(q)["input_ids"]) for q, _ in texts]
    responses = [torch.tensor(tokenizer(r, add_special_tokens=False)["input_ids"]) for _, r in texts]
    scores = [torch.tensor(s) for s in (1.0, -0.5, 0.3, 2.0)]
    return queries, responses, scores


def run_ppo(model_dir: str, out_dir: str, processes: int) -> dict[str, Any]:
    """Two PPO steps of 2 epochs on the same 4 rows: one process takes them as one mini-batch of two
    accumulated micro-batches, each of 2 processes takes its 2 rows as one micro-batch."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)  # the value head's initial weights
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
    per_process = GLOBAL_BATCH // processes
    config = PPOConfig(batch_size=per_process, mini_batch_size=GLOBAL_BATCH // 2, ppo_epochs=2, seed=0,
                       gradient_accumulation_steps=2 if processes == 1 else 1,
                       output_dir=os.path.join(out_dir, "ppo-run"))
    trainer = PPOTrainer(config, model, None, tokenizer, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    rank = trainer.accelerator.process_index
    queries, responses, scores = (rows[rank * per_process:(rank + 1) * per_process] for rows in ppo_rows(tokenizer))
    stats = [trainer.step(queries, responses, scores) for _ in range(2)]
    state = trainer.accelerator.get_state_dict(trainer.model)
    _save(state, os.path.join(out_dir, "ppo.safetensors"), trainer.accelerator.is_main_process)
    result = {"kl_coef": [float(s["objective/kl_coef"]) for s in stats]}
    if zero_stage(trainer.accelerator) == 3:
        result["reference_partitioned"] = is_partitioned(trainer.ref_model)
        result["generation"] = {n: zero3_generation(trainer, queries, n) for n in (3, 9)}
    return result


@contextlib.contextmanager
def counting_collectives() -> Iterator[dict[str, int]]:
    """Counts DeepSpeed's collective calls (all-gathers of partitioned weights among them) in the block."""
    import deepspeed.comm as dist

    counts = {"calls": 0}
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def counted(function: Callable) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            counts["calls"] += 1
            return function(*args, **kwargs)
        return call

    for name, function in originals.items():
        setattr(dist, name, counted(function))
    try:
        yield counts
    finally:
        for name, function in originals.items():
            setattr(dist, name, function)


COLLECTIVES = ("allgather_fn", "all_gather", "all_gather_into_tensor", "broadcast", "all_reduce", "reduce_scatter_fn")


def zero3_generation(trainer: PPOTrainer, queries: list[torch.Tensor], tokens: int) -> dict[str, Any]:
    """Collectives while generating `tokens` tokens greedily: through PPOTrainer.generate (the weights
    gathered once by unwrap_model_for_generation), and from the bare partitioned model (ZeRO-3's hooks
    gather each layer at every forward, i.e. every token)."""
    settings = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False}
    with counting_collectives() as bare:
        expected = generate_responses(unwrap_model(trainer.model), queries, trainer.tokenizer.pad_token_id, len(queries),
                                      False, None, **settings)
    with counting_collectives() as rollout:
        responses = trainer.generate(queries, return_prompt=False, **settings)
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {"bare": bare["calls"], "rollout": rollout["calls"],
            "same_tokens": all(torch.equal(a, b) for a, b in zip(expected, responses)),
            "partitioned_after": all(p.numel() < p.ds_numel or p.ds_numel <= 1 for p in model.parameters())}


RUNS = {"dpo": run_dpo, "ppo": run_ppo}


def main(model_dir: str, out_dir: str, methods: str) -> None:
    torch.set_num_threads(1)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    results = {name: RUNS[name](model_dir, out_dir, processes) for name in methods.split(",")}
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump({"processes": processes, **results}, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
