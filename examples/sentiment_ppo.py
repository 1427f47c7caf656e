"""Sentiment: PPO teaches a causal LM to write positive movie reviews.

The policy (GPT-2 fine-tuned on IMDB) continues the first 2-8 tokens of IMDB reviews; a sentiment classifier
(DistilBERT fine-tuned on IMDB, with its own tokenizer) reads query + response, and its POSITIVE logit is
the reward. A KL penalty to the frozen initial policy keeps the text fluent. This is TRL's classic loop:

    for batch in ppo_trainer.dataloader:
        responses = ppo_trainer.generate(queries, ...)      # 1. rollout
        rewards = classifier(queries + responses)           # 2. score
        stats = ppo_trainer.step(queries, responses, rewards)  # 3. PPO update
        ppo_trainer.log_stats(stats, batch, rewards)

    python examples/sentiment_ppo.py            # lvwerra/gpt2-imdb, lvwerra/distilbert-imdb, stanfordnlp/imdb
    python examples/sentiment_ppo.py --smoke    # tiny local models and generated reviews, seconds on a CPU
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
from transformers import AutoTokenizer

from _common import LengthSampler, hub_rows, sample_and_score, save_results
from _smoke import imdb_rows, smoke_setup, tiny_causal_lm, tiny_classifier
from tether import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer, RewardModelScorer
from tether.reports import METRICS_FILE, save_run_config, write_jsonl, write_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_sentiment_arguments(parser, output_dir="sentiment-ppo")
    parser.add_argument("--mini_batch_size", type=int, default=128)
    parser.add_argument("--ppo_epochs", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=1.41e-5)
    return parser.parse_args(argv)


def add_sentiment_arguments(parser: argparse.ArgumentParser, output_dir: str) -> None:
    """The arguments this example shares with adapters_rlhf.py."""
    parser.add_argument("--smoke", action="store_true",
                        help="Tiny local models and generated reviews instead of the hub ones (offline, seconds).")
    parser.add_argument("--output_dir", default=output_dir)
    parser.add_argument("--model_name", default="lvwerra/gpt2-imdb", help="The policy: a causal LM.")
    parser.add_argument("--reward_model", default="lvwerra/distilbert-imdb", help="A sentiment classifier.")
    parser.add_argument("--reward_label", default="POSITIVE", help="The classifier label whose logit is the reward.")
    parser.add_argument("--dataset_name", default="stanfordnlp/imdb", help="Reviews in a `text` column.")
    parser.add_argument("--max_reviews", type=int, default=25000, help="Reviews read from the dataset.")
    parser.add_argument("--min_review_chars", type=int, default=200, help="Shorter reviews are dropped.")
    parser.add_argument("--query_length", type=int, nargs=2, default=(2, 8), metavar=("MIN", "MAX"),
                        help="Queries are the first MIN..MAX tokens of a review.")
    parser.add_argument("--response_length", type=int, nargs=2, default=(4, 16), metavar=("MIN", "MAX"),
                        help="New tokens per response, drawn per batch.")
    parser.add_argument("--steps", type=int, default=None, help="PPO steps (default: one pass over the reviews).")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--init_kl_coef", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)


def apply_smoke_sizes(args: argparse.Namespace, **overrides: Any) -> None:
    """Smoke runs: a few small steps over short generated reviews."""
    sizes = dict(max_reviews=400, min_review_chars=0, query_length=(2, 4), response_length=(6, 10), steps=3,
                 batch_size=8, mini_batch_size=4, ppo_epochs=2, learning_rate=1e-3)
    sizes.update(overrides)
    for name, value in sizes.items():
        setattr(args, name, value)


def sentiment_sources(args: argparse.Namespace) -> tuple[str, str, Any]:
    """(policy, classifier, reviews dataset): hub ids and imdb, or tiny local stand-ins built in
    output_dir/smoke-models (the classifier with another tokenizer than the policy's)."""
    from datasets import Dataset

    if not args.smoke:
        return args.model_name, args.reward_model, hub_rows(args.dataset_name, args.max_reviews)
    rows = imdb_rows(args.max_reviews, seed=args.seed)
    texts, labels = [r["text"] for r in rows], [r["label"] for r in rows]
    models = os.path.join(args.output_dir, "smoke-models")
    policy = tiny_causal_lm(texts, os.path.join(models, "policy"), steps=80, seed=args.seed)
    classifier, accuracy = tiny_classifier(texts, labels, ["NEGATIVE", "POSITIVE"],
                                           os.path.join(models, "classifier"), seed=args.seed)
    print(f"Smoke: tiny policy in {policy}; tiny sentiment classifier in {classifier} "
          f"(held-out accuracy {accuracy:.2f})")
    return policy, classifier, Dataset.from_list(rows)


def build_dataset(reviews: Any, tokenizer: Any, args: argparse.Namespace) -> Any:
    """Queries: the first few tokens of each review, as `input_ids` (torch) and `query` (text)."""
    lengths = LengthSampler(*args.query_length, seed=args.seed)
    reviews = reviews.rename_column("text", "review").filter(lambda row: len(row["review"]) > args.min_review_chars)

    def tokenize(row: dict) -> dict:
        ids = tokenizer(row["review"])["input_ids"][: lengths()]
        return {"input_ids": ids, "query": tokenizer.decode(ids)}

    dataset = reviews.map(tokenize, remove_columns=reviews.column_names)
    dataset.set_format(type="torch", columns=["input_ids"], output_all_columns=True)
    return dataset


def endless(loader: Any) -> Any:
    """Batches of `loader`, epoch after epoch."""
    while True:
        yield from loader


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        smoke_setup()
        apply_smoke_sizes(args)
    policy_name, classifier_name, reviews = sentiment_sources(args)

    # The policy and its frozen copy as the reference (PPOTrainer makes it: ref_model=None).
    model = AutoModelForCausalLMWithValueHead.from_pretrained(policy_name)
    tokenizer = AutoTokenizer.from_pretrained(policy_name)
    dataset = build_dataset(reviews, tokenizer, args)
    config = PPOConfig(batch_size=args.batch_size, mini_batch_size=args.mini_batch_size, ppo_epochs=args.ppo_epochs,
                       learning_rate=args.learning_rate, init_kl_coef=args.init_kl_coef, seed=args.seed,
                       output_dir=args.output_dir)
    trainer = PPOTrainer(config, model, None, tokenizer, dataset=dataset)
    # The classifier scores text in its own tokenization (WordPiece for DistilBERT, BPE for GPT-2).
    classifier = RewardModelScorer(classifier_name, label=args.reward_label, batch_size=16)
    classifier.model.to(trainer.accelerator.device)

    steps = args.steps or len(trainer.dataloader)
    response_lengths = LengthSampler(*args.response_length, seed=args.seed)
    generation = {"do_sample": True, "top_k": 0, "top_p": 1.0}
    eval_queries = [dataset[i]["input_ids"] for i in range(min(16, len(dataset)))]

    before, _ = sample_and_score(trainer.ref_model.pretrained_model, tokenizer, eval_queries, classifier.score_texts,
                                 args.response_length[1], seed=args.seed)
    print(f"PPO for {steps} steps x {args.batch_size} reviews; reward: the {args.reward_label} logit of "
          f"{classifier_name}")
    metrics_file, history = os.path.join(args.output_dir, METRICS_FILE), []
    if os.path.exists(metrics_file):  # a fresh run, a fresh log
        os.remove(metrics_file)
    batches = endless(trainer.dataloader)
    for step in range(1, steps + 1):
        batch = next(batches)
        queries = batch["input_ids"]
        # 1. rollout: the policy continues each query
        responses = trainer.generate(queries, return_prompt=False, length_sampler=response_lengths,
                                     batch_size=args.batch_size, **generation)
        batch["response"] = tokenizer.batch_decode(responses, skip_special_tokens=True)
        # 2. score: the classifier's POSITIVE logit of query + response
        texts = [q + r for q, r in zip(batch["query"], batch["response"])]
        rewards = [torch.tensor(s) for s in classifier.score_texts(texts)]
        # 3. PPO update against those rewards, with the KL penalty to the reference
        stats = trainer.step(queries, responses, rewards)
        logs = trainer.log_stats(stats, batch, rewards, columns_to_log=["query", "response"])
        row = {"step": step, **{k: v for k, v in logs.items() if not isinstance(v, list)}}
        history.append(row)
        write_jsonl(metrics_file, [row])

    after, samples = sample_and_score(trainer.model.pretrained_model, tokenizer, eval_queries, classifier.score_texts,
                                      args.response_length[1], seed=args.seed)
    trainer.save_pretrained(args.output_dir)
    save_run_config(args.output_dir, "ppo", {**config.to_dict(), **vars(args)})
    write_report(args.output_dir)
    results = {"policy": policy_name, "classifier": classifier_name, "steps": steps,
               "reward_mean": [row["env/reward_mean"] for row in history],
               "kl": [row["objective/kl"] for row in history],
               "eval_reward_before": before, "eval_reward_after": after, "samples_after": samples[:4]}
    save_results(args.output_dir, results)
    print(f"Rollout reward {history[0]['env/reward_mean']:+.2f} -> {history[-1]['env/reward_mean']:+.2f}; "
          f"{len(eval_queries)} fixed prompts {before:+.2f} -> {after:+.2f}; KL {history[-1]['objective/kl']:.2f}")
    for text in samples[:4]:
        print(f"  {text}")
    print(f"Policy and value head saved to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
