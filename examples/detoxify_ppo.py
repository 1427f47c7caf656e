"""Detoxify: PPO lowers a toxicity classifier's score of what a causal LM writes.

Prompts are the beginnings of web sentences that tend to be continued toxically (real-toxicity-prompts with
toxicity above a threshold). A hate-speech classifier (RoBERTa, its own tokenizer) reads prompt + continuation;
the reward is its toxic label's logit, negated (a reward weight of -1), so PPO pushes the policy towards
continuations the classifier finds clean, while the KL penalty to the initial model keeps the language
intact. `PPOTrainer.train()` runs rollout -> score -> step.

    python examples/detoxify_ppo.py            # gpt-neo-125m, roberta-hate-speech, real-toxicity-prompts
    python examples/detoxify_ppo.py --smoke    # tiny local models, insults vs compliments, seconds on a CPU
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from datasets import Dataset
from transformers import AutoTokenizer

from _common import LengthSampler, hub_rows, sample_and_score, save_results
from _smoke import real_toxicity_rows, smoke_setup, tiny_causal_lm, tiny_classifier, toxicity_sentences
from tether import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer, RewardModelScorer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="Tiny local models and generated prompts instead of the hub ones (offline, seconds).")
    parser.add_argument("--output_dir", default="detoxify-ppo")
    parser.add_argument("--model_name", default="EleutherAI/gpt-neo-125m", help="The policy: a causal LM.")
    parser.add_argument("--reward_model", default="facebook/roberta-hate-speech-dynabench-r4-target",
                        help="A toxicity classifier.")
    parser.add_argument("--toxic_label", default="hate", help="The classifier's toxic label; the reward is minus "
                                                              "its logit.")
    parser.add_argument("--dataset_name", default="allenai/real-toxicity-prompts")
    parser.add_argument("--max_prompts", type=int, default=20000, help="Rows read from the dataset.")
    parser.add_argument("--min_toxicity", type=float, default=0.3, help="Keep prompts whose toxicity exceeds this.")
    parser.add_argument("--prompt_length", type=int, nargs=2, default=(5, 10), metavar=("MIN", "MAX"),
                        help="Prompts are cut to their first MIN..MAX tokens.")
    parser.add_argument("--max_new_tokens", type=int, default=30)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--mini_batch_size", type=int, default=16)
    parser.add_argument("--ppo_epochs", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=1.47e-5)
    parser.add_argument("--init_kl_coef", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.smoke:
        for name, value in dict(max_prompts=200, prompt_length=(12, 16), max_new_tokens=8, steps=3, batch_size=8,
                                mini_batch_size=4, ppo_epochs=2, learning_rate=1e-3).items():
            setattr(args, name, value)
    return args


def sources(args: argparse.Namespace) -> tuple[str, str, Any]:
    """(policy, classifier, prompts dataset): hub ids and real-toxicity-prompts, or tiny stand-ins."""
    if not args.smoke:
        return args.model_name, args.reward_model, hub_rows(args.dataset_name, args.max_prompts)
    sentences = toxicity_sentences(400, seed=args.seed)
    models = os.path.join(args.output_dir, "smoke-models")
    texts = [text for text, _ in sentences]
    policy = tiny_causal_lm(texts, os.path.join(models, "policy"), steps=80, seed=args.seed)
    classifier, accuracy = tiny_classifier(texts, [toxic for _, toxic in sentences], ["nothate", "hate"],
                                           os.path.join(models, "classifier"), seed=args.seed)
    print(f"Smoke: tiny policy in {policy}; tiny toxicity classifier in {classifier} "
          f"(held-out accuracy {accuracy:.2f})")
    return policy, classifier, Dataset.from_list(real_toxicity_rows(args.max_prompts, seed=args.seed))


def build_prompts(rows: Any, tokenizer: Any, args: argparse.Namespace) -> Any:
    """The toxic-leaning prompts, each cut to its first few tokens, as a `prompt` column."""
    lengths = LengthSampler(*args.prompt_length, seed=args.seed)
    rows = rows.filter(lambda row: (row["prompt"]["toxicity"] or 0.0) > args.min_toxicity)

    def cut(row: dict) -> dict:
        return {"prompt": tokenizer.decode(tokenizer(row["prompt"]["text"])["input_ids"][: lengths()])}

    return rows.map(cut, remove_columns=rows.column_names)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        smoke_setup()
    policy_name, classifier_name, rows = sources(args)
    tokenizer = AutoTokenizer.from_pretrained(policy_name)
    prompts = build_prompts(rows, tokenizer, args)
    toxicity = RewardModelScorer(classifier_name, label=args.toxic_label, batch_size=16)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(policy_name)
    config = PPOConfig(batch_size=args.batch_size, mini_batch_size=args.mini_batch_size, ppo_epochs=args.ppo_epochs,
                       learning_rate=args.learning_rate, init_kl_coef=args.init_kl_coef, seed=args.seed,
                       total_steps=args.steps, max_new_tokens=args.max_new_tokens, output_dir=args.output_dir,
                       logging_steps=max(1, args.steps // 20))
    # The reward is minus the toxic logit: weight -1 on the classifier's score.
    trainer = PPOTrainer(config, model, None, tokenizer, dataset=prompts, reward_funcs=[toxicity],
                         reward_weights=[-1.0])

    eval_queries = [tokenizer(p, return_tensors="pt")["input_ids"][0] for p in prompts["prompt"][:16]]
    before, _ = sample_and_score(trainer.ref_model.pretrained_model, tokenizer, eval_queries, toxicity.score_texts,
                                 args.max_new_tokens, seed=args.seed)
    print(f"PPO for {args.steps} steps x {args.batch_size} of {len(prompts)} prompts with toxicity > "
          f"{args.min_toxicity}; reward: minus the {args.toxic_label!r} logit of {classifier_name}")
    history = trainer.train()  # saves the policy and its value head to output_dir
    after, samples = sample_and_score(trainer.model.pretrained_model, tokenizer, eval_queries, toxicity.score_texts,
                                      args.max_new_tokens, seed=args.seed)

    results = {"policy": policy_name, "classifier": classifier_name, "steps": args.steps,
               "reward_mean": [row["env/reward_mean"] for row in history],
               "kl": [row["objective/kl"] for row in history],
               "eval_toxic_logit_before": before, "eval_toxic_logit_after": after, "samples_after": samples[:4]}
    save_results(args.output_dir, results)
    print(f"Rollout reward {history[0]['env/reward_mean']:+.2f} -> {history[-1]['env/reward_mean']:+.2f}; "
          f"toxic logit on {len(eval_queries)} fixed prompts {before:+.2f} -> {after:+.2f} (lower is cleaner); "
          f"KL {history[-1]['objective/kl']:.2f}")
    for text in samples[:4]:
        print(f"  {text}")
    print(f"Policy and value head saved to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
