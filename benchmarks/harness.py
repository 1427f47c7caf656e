"""What the CPU benchmarks (sft.py, reward.py, dpo.py) share: assets, the child runner, the step probe, the table.

- Assets, built once by the parent: a generated pseudo-language (`TextGenerator`), a 32k byte-level BPE tokenizer
  trained on it, and a ~23M-parameter Llama built from a config with seed 0 (`build_base_assets`), plus its
  sequence-classification twin for reward models (`save_reward_model`: same config and seed, num_labels=1).
- Each (library, setting) runs in a fresh subprocess of the calling script (`run_jobs`), so peak RSS (ru_maxrss) is
  per run; the child prints one `BENCH_RESULT {json}` line.
- `measure` builds the trainer, attaches `StepProbe` (a TrainerCallback timing on_step_begin -> on_step_end and
  counting, in the forward passes that build a graph, the sequences and non-pad tokens fed to the input embedding),
  trains and summarises: median-step and wall-clock throughput in the script's unit, RSS, losses, CPU/wall, load.
- `table` renders the results as markdown with tether/TRL ratios per setting.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARK = "BENCH_RESULT "
VOCAB = 32000
OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")
LIBS = ("trl", "tether")


# ----- assets --------------------------------------------------------------------------------------------------
class TextGenerator:
    """Pseudo-language: a few thousand syllables, ~55k Zipf-distributed words, sentences of them.

    Deterministic: one `random.Random(seed)` drives the vocabulary and then every `text` call, in call order.
    """

    def __init__(self, seed: int = 0) -> None:
        self.rng = rng = random.Random(seed)
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
        self.words, self.cum = words, cum

    def text(self, n: int) -> str:
        """n words in sentences: capitalised starts, commas, a full stop at the end (~1.25 tokens per word)."""
        out, toks = [], self.rng.choices(self.words, cum_weights=self.cum, k=n)
        for i, w in enumerate(toks):
            if i == 0 or out[-1].endswith("."):
                w = w.capitalize()
            r = self.rng.random()
            out.append(w + ("." if r < 0.08 or i == n - 1 else "," if r < 0.12 else ""))
        return " ".join(out)

    def randint(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)


def make_texts(n_docs: int, n_corpus_words: int) -> tuple[list[str], list[str], TextGenerator]:
    """(docs of 16-320 words, an extra tokenizer corpus, the generator to draw more text from)."""
    gen = TextGenerator(0)
    docs = [gen.text(gen.randint(16, 320)) for _ in range(n_docs)]
    corpus = [gen.text(1000) for _ in range(n_corpus_words // 1000)]
    return docs, corpus, gen


def llama_config(tok: Any, **overrides: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
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
        **overrides,
    )


def build_base_assets(work: Path, quick: bool) -> tuple[Any, list[str], TextGenerator, dict[str, Any]]:
    """Tokenizer and causal LM saved to work/model. Returns (tokenizer, docs, generator, info).

    The tokenizer is trained on the docs plus an extra corpus (300 docs + 100k words with --quick, else 3000 docs +
    1.5M words), so every benchmark gets the same tokenizer and model for the same `quick`.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    docs, corpus, gen = make_texts(300 if quick else 3000, 100_000 if quick else 1_500_000)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=alphabet
    )
    bpe.train_from_iterator(docs + corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(tok))
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    info = {"params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2), "bpe_vocab": len(tok)}
    return tok, docs, gen, info


def build_prompt_assets(work: Path, quick: bool, prompt_tokens: int, count: int = 512) -> dict[str, Any]:
    """The base model and tokenizer, and `count` prompts of exactly `prompt_tokens` tokens in
    work/prompts.json (equal lengths: no library pads a prompt, every generation batch has one shape)."""
    tok, _, gen, info = build_base_assets(work, quick)
    prompts: list[str] = []
    tried = 0
    while len(prompts) < count:
        text = gen.text(gen.randint(20, 30))
        tried += 1
        if len(tok(text)["input_ids"]) == prompt_tokens:
            prompts.append(text)
    (work / "prompts.json").write_text(json.dumps(prompts))
    return {**info, "prompts": len(prompts), "prompt_tokens": prompt_tokens, "prompt_texts_drawn": tried}


def letter_share(letter: str) -> Any:
    """A cheap deterministic reward function for online RL benchmarks: the share of a completion's
    characters that are `letter` (0 for an empty completion)."""

    def share(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        return [c.count(letter) / max(1, len(c)) for c in completions]

    share.__name__ = "target_share"
    return share


def save_reward_model(work: Path, tok: Any) -> Path:
    """LlamaForSequenceClassification (num_labels=1, pad_token_id set), same config and seed, to work/reward_model."""
    import torch
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(llama_config(tok, num_labels=1))
    model.save_pretrained(work / "reward_model")
    tok.save_pretrained(work / "reward_model")
    return work / "reward_model"


def spread(values: Sequence[int]) -> list[int]:
    """[min, median, max]."""
    s = sorted(values)
    return [s[0], s[len(s) // 2], s[-1]]


def preference_pairs(
    gen: TextGenerator,
    tok: Any,
    n: int,
    prompt_words: tuple[int, int],
    completion_words: tuple[int, int],
    accept: Callable[[int, int, int], bool],
) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """n plain-text pairs {prompt, chosen, rejected}: a prompt of sentences, two completions of independent lengths.

    Completions start with a space and prompts end with a full stop, so tokenizing prompt + completion + EOS as one
    string (TRL) and prompt and completion apart (tether) give the same ids; a pair where they differ is dropped, as
    is one that `accept(prompt tokens, chosen tokens, rejected tokens)` (completions counted with their EOS) refuses.
    Returns (pairs, token-length stats).
    """
    pairs: list[dict[str, str]] = []
    lengths: dict[str, list[int]] = {"prompt": [], "chosen": [], "rejected": []}
    dropped = {"boundary": 0, "length": 0}
    while len(pairs) < n:
        prompt = gen.text(gen.randint(*prompt_words))
        chosen = " " + gen.text(gen.randint(*completion_words))
        rejected = " " + gen.text(gen.randint(*completion_words))
        prompt_ids = tok(prompt)["input_ids"]
        sides = []
        for completion in (chosen, rejected):
            apart = prompt_ids + tok(completion)["input_ids"] + [tok.eos_token_id]
            sides.append(len(apart) - len(prompt_ids))
            if tok(prompt + completion + tok.eos_token)["input_ids"] != apart:
                dropped["boundary"] += 1
                break
        else:
            if not accept(len(prompt_ids), *sides):
                dropped["length"] += 1
                continue
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            for key, value in zip(lengths, (len(prompt_ids), *sides)):
                lengths[key].append(value)
    totals = [p + max(c, r) for p, c, r in zip(*lengths.values())]
    stats = {
        "pairs": len(pairs),
        **{f"{key}_tokens_min_p50_max": spread(values) for key, values in lengths.items()},
        "longest_side_tokens_min_p50_max": spread(totals),
        "dropped": dropped,
    }
    return pairs, stats


# ----- measuring one run (child process) ------------------------------------------------------------------------
def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def make_probe(pad_id: int, warmup: int) -> Any:
    """A StepProbe (defined lazily so the parent need not import transformers)."""
    import torch
    from transformers import TrainerCallback

    class StepProbe(TrainerCallback):
        """Per optimizer step: sequences, non-pad tokens and positions fed to the input embedding in forward passes
        that build a graph (the policy's; reference passes run under no_grad), and on_step_begin -> on_step_end time."""

        def __init__(self) -> None:
            self.rows = self.tokens = self.positions = 0
            self.t_step = 0.0
            self.steps: list[tuple[int, int, int, float]] = []  # (rows, non-pad tokens, positions, seconds)
            self.first_step: tuple[int, int, int] | None = None  # (rows, tokens, positions) of step 1 (warm-up)
            self.losses: list[float] = []
            self.first_log: dict[str, float] = {}
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
                self.rows += ids.shape[0] if ids.dim() > 1 else 1
                self.tokens += int((ids != pad_id).sum())
                self.positions += ids.numel()
                if len(self.shapes) < 8:
                    self.shapes.add(tuple(ids.shape))

        def _kwargs(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self.model_kwargs is None and torch.is_grad_enabled():
                self.model_kwargs = sorted(k for k, v in kwargs.items() if v is not None)

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.rows = self.tokens = self.positions = 0
            self.t_step = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            now = time.perf_counter()
            if self.first_step is None:
                self.first_step = (self.rows, self.tokens, self.positions)
            if state.global_step == warmup:
                self.t_warm, self.cpu_warm = now, time.process_time()
            elif state.global_step > warmup:
                self.steps.append((self.rows, self.tokens, self.positions, now - self.t_step))
                self.t_last, self.cpu_last = now, time.process_time()
            self.rss_peak = max(self.rss_peak, rss_mib())

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any
        ) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))
                self.log_keys.update(logs)
                if not self.first_log:
                    self.first_log = {k: v for k, v in logs.items() if isinstance(v, (int, float))}

    return StepProbe()


def measure(
    build: Callable[[], tuple[Any, int]],
    warmup: int,
    unit: str = "tokens",
    count: Callable[[int, int], float] | None = None,
) -> tuple[dict[str, Any], Any]:
    """Build the trainer (`build` returns (trainer, pad token id)), train it with a StepProbe, summarise.

    `count(rows, tokens)` is the number of `unit`s in a step (default: the non-pad tokens). Returns (the result
    fields, the probe).
    """
    import torch

    count = count or (lambda rows, tokens: tokens)
    t0 = time.perf_counter()
    trainer, pad_id = build()
    probe = make_probe(pad_id, warmup)
    trainer.add_callback(probe)
    setup_s, rss_setup = time.perf_counter() - t0, rss_mib()
    trainer.train()
    train_s = time.perf_counter() - t0 - setup_s
    steps = probe.steps
    units = sum(count(s[0], s[1]) for s in steps)
    tokens = sum(s[1] for s in steps)
    res: dict[str, Any] = {
        "timed_steps": len(steps),
        "warmup_steps": warmup,
        f"{unit}_per_s": round(statistics.median(count(s[0], s[1]) / s[3] for s in steps), 1 if unit == "tokens" else 3),
        f"{unit}_per_s_wall": round(units / (probe.t_last - probe.t_warm), 1 if unit == "tokens" else 3),
        "s_per_step": round(statistics.median(s[3] for s in steps), 3),
        f"{unit}_per_step": round(units / len(steps), 1),
    }
    if unit != "tokens":
        res["tokens_per_step"] = round(tokens / len(steps), 1)
    res.update({
        "pad_fraction": round(1 - tokens / sum(s[2] for s in steps), 4),
        "peak_rss_mib": round(peak_rss_mib(), 1),
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
        f"{unit}_per_cpu_s": round(units / (probe.cpu_last - probe.cpu_warm), 1 if unit == "tokens" else 3),
        "setup_s": round(setup_s, 1),
        "train_s": round(train_s, 1),
    })
    return res, probe


def emit(result: dict[str, Any]) -> None:
    print(MARK + json.dumps(result), flush=True)


# ----- the parent -----------------------------------------------------------------------------------------------
def parser(doc: str | None, steps: int = 6, warmup: int = 2, runs: Sequence[str] = LIBS) -> argparse.ArgumentParser:
    """The options every benchmark takes; scripts add their own settings. `runs`: what a child may run (`--run`),
    the libraries unless a script adds baselines of its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--libs", default=",".join(runs), help=f"comma-separated subset of {','.join(runs)}")
    p.add_argument("--steps", type=int, default=steps, help="timed optimizer steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=warmup, help="warm-up steps excluded from timing")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: small corpus, 2+1 steps")
    p.add_argument("--workdir", type=Path, help="keep assets and outputs here (default: a temp dir)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--regime", choices=("long", "short"), default="long", help=(
        "long: sequences up to 512 tokens (the sizes each script documents); short: at most 128 tokens a "
        "sequence (issue #15's short regime; each script says what it changes)"))
    p.add_argument("--bf16", action="store_true", help=(
        "bf16 autocast in both libraries (bf16=True, use_cpu=True: TRL's default precision); default fp32"))
    p.add_argument("--logging-steps", type=int, default=1, help=(
        "logging_steps of both configs (default 1: every step's loss is read; a larger value is closer to real "
        "use, where tether measures its per-token statistics only on the steps that log)"))
    p.add_argument("--run", choices=runs, help=argparse.SUPPRESS)  # child mode
    return p


REGIME = ["long"]  # --regime, set by parse(): read by the scripts' asset builders and runs, passed to children
BF16 = [False]  # --bf16, the same way
LOGGING_STEPS = [1]  # --logging-steps, the same way


def precision_kwargs() -> dict[str, bool]:
    """The precision fields of both libraries' configs: bf16 autocast with --bf16, else fp32. use_cpu=True
    either way: TRL's configs refuse bf16 on a machine without an accelerator unless it is set."""
    return {"bf16": BF16[0], "use_cpu": True}


def parse(p: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse, go offline, and in the parent apply --quick (2 timed steps after 1 warm-up step)."""
    a = p.parse_args()
    REGIME[0], BF16[0], LOGGING_STEPS[0] = a.regime, a.bf16, a.logging_steps
    os.environ.update(dict.fromkeys(OFFLINE, "1"), TOKENIZERS_PARALLELISM="false")
    if a.quick and not a.run:
        a.steps, a.warmup = 2, 1
    return a


@dataclass
class Job:
    lib: str
    setting: dict[str, Any]  # identifies the run in the results, e.g. {"packing": True}
    flags: list[str]  # child flags besides --run/--workdir
    tag: str  # log file suffix
    desc: str  # progress line


def run_jobs(script: str, work: Path, jobs: list[Job]) -> list[dict[str, Any]]:
    """Run each job as `python script --run LIB --workdir WORK FLAGS` in a fresh process; its stderr goes to
    work/log-LIB-TAG.txt. A failed run gives {"lib", **setting, "error": last log line}."""
    results: list[dict[str, Any]] = []
    for job in jobs:
        cmd = [sys.executable, script, "--run", job.lib, "--workdir", str(work), "--regime", REGIME[0],
               "--logging-steps", str(LOGGING_STEPS[0]), *(["--bf16"] if BF16[0] else []), *job.flags]
        print(f"running {job.lib} {job.desc} ...", file=sys.stderr, flush=True)
        log = work / f"log-{job.lib}-{job.tag}.txt"
        with log.open("w") as f:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
        if proc.returncode == 0 and lines:
            results.append(json.loads(lines[-1][len(MARK) :]))
        else:
            tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
            results.append({"lib": job.lib, **job.setting, "error": tail[0][:200]})
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    return results


def run_parent(
    a: argparse.Namespace,
    name: str,
    script: str,
    build_assets: Callable[[Path, bool], dict[str, Any]],
    jobs: Callable[[], list[Job]],
    render: Callable[[list[dict[str, Any]]], str],
) -> None:
    """Assets once (timed on stderr), then the jobs, then the table on stdout (and --json)."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        work = a.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        info = build_assets(work, a.quick)
        print(f"assets ({time.perf_counter() - t0:.0f}s): {json.dumps(info)}", file=sys.stderr, flush=True)
        results = run_jobs(script, work, jobs())
        print(render(results))
        if a.json:
            a.json.write_text(json.dumps({"assets": info, "results": results}, indent=1))


# ----- the table ------------------------------------------------------------------------------------------------
Column = tuple[str, Callable[[dict[str, Any]], str]]


def standard_columns(unit: str, digits: int = 0, extra: Sequence[Column] = ()) -> list[Column]:
    """Throughput in `unit` (median step, wall), s/step, units/step (and tokens/step when the unit is not
    tokens), pad %, `extra`, peak RSS, losses, CPU/wall (load)."""
    cols: list[Column] = [
        (f"{unit}/s (median step)", lambda r: f"{r[f'{unit}_per_s']:.{digits}f}"),
        (f"{unit}/s (wall)", lambda r: f"{r[f'{unit}_per_s_wall']:.{digits}f}"),
        ("s/step", lambda r: f"{r['s_per_step']:.2f}"),
        (f"{unit}/step", lambda r: f"{r[f'{unit}_per_step']:.0f}"),
    ]
    if unit != "tokens":
        cols.append(("tokens/step", lambda r: f"{r['tokens_per_step']:.0f}"))
    cols.append(("pad %", lambda r: f"{100 * r['pad_fraction']:.1f}"))
    cols += list(extra)
    cols += [
        ("peak RSS MiB", lambda r: f"{r['peak_rss_mib']:.0f}"),
        ("loss first -> last", lambda r: "-" if r["loss_first"] is None else
         f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}"),
        ("CPU/wall (load)", lambda r: f"{r['cpu_per_wall']:.2f} ({r['loadavg_1m']:.1f})"),
    ]
    return cols


def table(results: list[dict[str, Any]], setting: str, unit: str, columns: Sequence[Column]) -> str:
    """Markdown: one row per run (first column the `setting` value), then per setting value with both libraries
    a line `setting=value: tether/TRL unit/s = x, peak RSS = y`."""
    headers = [setting, "library", *(h for h, _ in columns)]
    rows = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in results:
        if "error" in r:
            rows.append(f"| {r[setting]} | {r['lib']} | error: {r['error']} |" + " |" * (len(columns) - 1))
            continue
        rows.append(f"| {r[setting]} | {r['lib']} | " + " | ".join(fmt(r) for _, fmt in columns) + " |")
    ok = {(r["lib"], r[setting]): r for r in results if "error" not in r}
    for value in dict.fromkeys(r[setting] for r in results):
        t, b = ok.get(("tether", value)), ok.get(("trl", value))
        if t and b:
            rows.append(
                f"\n{setting}={value}: tether/TRL {unit}/s = {t[f'{unit}_per_s'] / b[f'{unit}_per_s']:.2f}, "
                f"peak RSS = {t['peak_rss_mib'] / b['peak_rss_mib']:.2f}"
            )
    return "\n".join(rows)
