"""`tether demo`: the post-training story on a laptop CPU, offline: `tether pipeline` on an embedded YAML.

    setup (here):  generate a review corpus, preference pairs and prompts under data/, train a byte-level BPE
                   tokenizer on the corpus, build an untrained tiny Llama in base/
    the pipeline:  the YAML of `config.demo_yaml` (`tether demo --print-config`), run by `run_pipeline`:
                   sft -> reward -> ppo, and dpo from the SFT model (`--method grpo|rloo`: sft -> reward -> grpo|rloo)
    after each stage (the pipeline's `after_stage`), the story: samples of its model and their scores

Every policy stage is judged the same way (demo/evaluate.py), on review openings that no policy stage trains
on: the reward model's score of many sampled reviews, the hand-written lexicon's score (which no model saw, so
gaming the reward model does not fool it), and their perplexity under the SFT model (broken words make it
soar), for the SFT model and after the stage. The numbers are printed, saved to `story.json` and shown in the
report. A stage's own numbers (held-out loss, pair accuracy, rollout rewards) are read from the metrics.jsonl
its trainer wrote, so a stage the pipeline skips (unchanged since its last run) tells the same story.

Setup rewrites a file only when its contents change, so a second `tether demo` into the same folder finds
every stage up to date (the pipeline identifies folders by their files' sizes and modification times).
The whole demo should finish in under 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import (
    FULL,
    HELD_OUT_OPENINGS,
    MAX_NEW_TOKENS,
    POSITIVE_PAIRS_DIR,
    PROMPT_REPEATS,
    PROMPTS_FILE,
    QUICK,
    RANKED_PAIRS_DIR,
    REVIEWS,
    TRAIN_OPENINGS,
    DemoSizes,
    demo_yaml,
)
from .corpus import RANKED_PAIRS, TOWARDS_POSITIVE, generate_reviews

__all__ = ["FULL", "HELD_OUT_OPENINGS", "QUICK", "STORY_FILE", "TRAIN_OPENINGS", "DemoContext", "run_demo"]

RULE = "=" * 78
STORY_FILE = "story.json"
# One thread: the model's matrices are 128 wide, too small for a second thread to pay off much, and on a
# machine whose cores are busy with anything else, two OpenMP threads wait on each other: measured on 2
# shared cores, an SFT step took 0.25-0.5 s with one thread and 1.3-2.7 s with two.
DEMO_THREADS = 1
REWARD_EXAMPLES = ("this movie was truly wonderful, i would watch it again.",
                   "the plot was predictable and the acting was average.", "the plot was dull and the acting weak.")


@dataclass
class DemoContext:
    """What setup and the story share: where files go, how big things are, and what is known so far."""

    output_dir: Path
    sizes: DemoSizes
    seed: int = 0
    tokenizer: Any = None
    results: dict[str, str] = field(default_factory=dict)  # summary lines, in stage order
    story: dict[str, dict[str, Any]] = field(default_factory=dict)  # each stage's numbers, saved to story.json
    reward: Any = None  # the reward stage's model as a reward function (RewardModelScorer), once loaded
    reference: Any = None  # the SFT model, once loaded: the yardstick of fluency
    sft_eval: Any = None  # the SFT model's evaluation (PolicyEval), the "before" of every policy stage
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.output_dir / "data"

    @property
    def base_dir(self) -> Path:
        return self.output_dir / "base"

    def stage_dir(self, stage: str) -> Path:
        return self.output_dir / stage

    def stage_seed(self, stage: str) -> int:
        """A seed of its own for each stage's samples, so that stages do not print the same draws."""
        return self.seed + zlib.crc32(stage.encode()) % 9973


# ----- files, rewritten only when they change -----------------------------------------------------------
def _write_if_changed(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    path.write_text(text, encoding="utf-8")


def _write_jsonl(rows: list[dict], path: Path) -> None:
    _write_if_changed(path, "".join(json.dumps(row) + "\n" for row in rows))


def _sync_folder(source: Path, target: Path) -> None:
    """Make `target` hold `source`'s files, replacing only those whose bytes differ."""
    target.mkdir(parents=True, exist_ok=True)
    names = {p.name for p in source.iterdir()}
    for stale in target.iterdir():
        if stale.name not in names:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    for name in names:
        if not (target / name).is_file() or not filecmp.cmp(source / name, target / name, shallow=False):
            shutil.copyfile(source / name, target / name)


def _read_metrics(stage_dir: Path, key: str) -> list[float]:
    """Every logged value of `key` in a stage's metrics.jsonl, in order."""
    from ..reports import METRICS_FILE

    with open(stage_dir / METRICS_FILE, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [row[key] for row in rows if key in row]


# ----- setup ---------------------------------------------------------------------------------------------
def setup(ctx: DemoContext) -> None:
    """The pipeline's inputs: data/ (reviews, ranked and positive preference pairs, prompts), and base/ (an
    untrained tiny Llama with a BPE tokenizer trained on the reviews)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .corpus import preference_pairs
    from .tiny import tiny_llama_config, train_tokenizer

    sizes, data = ctx.sizes, ctx.data_dir
    reviews = generate_reviews(sizes.n_reviews + sizes.n_eval, seed=ctx.seed)
    corpus = reviews[: sizes.n_reviews]
    _write_jsonl(corpus, data / REVIEWS / "train.jsonl")
    _write_jsonl(reviews[sizes.n_reviews:], data / REVIEWS / "test.jsonl")  # held out: shows generalisation
    print(f"Generated {len(corpus)} training and {sizes.n_eval} held-out reviews -> {data / REVIEWS}")
    for row in corpus[:3]:
        print(f"  [{row['sentiment']:>8}] {row['text']}")
    # Preference pairs are continuations of one opening ranked by sentiment (corpus.preference_pairs), 10% held
    # out; DPO's use only the training openings, so that the held-out openings stay unseen by every policy.
    for folder, rankings, openings in ((RANKED_PAIRS_DIR, RANKED_PAIRS, None),
                                       (POSITIVE_PAIRS_DIR, TOWARDS_POSITIVE, TRAIN_OPENINGS)):
        pairs = preference_pairs(sizes.n_pairs, seed=ctx.seed + 1, rankings=rankings, openings=openings)
        split = max(1, len(pairs) // 10)
        _write_jsonl(pairs[split:], data / folder / "train.jsonl")
        _write_jsonl(pairs[:split], data / folder / "test.jsonl")
    _write_jsonl([{"prompt": p} for p in list(TRAIN_OPENINGS) * PROMPT_REPEATS], data / PROMPTS_FILE)
    print(f"Preference pairs -> {data / RANKED_PAIRS_DIR} (positive > neutral > negative, and whole reviews > "
          f"damaged ones), {data / POSITIVE_PAIRS_DIR} (positive preferred); prompts -> {data / PROMPTS_FILE}")

    ctx.tokenizer = train_tokenizer([r["text"] for r in corpus], vocab_size=sizes.vocab_size)
    example = corpus[0]["text"]
    pieces = ctx.tokenizer.convert_ids_to_tokens(ctx.tokenizer(example)["input_ids"])
    print(f"\nTrained a byte-level BPE tokenizer, {len(ctx.tokenizer)} tokens")
    print(f"  {example!r} -> {len(pieces)} tokens: {' '.join(pieces)}")
    torch.manual_seed(ctx.seed)
    config = tiny_llama_config(len(ctx.tokenizer), hidden_size=sizes.hidden_size, num_layers=sizes.num_layers,
                               num_heads=sizes.num_heads, max_positions=sizes.max_length,
                               pad_token_id=ctx.tokenizer.pad_token_id, eos_token_id=ctx.tokenizer.eos_token_id,
                               bos_token_id=ctx.tokenizer.bos_token_id)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    with tempfile.TemporaryDirectory(dir=ctx.output_dir) as staging:
        model.save_pretrained(staging)
        ctx.tokenizer.save_pretrained(staging)
        _sync_folder(Path(staging), ctx.base_dir)
    params = sum(p.numel() for p in model.parameters())
    print(f"Built an untrained Llama decoder: {sizes.num_layers} layers, hidden {sizes.hidden_size}, "
          f"{params / 1e6:.2f}M parameters -> {ctx.base_dir} (with the tokenizer)")
    ctx.results["setup"] = (f"{len(corpus)} reviews, {len(ctx.tokenizer)}-token BPE, "
                            f"{params / 1e6:.2f}M-parameter Llama in {ctx.base_dir}")


# ----- the story: samples and scores after each stage ------------------------------------------------------
def sample_reviews(model: Any, tokenizer: Any, prompts: list[str], seed: int,
                   max_new_tokens: int = 32) -> list[tuple[str, str, str]]:
    """(prompt, greedy completion, sampled completion) for each prompt; sampling is seeded."""
    import torch

    model.eval()
    out = []
    for k, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]  # [1, t]
        completions = []
        # Sampling draws from the full distribution (no top-k), so it shows what the model really learned.
        for decoding in ({"do_sample": False}, {"do_sample": True, "top_k": 0, "temperature": 1.0}):
            torch.manual_seed(seed + k)  # the same draws on every run, whatever ran before
            with torch.no_grad():
                gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                     **decoding)
            completions.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
        out.append((prompt, *completions))
    return out


def print_samples(title: str, samples: list[tuple[str, str, str]]) -> None:
    print(f"\n{title}  (prompt|continuation)")
    for prompt, greedy, sampled in samples:
        print(f"  greedy : {prompt}|{greedy}")
        print(f"  sampled: {prompt}|{sampled}")
    print()


def _shown_prompts(ctx: DemoContext) -> list[str]:
    """The openings whose samples are printed: held-out ones, which no policy stage trains on."""
    return list(HELD_OUT_OPENINGS[: ctx.sizes.n_samples])


def _load_policy(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _reward(ctx: DemoContext) -> Any:
    """The reward stage's model as a reward function, loaded once."""
    from ..rollout.rewards import RewardModelScorer

    if ctx.reward is None:
        ctx.reward = RewardModelScorer(str(ctx.stage_dir("reward")), ctx.tokenizer)
    return ctx.reward


def _reference(ctx: DemoContext) -> Any:
    """The SFT model, loaded once: the perplexity of every stage's samples is measured under it."""
    if ctx.reference is None:
        ctx.reference = _load_policy(ctx.stage_dir("sft"))
    return ctx.reference


def _evaluate(ctx: DemoContext, model: Any, stage: str) -> Any:
    from .evaluate import evaluate_policy

    return evaluate_policy(model, ctx.tokenizer, HELD_OUT_OPENINGS, ctx.sizes.eval_samples, ctx.stage_seed(stage),
                           _reward(ctx), _reference(ctx), max_new_tokens=MAX_NEW_TOKENS)


def _greedy(ctx: DemoContext, model: Any, prompts: list[str]) -> list[str]:
    import torch

    out = []
    for prompt in prompts:
        ids = ctx.tokenizer(prompt, return_tensors="pt")["input_ids"]  # [1, t]
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS,
                                 do_sample=False, eos_token_id=ctx.tokenizer.eos_token_id,
                                 pad_token_id=ctx.tokenizer.pad_token_id)
        out.append(ctx.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def report_policy(ctx: DemoContext, stage: str, label: str, model: Any, samples_per_prompt: int = 2) -> str:
    """Print `model`'s samples (greedy, then sampled) on held-out openings with their reward-model scores, and
    the held-out evaluation next to the SFT model's; record it in `ctx.story[stage]`. Returns a summary line."""
    if ctx.sft_eval is None:  # the "before" of every policy stage
        ctx.sft_eval = _evaluate(ctx, _reference(ctx), "sft")
    before, after = ctx.sft_eval, _evaluate(ctx, model.eval(), stage)
    prompts = _shown_prompts(ctx)
    greedy = _greedy(ctx, model, prompts)
    greedy_scores = _reward(ctx)(prompts, greedy)
    print(f"\nSamples AFTER {label}, on openings it never trained on (reward-model score, prompt|continuation):")
    for prompt, text, score in zip(prompts, greedy, greedy_scores):
        print(f"  greedy : {score:+5.2f}  {prompt}|{text}")
        shown = [k for k, p in enumerate(after.prompts) if p == prompt][:samples_per_prompt]
        for k in shown:
            print(f"  sampled: {after.rewards[k]:+5.2f}  {prompt}|{after.completions[k]}")
    n = len(after.completions)
    print(f"\nHeld-out evaluation: {n} reviews sampled on {len(HELD_OUT_OPENINGS)} unseen openings (temperature 1)")
    print(f"  {'':<14}{'reward model':>13}{'lexicon':>9}{'positive':>10}{'broken words':>14}{'distinct':>10}"
          f"{'perplexity under SFT':>22}")
    for name, ev in (("SFT model", before), (f"after {label}", after)):
        print(f"  {name:<14}{ev.reward:>+13.2f}{ev.positivity:>+9.2f}{ev.positive_share:>10.0%}"
              f"{ev.broken_share:>14.0%}{ev.distinct_share:>10.0%}{ev.perplexity:>22.2f}")
    ctx.story[stage] = {"before": before.summary(), "after": after.summary(),
                        "samples": [{"prompt": p, "completion": c, "reward": r}
                                    for p, c, r in zip(after.prompts, after.completions, after.rewards)]}
    return (f"held-out reward {before.reward:+.2f} -> {after.reward:+.2f}, lexicon {before.positivity:+.2f} -> "
            f"{after.positivity:+.2f}, perplexity {before.perplexity:.2f} -> {after.perplexity:.2f}")


def sft_story(ctx: DemoContext, stage_dir: Path) -> None:
    """Samples of the untrained and the fine-tuned model; the held-out loss before and after."""
    prompts, seed = _shown_prompts(ctx), ctx.stage_seed("sft")
    print_samples("Samples BEFORE training (random weights):",
                  sample_reviews(_load_policy(ctx.base_dir), ctx.tokenizer, prompts, seed))
    print_samples("Samples AFTER training:", sample_reviews(_reference(ctx), ctx.tokenizer, prompts, seed))
    losses = _read_metrics(stage_dir, "eval_loss")  # eval_on_start, then the command's final evaluation
    before, after = losses[0], losses[-1]
    print(f"Held-out loss {before:.2f} -> {after:.2f} nats/token; model in {stage_dir}")
    ctx.story["sft"] = {"loss_before": before, "loss_after": after}
    ctx.results["sft"] = f"held-out loss {before:.2f} -> {after:.2f}"


def reward_story(ctx: DemoContext, stage_dir: Path) -> None:
    """Pairwise accuracy on held-out pairs before and after, and the check on hand-written sentences."""
    from .corpus import CHECK_SENTENCES, CONTRADICTED, TRUNCATED
    from .evaluate import check_reward_model

    accuracies = _read_metrics(stage_dir, "eval_accuracy")
    before, after = accuracies[0], accuracies[-1]
    print(f"Held-out pairwise accuracy {before:.2f} -> {after:.2f}; model in {stage_dir}")
    reward = _reward(ctx)
    check = check_reward_model(reward.score_texts)
    n = sum(len(v) for v in CHECK_SENTENCES.values())
    print(f"Check set: {n} hand-written sentences in none of the corpus' templates (demo/corpus.py)")
    print(f"  clearly positive scored above clearly negative: accuracy {check.accuracy:.2f} (over all pairs of the "
          f"two); positive above neutral {check.ranking_accuracy('positive', 'neutral'):.2f}, neutral above negative "
          f"{check.ranking_accuracy('neutral', 'negative'):.2f}")
    print(f"  positive above itself cut short {check.paired_accuracy('positive', TRUNCATED):.2f}, above itself with "
          f"a word turned negative {check.paired_accuracy('positive', CONTRADICTED):.2f}")
    print("  mean score: " + ", ".join(f"{name} {check.mean(name):+.2f}" for name in check.scores))
    print("Scores of a few sentences:")
    for text, score in zip(REWARD_EXAMPLES, reward.score_texts(list(REWARD_EXAMPLES))):
        print(f"  {score:+6.2f}  {text}")
    ctx.story["reward"] = {"pair_accuracy_before": before, "pair_accuracy_after": after, **check.summary()}
    ctx.results["reward"] = (f"held-out pair accuracy {before:.2f} -> {after:.2f}, check-set accuracy "
                             f"{check.accuracy:.2f}, mean scores +/0/- {check.mean('positive'):+.2f} "
                             f"{check.mean('neutral'):+.2f} {check.mean('negative'):+.2f}")


def ppo_story(ctx: DemoContext, stage_dir: Path) -> None:
    summary = report_policy(ctx, "ppo", "PPO", _load_policy(stage_dir))
    rewards, kl = _read_metrics(stage_dir, "env/reward_mean"), _read_metrics(stage_dir, "objective/kl")
    print(f"Mean reward of rollouts {rewards[0]:+.2f} -> {rewards[-1]:+.2f}; KL to the SFT model {kl[-1]:.2f} nats "
          "per review")
    ctx.story["ppo"].update(rollout_reward_first=rewards[0], rollout_reward_last=rewards[-1], kl=kl[-1])
    ctx.results["ppo"] = f"{summary}, KL {kl[-1]:.2f}"


def group_rl_story(ctx: DemoContext, stage_dir: Path, method: str) -> None:
    summary = report_policy(ctx, method, method.upper(), _load_policy(stage_dir))
    rewards, kl = _read_metrics(stage_dir, "reward"), _read_metrics(stage_dir, "kl")
    print(f"Mean reward of sampled reviews {rewards[0]:+.2f} -> {rewards[-1]:+.2f} (training rollouts); KL to "
          f"the SFT model {kl[-1]:.2f}")
    ctx.story[method].update(rollout_reward_first=rewards[0], rollout_reward_last=rewards[-1], kl=kl[-1])
    ctx.results[method] = f"{summary}, KL {kl[-1]:.2f}"


def dpo_story(ctx: DemoContext, stage_dir: Path) -> None:
    summary = report_policy(ctx, "dpo", "DPO", _load_policy(stage_dir))
    accuracy = _read_metrics(stage_dir, "eval_rewards/accuracies")[-1]
    margin = _read_metrics(stage_dir, "eval_rewards/margins")[-1]
    print(f"Held-out rewards/accuracies {accuracy:.2f}, rewards/margins {margin:.2f} (DPO's implicit reward on "
          "held-out pairs)")
    ctx.story["dpo"].update(pair_accuracy=accuracy, margin=margin)
    ctx.results["dpo"] = f"{summary}, pair accuracy {accuracy:.2f}"


STORIES: dict[str, Callable[[DemoContext, Path], None]] = {
    "sft": sft_story, "reward": reward_story, "ppo": ppo_story, "dpo": dpo_story,
    "grpo": lambda ctx, d: group_rl_story(ctx, d, "grpo"), "rloo": lambda ctx, d: group_rl_story(ctx, d, "rloo"),
}


# ----- the demo ------------------------------------------------------------------------------------------
def _quiet_libraries() -> None:
    """Keep the Trainer's progress bar and logs; drop per-map dataset bars and load reports."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()  # weight loading/saving bars, not the Trainer's tqdm


def demo_flags(quick: bool = False, method: str = "ppo", output_dir: str | os.PathLike = "./tether-demo",
               seed: int = 0) -> str:
    """The `tether demo` options that differ from the defaults, as typed."""
    flags = [" --quick"] if quick else []
    flags += [f" --method {method}"] if method != "ppo" else []
    flags += [f" --output_dir {output_dir}"] if os.fspath(output_dir) != "./tether-demo" else []
    return "".join(flags + ([f" --seed {seed}"] if seed else []))


def run_demo(output_dir: str | os.PathLike = "./tether-demo", quick: bool = False, seed: int = 0,
             method: str = "ppo", num_threads: int | None = DEMO_THREADS) -> DemoContext:
    """Setup, then the demo's pipeline with the story after each stage, a summary and `story.json`; returns
    the context. `num_threads` sets torch's threads while it runs (None, or OMP_NUM_THREADS set: leave them)."""
    import torch
    import yaml
    from transformers import set_seed

    from ..pipeline import parse_pipeline, run_pipeline

    start = time.perf_counter()
    threads = torch.get_num_threads()
    if num_threads is not None and "OMP_NUM_THREADS" not in os.environ:  # a user's own choice stands
        torch.set_num_threads(num_threads)
    ctx = DemoContext(Path(output_dir), QUICK if quick else FULL, seed)
    try:
        _quiet_libraries()
        set_seed(seed)  # python, numpy and torch, so a rerun prints the same samples
        ctx.output_dir.mkdir(parents=True, exist_ok=True)
        print(f"\n{RULE}\nSetup: data, tokenizer and an untrained model\n{RULE}", flush=True)
        t0 = time.perf_counter()
        setup(ctx)
        ctx.timings["setup"] = time.perf_counter() - t0
        flags = demo_flags(quick, method, output_dir, seed)
        text = demo_yaml(os.fspath(output_dir), ctx.sizes, seed, method, flags)
        spec = parse_pipeline(yaml.safe_load(text), source="tether demo")
        notes: list[str] = []

        def tell_story(outcome: Any) -> None:
            STORIES[outcome.name](ctx, Path(outcome.model_dir))
            ctx.timings[outcome.name] = outcome.seconds
            notes.append(f"{outcome.name}: {ctx.results[outcome.name]}")

        result = run_pipeline(spec, after_stage=tell_story, report_title="tether demo", report_notes=notes)
    finally:
        torch.set_num_threads(threads)

    total = time.perf_counter() - start
    print(f"\n{RULE}\nSummary{' (--quick)' if quick else ''}: {total:.0f} s, everything under {ctx.output_dir}\n{RULE}")
    for outcome in [None, *result.stages]:
        name = "setup" if outcome is None else outcome.name
        took = "skipped" if outcome is not None and outcome.action == "skip" else f"{ctx.timings[name]:6.1f} s"
        print(f"  {name:<6} {took:>8}  {ctx.results.get(name, '')}")
    print(f"\nThe same pipeline from the command line (edit it, and rerun what changed):\n"
          f"  tether demo{flags} --print-config > demo.yaml\n  tether pipeline demo.yaml")
    with open(ctx.output_dir / STORY_FILE, "w", encoding="utf-8") as f:
        json.dump({**ctx.story, "timings": ctx.timings, "total_seconds": total, "quick": quick}, f, indent=2)
    print(f"\nReport of the whole pipeline (plots, samples, configs): {result.report}")
    return ctx


def print_config(output_dir: str | os.PathLike = "./tether-demo", quick: bool = False, seed: int = 0,
                 method: str = "ppo") -> None:
    """`tether demo --print-config`: the pipeline YAML the demo with these options runs."""
    sizes = QUICK if quick else FULL
    print(demo_yaml(os.fspath(output_dir), sizes, seed, method, demo_flags(quick, method, output_dir, seed)), end="")
