"""SFT throughput / memory benchmark on CPU: tether's SFTTrainer vs TRL's, same model, data and settings.

    python benchmarks/sft.py                          # both libraries, packing off and on
    python benchmarks/sft.py --libs trl --steps 20    # one side only
    python benchmarks/sft.py --quick                  # tiny smoke run

The parent builds the assets once (a ~23M-parameter Llama from config with seed 0, a byte-level BPE tokenizer
trained here, 3000 texts of 20-480 tokens, median ~240), then runs each (library, packing) pair in a fresh
subprocess (`--run LIB --packing 0|1`), so peak RSS is per run. Both sides go through `run_one`, with the same
call shape. Tokens/s counts non-pad input tokens (a pre-hook on the input embedding), over the steps after
`--warmup` warm-up steps; the step time is on_step_begin -> on_step_end (forward, backward, optimizer step).
Timings need an otherwise idle machine: the CPU/wall and load columns show when other processes competed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MARK = "BENCH_RESULT "
VOCAB = 32000
OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")


def make_texts(n_docs: int, n_corpus_words: int) -> tuple[list[str], list[str]]:
    """Pseudo-language: a few thousand syllables, ~55k Zipf-distributed words. Returns (docs, extra corpus)."""
    rng = random.Random(0)
    onsets = ["", *"bcdfghjklmnprstvwz", "br", "ch", "dr", "fl", "gr", "kl", "pr", "sh", "st", "th", "tr"]
    nuclei = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "y"]
    codas = ["", "n", "r", "s", "t", "l", "m", "k", "nd", "st"]
    syllables = [o + n + c for o in onsets for n in nuclei for c in codas]
    words = sorted({"".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(60000)})
    rng.shuffle(words)
    cum, total = [], 0.0
    for i in range(len(words)):
        total += 1.0 / (i + 1) ** 0.9
        cum.append(total)

    def sentence_stream(n: int) -> str:
        out, toks = [], rng.choices(words, cum_weights=cum, k=n)
        for i, w in enumerate(toks):
            if i == 0 or out[-1].endswith("."):
                w = w.capitalize()
            r = rng.random()
            out.append(w + ("." if r < 0.08 or i == n - 1 else "," if r < 0.12 else ""))
        return " ".join(out)

    # ~1.25 tokens per word (word piece + punctuation): 16-320 words gives ~20-400 tokens
    docs = [sentence_stream(rng.randint(16, 320)) for _ in range(n_docs)]
    corpus = [sentence_stream(1000) for _ in range(n_corpus_words // 1000)]
    return docs, corpus


def build_assets(work: Path, quick: bool) -> dict[str, Any]:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    docs, corpus = make_texts(300 if quick else 3000, 100_000 if quick else 1_500_000)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=alphabet
    )
    bpe.train_from_iterator(docs + corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    (work / "texts.json").write_text(json.dumps(docs))
    lens = sorted(len(ids) + 1 for ids in tok(docs)["input_ids"])  # +1: the EOS the trainers append
    return {
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "bpe_vocab": len(tok),
        "docs": len(docs),
        "doc_tokens_min_p50_max": [lens[0], lens[len(lens) // 2], lens[-1]],
    }


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def run_one(lib: str, packing: bool, work: Path, steps: int, warmup: int, grad_ckpt: bool) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    if lib == "trl":
        from trl import SFTConfig, SFTTrainer
    elif lib == "tether":
        from tether import SFTConfig, SFTTrainer
    else:
        raise ValueError(lib)

    class Probe(TrainerCallback):
        def __init__(self, pad_id: int) -> None:
            self.pad_id, self.tokens, self.positions, self.t_step = pad_id, 0, 0, 0.0
            self.steps: list[tuple[int, int, float]] = []  # (non-pad tokens, positions, seconds) per step
            self.losses: list[float] = []
            self.log_keys: set[str] = set()
            self.model_kwargs: list[str] | None = None
            self.shapes: set[tuple[int, ...]] = set()
            self.t_warm = self.t_last = self.cpu_warm = self.cpu_last = 0.0
            self.rss_peak = 0.0
            self.attn = "?"

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            self.attn = str(getattr(model.config, "_attn_implementation", "?"))
            model.get_input_embeddings().register_forward_pre_hook(self._count)
            model.register_forward_pre_hook(self._kwargs, with_kwargs=True)

        def _count(self, module: Any, args: tuple[Any, ...]) -> None:
            if torch.is_grad_enabled() and args and torch.is_tensor(args[0]):
                ids = args[0]
                self.tokens += int((ids != self.pad_id).sum())
                self.positions += ids.numel()
                if len(self.shapes) < 8:
                    self.shapes.add(tuple(ids.shape))

        def _kwargs(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self.model_kwargs is None and torch.is_grad_enabled():
                self.model_kwargs = sorted(k for k, v in kwargs.items() if v is not None)

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.tokens = self.positions = 0
            self.t_step = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            now = time.perf_counter()
            if state.global_step == warmup:
                self.t_warm, self.cpu_warm = now, time.process_time()
            elif state.global_step > warmup:
                self.steps.append((self.tokens, self.positions, now - self.t_step))
                self.t_last, self.cpu_last = now, time.process_time()
            self.rss_peak = max(self.rss_peak, rss_mib())

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any
        ) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))
                self.log_keys.update(logs)

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(work / "model")
    ds = Dataset.from_dict({"text": json.loads((work / "texts.json").read_text())})
    # bf16/gradient_checkpointing are explicit: TRL's SFTConfig defaults them to True (bf16 autocast on CPU).
    cfg = SFTConfig(
        output_dir=str(work / f"out-{lib}-{int(packing)}"),
        max_length=512,
        packing=packing,
        per_device_train_batch_size=8,
        max_steps=steps + warmup,
        learning_rate=1e-4,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
        bf16=False,
        gradient_checkpointing=grad_ckpt,
    )
    trainer = SFTTrainer(model=str(work / "model"), args=cfg, train_dataset=ds, processing_class=tok)
    probe = Probe(tok.pad_token_id)
    trainer.add_callback(probe)
    setup_s, rss_setup = time.perf_counter() - t0, rss_mib()
    trainer.train()
    train_s = time.perf_counter() - t0 - setup_s
    tokens = sum(s[0] for s in probe.steps)
    return {
        "lib": lib,
        "packing": packing,
        "timed_steps": len(probe.steps),
        "warmup_steps": warmup,
        "tokens_per_s": round(statistics.median(s[0] / s[2] for s in probe.steps), 1),
        "tokens_per_s_wall": round(tokens / (probe.t_last - probe.t_warm), 1),
        "s_per_step": round(statistics.median(s[2] for s in probe.steps), 3),
        "tokens_per_step": round(tokens / len(probe.steps), 1),
        "pad_fraction": round(1 - tokens / sum(s[1] for s in probe.steps), 4),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_after_setup_mib": round(rss_setup, 1),
        "rss_train_peak_sampled_mib": round(probe.rss_peak, 1),
        "loss_first": probe.losses[0] if probe.losses else None,
        "loss_last": probe.losses[-1] if probe.losses else None,
        "log_keys": sorted(probe.log_keys),
        "model_kwargs": probe.model_kwargs,
        "input_shapes": sorted(probe.shapes)[:8],
        "attn_implementation": probe.attn,
        "torch_threads": torch.get_num_threads(),
        # CPU-seconds per wall-second over the timed steps, and the 1-min load average at the end: a busy machine
        # (other processes) shows as load > threads and lowers the figures
        "cpu_per_wall": round((probe.cpu_last - probe.cpu_warm) / (probe.t_last - probe.t_warm), 2),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "tokens_per_cpu_s": round(tokens / (probe.cpu_last - probe.cpu_warm), 1),  # less load-sensitive
        "setup_s": round(setup_s, 1),
        "train_s": round(train_s, 1),
    }


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| packing | library | tokens/s (median step) | tokens/s (wall) | s/step | tokens/step | pad % "
        "| peak RSS MiB | loss first -> last | CPU/wall (load) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['packing']} | {r['lib']} | error: {r['error']} | | | | | | | |")
            continue
        rows.append(
            f"| {r['packing']} | {r['lib']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s_wall']:.0f} "
            f"| {r['s_per_step']:.2f} | {r['tokens_per_step']:.0f} | {100 * r['pad_fraction']:.1f} "
            f"| {r['peak_rss_mib']:.0f} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} "
            f"| {r['cpu_per_wall']:.2f} ({r['loadavg_1m']:.1f}) |"
        )
    ok = {(r["lib"], r["packing"]): r for r in results if "error" not in r}
    for packing in (False, True):
        t, b = ok.get(("tether", packing)), ok.get(("trl", packing))
        if t and b:
            rows.append(
                f"\npacking={packing}: tether/TRL tokens/s = {t['tokens_per_s'] / b['tokens_per_s']:.2f}, "
                f"peak RSS = {t['peak_rss_mib'] / b['peak_rss_mib']:.2f}"
            )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--libs", default="trl,tether", help="comma-separated subset of trl,tether")
    p.add_argument("--packing", default="0,1", help="packing settings to run: 0, 1 or 0,1 (child: one value)")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps excluded from timing")
    p.add_argument("--grad-ckpt", type=int, default=0, help="gradient_checkpointing (TRL's default is 1)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: small corpus, 2+1 steps")
    p.add_argument("--workdir", type=Path, help="keep assets and outputs here (default: a temp dir)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--run", choices=["trl", "tether"], help=argparse.SUPPRESS)  # child mode
    a = p.parse_args()
    os.environ.update(dict.fromkeys(OFFLINE, "1"), TOKENIZERS_PARALLELISM="false")
    if a.run:
        res = run_one(a.run, bool(int(a.packing)), a.workdir, a.steps, a.warmup, bool(a.grad_ckpt))
        print(MARK + json.dumps(res), flush=True)
        return
    if a.quick:
        a.steps, a.warmup = 2, 1
    with tempfile.TemporaryDirectory(prefix="bench-sft-") as tmp:
        work = a.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        info = build_assets(work, a.quick)
        print(f"assets ({time.perf_counter() - t0:.0f}s): {json.dumps(info)}", file=sys.stderr, flush=True)
        results: list[dict[str, Any]] = []
        for packing in [bool(int(x)) for x in a.packing.split(",")]:
            for lib in a.libs.split(","):
                flags = f"--packing {int(packing)} --steps {a.steps} --warmup {a.warmup} --grad-ckpt {a.grad_ckpt}"
                cmd = [sys.executable, __file__, "--run", lib, "--workdir", str(work), *flags.split()]
                print(f"running {lib} packing={packing} ...", file=sys.stderr, flush=True)
                log = work / f"log-{lib}-{int(packing)}.txt"
                with log.open("w") as f:
                    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
                if proc.returncode == 0 and lines:
                    results.append(json.loads(lines[-1][len(MARK) :]))
                else:
                    tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
                    results.append({"lib": lib, "packing": packing, "error": tail[0][:200]})
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        print(table(results))
        if a.json:
            a.json.write_text(json.dumps({"assets": info, "results": results}, indent=1))


if __name__ == "__main__":
    main()
