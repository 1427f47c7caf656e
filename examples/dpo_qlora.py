"""DPO with (Q)LoRA: SFT an instruct model with LoRA, DPO on answer pairs, merge the adapter and save a plain model.

1. sft:   LoRA over every linear layer, the base loaded in 4 bits (QLoRA) when bitsandbytes and a GPU are
          present (else full precision, with a note; `--load_in_4bit` forces 4 bits, which bitsandbytes >= 0.48
          also runs on a CPU), trained on question -> better answer as a chat; the adapter is then merged into
          the full-precision base;
2. dpo:   a fresh LoRA over that SFT model (4-bit again if chosen), trained with DPO on `prompt`/`chosen`/
          `rejected` rows mapped from a question/two-answers dataset; the reference is the same model with its
          adapter disabled, so the base weights are in memory once;
3. merge: the DPO adapter is merged into the full-precision SFT weights (never into 4-bit ones: rounding back
          to 4 bits would undo most of what the adapter learned) and saved as a plain safetensors model that
          `AutoModelForCausalLM.from_pretrained` loads, no peft or bitsandbytes needed.

    python examples/dpo_qlora.py            # Qwen/Qwen2.5-0.5B-Instruct on lvwerra/stack-exchange-paired
    python examples/dpo_qlora.py --smoke [--load_in_4bit]    # tiny local model, seconds on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from _common import hub_rows, save_results
from _smoke import smoke_setup, stack_exchange_rows, tiny_causal_lm
from tether import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from tether.models.loading import is_quantized, merge_adapter_and_save


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="A tiny local model and generated Q&A instead of the hub ones (offline, seconds).")
    parser.add_argument("--output_dir", default="dpo-qlora")
    parser.add_argument("--model_name", default="Qwen/Qwen2.5-0.5B-Instruct", help="A causal LM with a chat template.")
    parser.add_argument("--dataset_name", default="lvwerra/stack-exchange-paired",
                        help="Rows with question, response_j (better answer), response_k (worse answer).")
    parser.add_argument("--rows", type=int, default=20000, help="Rows read for each stage.")
    parser.add_argument("--load_in_4bit", action=argparse.BooleanOptionalAction, default=None,
                        help="4-bit base weights (QLoRA). Default: when bitsandbytes and a GPU are present.")
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--max_prompt_length", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=4)
    parser.add_argument("--sft_steps", type=int, default=500)
    parser.add_argument("--sft_learning_rate", type=float, default=2e-4)
    parser.add_argument("--dpo_steps", type=int, default=1000)
    parser.add_argument("--dpo_learning_rate", type=float, default=5e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.smoke:
        for name, value in dict(rows=96, lora_r=8, max_length=64, max_prompt_length=32, batch_size=8,
                                gradient_accumulation_steps=1, sft_steps=12, sft_learning_rate=1e-2, dpo_steps=12,
                                dpo_learning_rate=1e-3).items():
            setattr(args, name, value)
    return args


def choose_4bit(requested: bool | None) -> tuple[bool, str]:
    """(load in 4 bits?, why). Asked for explicitly: as asked (a missing bitsandbytes is then an error that
    says how to install it, never a silent full-precision run). Otherwise 4 bits exactly when bitsandbytes
    imports and a GPU is present."""
    if requested is not None:
        return requested, f"{'4-bit QLoRA' if requested else 'full-precision LoRA'}, as asked"
    try:
        import bitsandbytes  # noqa: F401
        have_bnb = True
    except ImportError:
        have_bnb = False
    if have_bnb and torch.cuda.is_available():
        return True, "4-bit QLoRA: bitsandbytes and a GPU are present"
    missing = "no GPU" if have_bnb else "bitsandbytes is not installed (pip install bitsandbytes)"
    return False, f"full-precision LoRA: {missing}; pass --load_in_4bit to quantize anyway"


def stage_rows(args: argparse.Namespace, stage: str) -> Any:
    if args.smoke:
        return Dataset.from_list(stack_exchange_rows(args.rows, seed=args.seed + (stage == "dpo")))
    return hub_rows(args.dataset_name, args.rows, data_dir={"sft": "data/finetune", "dpo": "data/rl"}[stage])


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def base_model(args: argparse.Namespace) -> str:
    """The hub model, or for --smoke a tiny Llama pretrained on Q&A chats (good and bad answers alike);
    its tokenizer carries a chat template, as an instruct model's does."""
    if not args.smoke:
        return args.model_name
    rows = stack_exchange_rows(400, seed=args.seed + 10)
    texts = [f"<|user|>\n{r['question']}<|end|>\n<|assistant|>\n{r[answer]}<|end|>\n"
             for r in rows for answer in ("response_j", "response_k")]
    path = tiny_causal_lm(texts, os.path.join(args.output_dir, "smoke-models", "base"), steps=80, seed=args.seed)
    print(f"Smoke: tiny Llama base model in {path}")
    return path


def lora(args: argparse.Namespace) -> LoraConfig:
    """LoRA over every linear layer; a new config per stage (peft records the base model in it)."""
    return LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.05, target_modules="all-linear",
                      task_type="CAUSAL_LM")


def options(args: argparse.Namespace, output_dir: str, steps: int, learning_rate: float, four_bit: bool) -> dict:
    gpu = torch.cuda.is_available() and not args.smoke
    init = {"dtype": "bfloat16"} if gpu else {}  # also the 4-bit layers' compute dtype
    if four_bit:
        init.update(load_in_4bit=True, bnb_4bit_use_double_quant=True)
    return dict(output_dir=output_dir, max_steps=steps, learning_rate=learning_rate, seed=args.seed,
                per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
                gradient_accumulation_steps=args.gradient_accumulation_steps, max_length=args.max_length,
                logging_steps=max(1, steps // 4), save_strategy="no", report_to="none", disable_tqdm=args.smoke,
                dataloader_pin_memory=gpu, bf16=gpu, activation_checkpointing=gpu, model_init_kwargs=init or None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        smoke_setup()
    four_bit, why = choose_4bit(args.load_in_4bit)
    print(f"Note: {why}.")
    base = base_model(args)
    results: dict[str, Any] = {"base": base, "load_in_4bit": four_bit, "why": why}

    # 1. SFT: question -> the better answer, as a chat; the adapter merged into the full-precision base.
    rows = stage_rows(args, "sft")
    chats = rows.map(lambda r: {"prompt": user(r["question"]), "completion": assistant(r["response_j"])},
                     remove_columns=rows.column_names)
    sft_dir = os.path.join(args.output_dir, "sft")
    sft = SFTTrainer(base, train_dataset=chats, peft_config=lora(args),
                     args=SFTConfig(**options(args, sft_dir, args.sft_steps, args.sft_learning_rate, four_bit)))
    results["sft_trained_quantized"] = is_quantized(sft.model)
    sft.train()
    sft.save_model(sft_dir)  # the adapter
    sft_model = merge_adapter_and_save(sft.model, os.path.join(sft_dir, "merged"), tokenizer=sft.processing_class)
    losses = [row["loss"] for row in sft.state.log_history if "loss" in row]
    results["sft_loss"] = [losses[0], losses[-1]]
    print(f"SFT loss {losses[0]:.2f} -> {losses[-1]:.2f}; merged SFT model in {sft_model}")
    del sft

    # 2. DPO with a fresh adapter over the SFT model; the reference is that model with the adapter disabled.
    rows = stage_rows(args, "dpo")
    pairs = rows.map(lambda r: {"prompt": user(r["question"]), "chosen": assistant(r["response_j"]),
                                "rejected": assistant(r["response_k"])}, remove_columns=rows.column_names)
    split = pairs.train_test_split(test_size=0.1, seed=args.seed)
    dpo_dir = os.path.join(args.output_dir, "dpo")
    dpo = DPOTrainer(sft_model, train_dataset=split["train"], eval_dataset=split["test"], peft_config=lora(args),
                     args=DPOConfig(beta=args.beta, max_prompt_length=args.max_prompt_length,
                                    **options(args, dpo_dir, args.dpo_steps, args.dpo_learning_rate, four_bit)))
    results.update(dpo_ref_model_is_none=dpo.ref_model is None, dpo_trained_quantized=is_quantized(dpo.model))
    dpo.train()
    metrics = dpo.evaluate()
    dpo.save_model(dpo_dir)  # the adapter
    results.update(dpo_eval_accuracy=metrics["eval_rewards/accuracies"],
                   dpo_eval_margin=metrics["eval_rewards/margins"])
    print(f"DPO held-out rewards/accuracies {metrics['eval_rewards/accuracies']:.2f}, "
          f"margins {metrics['eval_rewards/margins']:.2f}")

    # 3. Merge into the full-precision SFT weights and save a plain model.
    merged_dir = merge_adapter_and_save(dpo.model, os.path.join(args.output_dir, "merged"),
                                        base_model_name_or_path=sft_model, tokenizer=dpo.processing_class)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    with open(os.path.join(merged_dir, "config.json"), encoding="utf-8") as f:
        results["merged_is_quantized"] = "quantization_config" in json.load(f)
    question = rows[0]["question"]
    ids = tokenizer.apply_chat_template(user(question), add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        out = merged.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    results.update(merged_model=merged_dir, sample={"question": question, "answer": answer})
    save_results(args.output_dir, results)
    print(f"Merged model (plain safetensors, {type(merged).__name__}) saved to {merged_dir}")
    print(f"  Q: {question}\n  A: {answer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
