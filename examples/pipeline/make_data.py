"""Files for the pipeline examples, offline: the demo's generated movie reviews as data files, and an untrained
tiny Llama with its own tokenizer as the base model.

    python examples/pipeline/make_data.py            # in the working directory: data/*.jsonl and base/
    tether pipeline examples/pipeline/rlhf.yaml      # then the pipeline, from the same directory

    data/reviews.jsonl   {"text"}                          SFT: reviews of every sentiment
    data/pairs.jsonl     {"prompt", "chosen", "rejected"}  reward model and DPO: positive preferred over negative
    data/prompts.jsonl   {"prompt"}                        PPO: review openings to continue
    base/                an untrained Llama decoder (~0.9M parameters) and a byte-level BPE tokenizer
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence


def write_jsonl(rows: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_data(directory: str = ".", n_reviews: int = 4000, n_pairs: int = 600, seed: int = 0) -> None:
    """data/reviews.jsonl, data/pairs.jsonl and data/prompts.jsonl under `directory`."""
    from tether.demo.corpus import generate_reviews, preference_pairs, review_prompts

    write_jsonl([{"text": r["text"]} for r in generate_reviews(n_reviews, seed=seed)],
                os.path.join(directory, "data", "reviews.jsonl"))
    write_jsonl(preference_pairs(n_pairs, seed=seed + 1), os.path.join(directory, "data", "pairs.jsonl"))
    write_jsonl([{"prompt": p} for p in review_prompts() * 4], os.path.join(directory, "data", "prompts.jsonl"))


def write_base_model(directory: str = ".", vocab_size: int = 1024, hidden_size: int = 128, num_layers: int = 4,
                     seed: int = 0) -> str:
    """An untrained tiny Llama and a tokenizer trained on the reviews, in `directory`/base; returns its path."""
    import torch
    from transformers import AutoModelForCausalLM

    from tether.demo.corpus import generate_reviews
    from tether.demo.tiny import tiny_llama_config, train_tokenizer

    tokenizer = train_tokenizer([r["text"] for r in generate_reviews(4000, seed=seed)], vocab_size=vocab_size)
    torch.manual_seed(seed)
    config = tiny_llama_config(len(tokenizer), hidden_size=hidden_size, num_layers=num_layers, max_positions=128,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                               bos_token_id=tokenizer.bos_token_id)
    path = os.path.join(directory, "base")
    AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=".", help="Where data/ and base/ go (the pipeline's working directory).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_data(args.dir, seed=args.seed)
    print(f"Wrote {os.path.join(args.dir, 'data')}/reviews.jsonl, pairs.jsonl, prompts.jsonl")
    print(f"Wrote an untrained tiny Llama and its tokenizer to {write_base_model(args.dir, seed=args.seed)}")


if __name__ == "__main__":
    main()
