"""Adapters-only RLHF: the sentiment task of sentiment_ppo.py, training only a LoRA adapter and the value head.

The policy is the base model plus a LoRA adapter; the value head sits on the same trunk and trains alongside.
No reference copy is made: the reference is the same model with its adapter disabled, so the base weights
are held in memory once (the way large policies fit on one GPU). `PPOTrainer.train()` runs the loop with
the sentiment classifier's POSITIVE logit as the reward function; only the adapter and the value head are
saved.

    python examples/adapters_rlhf.py            # lvwerra/gpt2-imdb + LoRA, lvwerra/distilbert-imdb, stanfordnlp/imdb
    python examples/adapters_rlhf.py --smoke    # tiny local models and generated reviews, seconds on a CPU
"""

from __future__ import annotations

import argparse
import sys

from datasets import Dataset
from peft import LoraConfig
from transformers import AutoTokenizer

from _common import sample_and_score, save_results
from _smoke import smoke_setup
from sentiment_ppo import add_sentiment_arguments, apply_smoke_sizes, build_dataset, sentiment_sources
from tether import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer, RewardModelScorer
from tether.models.reference import reference_mode


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_sentiment_arguments(parser, output_dir="adapters-rlhf")
    parser.add_argument("--mini_batch_size", type=int, default=32)
    parser.add_argument("--ppo_epochs", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=1e-4,
                        help="Higher than for full fine-tuning: an adapter has few parameters to move.")
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--lora_alpha", type=int, default=32)
    parser.add_argument("--lora_dropout", type=float, default=0.05)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        smoke_setup()
        apply_smoke_sizes(args, learning_rate=3e-3, lora_r=8, lora_alpha=16, lora_dropout=0.0)
    policy_name, classifier_name, reviews = sentiment_sources(args)
    tokenizer = AutoTokenizer.from_pretrained(policy_name)
    queries = build_dataset(reviews, tokenizer, args)
    prompts = Dataset.from_dict({"prompt": queries["query"]})

    # LoRA on every linear layer of the trunk; the value head is a plain trainable head beside it.
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(policy_name, peft_config=lora)
    classifier = RewardModelScorer(classifier_name, label=args.reward_label, batch_size=16)
    steps = args.steps or len(prompts) // args.batch_size
    config = PPOConfig(batch_size=args.batch_size, mini_batch_size=args.mini_batch_size, ppo_epochs=args.ppo_epochs,
                       learning_rate=args.learning_rate, init_kl_coef=args.init_kl_coef, seed=args.seed,
                       total_steps=steps, max_new_tokens=args.response_length[1], output_dir=args.output_dir,
                       logging_steps=max(1, steps // 20))
    # ref_model=None with a PEFT policy: the reference is the adapter-disabled policy, no second copy.
    trainer = PPOTrainer(config, model, None, tokenizer, dataset=prompts, reward_funcs=classifier)
    trainable = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    held = sum(p.numel() for p in trainer.model.parameters())
    n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    print(f"Reference model: {'adapter-disabled policy' if trainer.ref_model is None else 'a copy'}; "
          f"{n_trainable:,} of {held:,} parameters train ({100 * n_trainable / held:.2f}%: LoRA + value head)")

    eval_queries = [queries[i]["input_ids"] for i in range(min(16, len(queries)))]
    policy = trainer.model.pretrained_model
    with reference_mode(trainer.model):  # the base model: what the KL penalty compares against
        before, _ = sample_and_score(policy, tokenizer, eval_queries, classifier.score_texts,
                                     args.response_length[1], seed=args.seed)
    history = trainer.train()  # saves the adapter, the value head and the tokenizer to output_dir
    after, samples = sample_and_score(policy, tokenizer, eval_queries, classifier.score_texts,
                                      args.response_length[1], seed=args.seed)

    results = {"policy": policy_name, "classifier": classifier_name, "steps": steps,
               "ref_model_is_none": trainer.ref_model is None, "trainable_parameters": trainable,
               "parameters_trainable": n_trainable, "parameters_held": held,
               "reward_mean": [row["env/reward_mean"] for row in history],
               "kl": [row["objective/kl"] for row in history],
               "eval_reward_before": before, "eval_reward_after": after, "samples_after": samples[:4]}
    save_results(args.output_dir, results)
    print(f"Rollout reward {history[0]['env/reward_mean']:+.2f} -> {history[-1]['env/reward_mean']:+.2f}; "
          f"{len(eval_queries)} fixed prompts {before:+.2f} (adapter off) -> {after:+.2f}; "
          f"KL {history[-1]['objective/kl']:.2f}")
    for text in samples[:4]:
        print(f"  {text}")
    print(f"Adapter and value head saved to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
