"""StackLLaMA-style RLHF: SFT on questions and answers, a reward model on ranked answers, then PPO against it.

Three stages, each reading the one before from output_dir (run them together or one at a time, `--stages`):
1. sft:    supervised fine-tuning on "Question: ...\\n\\nAnswer: " + the better-rated answer (`response_j`);
2. reward: a reward model (the SFT model with a scalar head) learns that `response_j` beats `response_k`
           for the same question (pairwise loss), held-out pairwise accuracy reported;
3. ppo:    PPO from the SFT model against that reward model, with a KL penalty to the SFT model.
           The value estimates come from a value head on the policy by default; with
           `--critic_from_reward_model` they come instead from a separate critic initialised from the reward
           model's weights (InstructGPT / DeepSpeed-Chat), trained alongside the policy.
`--use_peft` trains LoRA adapters in every stage (each merged into its base before the next stage reads it;
in PPO the reference is the adapter-disabled policy), as the original StackLLaMA did for LLaMA-7B.

    python examples/stack_llama.py --use_peft                                # HuggingFaceTB/SmolLM2-360M
    python examples/stack_llama.py --model_name meta-llama/Llama-3.2-1B --critic_from_reward_model
    python examples/stack_llama.py --smoke [--critic_from_reward_model]      # tiny local models, seconds
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import AutoTokenizer

from _common import hub_rows, save_results
from _smoke import smoke_setup, stack_exchange_rows, tiny_causal_lm
from tether import (
    AutoModelForCausalLMWithValueHead,
    PPOConfig,
    PPOTrainer,
    RewardConfig,
    RewardModelScorer,
    RewardTrainer,
    SFTConfig,
    SFTTrainer,
)
from tether.models.loading import merge_adapter_and_save

STAGES = ("sft", "reward", "ppo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="Tiny local models and generated Q&A instead of the hub ones (offline, seconds).")
    parser.add_argument("--output_dir", default="stack-llama")
    parser.add_argument("--stages", default=",".join(STAGES), help="Comma-separated subset of sft,reward,ppo.")
    parser.add_argument("--model_name", default="HuggingFaceTB/SmolLM2-360M", help="A Llama-family causal LM.")
    parser.add_argument("--dataset_name", default="lvwerra/stack-exchange-paired",
                        help="Rows with question, response_j (better answer), response_k (worse answer).")
    parser.add_argument("--rows", type=int, default=20000, help="Rows read per stage.")
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--use_peft", action="store_true", help="LoRA adapters instead of full fine-tuning.")
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--critic_from_reward_model", action="store_true",
                        help="PPO's values from a separate critic initialised from the reward model.")
    parser.add_argument("--sft_steps", type=int, default=2000)
    parser.add_argument("--sft_learning_rate", type=float, default=2e-5)
    parser.add_argument("--reward_steps", type=int, default=2000)
    parser.add_argument("--reward_learning_rate", type=float, default=2e-5)
    parser.add_argument("--batch_size", type=int, default=8, help="Per-device batch of SFT and reward training.")
    parser.add_argument("--ppo_steps", type=int, default=200)
    parser.add_argument("--ppo_batch_size", type=int, default=64)
    parser.add_argument("--ppo_mini_batch_size", type=int, default=8)
    parser.add_argument("--ppo_learning_rate", type=float, default=1.41e-5)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if unknown := set(args.stages) - set(STAGES):
        parser.error(f"unknown stage(s) {sorted(unknown)}; choose from {','.join(STAGES)}")
    if args.smoke:
        for name, value in dict(rows=96, max_length=64, lora_r=8, sft_steps=12, sft_learning_rate=3e-3,
                                reward_steps=12, reward_learning_rate=3e-3, ppo_steps=2, ppo_batch_size=8,
                                ppo_mini_batch_size=4, ppo_learning_rate=1e-3, max_new_tokens=12).items():
            setattr(args, name, value)
    return args


def prompt_of(question: str) -> str:
    return f"Question: {question}\n\nAnswer: "


def stage_rows(args: argparse.Namespace, stage: str) -> Any:
    """The dataset slice of a stage (the hub dataset keeps one folder per stage), or generated rows."""
    if args.smoke:
        return Dataset.from_list(stack_exchange_rows(args.rows, seed=args.seed + STAGES.index(stage)))
    data_dir = {"sft": "data/finetune", "reward": "data/reward", "ppo": "data/rl"}[stage]
    return hub_rows(args.dataset_name, args.rows, data_dir=data_dir)


def base_model(args: argparse.Namespace) -> str:
    """The hub model, or for --smoke a tiny Llama pretrained on Q&A text (good and bad answers alike)."""
    if not args.smoke:
        return args.model_name
    rows = stack_exchange_rows(400, seed=args.seed + 10)
    texts = [prompt_of(r["question"]) + r[answer] for r in rows for answer in ("response_j", "response_k")]
    path = tiny_causal_lm(texts, os.path.join(args.output_dir, "smoke-models", "base"), steps=80, seed=args.seed)
    print(f"Smoke: tiny Llama base model in {path}")
    return path


def trainer_options(args: argparse.Namespace, output_dir: str, steps: int, learning_rate: float) -> dict:
    return dict(output_dir=output_dir, max_steps=steps, learning_rate=learning_rate, seed=args.seed,
                per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
                max_length=args.max_length, logging_steps=max(1, steps // 4), save_strategy="no",
                report_to="none", disable_tqdm=args.smoke, dataloader_pin_memory=torch.cuda.is_available())


def lora(args: argparse.Namespace, task_type: str) -> LoraConfig | None:
    return LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.05, target_modules="all-linear",
                      task_type=task_type) if args.use_peft else None


def save_stage(trainer: Any, directory: str, use_peft: bool) -> str:
    """Save a stage's model; an adapter is merged into its base for the next stage. Returns the model dir."""
    trainer.save_model(directory)
    if not use_peft:
        return directory
    return merge_adapter_and_save(trainer.model, os.path.join(directory, "merged"), tokenizer=trainer.processing_class)


def sft_stage(args: argparse.Namespace, base: str, results: dict) -> str:
    rows = stage_rows(args, "sft")
    data = rows.map(lambda r: {"prompt": prompt_of(r["question"]), "completion": r["response_j"]},
                    remove_columns=rows.column_names)
    out = os.path.join(args.output_dir, "sft")
    trainer = SFTTrainer(base, train_dataset=data, peft_config=lora(args, "CAUSAL_LM"),
                         args=SFTConfig(**trainer_options(args, out, args.sft_steps, args.sft_learning_rate)))
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    results["sft_loss"] = [losses[0], losses[-1]]
    print(f"SFT loss {losses[0]:.2f} -> {losses[-1]:.2f}")
    return save_stage(trainer, out, args.use_peft)


def reward_stage(args: argparse.Namespace, sft_model: str, results: dict) -> str:
    rows = stage_rows(args, "reward")
    pairs = rows.map(lambda r: {"prompt": prompt_of(r["question"]), "chosen": r["response_j"],
                                "rejected": r["response_k"]}, remove_columns=rows.column_names)
    split = pairs.train_test_split(test_size=0.1, seed=args.seed)
    out = os.path.join(args.output_dir, "reward")
    trainer = RewardTrainer(sft_model, train_dataset=split["train"], eval_dataset=split["test"],
                            peft_config=lora(args, "SEQ_CLS"), args=RewardConfig(
                                **trainer_options(args, out, args.reward_steps, args.reward_learning_rate)))
    before = trainer.evaluate()["eval_accuracy"]
    trainer.train()
    after = trainer.evaluate()["eval_accuracy"]
    results["reward_accuracy"] = [before, after]
    print(f"Reward model: held-out pairwise accuracy {before:.2f} -> {after:.2f}")
    return save_stage(trainer, out, args.use_peft)


def ppo_stage(args: argparse.Namespace, sft_model: str, reward_model: str, results: dict) -> None:
    rows = stage_rows(args, "ppo")
    prompts = rows.map(lambda r: {"prompt": prompt_of(r["question"])}, remove_columns=rows.column_names)
    out = os.path.join(args.output_dir, "ppo")
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(sft_model, peft_config=lora(args, "CAUSAL_LM"))
    tokenizer = AutoTokenizer.from_pretrained(sft_model)
    config = PPOConfig(batch_size=args.ppo_batch_size, mini_batch_size=args.ppo_mini_batch_size, ppo_epochs=4,
                       learning_rate=args.ppo_learning_rate, init_kl_coef=0.2, total_steps=args.ppo_steps,
                       max_new_tokens=args.max_new_tokens, output_dir=out, seed=args.seed,
                       logging_steps=max(1, args.ppo_steps // 20))
    critic = reward_model if args.critic_from_reward_model else None
    trainer = PPOTrainer(config, policy, None, tokenizer, dataset=prompts, reward_funcs=RewardModelScorer(reward_model),
                         critic=critic)
    if trainer.critic is not None:
        # The critic starts as the reward model, score head included (a fresh head would start at random).
        start = trainer.accelerator.unwrap_model(trainer.critic).state_dict()
        saved = load_file(os.path.join(reward_model, "model.safetensors"))
        results["critic_initial_max_abs_diff"] = max(
            float((start[name].float().cpu() - weight.float()).abs().max()) for name, weight in saved.items())
        print(f"Critic initialised from the reward model in {reward_model}; the policy's value head is unused")
    history = trainer.train()  # saves the policy (+ value head, + critic/) to output_dir/ppo
    results.update(ppo_reward_mean=[row["env/reward_mean"] for row in history],
                   ppo_kl=[row["objective/kl"] for row in history], critic=critic,
                   ref_model_is_none=trainer.ref_model is None)
    print(f"PPO rollout reward {history[0]['env/reward_mean']:+.2f} -> {history[-1]['env/reward_mean']:+.2f}, "
          f"KL {history[-1]['objective/kl']:.2f}; policy saved to {out}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        smoke_setup()
    results: dict[str, Any] = {"stages": args.stages, "use_peft": args.use_peft}
    # Where each stage leaves the model the next one starts from (merged, when adapters were trained).
    sft_model, reward_model = (os.path.join(args.output_dir, stage, *(["merged"] if args.use_peft else []))
                               for stage in ("sft", "reward"))
    if "sft" in args.stages:
        sft_model = sft_stage(args, base_model(args), results)
    if "reward" in args.stages:
        reward_model = reward_stage(args, sft_model, results)
    if "ppo" in args.stages:
        ppo_stage(args, sft_model, reward_model, results)
    results.update(sft_model=sft_model, reward_model=reward_model)
    save_results(args.output_dir, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
