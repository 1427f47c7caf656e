"""Distillation throughput / memory on CPU: tether's GKDTrainer and DistillationTrainer vs TRL 1.16's
(`trl.experimental.gkd.GKDTrainer`, top-level `trl.DistillationTrainer`), same student, teacher, data and settings.

    /work/.venv-trl116/bin/python benchmarks/bench_gkd.py                  # both libraries, the three settings
    /work/.venv-trl116/bin/python benchmarks/bench_gkd.py --settings gkd-dataset --steps 10
    /work/.venv-trl116/bin/python benchmarks/bench_gkd.py --quick          # tiny smoke run

Models: the student is sft.py's ~23M Llama (harness.py, seed 0); the teacher the same architecture drawn with seed 1
(work/teacher), float32 both. Each (library, setting) trains in a fresh subprocess (`--settings`):
- gkd-dataset: GKD with lmbda=0 (every micro-batch is the dataset's: two forwards and the divergence, no sampling).
- gkd-on-policy: GKD with lmbda=1 (every micro-batch's completions sampled from the student first).
- distillation: DistillationTrainer (prompts only; every completion sampled from the student).
Data: 512 prompts of exactly PROMPT_TOKENS = 32 tokens from the harness' text generator; for GKD each gets a reply
of 40-60 words, as conversations [{"role": "user", ...}, {"role": "assistant", ...}] rendered by the same simple chat
template in both libraries (TRL's GKD collator reads `messages`; tether splits the last turn off as the completion).
Distillation reads the plain prompts.

Settings pinned on both configs (field names both accept): per_device_train_batch_size 8, gradient_accumulation 1,
max_new_tokens / max_completion_length N = 64 (`--max-new-tokens`), learning_rate 1e-5, bf16 False and use_cpu True
(TRL defaults bf16 to True), gradient_checkpointing False (TRL's default is True), seed 0, logging_steps 1,
save_strategy no. Method defaults kept in both: GKD temperature 0.9, beta 0.5, seq_kd False, disable_dropout True;
Distillation temperature 1.0, beta 1.0, top_k 0, top_p 1.0. A random-init student rarely samples EOS, so completions
run to N in both libraries.

Timing: a step end to end, from one on_step_end to the next (harness.StepProbe's on_step_begin -> on_step_end
would miss tether's sampling, which runs in `get_batch_samples`, before on_step_begin; TRL samples inside
training_step), median over the steps after `--warmup`; samples/s = 8 sequences / that. "(wall)" is all timed
samples over the wall time from the end of the warm-up to the last step's end; samples/CPU-s the same over the
process's CPU time (steadier than wall time on a shared machine). On a machine others use, run with `--threads 1`:
two torch threads that find one free core spin against each other and single steps take 10x as long. "generation s" is the time per timed step spent in the sampler
(tether: `rollout.sampling.sample_groups` as trainers/gkd.py calls it; TRL: `GKDTrainer.generate_on_policy_outputs`,
`DistillationTrainer._generate_single_turn`, both around `model.generate`). Peak RSS is the child's ru_maxrss
(student, teacher, optimizer and the largest step's temporaries). Both libraries compute the same loss: at step 1
of gkd-dataset (same weights, same batch) the losses must agree.

Where TRL 1.16 differs by design: its GKDTrainer computes the student's and the teacher's full [b, t, V] logits and
the divergence over all of them (masked afterwards); tether projects only the completion tokens' hidden states,
1,024 at a time, under activation checkpointing. TRL's DistillationTrainer uses its chunked divergence kernel on
completion positions (Triton on GPUs; on CPU every position is projected).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import harness

PROMPT_TOKENS, BATCH = 32, 8
SETTINGS = ("gkd-dataset", "gkd-on-policy", "distillation")
CHAT_TEMPLATE = (  # tether.demo.tiny's template, written out so the TRL child needs nothing of tether's
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def build_assets(work: Path, quick: bool) -> dict[str, Any]:
    """The harness' model and tokenizer, prompts of PROMPT_TOKENS tokens, a reply to each, and the teacher."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    info = harness.build_prompt_assets(work, quick, PROMPT_TOKENS)
    gen = harness.TextGenerator(5)
    prompts = json.loads((work / "prompts.json").read_text())
    (work / "replies.json").write_text(json.dumps([gen.text(gen.randint(40, 60)) for _ in prompts]))
    tok = AutoTokenizer.from_pretrained(work / "model")
    torch.manual_seed(1)
    LlamaForCausalLM(harness.llama_config(tok)).save_pretrained(work / "teacher")
    tok.save_pretrained(work / "teacher")
    return {**info, "teacher_seed": 1}


def run_one(lib: str, setting: str, a: Any) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, set_seed

    work, gkd = a.workdir, setting.startswith("gkd")
    generation: list[tuple[float, float]] = []  # (end time, seconds) of each sampler call

    def timed(owner: Any, name: str, static: bool = False) -> None:
        func = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = func(*args, **kwargs)
            generation.append((time.perf_counter(), time.perf_counter() - t0))
            return out

        setattr(owner, name, staticmethod(wrapper) if static else wrapper)

    if lib == "trl":
        if gkd:
            from trl.experimental.gkd import GKDConfig as Config
            from trl.experimental.gkd import GKDTrainer as Trainer

            timed(Trainer, "generate_on_policy_outputs", static=True)
        else:
            from trl import DistillationConfig as Config
            from trl import DistillationTrainer as Trainer

            timed(Trainer, "_generate_single_turn")
    else:
        import tether.trainers.gkd as module

        Trainer = module.GKDTrainer if gkd else module.DistillationTrainer
        Config = module.GKDConfig if gkd else module.DistillationConfig
        timed(module, "sample_groups")

    prompts = json.loads((work / "prompts.json").read_text())
    if gkd:
        replies = json.loads((work / "replies.json").read_text())
        rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}
                for p, r in zip(prompts, replies)]
        fields = dict(lmbda=0.0 if setting == "gkd-dataset" else 1.0, max_new_tokens=a.max_new_tokens)
    else:
        rows = [{"prompt": p} for p in prompts]
        fields = dict(max_completion_length=a.max_new_tokens)

    def build() -> tuple[Any, int]:
        tok = AutoTokenizer.from_pretrained(work / "model")
        tok.chat_template = CHAT_TEMPLATE
        config = Config(output_dir=str(work / f"out-{lib}-{setting}"), per_device_train_batch_size=BATCH,
                        gradient_accumulation_steps=1, learning_rate=1e-5, bf16=False, use_cpu=True,
                        gradient_checkpointing=False, max_steps=a.steps + a.warmup, logging_steps=1,
                        report_to="none", save_strategy="no", seed=0, **fields)
        set_seed(0)
        trainer = Trainer(model=str(work / "model"), teacher_model=str(work / "teacher"), args=config,
                          train_dataset=Dataset.from_list(rows), processing_class=tok)
        return trainer, tok.pad_token_id

    ends: list[float] = []  # time of each on_step_end

    def build_with_clock() -> tuple[Any, int]:
        from transformers import TrainerCallback

        class Clock(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                ends.append(time.perf_counter())

        trainer, pad_id = build()
        trainer.add_callback(Clock())
        return trainer, pad_id

    torch.set_num_threads(a.threads)
    res, probe = harness.measure(build_with_clock, a.warmup, unit="samples", count=lambda rows, tokens: BATCH)
    # A step end to end: from the previous step's end, so that work done before on_step_begin counts too (tether
    # completes a step's micro-batches in get_batch_samples, which Trainer calls before on_step_begin).
    whole = [b - e for e, b in zip(ends[a.warmup - 1:], ends[a.warmup:])]
    res["s_per_step_end_to_end"] = round(statistics.median(whole), 3)
    res["samples_per_s_end_to_end"] = round(BATCH / statistics.median(whole), 3)
    timed_generation = [s for end, s in generation if end > probe.t_warm]
    res["generation_s"] = round(sum(timed_generation) / max(1, res["timed_steps"]), 3)
    res["step1_loss"] = probe.first_log.get("loss")
    return {"lib": lib, "setting": setting, **res, "max_new_tokens": a.max_new_tokens}


def main() -> None:
    import os

    p = harness.parser(__doc__)
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {','.join(SETTINGS)}")
    p.add_argument("--max-new-tokens", type=int, help="tokens sampled per completion (default 64; 8 with --quick)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in every run (default: usable CPUs)")
    a = harness.parse(p)
    a.max_new_tokens = a.max_new_tokens or (8 if a.quick else 64)
    a.threads = a.threads or len(os.sched_getaffinity(0))
    if a.run:
        harness.emit(run_one(a.run, a.settings, a))
        return

    def jobs() -> list[harness.Job]:
        flags = (f"--steps {a.steps} --warmup {a.warmup} --max-new-tokens {a.max_new_tokens} "
                 f"--threads {a.threads}").split()
        return [harness.Job(lib, {"setting": s}, ["--settings", s, *flags], s, f"setting={s}")
                for s in a.settings.split(",") for lib in a.libs.split(",")]

    def render(results: list[dict[str, Any]]) -> str:
        for r in results:  # the end-to-end figures stand in for harness' on_step_begin -> on_step_end ones
            if "error" not in r:
                r["samples_per_s"], r["s_per_step"] = r["samples_per_s_end_to_end"], r["s_per_step_end_to_end"]
        columns = harness.standard_columns("samples", digits=2, extra=[
            ("samples/CPU-s", lambda r: f"{r['samples_per_cpu_s']:.3f}"),
            ("generation s/step", lambda r: f"{r['generation_s']:.2f}"),
            ("step-1 loss", lambda r: f"{r['step1_loss']:.4f}" if r.get("step1_loss") is not None else "-"),
        ])
        return harness.table(results, "setting", "samples", columns)

    harness.run_parent(a, "gkd", __file__, build_assets, jobs, render)


if __name__ == "__main__":
    main()
