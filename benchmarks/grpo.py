"""GRPO / RLOO throughput on CPU: tether's GRPOTrainer and RLOOTrainer vs TRL 1.16's, same model and data.

    python benchmarks/grpo.py                        # 4 runs: TRL and tether, GRPO and RLOO
    python benchmarks/grpo.py --methods grpo         # one method
    python benchmarks/grpo.py --quick                # tiny smoke run

What is measured: optimizer steps of each trainer's own `train()` on sft.py's ~23M Llama (harness.py), with
the same prompts, group size, completion length, sampling and reward function, each (library, method) in a
fresh subprocess with the same `torch.set_num_threads` (`--threads`, default: the CPUs this process may use).
Sizes: G = 8 completions per prompt (`--num-generations`), B = 16 completions per step (`--batch-size`: TRL's
per_device_train_batch_size, which counts completions in both libraries, so B / G = 2 prompts per step),
completions of at most N = 64 tokens (`--max-new-tokens`), prompts of exactly PROMPT_TOKENS = 32 tokens
(plain text, a prompt-only dataset of 512), 2 warm-up + 8 timed steps; --quick: G = 4, B = 4, N = 8, 1 + 2.

Timing, the same way from outside for both libraries:
- step: on_step_begin -> on_step_end of a TrainerCallback (one optimizer step: here one round of generation,
  its scoring and one update; logging runs after on_step_end and is not timed).
- generation: the sampler call inside the step. tether: `tether.trainers.online.sample_groups` (prefill of
  the B / G unique prompts, KV cache shared by each group, decoding to EOS or N). TRL: the trainer class's
  `_generate_single_turn` (left-padding, `model.generate` on B prompt rows, as TRL's sampler repeats each
  prompt G times, cut after the first EOS). Both return the completion tokens up to and including EOS.
- scoring: the reward call. tether: `RewardFunctions.score`; TRL: `_calculate_rewards`. Decoding the
  completions to text happens outside both (tether: in `_generate_round`; TRL: in `_generate`).
- round: tether `OnlineTrainer._generate_round`, TRL `_generate_and_score_completions`: generation,
  decoding, scoring, reference log-probs (RLOO), advantages. "update" is step - generation - scoring; of
  it, "no-grad prep" is round - generation - scoring (decoding, tokenising / padding, reference log-probs,
  advantages); the rest is the training pass (forward + backward + AdamW) and the Trainer's loop.
Derived figures, per timed step, median over the timed steps: completions/s = B / step s; generated
tokens/s = the step's generated tokens (the actual completion lengths, EOS counted) / step s; sampler
tokens/s = generated tokens / generation s; generation share = generation s / step s. Completions/s (wall)
= all timed completions / the wall time from the end of the warm-up to the end of the last step. Mean
completion tokens is over all timed completions: a random-init model rarely samples EOS, so most
completions run to N in both libraries (both stop at the tokenizer's EOS, which is also the model's
generation_config EOS); "EOS %" is the share that ended at one. "Prompt rows encoded / step" is the number
of prompt rows given to the sampler: B for TRL (the prompt repeated per completion), B / G for tether (each
group shares its prompt's KV cache); every row is PROMPT_TOKENS tokens in both. Peak RSS is the child's
ru_maxrss; "CPU/wall (load)" is CPU-seconds per wall-second over the timed steps and the 1-minute load
average at the end (a load above the thread count means other processes shared the cores).

Settings, the same on both configs (field names both accept): num_generations G,
per_device_train_batch_size B, max_completion_length N, temperature 1.0, top_p 1.0, top_k 0 (min_p off:
TRL None, tether 0.0), learning_rate 1e-6, epsilon 0.2, num_iterations 1, gradient_accumulation_steps 1
(so steps_per_generation 1: one round per step, on-policy), mask_truncated_completions False,
disable_dropout True, bf16 False (`--bf16`: True) and use_cpu True (TRL defaults bf16 to True), gradient_checkpointing False
(TRL's default is True), seed 0, logging_steps 1, report_to none, save_strategy no. Method defaults kept in
both: GRPO beta 0.0 (no reference model), loss_type "dapo", scale_rewards "group"; RLOO beta 0.05 (a
reference model in both: TRL loads a second copy, tether copies the policy), normalize_advantages False.
tether only: num_completions_to_log 0 (its samples.jsonl; TRL's log_completions defaults to False). Reward,
the same function in both: the share of the letter TARGET in the decoded completion (cheap, deterministic,
and it varies within a group, so advantages are not all zero).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness

PROMPT_TOKENS = 32
TARGET = "e"
LEARNING_RATE = 1e-6
# What a step records besides its time (0 where no wrapper ran): seconds per phase, then the wrappers' counts.
PHASE_KEYS = ("generation", "scoring", "round", "completions", "gen_tokens", "ended", "prompt_rows",
              "prompt_tokens", "reward")
NAMES = {"trl": "TRL", "tether": "tether"}
METHODS = {"grpo": ("GRPO", 0.0), "rloo": ("RLOO", 0.05)}  # name, beta (both libraries' default for it)


def build_assets(work: Path, quick: bool) -> dict[str, Any]:
    return harness.build_prompt_assets(work, quick, PROMPT_TOKENS)


target_share = harness.letter_share(TARGET)


# ----- timing (child) --------------------------------------------------------------------------------------
class Steps:
    """Seconds per named phase within each optimizer step (phases may nest: each wrapper times its own call),
    plus counts the wrappers add (generated tokens, completions, ...). `callback()` marks the steps."""

    def __init__(self) -> None:
        self.now: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self.t0 = self.cpu0 = 0.0

    def wrap(self, owner: Any, name: str, phase: str,
             count: Callable[[Any, tuple[Any, ...]], dict[str, float]] | None = None) -> None:
        """Replace `owner.name` (a class's method or a module's function) by a timed version; `count(result,
        args)` gives numbers to add to the step."""
        func = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                out = func(*args, **kwargs)
            finally:
                self.now[phase] += time.perf_counter() - t0
            for key, value in (count(out, args) if count else {}).items():
                self.now[key] += value
            return out

        setattr(owner, name, timed)

    def callback(self) -> Any:
        from transformers import TrainerCallback

        steps = self

        class StepTimer(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                steps.now = defaultdict(float)
                steps.t0, steps.cpu0 = time.perf_counter(), time.process_time()

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                now = time.perf_counter()
                steps.steps.append({**dict.fromkeys(PHASE_KEYS, 0.0), **steps.now, "step": now - steps.t0,
                                    "cpu": time.process_time() - steps.cpu0, "t_end": now})

        return StepTimer()


def summarise(steps: Steps, warmup: int, max_new_tokens: int) -> dict[str, Any]:
    timed = steps.steps[warmup:]
    missing = [i for i, s in enumerate(steps.steps) if not s.get("completions")]
    if missing:
        raise SystemExit(f"steps {missing} ran without the wrapped sampler: the benchmark times generation "
                         "by wrapping it; wrap the function train() now samples with.")

    def med(f: Callable[[dict[str, float]], float], digits: int = 3) -> float:
        return round(statistics.median(f(s) for s in timed), digits)

    completions = sum(s["completions"] for s in timed)
    wall = timed[-1]["t_end"] - (timed[0]["t_end"] - timed[0]["step"])
    return {
        "timed_steps": len(timed),
        "warmup_steps": warmup,
        "completions_per_step": round(completions / len(timed), 1),
        "completions_per_s": med(lambda s: s["completions"] / s["step"]),
        "completions_per_s_wall": round(completions / wall, 3),
        "gen_tokens_per_s": med(lambda s: s["gen_tokens"] / s["step"], 1),
        "sampler_tokens_per_s": med(lambda s: s["gen_tokens"] / s["generation"], 1),
        "s_per_step": med(lambda s: s["step"]),
        "generation_s": med(lambda s: s["generation"]),
        "generation_share": med(lambda s: s["generation"] / s["step"]),
        "scoring_s": med(lambda s: s["scoring"], 4),
        "update_s": med(lambda s: s["step"] - s["generation"] - s["scoring"]),
        "prep_s": med(lambda s: s["round"] - s["generation"] - s["scoring"]),
        "train_pass_s": med(lambda s: s["step"] - s["round"]),
        "gen_tokens_per_step": round(sum(s["gen_tokens"] for s in timed) / len(timed), 1),
        "mean_completion_tokens": round(sum(s["gen_tokens"] for s in timed) / completions, 2),
        "eos_fraction": round(sum(s["ended"] for s in timed) / completions, 4),
        "max_new_tokens": max_new_tokens,
        "prompt_rows_encoded_per_step": round(sum(s["prompt_rows"] for s in timed) / len(timed), 1),
        "mean_prompt_tokens": round(sum(s["prompt_tokens"] for s in timed)
                                    / sum(s["prompt_rows"] for s in timed), 2),
        "reward_mean": round(sum(s["reward"] for s in timed) / len(timed), 4),
        "peak_rss_mib": round(harness.peak_rss_mib(), 1),
        "cpu_per_wall": round(sum(s["cpu"] for s in timed) / sum(s["step"] for s in timed), 2),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


# ----- one run (child) -------------------------------------------------------------------------------------
def run_one(lib: str, method: str, a: Any) -> dict[str, Any]:
    import torch

    torch.set_num_threads(a.threads)
    from datasets import Dataset
    from transformers import AutoTokenizer, set_seed

    name, beta = METHODS[method]
    work = a.workdir
    tok = AutoTokenizer.from_pretrained(work / "model")
    eos = tok.eos_token_id
    steps = Steps()
    if lib == "trl":
        import trl

        Trainer, Config = getattr(trl, f"{name}Trainer"), getattr(trl, f"{name}Config")
        extra: dict[str, Any] = {}

        def generated(out: Any, args: tuple[Any, ...]) -> dict[str, float]:
            ids = out[0] if isinstance(out, tuple) else out  # lists; GRPO returns (ids, logprobs), RLOO ids
            prompt_ids = args[1]  # (self, prompt_ids, ...): one row per completion
            return {"completions": len(ids), "gen_tokens": sum(len(x) for x in ids),
                    "ended": sum(bool(x) and x[-1] == eos for x in ids),
                    "prompt_rows": len(prompt_ids), "prompt_tokens": sum(len(p) for p in prompt_ids)}

        steps.wrap(Trainer, "_generate_single_turn", "generation", generated)
        steps.wrap(Trainer, "_calculate_rewards", "scoring",
                   lambda out, args: {"reward": float(out.sum(1).mean())})  # [n, reward functions]
        steps.wrap(Trainer, "_generate_and_score_completions", "round")
    else:
        import tether
        import tether.trainers.online as online
        from tether.rollout.rewards import RewardFunctions

        Trainer, Config = getattr(tether, f"{name}Trainer"), getattr(tether, f"{name}Config")
        extra = {"num_completions_to_log": 0}

        def generated(out: Any, args: tuple[Any, ...]) -> dict[str, float]:
            prompts = args[1]  # (model, prompts, ...): the unique prompts, each sampled G times
            return {"completions": out.completion_ids.shape[0], "gen_tokens": int(out.completion_mask.sum()),
                    "ended": int((~out.truncated).sum()),
                    "prompt_rows": len(prompts), "prompt_tokens": sum(len(p) for p in prompts)}

        steps.wrap(online, "sample_groups", "generation", generated)  # as _generate_round looks it up
        steps.wrap(RewardFunctions, "score", "scoring", lambda out, args: {"reward": float(out[0].mean())})
        steps.wrap(online.OnlineTrainer, "_generate_round", "round")

    prompts = json.loads((work / "prompts.json").read_text())
    config = Config(
        output_dir=str(work / f"out-{lib}-{method}"),
        per_device_train_batch_size=a.batch_size,
        num_generations=a.num_generations,
        max_completion_length=a.max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=LEARNING_RATE,
        beta=beta,
        epsilon=0.2,
        num_iterations=1,
        gradient_accumulation_steps=1,
        mask_truncated_completions=False,
        disable_dropout=True,
        **harness.precision_kwargs(),  # bf16 False (fp32) unless --bf16; use_cpu True
        gradient_checkpointing=False,
        max_steps=a.warmup + a.steps,
        logging_steps=harness.LOGGING_STEPS[0],
        report_to="none",
        save_strategy="no",
        seed=0,
        **extra,
    )
    set_seed(0)
    t0 = time.perf_counter()
    trainer = Trainer(str(work / "model"), reward_funcs=target_share, args=config,
                      train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok)
    trainer.add_callback(steps.callback())
    setup_s = time.perf_counter() - t0
    trainer.train()
    return {"lib": lib, "method": name, **summarise(steps, a.warmup, a.max_new_tokens),
            "num_generations": a.num_generations, "batch_size": a.batch_size, "beta": beta,
            "torch_threads": torch.get_num_threads(), "setup_s": round(setup_s, 1),
            "loss_type": getattr(config, "loss_type", None)}


# ----- the parent ------------------------------------------------------------------------------------------
def render(results: list[dict[str, Any]]) -> str:
    columns: list[harness.Column] = [
        ("completions/s (median step)", lambda r: f"{r['completions_per_s']:.2f}"),
        ("completions/s (wall)", lambda r: f"{r['completions_per_s_wall']:.2f}"),
        ("generated tokens/s", lambda r: f"{r['gen_tokens_per_s']:.0f}"),
        ("s/step", lambda r: f"{r['s_per_step']:.2f}"),
        ("generation s (share)", lambda r: f"{r['generation_s']:.2f} ({100 * r['generation_share']:.0f}%)"),
        ("scoring s", lambda r: f"{r['scoring_s']:.4f}"),
        ("update s", lambda r: f"{r['update_s']:.2f}"),
        ("of it no-grad prep s", lambda r: f"{r['prep_s']:.2f}"),
        ("sampler tokens/s", lambda r: f"{r['sampler_tokens_per_s']:.0f}"),
        ("mean completion tokens (EOS %)",
         lambda r: f"{r['mean_completion_tokens']:.1f} ({100 * r['eos_fraction']:.1f})"),
        ("prompt rows encoded / step", lambda r: f"{r['prompt_rows_encoded_per_step']:.0f}"),
        ("reward (mean)", lambda r: f"{r['reward_mean']:.4f}"),
        ("peak RSS MiB", lambda r: f"{r['peak_rss_mib']:.0f}"),
        ("CPU/wall (load)", lambda r: f"{r['cpu_per_wall']:.2f} ({r['loadavg_1m']:.1f})"),
    ]
    headers = ["method", "library", *(h for h, _ in columns)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in results:
        cells = ([f"error: {r['error']}", *[""] * (len(columns) - 1)] if "error" in r
                 else [f(r) for _, f in columns])
        lines.append(f"| {r['method']} | {NAMES[r['lib']]} | " + " | ".join(cells) + " |")
    ok = {(r["lib"], r["method"]): r for r in results if "error" not in r}
    notes = []
    for name, _ in METHODS.values():
        t, b = ok.get(("tether", name)), ok.get(("trl", name))
        if t and b:
            ratios = [(f"completions/s = {t['completions_per_s'] / b['completions_per_s']:.2f} (target 2)"),
                      f"generated tokens/s = {t['gen_tokens_per_s'] / b['gen_tokens_per_s']:.2f}",
                      f"sampler tokens/s = {t['sampler_tokens_per_s'] / b['sampler_tokens_per_s']:.2f}",
                      f"update s = {t['update_s'] / b['update_s']:.2f}",
                      f"peak RSS = {t['peak_rss_mib'] / b['peak_rss_mib']:.2f}"]
            notes.append(f"{name}: tether/TRL " + ", ".join(ratios) + "; generation share of the step: "
                         f"tether {100 * t['generation_share']:.0f}%, TRL {100 * b['generation_share']:.0f}%")
    return "\n".join(lines + ([""] if notes else []) + notes)


def main() -> None:
    p = harness.parser(__doc__, steps=8, warmup=2)
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--batch-size", type=int, help="completions per step (default 16; 4 with --quick)")
    p.add_argument("--num-generations", type=int, help="completions per prompt (default 8; 4 with --quick)")
    p.add_argument("--max-new-tokens", type=int, help="max_completion_length (default 64; 8 with --quick)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in every run (default: usable CPUs)")
    a = harness.parse(p)
    a.batch_size = a.batch_size or (4 if a.quick else 16)
    a.num_generations = a.num_generations or (4 if a.quick else 8)
    a.max_new_tokens = a.max_new_tokens or (8 if a.quick else 64)
    a.threads = a.threads or len(os.sched_getaffinity(0))
    if a.run:
        harness.emit(run_one(a.run, a.methods, a))
        return
    if a.batch_size % a.num_generations:
        raise SystemExit(f"--batch-size ({a.batch_size}) must be a multiple of --num-generations "
                         f"({a.num_generations}): a step holds whole groups.")

    def jobs() -> list[harness.Job]:
        flags = (f"--steps {a.steps} --warmup {a.warmup} --batch-size {a.batch_size} --num-generations "
                 f"{a.num_generations} --max-new-tokens {a.max_new_tokens} --threads {a.threads}").split()
        return [harness.Job(lib, {"method": METHODS[m][0]}, ["--methods", m, *flags], m, f"method={m}")
                for m in a.methods.split(",") for lib in a.libs.split(",")]

    harness.run_parent(a, "grpo", __file__, build_assets, jobs, render)


if __name__ == "__main__":
    main()
