"""Reward-model throughput / memory benchmark on CPU: tether's RewardTrainer vs TRL's (1.16), same model and data.

    python benchmarks/reward.py                  # both libraries
    python benchmarks/reward.py --libs tether    # one side only
    python benchmarks/reward.py --quick          # tiny smoke run

What is compared: one Bradley-Terry training step (forward over the [2b, t] chosen-then-rejected batch, backward,
AdamW step) of the same reward model on the same batches. The model is `LlamaForSequenceClassification`
(num_labels=1, pad_token_id set) built from sft.py's ~23M Llama config with seed 0 and saved once (harness.py); both
trainers load it by path. Data: 2000 plain-text pairs {prompt, chosen, rejected} from the harness' text generator
(200 with --quick): prompts of ~10-75 tokens, chosen and rejected of independent lengths ~10-350 tokens, every
sequence within max_length (see the asset line on stderr). Pairs/s is pairs per optimizer step (the sequences fed to
the input embedding in the step's graph-building forward, / 2) over its on_step_begin -> on_step_end time, median over
the steps after `--warmup`; peak RSS is the child process's ru_maxrss. Same child/parent machinery as sft.py.

Settings pinned on both configs (field names both accept):
- bf16=False (`--bf16`: True, both): TRL's configs default bf16 to True when fp16 is off (bf16 autocast; on a CPU-only machine the
  config even refuses it unless use_cpu=True); tether's default is False.
- gradient_checkpointing=False (`--grad-ckpt` to change): TRL's default is True, tether's False.
- learning_rate=1e-5 (both default to 1e-4), per_device_train_batch_size=8, seed 0, logging_steps=1.
- max_length=512 (128 with `--regime short`, whose prompts are 6-30 words and completions 6-60; both default to
  1024). It never binds: TRL drops pairs longer than max_length where tether
  truncates them, so the data keeps every sequence shorter.
- disable_dropout=True (both default; the model has no dropout anyway), center_rewards_coefficient=None (both).
Left at TRL's defaults, with tether's equivalent behaviour: pad_to_multiple_of ("auto" is None on CPU; tether pads
to the batch maximum too), activation_offloading=False, eos_token (the tokenizer's; both append EOS to each side).
Both trainers are built right after set_seed(0) and load the same saved weights (no random head), both shuffle with
seed 0, tokenization gives the same ids on both sides (harness.preference_pairs checks every pair) and both read the
score at the last real token: the batches (tokens/step) and the loss and margin at step 1 must agree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import harness

MAX_LENGTH = 512
# Pairs per optimizer step: the batch size (no accumulation). Counting input rows would be wrong for tether,
# whose padding-free batches pack several sequences into one row.
PAIRS_PER_STEP = 8


def max_length() -> int:
    return 128 if harness.REGIME[0] == "short" else MAX_LENGTH


def build_assets(work: Path, quick: bool) -> dict[str, Any]:
    tok, _, gen, info = harness.build_base_assets(work, quick)
    harness.save_reward_model(work, tok)
    short = harness.REGIME[0] == "short"
    pairs, stats = harness.preference_pairs(
        gen, tok, 200 if quick else 2000, prompt_words=(6, 30) if short else (8, 60),
        completion_words=(6, 60) if short else (8, 280), accept=lambda p, c, r: p + max(c, r) <= max_length(),
    )
    (work / "pairs.json").write_text(json.dumps(pairs))
    return {**info, **stats}


def run_one(lib: str, work: Path, steps: int, warmup: int, grad_ckpt: bool) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoTokenizer, set_seed

    if lib == "trl":
        from trl import RewardConfig, RewardTrainer
    else:
        from tether import RewardConfig, RewardTrainer

    def build() -> tuple[Any, int]:
        model = work / "reward_model"
        tok = AutoTokenizer.from_pretrained(model)
        ds = Dataset.from_list(json.loads((work / "pairs.json").read_text()))
        cfg = RewardConfig(
            output_dir=str(work / f"out-{lib}"),
            max_length=max_length(),
            per_device_train_batch_size=8,
            max_steps=steps + warmup,
            learning_rate=1e-5,
            logging_steps=harness.LOGGING_STEPS[0],
            report_to="none",
            save_strategy="no",
            seed=0,
            **harness.precision_kwargs(),
            gradient_checkpointing=grad_ckpt,
            disable_dropout=True,
        )
        set_seed(0)
        trainer = RewardTrainer(model=str(model), args=cfg, train_dataset=ds, processing_class=tok)
        return trainer, tok.pad_token_id

    res, probe = harness.measure(build, warmup, unit="pairs", count=lambda rows, tokens: PAIRS_PER_STEP)
    first = {k: round(v, 5) for k, v in probe.first_log.items() if k in ("loss", "accuracy", "margin", "mean_reward")}
    return {"lib": lib, "grad_ckpt": grad_ckpt, **res, "step1": first, "step1_rows_tokens": probe.first_step[:2]}


def main() -> None:
    p = harness.parser(__doc__)
    p.add_argument("--grad-ckpt", type=int, default=0, help="gradient_checkpointing (TRL's default is 1)")
    a = harness.parse(p)
    if a.run:
        harness.emit(run_one(a.run, a.workdir, a.steps, a.warmup, bool(a.grad_ckpt)))
        return

    def jobs() -> list[harness.Job]:
        flags = f"--steps {a.steps} --warmup {a.warmup} --grad-ckpt {a.grad_ckpt}".split()
        return [harness.Job(lib, {"grad_ckpt": bool(a.grad_ckpt)}, flags, "reward", f"grad_ckpt={bool(a.grad_ckpt)}")
                for lib in a.libs.split(",")]

    columns = harness.standard_columns("pairs", digits=2, extra=[
        ("step-1 margin", lambda r: f"{r['step1'].get('margin', float('nan')):.4f}"),
    ])
    harness.run_parent(a, "reward", __file__, build_assets, jobs,
                       lambda results: harness.table(results, "grad_ckpt", "pairs", columns))


if __name__ == "__main__":
    main()
