"""How far tether's training steps are from what this CPU's matrix units allow (issue #15).

    python benchmarks/roofline.py                                 # every workload, both regimes
    python benchmarks/roofline.py --workloads sft-packed,grpo --regimes short
    python benchmarks/roofline.py --quick                         # a smoke run (tiny sizes, 1 + 1 steps)

1. The ceiling: torch.matmul throughput (GFLOP/s) on the shapes the model's layers use ([rows, 256] x [256, 1024],
   [rows, 1024] x [1024, 256], [rows, 256] x [256, 256], the [rows, 256] x [256, 32000] LM head), fp32 and bf16,
   at the `--threads` the workloads run with. The fp32 figure of the best shape is the "peak" of the table.
2. Each workload (tether's own trainer and `train()`, harness.py's ~23M Llama with a 32k vocabulary, fp32) runs
   `--warmup` + `--steps` optimizer steps; for the timed steps it records
   - the model FLOPs (the issue's count): per token of a forward pass 2 x the parameters of the decoder body
     (input embedding and LM head excluded) plus attention 4 x layers x hidden x the keys the token attends
     (its position + 1: causal, padding not counted), tripled for passes that build a graph (forward +
     backward); the LM head is counted where it is computed, 2 x hidden x vocabulary per row projected
     (tether projects only the positions whose log-probs are needed; tripled when a gradient flows);
   - the time of each phase: generation (the sampler call, online methods), no-grad passes (reference and
     old-policy log-probs outside the sampler), forward + backward (the trainer's training_step less its no-grad
     passes), optimizer (step and zero_grad), and the rest of the step (data loading and collation, callbacks,
     logging, Python), a step being the time from one on_step_end to the next. PPO runs its own loop: its
     generation is `generate()`, its step from one `step()`'s end to the next (rollout scoring between them is
     "data+overhead"), and forward + backward is `step()` less its no-grad passes and optimizer steps.
   Achieved FLOP/s = a phase's FLOPs / its time; "share" = that / the fp32 peak (bf16's with --bf16).
Regimes: short (at most 128 tokens a sequence, 8 rows a step; GRPO/RLOO 16 completions a step, 4 per prompt, of
32 tokens; PPO 16 completions of 32, mini-batches of 8, 2 PPO epochs) and long (sequences up to 512 tokens;
GRPO/RLOO/PPO completions of 128).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import harness

HIDDEN, INTERMEDIATE, LAYERS = 256, 1024, 6
WORKLOADS = ("sft-padded", "sft-packed", "reward", "dpo", "kto", "grpo", "rloo", "ppo")
REGIMES = {
    # max_length, words per text (lo, hi), prompt words, completion words, GRPO completion tokens
    "short": dict(max_length=128, text_words=(12, 90), prompt_words=(6, 30), completion_words=(6, 60),
                  completion_tokens=32),
    "long": dict(max_length=512, text_words=(60, 380), prompt_words=(20, 80), completion_words=(40, 240),
                 completion_tokens=128),
}


# ----- the ceiling ---------------------------------------------------------------------------------------------
def matmul_ceiling(rows: int, repeats: int) -> dict[str, dict[str, float]]:
    """GFLOP/s of `torch.matmul` on the model's layer shapes, fp32 and bf16 (median of `repeats`)."""
    import torch

    shapes = {"qkvo [r,256]x[256,256]": (HIDDEN, HIDDEN), "up [r,256]x[256,1024]": (HIDDEN, INTERMEDIATE),
              "down [r,1024]x[1024,256]": (INTERMEDIATE, HIDDEN), "head [r,256]x[256,32000]": (HIDDEN, harness.VOCAB)}
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for dtype in (torch.float32, torch.bfloat16):
        for name, (k, n) in shapes.items():
            a, b = torch.randn(rows, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            for _ in range(2):
                a @ b
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - t0)
            out[name][str(dtype).removeprefix("torch.")] = round(2 * rows * k * n / statistics.median(times) / 1e9, 1)
    return dict(out)


def model_mix_ceiling(ceiling: dict[str, dict[str, float]], dtype: str) -> float:
    """GFLOP/s of the model's own matmuls at the measured rates: per token, 6 layers of q, k, v, o (256 x 256),
    gate and up (256 x 1024), down (1024 x 256), and the LM head (256 x 32000), each at its shape's rate; the
    FLOP-weighted harmonic mean (time = sum of FLOPs / rate)."""
    flops = {"qkvo [r,256]x[256,256]": 4 * LAYERS * HIDDEN * HIDDEN,
             "up [r,256]x[256,1024]": 2 * LAYERS * HIDDEN * INTERMEDIATE,
             "down [r,1024]x[1024,256]": LAYERS * INTERMEDIATE * HIDDEN,
             "head [r,256]x[256,32000]": HIDDEN * harness.VOCAB}
    return sum(flops.values()) / sum(f / ceiling[name][dtype] for name, f in flops.items())


# ----- counting and timing inside a run ------------------------------------------------------------------------
class Meter:
    """FLOPs and seconds per phase over the timed steps of one training run."""

    def __init__(self, body_params: int, warmup: int) -> None:
        self.body_params, self.warmup = body_params, warmup
        self.step = 0  # steps completed
        self.phase = "other"  # where FLOPs of a forward pass go: "generation", "no-grad", "train"
        self.flops: dict[str, float] = defaultdict(float)
        self.seconds: dict[str, float] = defaultdict(float)
        self.step_seconds: list[float] = []
        self.tokens = 0
        self._t_step = 0.0
        self._forward_start: dict[int, float] = {}
        self.in_step = True
        self.last_body_grad = False  # the grad mode of the latest body forward: its head rows follow it

    @property
    def timing(self) -> bool:
        """Inside a timed step (work between steps, e.g. the report's samples at the end, is not counted)."""
        return self.step >= self.warmup and self.in_step

    def add_seconds(self, phase: str, seconds: float) -> None:
        if self.timing:
            self.seconds[phase] += seconds

    def add_flops(self, phase: str, flops: float) -> None:
        if self.timing:
            self.flops[phase] += flops

    @contextmanager
    def timed(self, phase: str):
        previous, self.phase = self.phase, phase
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add_seconds(phase, time.perf_counter() - t0)
            self.phase = previous

    # hooks on each decoder body (a module with embed_tokens and layers)
    def body_pre_hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        import torch

        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        shape = ids.shape if ids is not None else embeds.shape[:2]
        b, q = (1, shape[0]) if len(shape) == 1 else (shape[0], shape[1])
        mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
        real = torch.ones(b, q, dtype=torch.bool) if mask is None or mask.dim() != 2 else mask[:, -q:].bool()
        if positions is None:
            if mask is not None and mask.dim() == 2:
                positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q:]
            else:
                past = kwargs.get("cache_position")
                start = int(past[0]) if past is not None and past.numel() else 0
                positions = torch.arange(start, start + q).expand(b, q)
        tokens = int(real.sum())
        keys = float(((positions.reshape(b, q).float() + 1) * real).sum())
        grad = self.last_body_grad = torch.is_grad_enabled()
        phase = self.phase if self.phase == "generation" else ("train" if grad else "no-grad")
        factor = 3 if grad else 1
        self.add_flops(phase, factor * (2 * self.body_params * tokens + 4 * LAYERS * HIDDEN * keys))
        if phase == "train":
            self.tokens += tokens if self.timing else 0
        if phase == "no-grad" and self.phase != "no-grad":  # a no-grad pass outside the sampler: time it
            self._forward_start[id(module)] = time.perf_counter()

    def body_post_hook(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        start = self._forward_start.pop(id(module), None)
        if start is not None:
            self.add_seconds("no-grad", time.perf_counter() - start)

    def head_rows(self, rows: int, grad: bool) -> None:
        """`rows` positions projected onto the vocabulary."""
        phase = self.phase if self.phase == "generation" else ("train" if grad else "no-grad")
        self.add_flops(phase, (3 if grad else 1) * 2 * HIDDEN * harness.VOCAB * rows)


def _timed_optimizer(optimizer: Any, meter: Meter) -> None:
    for name in ("step", "zero_grad"):
        method = getattr(optimizer, name)

        def timed(*a, _method=method, **k):
            t0 = time.perf_counter()
            out = _method(*a, **k)
            meter.add_seconds("optimizer", time.perf_counter() - t0)
            return out

        setattr(optimizer, name, timed)


def instrument(trainer: Any, meter: Meter) -> None:
    """Hooks and wrappers that feed `meter` (see the module docstring)."""
    import torch
    from transformers import TrainerCallback

    import tether.ops.logprobs as logprobs
    import tether.trainers.online as online

    seen: set[int] = set()
    for root in (trainer.model, getattr(trainer, "ref_model", None)):
        if root is None:
            continue
        for module in root.modules():
            if hasattr(module, "embed_tokens") and hasattr(module, "layers") and id(module) not in seen:
                seen.add(id(module))
                module.register_forward_pre_hook(meter.body_pre_hook, with_kwargs=True)
                module.register_forward_hook(meter.body_post_hook, with_kwargs=True)
            if type(module).__name__ == "Linear" and getattr(module, "out_features", 0) == harness.VOCAB:
                module.register_forward_pre_hook(
                    lambda m, args: meter.head_rows(args[0].reshape(-1, args[0].shape[-1]).shape[0],
                                                    torch.is_grad_enabled()))
    chunk_logits = logprobs._chunk_logits

    chunk_stats = logprobs._chunk_stats

    def counted_chunk_logits(hidden, weight, *args, **kwargs):
        # Called in the forward of tether's head functions (grad mode is off inside an autograd Function, so the
        # pass's mode is the latest body forward's) and again in their backward (counted in the forward's x 3).
        if torch._C._current_graph_task_id() != -1:
            return chunk_logits(hidden, weight, *args, **kwargs)
        meter.head_rows(hidden.shape[0], meter.last_body_grad)
        t0 = time.perf_counter()
        out = chunk_logits(hidden, weight, *args, **kwargs)
        if not meter.last_body_grad and meter.phase != "generation":  # the head of a no-grad pass: its time too
            meter.add_seconds("no-grad", time.perf_counter() - t0)
        return out

    def timed_chunk_stats(*args, **kwargs):
        t0 = time.perf_counter()
        out = chunk_stats(*args, **kwargs)
        if torch._C._current_graph_task_id() == -1 and not meter.last_body_grad and meter.phase != "generation":
            meter.add_seconds("no-grad", time.perf_counter() - t0)
        return out

    logprobs._chunk_logits, logprobs._chunk_stats = counted_chunk_logits, timed_chunk_stats
    sampler = online.sample_groups

    def timed_sampler(*args, **kwargs):
        with meter.timed("generation"):
            return sampler(*args, **kwargs)

    online.sample_groups = timed_sampler
    if isinstance(trainer, tether_ppo_trainer()):
        _instrument_ppo(trainer, meter)
        return
    training_step = trainer.training_step

    def timed_training_step(*args, **kwargs):
        # Online trainers generate a round inside training_step: its generation and no-grad passes are theirs.
        before = meter.seconds["no-grad"] + meter.seconds["generation"]
        t0 = time.perf_counter()
        out = training_step(*args, **kwargs)
        inside = meter.seconds["no-grad"] + meter.seconds["generation"] - before
        meter.add_seconds("forward+backward", time.perf_counter() - t0 - inside)
        return out

    trainer.training_step = timed_training_step

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kw):
            _timed_optimizer(optimizer, meter)

        # A step is timed from the end of the step before it: fetching and collating its batch (before
        # on_step_begin) and logging (after on_step_end) are part of what a step costs.
        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            if meter.timing:
                meter.step_seconds.append(now - meter._t_step)
            meter.step, meter._t_step = meter.step + 1, now
            meter.in_step = state.global_step < state.max_steps  # after the last step: the run's end, not timed

    trainer.add_callback(StepClock())


def tether_ppo_trainer() -> type:
    from tether import PPOTrainer

    return PPOTrainer


def _instrument_ppo(trainer: Any, meter: Meter) -> None:
    """PPO's own loop (no Trainer callbacks): generate() is generation; step() is the update (its no-grad
    rollout passes and optimizer steps counted apart); a step is timed from one step()'s end to the next."""
    _timed_optimizer(trainer.optimizer, meter)
    generate, step = trainer.generate, trainer.step

    def timed_generate(*args, **kwargs):
        with meter.timed("generation"):
            return generate(*args, **kwargs)

    def timed_step(*args, **kwargs):
        before = meter.seconds["no-grad"] + meter.seconds["optimizer"]
        t0 = time.perf_counter()
        out = step(*args, **kwargs)
        now = time.perf_counter()
        inside = meter.seconds["no-grad"] + meter.seconds["optimizer"] - before
        meter.add_seconds("forward+backward", now - t0 - inside)
        if meter.timing:
            meter.step_seconds.append(now - meter._t_step)
        meter.step, meter._t_step = meter.step + 1, now
        meter.in_step = meter.step < trainer.config.train_steps
        return out

    trainer.generate, trainer.step = timed_generate, timed_step


# ----- workloads -----------------------------------------------------------------------------------------------
def data(work: Path, regime: dict[str, Any], n: int) -> dict[str, Any]:
    """Texts, preference pairs and prompts of the regime's sizes (deterministic)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work / "model")
    gen = harness.TextGenerator(1)
    texts = [gen.text(gen.randint(*regime["text_words"])) for _ in range(n)]
    limit = regime["max_length"]
    pairs, _ = harness.preference_pairs(gen, tok, n, regime["prompt_words"], regime["completion_words"],
                                        lambda p, c, r: p + max(c, r) <= limit)
    prompts = [gen.text(gen.randint(8, 16)) for _ in range(n)]
    return {"texts": texts, "pairs": pairs, "prompts": prompts}


def build(workload: str, work: Path, regime: dict[str, Any], sets: dict[str, Any], steps: int,
          bf16: bool = False) -> Any:
    from datasets import Dataset
    from transformers import AutoTokenizer

    import tether

    tok = AutoTokenizer.from_pretrained(work / "model")
    common = dict(output_dir=str(work / f"out-{workload}"), max_steps=steps, learning_rate=1e-5, logging_steps=1,
                  report_to="none", save_strategy="no", seed=0, disable_tqdm=True, per_device_train_batch_size=8,
                  bf16=bf16, use_cpu=True)
    model = str(work / "model")
    if workload.startswith("sft"):
        config = tether.SFTConfig(**common, max_length=regime["max_length"], packing=workload == "sft-packed")
        return tether.SFTTrainer(model, args=config, train_dataset=Dataset.from_dict({"text": sets["texts"]}),
                                 processing_class=tok)
    pairs = Dataset.from_list(sets["pairs"])
    if workload == "reward":
        config = tether.RewardConfig(**common, max_length=regime["max_length"])
        return tether.RewardTrainer(str(work / "reward_model"), args=config, train_dataset=pairs, processing_class=tok)
    if workload == "dpo":
        config = tether.DPOConfig(**common, max_length=regime["max_length"])
        return tether.DPOTrainer(model, args=config, train_dataset=pairs, processing_class=tok)
    if workload == "kto":
        rows = [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
                for p in sets["pairs"] for side in ("chosen", "rejected")]
        config = tether.KTOConfig(**common, max_length=regime["max_length"])
        return tether.KTOTrainer(model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok)
    group = dict(num_generations=4, max_completion_length=regime["completion_tokens"], temperature=1.0, top_k=0,
                 per_device_train_batch_size=16)
    reward = harness.letter_share("e")
    prompts = Dataset.from_dict({"prompt": sets["prompts"]})
    if workload == "ppo":
        from tether import AutoModelForCausalLMWithValueHead

        config = tether.PPOConfig(batch_size=16, mini_batch_size=8, ppo_epochs=2, learning_rate=1e-5,
                                  total_steps=steps, max_new_tokens=regime["completion_tokens"], top_k=0,
                                  output_dir=common["output_dir"], seed=0, logging_steps=1,
                                  **({"accelerator_kwargs": {"mixed_precision": "bf16"}} if bf16 else {}))
        return tether.PPOTrainer(config, AutoModelForCausalLMWithValueHead.from_pretrained(model), None, tok,
                                 dataset=prompts, reward_funcs=reward)
    common = {**common, **group}
    if workload == "grpo":
        return tether.GRPOTrainer(model, reward_funcs=reward, args=tether.GRPOConfig(**common), train_dataset=prompts,
                                  processing_class=tok)
    return tether.RLOOTrainer(model, reward_funcs=reward, args=tether.RLOOConfig(**common), train_dataset=prompts,
                              processing_class=tok)


def run_workload(workload: str, regime_name: str, work: Path, sets: dict[str, Any], steps: int, warmup: int,
                 peak: float, bf16: bool = False) -> dict[str, Any]:
    regime = REGIMES[regime_name]
    trainer = build(workload, work, regime, sets, steps + warmup, bf16)
    body = sum(p.numel() for n, p in trainer.model.named_parameters()
               if "embed_tokens" not in n and "lm_head" not in n and "score" not in n and "v_head" not in n)
    meter = Meter(body, warmup)
    instrument(trainer, meter)
    t0 = meter._t_step = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    step_total = sum(meter.step_seconds)
    phases = {p: meter.seconds[p] for p in ("generation", "no-grad", "forward+backward", "optimizer")}
    phases["data+overhead"] = max(0.0, step_total - sum(phases.values()))
    flops = {"generation": meter.flops["generation"], "no-grad": meter.flops["no-grad"],
             "forward+backward": meter.flops["train"]}
    total_flops = sum(flops.values())
    return {
        "workload": workload, "regime": regime_name, "timed_steps": len(meter.step_seconds),
        "s_per_step": round(statistics.median(meter.step_seconds), 3), "wall_s": round(wall, 1),
        "trained_tokens_per_step": round(meter.tokens / max(1, len(meter.step_seconds))),
        "share_of_step": {p: round(s / step_total, 3) for p, s in phases.items()},
        "gflops": {p: round(f / max(phases[p], 1e-9) / 1e9, 1) for p, f in flops.items() if f},
        "share_of_peak": {p: round(f / max(phases[p], 1e-9) / 1e9 / peak, 3) for p, f in flops.items() if f},
        "step_gflops": round(total_flops / step_total / 1e9, 1),
        "step_share_of_peak": round(total_flops / step_total / 1e9 / peak, 3),
    }


def table(results: list[dict[str, Any]], peak: float, mix: float, dtype: str = "float32") -> str:
    phases = ("generation", "no-grad", "forward+backward", "optimizer", "data+overhead")
    lines = ["| regime | workload | s/step | trained tokens/step | step GFLOP/s (share of peak) | "
             + " | ".join(f"{p}: time share, GFLOP/s" for p in phases) + " |",
             "|---" * (5 + len(phases)) + "|"]
    for r in results:
        cells = []
        for p in phases:
            share = r["share_of_step"].get(p, 0.0)
            rate = r["gflops"].get(p)
            cells.append(f"{share:.0%}" + (f", {rate:.0f}" if rate else "") if share else "-")
        lines.append(f"| {r['regime']} | {r['workload']} | {r['s_per_step']:.2f} | {r['trained_tokens_per_step']} | "
                     f"{r['step_gflops']:.0f} ({r['step_share_of_peak']:.0%}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + (f"\n\nPeak ({dtype} matmul, best layer shape): {peak:.0f} GFLOP/s; the model's own matmul "
                               f"mix at the measured rates: {mix:.0f} GFLOP/s.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--regimes", default="short,long")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (bf16=True, use_cpu=True); shares of the bf16 "
                                                       "peak")
    p.add_argument("--out", default=None, help="Also write the results as JSON here.")
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    steps, warmup = (1, 1) if a.quick else (a.steps, max(1, a.warmup))  # the first timed step starts at a step end
    ceiling = matmul_ceiling(rows=256 if a.quick else 4096, repeats=3 if a.quick else 10)
    dtype = "bfloat16" if a.bf16 else "float32"
    peak = max(v[dtype] for v in ceiling.values())
    mix = {d: round(model_mix_ceiling(ceiling, d), 1) for d in ("float32", "bfloat16")}
    print(json.dumps({"threads": a.threads, "matmul_gflops": ceiling, "model_mix_gflops": mix}, indent=1), flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok, _, _, info = harness.build_base_assets(work, a.quick)
        harness.save_reward_model(work, tok)
        for regime in a.regimes.split(","):
            sets = data(work, REGIMES[regime], 64 if a.quick else 400)
            for workload in a.workloads.split(","):
                result = run_workload(workload, regime, work, sets, steps, warmup, peak, a.bf16)
                print(json.dumps(result), flush=True)
                results.append(result)
    print(table(results, peak, mix[dtype], dtype))
    if a.out:
        Path(a.out).write_text(json.dumps({"ceiling": ceiling, "model_mix": mix, "model": info, "results": results},
                                          indent=1))


if __name__ == "__main__":
    main()
