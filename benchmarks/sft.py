"""SFT throughput / memory benchmark on CPU: tether's SFTTrainer vs TRL's, same model, data and settings.

    python benchmarks/sft.py                          # both libraries, packing off and on
    python benchmarks/sft.py --libs trl --steps 20    # one side only
    python benchmarks/sft.py --quick                  # tiny smoke run

The parent builds the assets once (harness.py: a ~23M-parameter Llama from config with seed 0, a byte-level BPE
tokenizer trained here, 3000 texts of 20-480 tokens, median ~240), then runs each (library, packing) pair in a fresh
subprocess (`--run LIB --packing 0|1`), so peak RSS is per run. Both sides go through `run_one`, with the same
call shape. Tokens/s counts non-pad input tokens (a pre-hook on the input embedding), over the steps after
`--warmup` warm-up steps; the step time is on_step_begin -> on_step_end (forward, backward, optimizer step).
Timings need an otherwise idle machine: the CPU/wall and load columns show when other processes competed.

`--regime short`: texts of 12-90 words (15-115 tokens) and max_length 128.

Pinned: bf16=False (`--bf16`: True, both) and gradient_checkpointing=False (`--grad-ckpt`), because TRL's SFTConfig defaults both to True
(bf16 autocast on CPU, recomputed activations) while tether's defaults are off; max_length 512, batch 8, lr 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import harness


def max_length() -> int:
    return 128 if harness.REGIME[0] == "short" else 512


def build_assets(work: Path, quick: bool) -> dict[str, Any]:
    tok, docs, gen, info = harness.build_base_assets(work, quick)
    if harness.REGIME[0] == "short":  # texts of 12-90 words (~15-115 tokens): chat-turn sized
        docs = [gen.text(gen.randint(12, 90)) for _ in docs]
    (work / "texts.json").write_text(json.dumps(docs))
    lens = [len(ids) + 1 for ids in tok(docs)["input_ids"]]  # +1: the EOS the trainers append
    return {**info, "docs": len(docs), "doc_tokens_min_p50_max": harness.spread(lens)}


def run_one(lib: str, packing: bool, work: Path, steps: int, warmup: int, grad_ckpt: bool) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoTokenizer

    if lib == "trl":
        from trl import SFTConfig, SFTTrainer
    else:
        from tether import SFTConfig, SFTTrainer

    def build() -> tuple[Any, int]:
        tok = AutoTokenizer.from_pretrained(work / "model")
        ds = Dataset.from_dict({"text": json.loads((work / "texts.json").read_text())})
        # bf16/gradient_checkpointing are explicit: TRL's SFTConfig defaults them to True (bf16 autocast on CPU).
        cfg = SFTConfig(
            output_dir=str(work / f"out-{lib}-{int(packing)}"),
            max_length=max_length(),
            packing=packing,
            per_device_train_batch_size=8,
            max_steps=steps + warmup,
            learning_rate=1e-4,
            logging_steps=harness.LOGGING_STEPS[0],
            report_to="none",
            save_strategy="no",
            seed=0,
            **harness.precision_kwargs(),
            gradient_checkpointing=grad_ckpt,
        )
        trainer = SFTTrainer(model=str(work / "model"), args=cfg, train_dataset=ds, processing_class=tok)
        return trainer, tok.pad_token_id

    res, _ = harness.measure(build, warmup, unit="tokens")
    return {"lib": lib, "packing": packing, **res}


def main() -> None:
    p = harness.parser(__doc__)
    p.add_argument("--packing", default="0,1", help="packing settings to run: 0, 1 or 0,1 (child: one value)")
    p.add_argument("--grad-ckpt", type=int, default=0, help="gradient_checkpointing (TRL's default is 1)")
    a = harness.parse(p)
    if a.run:
        harness.emit(run_one(a.run, bool(int(a.packing)), a.workdir, a.steps, a.warmup, bool(a.grad_ckpt)))
        return

    def jobs() -> list[harness.Job]:
        flags = f"--steps {a.steps} --warmup {a.warmup} --grad-ckpt {a.grad_ckpt}".split()
        return [
            harness.Job(lib, {"packing": packing}, ["--packing", str(int(packing)), *flags], str(int(packing)),
                        f"packing={packing}")
            for packing in [bool(int(x)) for x in a.packing.split(",")]
            for lib in a.libs.split(",")
        ]

    columns = harness.standard_columns("tokens")
    harness.run_parent(a, "sft", __file__, build_assets, jobs,
                       lambda results: harness.table(results, "packing", "tokens", columns))


if __name__ == "__main__":
    main()
