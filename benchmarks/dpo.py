"""DPO throughput / memory benchmark on CPU: tether's DPOTrainer vs TRL's (1.16), same model, data and settings.

    python benchmarks/dpo.py                               # both libraries, the three reference settings
    python benchmarks/dpo.py --settings lora --steps 20    # one setting
    python benchmarks/dpo.py --quick                       # tiny smoke run

What is compared: one DPO training step (policy forward with graph over the [2b, t] chosen-then-rejected batch, the
reference log-probs, sigmoid loss, backward, AdamW step) of sft.py's ~23M Llama (harness.py) on the same batches,
in three settings (`--settings`, each library in a fresh subprocess):
- ref: an explicit reference model, a second copy loaded from the same path and passed as `ref_model`.
- lora: peft LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM") via `peft_config`, ref_model=None,
  so the reference is the policy with its adapter disabled.
- precompute: precompute_ref_log_probs=True, ref_model=None: reference log-probs computed in one pass over the data
  in the trainer's constructor (batch 8), none during training. Only training steps are timed; the pass's own time
  is reported apart (`precompute s`, timing the method that runs it in each library).
Data: plain-text pairs {prompt, chosen, rejected} from the harness' text generator, prompts 30-100 tokens,
completions 50-300 tokens (with EOS), independent lengths. Each run trains on the first (warmup + steps) * 8 of 2000
generated pairs (200 with --quick), exactly one epoch, so all settings and both libraries see the same batches and
the precompute pass covers exactly the pairs trained on. Pairs/s is pairs per optimizer step (sequences fed to the
input embedding in the step's graph-building forward, / 2; reference passes run without a graph) over its
on_step_begin -> on_step_end time, median over the steps after `--warmup`. Peak RSS is the child's ru_maxrss
(precompute included). "step-1 logps" are the mean summed completion log-probs of chosen / rejected at step 1: with
the same batch and weights they must agree (the step-1 loss is log 2 in every setting, since policy = reference).

`--regime short`: prompts of 8-40 tokens, completions of at least 8, each pair within 128 tokens; max_length 128,
max_prompt_length 64 (tether).

Settings pinned on both configs (field names both accept):
- bf16=False (`--bf16`: True, both): TRL's configs default bf16 to True when fp16 is off (bf16 autocast; on a CPU-only machine the
  config even refuses it unless use_cpu=True); tether's default is False.
- gradient_checkpointing=False: TRL's default is True, tether's False.
- beta=0.1, loss_type="sigmoid", learning_rate=1e-6, disable_dropout=True: the defaults of both, made explicit.
- max_length=512 (both default to 1024); the data keeps every sequence within it, so truncation never binds.
- precompute_ref_batch_size=8: TRL falls back to per_device_train_batch_size, tether to per_device_eval_batch_size.
- per_device_train_batch_size=8 pairs, seed 0 (and set_seed(0) just before each trainer is built, so the LoRA
  initialisation draws the same numbers: TRL seeds before creating the adapter, tether does not), logging_steps=1.
- max_prompt_length=128 on tether only: TRL 1.16's DPOConfig has no such field (prompts are not truncated apart);
  the prompts are at most 100 tokens, so it does not bind.
TRL 1.16 options with no tether counterpart, left at their defaults: padding_free=False (and TRL falls back to
padding anyway), pad_to_multiple_of ("auto": None on CPU), truncation_mode="keep_start" (no truncation happens),
use_weighting=False, ld_alpha=None, sync_ref_model=False, activation_offloading=False, f_divergence "reverse_kl".
TRL 1.16 has no `use_logits_to_keep`: it always uses its fused LM head, which on CPU (no Triton) scores every
position of the batch (prompt and padding included) and also computes entropy / mean logit / top-1 for its metrics;
tether projects only the completion tokens.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import harness

MAX_LENGTH, MAX_PROMPT_LENGTH, BATCH = 512, 128, 8
SETTINGS = ("ref", "lora", "precompute")


def sizes() -> tuple[int, int]:
    """(max_length, max_prompt_length) of the regime."""
    return (128, 64) if harness.REGIME[0] == "short" else (MAX_LENGTH, MAX_PROMPT_LENGTH)


def build_assets(work: Path, quick: bool) -> dict[str, Any]:
    tok, _, gen, info = harness.build_base_assets(work, quick)
    if harness.REGIME[0] == "short":
        words, accept = ((6, 30), (6, 60)), lambda p, c, r: 8 <= p <= 40 and 8 <= min(c, r) and p + max(c, r) <= 128
    else:
        words, accept = ((24, 80), (40, 240)), lambda p, c, r: 30 <= p <= 100 and 50 <= min(c, r) and max(c, r) <= 300
    pairs, stats = harness.preference_pairs(gen, tok, 200 if quick else 2000, prompt_words=words[0],
                                            completion_words=words[1], accept=accept)
    (work / "pairs.json").write_text(json.dumps(pairs))
    return {**info, **stats}


def run_one(lib: str, setting: str, work: Path, steps: int, warmup: int) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    if lib == "trl":
        from trl import DPOConfig, DPOTrainer

        precompute_method, extra = "_precompute_ref_logps", {}
    else:
        from tether import DPOConfig, DPOTrainer

        precompute_method, extra = "_add_reference_log_probs", {"max_prompt_length": sizes()[1]}

    # Time the reference pass (it runs inside the constructor) by wrapping the method that does it.
    precompute_s: list[float] = []
    original = getattr(DPOTrainer, precompute_method)

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            precompute_s.append(time.perf_counter() - t0)

    setattr(DPOTrainer, precompute_method, timed)
    n_pairs = (steps + warmup) * BATCH

    def build() -> tuple[Any, int]:
        model = str(work / "model")
        tok = AutoTokenizer.from_pretrained(model)
        pairs = json.loads((work / "pairs.json").read_text())
        if len(pairs) < n_pairs:
            raise SystemExit(f"{n_pairs} pairs needed, {len(pairs)} generated: lower --steps")
        ds = Dataset.from_list(pairs[:n_pairs])
        cfg = DPOConfig(
            output_dir=str(work / f"out-{lib}-{setting}"),
            max_length=sizes()[0],
            per_device_train_batch_size=BATCH,
            max_steps=steps + warmup,
            learning_rate=1e-6,
            beta=0.1,
            loss_type="sigmoid",
            logging_steps=harness.LOGGING_STEPS[0],
            report_to="none",
            save_strategy="no",
            seed=0,
            **harness.precision_kwargs(),
            gradient_checkpointing=False,
            disable_dropout=True,
            precompute_ref_log_probs=setting == "precompute",
            precompute_ref_batch_size=BATCH,
            **extra,
        )
        kwargs: dict[str, Any] = {}
        if setting == "ref":
            kwargs["ref_model"] = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        elif setting == "lora":
            kwargs["peft_config"] = LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM")
        set_seed(0)
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, **kwargs)
        return trainer, tok.pad_token_id

    # Pairs per step is the batch size: counting input rows would be wrong, packed rows hold several sequences.
    res, probe = harness.measure(build, warmup, unit="pairs", count=lambda rows, tokens: BATCH)
    keys = ("loss", "logps/chosen", "logps/rejected", "rewards/margins")
    first = {k: round(v, 4) for k, v in probe.first_log.items() if k in keys}
    out = {"lib": lib, "setting": setting, **res, "step1": first, "step1_rows_tokens": probe.first_step[:2]}
    if precompute_s:
        out["precompute_s"] = round(sum(precompute_s), 1)
        out["precompute_pairs_per_s"] = round(n_pairs / sum(precompute_s), 2)
    return out


def main() -> None:
    p = harness.parser(__doc__)
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {','.join(SETTINGS)}")
    a = harness.parse(p)
    if a.run:
        harness.emit(run_one(a.run, a.settings, a.workdir, a.steps, a.warmup))
        return

    def jobs() -> list[harness.Job]:
        flags = f"--steps {a.steps} --warmup {a.warmup}".split()
        return [harness.Job(lib, {"setting": s}, ["--settings", s, *flags], s, f"setting={s}")
                for s in a.settings.split(",") for lib in a.libs.split(",")]

    def step1_logps(r: dict[str, Any]) -> str:
        return f"{r['step1'].get('logps/chosen', float('nan')):.2f} / {r['step1'].get('logps/rejected', float('nan')):.2f}"

    columns = harness.standard_columns("pairs", digits=2, extra=[
        ("precompute s", lambda r: f"{r['precompute_s']:.1f}" if "precompute_s" in r else "-"),
        ("step-1 logps chosen / rejected", step1_logps),
    ])
    harness.run_parent(a, "dpo", __file__, build_assets, jobs,
                       lambda results: harness.table(results, "setting", "pairs", columns))


if __name__ == "__main__":
    main()
