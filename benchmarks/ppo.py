"""PPO rollout / update benchmark on CPU: tether's PPOTrainer.train(), its phases, and what TRL 1.16 can be held to.

    python benchmarks/ppo.py                          # model.generate baseline, TRL GRPO, tether PPO (4 and 1 epochs)
    python benchmarks/ppo.py --libs hf,tether         # no TRL
    python benchmarks/ppo.py --quick                  # tiny smoke run

What is measured: steps of the RL loop on sft.py's ~23M Llama (harness.py), each split into its phases. Sizes:
B = 16 completions per step (`--batch-size`), max_new_tokens N = 64 (`--max-new-tokens`), prompts of 32 tokens,
2 warm-up + 8 timed steps; with --quick B = 8, N = 16, 1 + 2 steps.
- tether (`--run tether`): `PPOTrainer.train()` with a value-head policy and a frozen reference copy. Phases, per
  step: generation (`PPOTrainer.generate` on the step's B prompts, as train() calls it), scoring (decoding and the
  reward function: the time between generate returning and `step()` starting), update (`step()`), itself split into
  its no-grad passes (old log-probs and values of the policy, reference log-probs: `time/ppo/forward_pass` of the
  stats) and the optimisation (`ppo_epochs` passes over the batch, forward + backward + Adam:
  `time/ppo/optimize_step`). Run with `ppo_epochs` 4 (tether's default, classic TRL's) and 1 (`--ppo-epochs`), one
  mini-batch of B per epoch.
- TRL (`--run trl`): TRL 1.16 has no PPO; its `GRPOTrainer` does the same three phases, so those are compared.
  Timed by wrapping its methods: generation = `_generate_single_turn` (left-pad, `model.generate`, cut at EOS),
  scoring = `_calculate_rewards` (the reward function), and the optimizer step (on_step_begin -> on_step_end). Its
  update is the step minus generation and scoring, split into the no-grad part (`_generate_and_score_completions`
  minus generation and scoring: tokenizing and decoding, padding, the reference log-probs, group advantages) and
  the training pass (step minus `_generate_and_score_completions`: one forward + backward + AdamW).
- model.generate (`--run hf`): the plain baseline for generation alone: `AutoModelForCausalLM.generate` on the
  same B prompts per step, left-padded into one batch, same sampling settings and max_new_tokens, cut at EOS.
How the comparison is made:
- Same model weights, same prompts (all exactly PROMPT_TOKENS tokens, so no library pads a prompt and every
  generation batch is [B, PROMPT_TOKENS] -> [B, PROMPT_TOKENS + max_new_tokens]), B completions per step
  everywhere: tether answers B distinct prompts once each, TRL's GRPO B / G prompts G times each (`--num-generations`).
  Sampling: do_sample, temperature 1.0, top_k 0, top_p 1.0, max_new_tokens N (TRL: max_completion_length N). The
  random-init model almost never samples EOS, so nearly every completion has N tokens; generated tokens/s counts
  the tokens each sampler returns (up to and including EOS) over its generation time.
- Same reward function for both: the share of the letter TARGET in the decoded completion (cheap, deterministic,
  and it varies between samples, so GRPO's group advantages are not all zero).
- The update is compared per completion: update seconds / B. PPO does more work per completion than GRPO's step:
  a value head and its loss, a no-grad pass for old log-probs and values that GRPO skips (with num_iterations=1 its
  old log-probs are the detached current ones), and `ppo_epochs` training passes where GRPO makes one. Both compute
  reference log-probs (TRL: beta=0.04, `--beta`; its default 0.0 would load no reference model). The
  ppo_epochs=1 row is the closest match: same forward + backward passes per completion plus PPO's extra no-grad one.
- Episodes/s is B over the whole step (generation + scoring + update, and tether's loop overhead), median over the
  timed steps; a step is one optimizer update for TRL, one `step()` (ppo_epochs optimizer updates) for tether.
- Peak RSS: the child's ru_maxrss (whole run), and per phase the largest RSS sampled every 10 ms while that phase
  ran (warm-up included): a sampled peak can miss a spike shorter than 10 ms.
Settings pinned on TRL's GRPOConfig (tether's PPOConfig has no such switches): bf16=False, gradient_checkpointing=False
(TRL defaults True), disable_dropout=True, num_iterations=1, steps_per_generation=1, gradient_accumulation_steps=1,
learning_rate as tether's, mask_truncated_completions=False (its default: every completion is truncated here), seed 0.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness

PROMPT_TOKENS = 32
TARGET = "e"
LEARNING_RATE = 1e-5
RUNS = ("hf", *harness.LIBS)
NAMES = {"hf": "model.generate", "trl": "TRL GRPO", "tether": "tether PPO"}


def build_assets(work: Path, quick: bool) -> dict[str, Any]:
    return harness.build_prompt_assets(work, quick, PROMPT_TOKENS)


target_share = harness.letter_share(TARGET)


# ----- timing phases (child) ------------------------------------------------------------------------------------
class Phases:
    """Seconds per named phase within each step, and the RSS peak sampled every 10 ms per innermost open phase.

    Phases nest (`begin`/`end` form a stack): a phase's seconds include those of the phases opened inside it.
    """

    def __init__(self) -> None:
        import psutil

        self.open: list[tuple[str, float]] = []
        self.label = "setup"  # the innermost open phase, read by the sampler thread
        self.now: dict[str, float] = defaultdict(float)  # the current step's seconds (and counts) per phase
        self.steps: list[dict[str, float]] = []
        self.rss_peak: dict[str, float] = defaultdict(float)
        process = psutil.Process()

        def sample() -> None:
            while True:
                rss, label = process.memory_info().rss / 2**20, self.label
                self.rss_peak[label] = max(self.rss_peak[label], rss)
                time.sleep(0.01)

        threading.Thread(target=sample, daemon=True).start()

    def begin(self, name: str) -> None:
        self.open.append((name, time.perf_counter()))
        self.label = name

    def end(self) -> None:
        name, t0 = self.open.pop()
        self.now[name] += time.perf_counter() - t0
        self.label = self.open[-1][0] if self.open else "other"

    def wrap(self, func: Callable[..., Any], name: str, count: Callable[[Any], int] | None = None) -> Callable:
        """`func` timed as phase `name`; `count(result)` is added to the step's `name + "_tokens"`."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            self.begin(name)
            try:
                out = func(*args, **kwargs)
            finally:
                self.end()
            if count is not None:
                self.now[name + "_tokens"] += count(out)
            return out

        return timed

    def close_step(self, total: float, **values: float) -> None:
        self.steps.append({**self.now, **values, "total": total, "t_end": time.perf_counter(),
                           "cpu_end": time.process_time()})
        self.now = defaultdict(float)


def summarise(phases: Phases, warmup: int, batch: int, split: Callable[[dict[str, float]], dict[str, float]],
              setup_s: float) -> dict[str, Any]:
    """Medians over the steps after `warmup` of each phase (`split(step)` maps a step's raw timings to the reported
    phases), episodes/s, generated tokens/s, RSS and load."""
    timed, first = phases.steps[warmup:], phases.steps[warmup - 1] if warmup else None
    rows = [split(s) for s in timed]
    med = {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]}
    wall = timed[-1]["t_end"] - (first["t_end"] if first else timed[0]["t_end"] - timed[0]["total"])
    cpu = timed[-1]["cpu_end"] - (first["cpu_end"] if first else 0.0)
    gen_tokens = [s.get("generation_tokens", 0) for s in timed]
    res: dict[str, Any] = {
        "timed_steps": len(timed),
        "warmup_steps": warmup,
        "episodes_per_step": batch,
        "s_per_step": med,
        "episodes_per_s": round(statistics.median(batch / s["total"] for s in timed), 3),
        "episodes_per_s_wall": round(batch * len(timed) / wall, 3),
        "gen_tokens_per_step": round(statistics.mean(gen_tokens), 1),
        "gen_tokens_per_s": round(statistics.median(n / r["generation"] for n, r in zip(gen_tokens, rows)), 1),
        "update_s_per_completion": round(med["update"] / batch, 4) if "update" in med else None,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_peak_sampled_mib": {k: round(v, 1) for k, v in phases.rss_peak.items()},
        "reward_first_last": [round(phases.steps[0].get("reward", float("nan")), 4),
                              round(timed[-1].get("reward", float("nan")), 4)],
        "cpu_per_wall": round(cpu / wall, 2),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "setup_s": round(setup_s, 1),
    }
    return res


# ----- the three runs (child) -----------------------------------------------------------------------------------
def sampling(max_new_tokens: int) -> dict[str, Any]:
    """Generation settings every sampler gets: plain sampling from the full distribution."""
    return {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "max_new_tokens": max_new_tokens}


def run_hf(work: Path, a: Any, phases: Phases) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32).eval()
    prompts = json.loads((work / "prompts.json").read_text())
    setup_s = time.perf_counter() - t0
    torch.manual_seed(0)
    for i in range(a.warmup + a.steps):
        start = i * a.batch_size % (len(prompts) - a.batch_size + 1)
        tok.padding_side = "left"  # no effect here (equal lengths), but it is what a batched baseline needs
        inputs = tok(prompts[start:start + a.batch_size], return_tensors="pt", padding=True)
        phases.begin("generation")
        with torch.no_grad():
            out = model.generate(**inputs, **sampling(a.max_new_tokens), pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)  # [b, q + r]
        new = out[:, inputs["input_ids"].shape[1]:]  # [b, r]
        # Tokens up to and including the first EOS (rows that ended early are padded after it).
        is_eos = new == tok.eos_token_id
        lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, new.shape[1])
        phases.end()
        phases.now["generation_tokens"] = int(lengths.sum())
        phases.close_step(phases.now["generation"])
    res = summarise(phases, a.warmup, a.batch_size, lambda s: {"generation": s["generation"]}, setup_s)
    return {"lib": "hf", "setting": "generation only", **res}


def run_tether(work: Path, a: Any, phases: Phases) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoTokenizer

    from tether import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(work / "model")
    prompts = json.loads((work / "prompts.json").read_text())
    config = PPOConfig(
        batch_size=a.batch_size, mini_batch_size=a.batch_size, ppo_epochs=a.ppo_epochs, learning_rate=LEARNING_RATE,
        total_steps=a.warmup + a.steps, max_new_tokens=a.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
        output_dir=str(work / f"out-tether-{a.ppo_epochs}"), seed=0, logging_steps=10**9,
    )
    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(work / "model"))
    trainer = PPOTrainer(config, model, None, tok, dataset=Dataset.from_dict({"prompt": prompts}),
                         reward_funcs=target_share)
    setup_s = time.perf_counter() - t0

    # train() calls self.generate and self.step: wrap them on the instance. Scoring is what happens in between.
    generate = phases.wrap(trainer.generate, "generation", count=lambda out: sum(len(r) for r in out))
    update = phases.wrap(trainer.step, "update")
    step_end = [0.0]

    def timed_generate(*args: Any, **kwargs: Any) -> Any:
        out = generate(*args, **kwargs)
        phases.begin("scoring")
        return out

    def timed_step(*args: Any, **kwargs: Any) -> Any:
        phases.end()  # scoring
        stats = update(*args, **kwargs)
        now = time.perf_counter()
        phases.close_step(now - step_end[0], reward=float(stats.get("ppo/mean_scores", "nan")),
                          nograd=stats.get("time/ppo/forward_pass", float("nan")),
                          optimize=stats.get("time/ppo/optimize_step", float("nan")))
        step_end[0] = now
        return stats

    trainer.generate, trainer.step = timed_generate, timed_step
    step_end[0] = time.perf_counter()
    phases.label = "other"
    trainer.train()
    if any("generation" not in s for s in phases.steps):
        raise SystemExit("PPOTrainer.train() ran a step without calling self.generate: the benchmark times "
                         "generation by wrapping that method; wrap the one train() now samples with.")

    def split(s: dict[str, float]) -> dict[str, float]:
        return {"generation": s["generation"], "scoring": s["scoring"], "update": s["update"],
                "nograd": s["nograd"], "optimize": s["optimize"],
                "other": s["total"] - s["generation"] - s["scoring"] - s["update"], "total": s["total"]}

    res = summarise(phases, a.warmup, a.batch_size, split, setup_s)
    return {"lib": "tether", "setting": f"PPO, ppo_epochs={a.ppo_epochs}", **res}


def run_trl(work: Path, a: Any, phases: Phases) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback, set_seed
    from trl import GRPOConfig, GRPOTrainer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(work / "model")
    prompts = json.loads((work / "prompts.json").read_text())
    # Wrapped on the class before the trainer exists: TRL calls them as methods.
    GRPOTrainer._generate_single_turn = phases.wrap(GRPOTrainer._generate_single_turn, "generation",
                                                    count=lambda out: sum(len(ids) for ids in out[0]))
    rewards = phases.wrap(GRPOTrainer._calculate_rewards, "scoring")

    def timed_rewards(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = rewards(*args, **kwargs)  # [completions, reward functions]
        phases.now["reward"] = float(out.mean())
        return out

    GRPOTrainer._calculate_rewards = timed_rewards
    GRPOTrainer._generate_and_score_completions = phases.wrap(GRPOTrainer._generate_and_score_completions, "prep")

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            phases.begin("step")

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            phases.end()
            phases.close_step(phases.now["step"])

    config = GRPOConfig(
        output_dir=str(work / "out-trl"),
        per_device_train_batch_size=a.batch_size,
        num_generations=a.num_generations,
        max_completion_length=a.max_new_tokens,
        temperature=1.0, top_k=0, top_p=1.0,
        beta=a.beta,
        num_iterations=1,
        steps_per_generation=1,
        gradient_accumulation_steps=1,
        learning_rate=LEARNING_RATE,
        max_steps=a.warmup + a.steps,
        bf16=False,
        gradient_checkpointing=False,
        disable_dropout=True,
        mask_truncated_completions=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
    )
    set_seed(0)
    trainer = GRPOTrainer(model=str(work / "model"), reward_funcs=target_share, args=config,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok)
    trainer.add_callback(StepTimer())
    setup_s = time.perf_counter() - t0
    phases.label = "other"
    trainer.train()

    def split(s: dict[str, float]) -> dict[str, float]:
        gen_score = s["generation"] + s["scoring"]
        return {"generation": s["generation"], "scoring": s["scoring"], "update": s["step"] - gen_score,
                "nograd": s["prep"] - gen_score, "optimize": s["step"] - s["prep"], "total": s["step"]}

    res = summarise(phases, a.warmup, a.batch_size, split, setup_s)
    return {"lib": "trl", "setting": f"GRPO, G={a.num_generations}, beta={a.beta}", **res}


# ----- the parent -----------------------------------------------------------------------------------------------
def render(results: list[dict[str, Any]]) -> str:
    """One row per run, then the ratios the comparison rests on."""

    def phase(key: str) -> Callable[[dict[str, Any]], str]:
        return lambda r: f"{r['s_per_step'][key]:.2f}" if key in r["s_per_step"] else "-"

    def rss(r: dict[str, Any]) -> str:
        peaks = r["rss_peak_sampled_mib"]
        update = max(peaks.get(k, 0.0) for k in ("update", "step", "prep"))  # tether's phase; TRL's two
        return f"{peaks.get('generation', 0):.0f} / " + (f"{update:.0f}" if update else "-")

    columns: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("episodes/s (median step)", lambda r: f"{r['episodes_per_s']:.2f}" if "update" in r["s_per_step"] else "-"),
        ("s/step", phase("total")),
        ("generation s", phase("generation")),
        ("scoring s", phase("scoring")),
        ("update s", phase("update")),
        ("no-grad passes s", phase("nograd")),
        ("training passes s", phase("optimize")),
        ("update s / completion", lambda r: f"{r['update_s_per_completion']:.3f}" if r["update_s_per_completion"]
         else "-"),
        ("generated tokens/step", lambda r: f"{r['gen_tokens_per_step']:.0f}"),
        ("generated tokens/s", lambda r: f"{r['gen_tokens_per_s']:.0f}"),
        ("peak RSS MiB (run)", lambda r: f"{r['peak_rss_mib']:.0f}"),
        ("sampled peak RSS MiB generation / update", rss),
        ("reward first -> last", lambda r: "{:.3f} -> {:.3f}".format(*r["reward_first_last"])),
        ("CPU/wall (load)", lambda r: f"{r['cpu_per_wall']:.2f} ({r['loadavg_1m']:.1f})"),
    ]
    headers = ["run", "setting", *(h for h, _ in columns)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in results:
        if "error" in r:
            lines.append(f"| {NAMES[r['lib']]} | {r['setting']} | error: {r['error']} |" + " |" * (len(columns) - 1))
        else:
            lines.append(f"| {NAMES[r['lib']]} | {r['setting']} | " + " | ".join(f(r) for _, f in columns) + " |")
    ok = [r for r in results if "error" not in r]
    hf = next((r for r in ok if r["lib"] == "hf"), None)
    trl = next((r for r in ok if r["lib"] == "trl"), None)
    notes = []
    for t in (r for r in ok if r["lib"] == "tether"):
        parts = []
        if hf:
            parts.append(f"generated tokens/s vs model.generate = {t['gen_tokens_per_s'] / hf['gen_tokens_per_s']:.2f}")
        if trl:
            parts.append(f"vs TRL GRPO generation = {t['gen_tokens_per_s'] / trl['gen_tokens_per_s']:.2f}")
            parts.append(f"update s per completion tether/TRL = "
                         f"{t['update_s_per_completion'] / trl['update_s_per_completion']:.2f}")
            parts.append(f"episodes/s tether/TRL = {t['episodes_per_s'] / trl['episodes_per_s']:.2f}")
            parts.append(f"peak RSS tether/TRL = {t['peak_rss_mib'] / trl['peak_rss_mib']:.2f}")
        if parts:
            notes.append(f"{t['setting']}: " + ", ".join(parts))
    if hf and trl:
        notes.append(f"TRL GRPO generated tokens/s vs model.generate = "
                     f"{trl['gen_tokens_per_s'] / hf['gen_tokens_per_s']:.2f}")
    return "\n".join(lines + ([""] if notes else []) + notes)


def main() -> None:
    p = harness.parser(__doc__, steps=8, warmup=2, runs=RUNS)
    p.add_argument("--batch-size", type=int, help="completions (episodes) per step (default 16; 8 with --quick)")
    p.add_argument("--max-new-tokens", type=int, help="completion length limit (default 64; 16 with --quick)")
    p.add_argument("--num-generations", type=int, default=4, help="TRL GRPO: completions per prompt")
    p.add_argument("--beta", type=float, default=0.04, help="TRL GRPO: KL coefficient (> 0 loads a reference model)")
    p.add_argument("--ppo-epochs", default="4,1", help="tether: comma-separated ppo_epochs, one run each")
    a = harness.parse(p)
    a.batch_size = a.batch_size or (8 if a.quick else 16)
    a.max_new_tokens = a.max_new_tokens or (16 if a.quick else 64)
    if a.run:
        a.ppo_epochs = int(a.ppo_epochs.split(",")[0])
        runner = {"hf": run_hf, "tether": run_tether, "trl": run_trl}[a.run]
        harness.emit({**runner(a.workdir, a, Phases()), "batch_size": a.batch_size,
                      "max_new_tokens": a.max_new_tokens})
        return
    if a.batch_size % a.num_generations:
        raise SystemExit(f"--batch-size ({a.batch_size}) must be a multiple of --num-generations "
                         f"({a.num_generations}): GRPO draws batch_size / num_generations prompts per step.")

    def jobs() -> list[harness.Job]:
        flags = (f"--steps {a.steps} --warmup {a.warmup} --batch-size {a.batch_size} --max-new-tokens "
                 f"{a.max_new_tokens} --num-generations {a.num_generations} --beta {a.beta}").split()
        out = []
        for lib in a.libs.split(","):
            if lib == "tether":
                out += [harness.Job("tether", {"setting": f"ppo_epochs={e}"}, [*flags, "--ppo-epochs", e],
                                    f"epochs{e}", f"PPO ppo_epochs={e}") for e in a.ppo_epochs.split(",")]
            else:
                out.append(harness.Job(lib, {"setting": NAMES[lib]}, flags, "run", NAMES[lib]))
        return out

    harness.run_parent(a, "ppo", __file__, build_assets, jobs, render)


if __name__ == "__main__":
    main()
