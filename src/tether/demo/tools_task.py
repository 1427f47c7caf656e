"""`tether demo --method tools`: a tiny model learns, by GRPO, to call a calculator for sums it cannot do.

The task: prompts like `48213+90577=`; the reward is 1 when the model's final turn is the exact sum. Five-digit
sums are out of reach of a 2-layer model trained for a minute, but copying is not: with the calculator tool
(classic syntax, TRL 0.7's TextEnvironment form) an episode is

    48213+90577=<request><Calculator>48213+90577<call>138790<response>138790<eos>
    |-- prompt --||------------- model turn 1 --------||- observation -||- turn 2 -|

and only the model's turns are trained. A short SFT warm-up teaches the syntax on a mix where 40% of the
transcripts call the tool and the rest guess an answer, so the SFT model calls the tool about 40% of the time
and is right about that often. GRPO then raises the tool-call rate of the first turn, and success with it:
the report plots both per turn.

The model reads characters: a word-level tokenizer over single characters, with the call syntax's markers as
single tokens (so `<call>` ends a turn as one token).
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

from ..rollout.multiturn import ToolEnvironment
from ..rollout.tools import Calculator

MARKERS = ["<request>", "<Calculator>", "<call>", "<response>"]
CHARACTERS = list("0123456789+=")
DIGITS = 5


def arithmetic_tokenizer() -> Any:
    """Characters and the call markers as tokens; pad/eos/bos as the tiny demo models expect (ids 0, 1, 2)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", *MARKERS, *CHARACTERS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>", additional_special_tokens=MARKERS)


class ArithmeticEnvironment(ToolEnvironment):
    """One episode of the task: the calculator (classic syntax) as its tool; reward 1 when the final turn is the
    exact sum (the `answer` column), else 0."""

    def __init__(self) -> None:
        super().__init__([Calculator()], syntax="classic", timeout=5.0, max_chars=64)
        self.answer = ""

    def reset(self, prompt: Any = None, answer: str = "", **row: Any) -> None:
        super().reset()
        self.answer = str(answer)

    def episode_reward(self, final_text: str) -> float:
        return float(final_text.strip() == self.answer)


def _problem(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(10 ** (DIGITS - 1), 10 ** DIGITS), rng.randrange(10 ** (DIGITS - 1), 10 ** DIGITS)
    return f"{a}+{b}", str(a + b)


def sft_rows(n: int, seed: int, tool_share: float = 0.4) -> list[dict[str, str]]:
    """Warm-up transcripts: `tool_share` of them call the calculator and copy its answer; the rest guess."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        expression, answer = _problem(rng)
        if rng.random() < tool_share:
            text = f"{expression}=<request><Calculator>{expression}<call>{answer}<response>{answer}"
        else:
            guess = str(rng.randrange(10 ** DIGITS, 2 * 10 ** DIGITS))
            text = f"{expression}={guess}"
        rows.append({"text": text})
    return rows


def prompt_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed + 1000)
    rows = []
    for _ in range(n):
        expression, answer = _problem(rng)
        rows.append({"prompt": f"{expression}=", "answer": answer})
    return rows


SIZES = {
    "full": dict(sft_rows=4000, sft_epochs=6, grpo_prompts=640, grpo_steps=80, hidden=128, layers=3),
    "quick": dict(sft_rows=400, sft_epochs=1, grpo_prompts=32, grpo_steps=4, hidden=64, layers=2),
}


def _read_metric(run_dir: Path, key: str) -> list[float]:
    from ..reports.runfiles import METRICS_FILE, read_jsonl

    return [float(r[key]) for r in read_jsonl(run_dir / METRICS_FILE) if r.get(key) is not None]


def run_tools_demo(output_dir: str | os.PathLike = "./tether-demo-tools", quick: bool = False, seed: int = 0,
                   num_threads: int | None = 2) -> dict[str, Any]:
    """SFT warm-up, then GRPO with `ArithmeticEnvironment`; one report; returns the story's figures."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, set_seed

    from ..reports import write_report
    from ..trainers.grpo import GRPOConfig, GRPOTrainer
    from ..trainers.sft import SFTConfig, SFTTrainer
    from .tiny import tiny_llama_config

    sizes = SIZES["quick" if quick else "full"]
    out = Path(output_dir)
    threads = torch.get_num_threads()
    if num_threads is not None and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(num_threads)
    started = time.perf_counter()
    try:
        set_seed(seed)
        tokenizer = arithmetic_tokenizer()
        model = AutoModelForCausalLM.from_config(tiny_llama_config(
            len(tokenizer), hidden_size=sizes["hidden"], num_layers=sizes["layers"], max_positions=128))
        print("1. SFT warm-up: the call syntax, on transcripts of which 40% call the calculator", flush=True)
        sft = SFTTrainer(model, args=SFTConfig(
            output_dir=str(out / "sft"), num_train_epochs=sizes["sft_epochs"], per_device_train_batch_size=16,
            learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=0.05, logging_steps=10, save_strategy="no",
            report_to=[], seed=seed, max_length=64),
            train_dataset=Dataset.from_list(sft_rows(sizes["sft_rows"], seed)), processing_class=tokenizer)
        sft.train()
        sft.save_model()
        print("2. GRPO with the calculator environment: only the model's own tokens are trained", flush=True)
        grpo = GRPOTrainer(sft.model, args=GRPOConfig(
            output_dir=str(out / "grpo"), max_steps=sizes["grpo_steps"], per_device_train_batch_size=16,
            num_generations=8, max_completion_length=40, max_turns=3, learning_rate=1e-4, beta=0.0,
            temperature=1.0, logging_steps=1, save_strategy="no", report_to=[], seed=seed, num_completions_to_log=4),
            train_dataset=Dataset.from_list(prompt_rows(sizes["grpo_prompts"], seed)), processing_class=tokenizer,
            environment_factory=ArithmeticEnvironment)
        grpo.train()
        grpo.save_model()
    finally:
        torch.set_num_threads(threads)
    rate = _read_metric(out / "grpo", "episodes/turn_1/tool_call_rate")
    reward = _read_metric(out / "grpo", "reward")
    window = max(1, len(rate) // 5)
    story = {"tool_call_rate_first": sum(rate[:window]) / window, "tool_call_rate_last": sum(rate[-window:]) / window,
             "success_first": sum(reward[:window]) / window, "success_last": sum(reward[-window:]) / window,
             "seconds": time.perf_counter() - started, "quick": quick}
    notes = [f"GRPO, first {window} steps -> last {window}: tool-call rate of the first turn "
             f"{story['tool_call_rate_first']:.0%} -> {story['tool_call_rate_last']:.0%}, task success "
             f"{story['success_first']:.0%} -> {story['success_last']:.0%}."]
    report = write_report(out, title="tether demo --method tools", notes=notes,
                          runs=[("SFT warm-up", out / "sft"), ("GRPO with a calculator environment", out / "grpo")])
    (out / "story.json").write_text(json.dumps(story, indent=2))
    print(notes[0])
    print(f"Report: {report.path}")
    return story
