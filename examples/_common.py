"""What several examples share that is not a smoke stand-in: loading a slice of a hub dataset, drawing
lengths, sampling + scoring a fixed set of prompts (the before/after comparison), and results.json."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch

from tether.rollout.generation import generate_responses

RESULTS_FILE = "results.json"


def hub_rows(name: str, n: int, split: str = "train", **kwargs: Any) -> Any:
    """The first `n` rows of a hub dataset as an in-memory `Dataset`, streamed: only what is read is
    downloaded (stack-exchange-paired holds millions of rows)."""
    from datasets import Dataset, load_dataset

    return Dataset.from_list(list(load_dataset(name, split=split, streaming=True, **kwargs).take(n)))


class LengthSampler:
    """`sampler()` draws a length uniformly from [low, high], from its own seeded stream."""

    def __init__(self, low: int, high: int, seed: int = 0) -> None:
        self.low, self.high, self.rng = low, high, random.Random(seed)

    def __call__(self) -> int:
        return self.rng.randint(self.low, self.high)


@torch.no_grad()
def sample_and_score(model: torch.nn.Module, tokenizer: Any, queries: Sequence[torch.Tensor],
                     score: Callable[[list[str]], list[float]], max_new_tokens: int, seed: int = 0,
                     ) -> tuple[float, list[str]]:
    """Sample one response per query (seeded, so two models see the same draws of the random stream) and
    score query + response; returns (mean score, the texts)."""
    torch.manual_seed(seed)
    responses = generate_responses(model, list(queries), tokenizer.pad_token_id, batch_size=len(queries),
                                   max_new_tokens=max_new_tokens, do_sample=True, top_k=0, top_p=1.0,
                                   eos_token_id=tokenizer.eos_token_id)
    texts = [tokenizer.decode(q, skip_special_tokens=True) + tokenizer.decode(r, skip_special_tokens=True)
             for q, r in zip(queries, responses)]
    scores = score(texts)
    return sum(scores) / len(scores), texts


def save_results(output_dir: str, results: dict[str, Any]) -> str:
    """Write the run's headline facts and numbers to output_dir/results.json; returns its path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, RESULTS_FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=str)
    return path
