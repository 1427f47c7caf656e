"""Online DPO throughput on CPU: tether's OnlineDPOTrainer vs TRL 1.16's (trl.experimental.online_dpo), same model,
prompts, sampling and reward function.

    /work/.venv-trl116/bin/python benchmarks/bench_online_dpo.py             # TRL and tether (a venv with both)
    /work/.venv-trl116/bin/python benchmarks/bench_online_dpo.py --quick     # tiny smoke run

What is measured: optimizer steps of each trainer's own `train()` on sft.py's ~23M Llama (harness.py), each library
in a fresh subprocess with the same `torch.set_num_threads` (`--threads`, default: the CPUs this process may use).
Sizes: P = 8 prompts per step (`--prompts`: per_device_train_batch_size, which counts prompts in both libraries),
two completions each (16 completions, 8 pairs per step), at most N = 64 new tokens (`--max-new-tokens`), prompts of
exactly PROMPT_TOKENS = 32 tokens (plain text, 512 of them); 2 warm-up + 8 timed steps; --quick: P = 2, N = 8,
1 + 2 steps.

Timing, the same way from outside for both libraries (grpo.py's `Steps`): step = on_step_begin -> on_step_end of a
TrainerCallback (one generation round, scoring, the reference pass and one update); generation = the sampler call
(tether: `tether.trainers.online.sample_groups`, the P unique prompts with each prompt's KV cache shared by its
pair; TRL: `OnlineDPOTrainer._generate`, which tokenises, left-pads, repeats each prompt twice and calls
`model.generate`); update = step - generation (decoding, scoring, reference and policy log-probs, backward,
AdamW). Derived per timed step, median over the timed steps: completions/s = 2P / step s (the "samples/s"),
pairs/s = P / step s, generated tokens/s = the step's generated tokens (actual completion lengths) / step s.
Peak RSS is the child's ru_maxrss.

Settings, the same on both configs (field names both accept): per_device_train_batch_size P, max_new_tokens N,
temperature 0.9, top_p 1, top_k 0, beta 0.1, loss_type sigmoid, learning_rate 5e-7, max_length 512 (TRL's defaults
for all of these), disable_dropout True, gradient_accumulation_steps 1, bf16 False and use_cpu True (TRL defaults bf16
to True), gradient_checkpointing False (TRL's default is True), seed 0, logging_steps 1, report_to none, save_strategy
no. tether only: num_completions_to_log 0 (its samples.jsonl). The reference is a frozen copy of the policy in both.
Reward, the same function in both: the share of the letter TARGET in the decoded completion.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import harness
from grpo import Steps

PROMPT_TOKENS = 32
TARGET = "e"
NAMES = {"trl": "TRL 1.16", "tether": "tether"}


def build_assets(work: Path, quick: bool) -> dict[str, Any]:
    return harness.build_prompt_assets(work, quick, PROMPT_TOKENS)


target_share = harness.letter_share(TARGET)


def summarise(steps: Steps, warmup: int, prompts: int) -> dict[str, Any]:
    timed = steps.steps[warmup:]
    if any(not s.get("completions") for s in steps.steps):
        raise SystemExit("a step ran without the wrapped sampler: wrap the function train() now samples with.")

    def med(f: Any, digits: int = 3) -> float:
        return round(statistics.median(f(s) for s in timed), digits)

    completions = sum(s["completions"] for s in timed)
    return {
        "timed_steps": len(timed), "warmup_steps": warmup, "prompts_per_step": prompts,
        "completions_per_step": round(completions / len(timed), 1),
        "completions_per_s": med(lambda s: s["completions"] / s["step"]),
        "pairs_per_s": med(lambda s: s["completions"] / 2 / s["step"]),
        "gen_tokens_per_s": med(lambda s: s["gen_tokens"] / s["step"], 1),
        "s_per_step": med(lambda s: s["step"]),
        "generation_s": med(lambda s: s["generation"]),
        "update_s": med(lambda s: s["step"] - s["generation"]),
        "mean_completion_tokens": round(sum(s["gen_tokens"] for s in timed) / completions, 2),
        "eos_fraction": round(sum(s["ended"] for s in timed) / completions, 4),
        "prompt_rows_encoded_per_step": round(sum(s["prompt_rows"] for s in timed) / len(timed), 1),
        "peak_rss_mib": round(harness.peak_rss_mib(), 1),
        "cpu_per_wall": round(sum(s["cpu"] for s in timed) / sum(s["step"] for s in timed), 2),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def run_one(lib: str, a: Any) -> dict[str, Any]:
    import torch

    torch.set_num_threads(a.threads)
    from datasets import Dataset
    from transformers import AutoTokenizer, set_seed

    work = a.workdir
    tok = AutoTokenizer.from_pretrained(work / "model")
    steps = Steps()
    if lib == "trl":
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

        extra: dict[str, Any] = {}

        def generated(out: Any, args: tuple[Any, ...]) -> dict[str, float]:
            prompt_ids, _, completion_ids, completion_mask = out[:4]  # prompts repeated: one row per completion
            return {"completions": completion_ids.shape[0], "gen_tokens": int(completion_mask.sum()),
                    "ended": int((completion_ids == tok.eos_token_id).any(-1).sum()),
                    "prompt_rows": prompt_ids.shape[0]}

        steps.wrap(OnlineDPOTrainer, "_generate", "generation", generated)
    else:
        import tether.trainers.online as online
        from tether import OnlineDPOConfig, OnlineDPOTrainer

        extra = {"num_completions_to_log": 0}

        def generated(out: Any, args: tuple[Any, ...]) -> dict[str, float]:
            return {"completions": out.completion_ids.shape[0], "gen_tokens": int(out.completion_mask.sum()),
                    "ended": int((~out.truncated).sum()), "prompt_rows": len(args[1])}  # the unique prompts

        steps.wrap(online, "sample_groups", "generation", generated)  # as _generate_round looks it up

    config = OnlineDPOConfig(
        output_dir=str(work / f"out-{lib}"), per_device_train_batch_size=a.prompts, max_new_tokens=a.max_new_tokens,
        temperature=0.9, top_p=1.0, top_k=0, beta=0.1, loss_type="sigmoid", learning_rate=5e-7, max_length=512,
        disable_dropout=True, gradient_accumulation_steps=1, bf16=False, use_cpu=True, gradient_checkpointing=False,
        max_steps=a.warmup + a.steps, logging_steps=1, report_to="none", save_strategy="no", seed=0, **extra)
    prompts = json.loads((work / "prompts.json").read_text())
    set_seed(0)
    t0 = time.perf_counter()
    trainer = OnlineDPOTrainer(str(work / "model"), reward_funcs=target_share, args=config,
                               train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok)
    trainer.add_callback(steps.callback())
    setup_s = time.perf_counter() - t0
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"lib": lib, "setting": "online-dpo", **summarise(steps, a.warmup, a.prompts),
            "max_new_tokens": a.max_new_tokens, "torch_threads": torch.get_num_threads(),
            "setup_s": round(setup_s, 1), "loss_first": losses[0], "loss_last": losses[-1]}


def render(results: list[dict[str, Any]]) -> str:
    columns: list[harness.Column] = [
        ("completions/s", lambda r: f"{r['completions_per_s']:.2f}"),
        ("pairs/s", lambda r: f"{r['pairs_per_s']:.2f}"),
        ("generated tokens/s", lambda r: f"{r['gen_tokens_per_s']:.0f}"),
        ("s/step", lambda r: f"{r['s_per_step']:.2f}"),
        ("generation s", lambda r: f"{r['generation_s']:.2f}"),
        ("update s", lambda r: f"{r['update_s']:.2f}"),
        ("mean completion tokens (EOS %)",
         lambda r: f"{r['mean_completion_tokens']:.1f} ({100 * r['eos_fraction']:.1f})"),
        ("prompt rows encoded / step", lambda r: f"{r['prompt_rows_encoded_per_step']:.0f}"),
        ("peak RSS MiB", lambda r: f"{r['peak_rss_mib']:.0f}"),
        ("loss first -> last", lambda r: f"{r['loss_first']:.4f} -> {r['loss_last']:.4f}"),
        ("CPU/wall (load)", lambda r: f"{r['cpu_per_wall']:.2f} ({r['loadavg_1m']:.1f})"),
    ]
    lines = ["| library | " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for r in results:
        cells = [f"error: {r['error']}", *[""] * (len(columns) - 1)] if "error" in r else [f(r) for _, f in columns]
        lines.append(f"| {NAMES[r['lib']]} | " + " | ".join(cells) + " |")
    ok = {r["lib"]: r for r in results if "error" not in r}
    if {"trl", "tether"} <= set(ok):
        t, b = ok["tether"], ok["trl"]
        lines.append(f"\ntether/TRL: completions/s = {t['completions_per_s'] / b['completions_per_s']:.2f}, "
                     f"generation s = {t['generation_s'] / b['generation_s']:.2f}, update s = "
                     f"{t['update_s'] / b['update_s']:.2f}, peak RSS = {t['peak_rss_mib'] / b['peak_rss_mib']:.2f}")
    return "\n".join(lines)


def main() -> None:
    p = harness.parser(__doc__, steps=8, warmup=2)
    p.add_argument("--prompts", type=int, help="prompts per step, a pair each (default 8; 2 with --quick)")
    p.add_argument("--max-new-tokens", type=int, help="max_new_tokens (default 64; 8 with --quick)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in every run (default: usable CPUs)")
    a = harness.parse(p)
    a.prompts = a.prompts or (2 if a.quick else 8)
    a.max_new_tokens = a.max_new_tokens or (8 if a.quick else 64)
    a.threads = a.threads or len(os.sched_getaffinity(0))
    if a.run:
        harness.emit(run_one(a.run, a))
        return

    def jobs() -> list[harness.Job]:
        flags = (f"--steps {a.steps} --warmup {a.warmup} --prompts {a.prompts} --max-new-tokens {a.max_new_tokens} "
                 f"--threads {a.threads}").split()
        return [harness.Job(lib, {"setting": "online-dpo"}, flags, "online-dpo", "online DPO")
                for lib in a.libs.split(",")]

    harness.run_parent(a, "online-dpo", __file__, build_assets, jobs, render)


if __name__ == "__main__":
    main()
