"""`tether demo`: the post-training story on a laptop CPU, offline, one stage after another.

Stages are plain functions of one shared `DemoContext` (paths, sizes, the tokenizer, results so far), run in
the order of `STAGES`. Later stages (reward model, PPO, DPO) append themselves to that list and read what
the earlier ones left in the context (`ctx.corpus`, `ctx.tokenizer`, `ctx.sft_dir`, ...).

    setup: generate a review corpus, train a byte-level BPE tokenizer on it, build an untrained tiny Llama
    sft:   supervised fine-tuning with tether's SFTTrainer; samples before (gibberish) and after (reviews)

The whole demo, all stages together, should finish in under 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .corpus import generate_reviews, review_prompts

RULE = "=" * 78


@dataclass(frozen=True)
class DemoSizes:
    """Everything that differs between the full demo and `--quick`."""

    n_reviews: int
    n_eval: int
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    sft_steps: int
    batch_size: int
    max_length: int
    learning_rate: float
    n_samples: int
    n_pairs: int
    reward_steps: int
    dpo_steps: int
    ppo_steps: int


# The corpus has ~300 distinct words: a 1024-token BPE (it stops at ~840, out of merges) makes nearly every
# word one token, and a ~0.9M-parameter model fits it. A high learning rate with a short warmup and cosine
# decay gets the held-out loss from ~6.8 to ~0.9 nats/token (about the corpus' own entropy) in 200 steps,
# about 6 passes over the corpus; 120 steps already read as reviews, 300 barely improve on 200.
FULL = DemoSizes(n_reviews=4000, n_eval=200, vocab_size=1024, hidden_size=128, num_layers=4, num_heads=4,
                 sft_steps=200, batch_size=16, max_length=128, learning_rate=3e-3, n_samples=4,
                 n_pairs=600, reward_steps=80, dpo_steps=60, ppo_steps=40)
QUICK = DemoSizes(n_reviews=600, n_eval=50, vocab_size=400, hidden_size=64, num_layers=2, num_heads=4,
                  sft_steps=12, batch_size=8, max_length=64, learning_rate=3e-3, n_samples=2,
                  n_pairs=64, reward_steps=4, dpo_steps=4, ppo_steps=2)


@dataclass
class DemoContext:
    """What the stages share: where files go, how big things are, and what earlier stages produced."""

    output_dir: Path
    sizes: DemoSizes
    seed: int = 0
    corpus: list[dict] = field(default_factory=list)
    tokenizer: Any = None
    results: dict[str, str] = field(default_factory=dict)  # summary lines, in stage order
    reward_scorer: Any = None  # the stage-2 reward model, once loaded
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def corpus_file(self) -> Path:
        return self.output_dir / "corpus.jsonl"

    @property
    def eval_file(self) -> Path:
        return self.output_dir / "corpus_eval.jsonl"

    @property
    def tokenizer_dir(self) -> Path:
        return self.output_dir / "tokenizer"

    @property
    def base_dir(self) -> Path:
        return self.output_dir / "base"

    @property
    def sft_dir(self) -> Path:
        return self.output_dir / "sft"

    @property
    def reward_dir(self) -> Path:
        return self.output_dir / "reward"

    @property
    def dpo_dir(self) -> Path:
        return self.output_dir / "dpo"

    @property
    def ppo_dir(self) -> Path:
        return self.output_dir / "ppo"


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    run: Callable[[DemoContext], None]


# ----- helpers shared by the stages ------------------------------------------------------------------------
def _write_jsonl(rows: list[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


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


def _demo_prompts(ctx: DemoContext) -> list[str]:
    prompts = review_prompts()
    # Spread over the openings rather than the first few, so samples do not all start alike.
    step = max(1, len(prompts) // ctx.sizes.n_samples)
    return prompts[::step][: ctx.sizes.n_samples]


# ----- stages ----------------------------------------------------------------------------------------------
def setup_stage(ctx: DemoContext) -> None:
    """Corpus -> tokenizer -> an untrained tiny Llama saved to `base/`."""
    import torch
    from transformers import AutoModelForCausalLM

    from .tiny import tiny_llama_config, train_tokenizer

    sizes = ctx.sizes
    reviews = generate_reviews(sizes.n_reviews + sizes.n_eval, seed=ctx.seed)
    ctx.corpus = reviews[: sizes.n_reviews]
    _write_jsonl(ctx.corpus, ctx.corpus_file)
    _write_jsonl(reviews[sizes.n_reviews:], ctx.eval_file)  # held out: the loss on it shows generalisation
    print(f"Generated {len(ctx.corpus)} training and {sizes.n_eval} held-out reviews -> {ctx.corpus_file}")
    for row in ctx.corpus[:3]:
        print(f"  [{row['sentiment']:>8}] {row['text']}")

    ctx.tokenizer = train_tokenizer([r["text"] for r in ctx.corpus], vocab_size=sizes.vocab_size)
    ctx.tokenizer.save_pretrained(ctx.tokenizer_dir)
    example = ctx.corpus[0]["text"]
    pieces = ctx.tokenizer.convert_ids_to_tokens(ctx.tokenizer(example)["input_ids"])
    print(f"\nTrained a byte-level BPE tokenizer, {len(ctx.tokenizer)} tokens -> {ctx.tokenizer_dir}")
    print(f"  {example!r} -> {len(pieces)} tokens: {' '.join(pieces)}")

    torch.manual_seed(ctx.seed)
    config = tiny_llama_config(len(ctx.tokenizer), hidden_size=sizes.hidden_size, num_layers=sizes.num_layers,
                               num_heads=sizes.num_heads, max_positions=sizes.max_length,
                               pad_token_id=ctx.tokenizer.pad_token_id, eos_token_id=ctx.tokenizer.eos_token_id,
                               bos_token_id=ctx.tokenizer.bos_token_id)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.save_pretrained(ctx.base_dir)
    ctx.tokenizer.save_pretrained(ctx.base_dir)
    params = sum(p.numel() for p in model.parameters())
    print(f"\nBuilt an untrained Llama decoder: {sizes.num_layers} layers, hidden {sizes.hidden_size}, "
          f"{params / 1e6:.2f}M parameters -> {ctx.base_dir}")
    ctx.results["setup"] = (f"{len(ctx.corpus)} reviews, {len(ctx.tokenizer)}-token BPE, "
                            f"{params / 1e6:.2f}M-parameter Llama in {ctx.base_dir}")


def sft_stage(ctx: DemoContext) -> None:
    """Supervised fine-tuning of `base/` on the corpus with tether's SFTTrainer, saved to `sft/`."""
    from datasets import Dataset

    from ..trainers.sft import SFTConfig, SFTTrainer

    sizes = ctx.sizes
    config = SFTConfig(
        output_dir=str(ctx.sft_dir),
        max_steps=sizes.sft_steps,
        per_device_train_batch_size=sizes.batch_size,
        per_device_eval_batch_size=32,
        learning_rate=sizes.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, sizes.sft_steps // 20),
        packing=True,  # ~20-token reviews packed into rows of max_length: no compute spent on padding
        max_length=sizes.max_length,
        logging_steps=max(1, sizes.sft_steps // 6),
        save_strategy="no",  # the final model is saved below; checkpoints would only cost time and disk
        report_to="none",
        seed=ctx.seed,
        data_seed=ctx.seed,
        disable_tqdm=False,
        dataloader_pin_memory=False,  # CPU only: pinning has nothing to pin to and warns
    )
    trainer = SFTTrainer(
        str(ctx.base_dir), args=config, processing_class=ctx.tokenizer,
        train_dataset=Dataset.from_list(ctx.corpus), eval_dataset=Dataset.from_list(_read_jsonl(ctx.eval_file)),
    )
    prompts = _demo_prompts(ctx)
    print_samples("Samples BEFORE training (random weights):", sample_reviews(trainer.model, ctx.tokenizer, prompts,
                                                                             ctx.seed))
    loss_before = trainer.evaluate()["eval_loss"]
    print(f"Training {sizes.sft_steps} steps x {sizes.batch_size} packed rows of {sizes.max_length} tokens "
          f"(learning rate {sizes.learning_rate:g}, cosine schedule)...")
    trainer.train()
    loss_after = trainer.evaluate()["eval_loss"]
    trainer.save_model(str(ctx.sft_dir))
    print_samples("Samples AFTER training:", sample_reviews(trainer.model, ctx.tokenizer, prompts, ctx.seed))
    print(f"Held-out loss {loss_before:.2f} -> {loss_after:.2f} nats/token; model saved to {ctx.sft_dir}")
    ctx.results["sft"] = f"held-out loss {loss_before:.2f} -> {loss_after:.2f}, model in {ctx.sft_dir}"


def _preference_splits(ctx: DemoContext) -> tuple[Any, Any]:
    """Preference pairs from the corpus' templates (positive preferred over negative), 10% held out."""
    from datasets import Dataset

    from .corpus import preference_pairs

    pairs = preference_pairs(ctx.sizes.n_pairs, seed=ctx.seed + 1)
    split = max(1, len(pairs) // 10)
    return Dataset.from_list(pairs[split:]), Dataset.from_list(pairs[:split])


def _common_config(ctx: DemoContext, steps: int) -> dict[str, Any]:
    return dict(max_steps=steps, per_device_train_batch_size=ctx.sizes.batch_size, per_device_eval_batch_size=32,
                logging_steps=max(1, steps // 4), save_strategy="no", report_to="none", seed=ctx.seed,
                data_seed=ctx.seed, dataloader_pin_memory=False, max_length=ctx.sizes.max_length)


def reward_stage(ctx: DemoContext) -> None:
    """A sentiment reward model, initialised from the SFT model (as in InstructGPT), on preference pairs."""
    import transformers
    from transformers import AutoModelForSequenceClassification

    from ..rollout.rewards import RewardModelScorer
    from ..trainers.reward import RewardConfig, RewardTrainer

    train, held_out = _preference_splits(ctx)
    transformers.logging.set_verbosity_error()  # the load report only says the score head is new, as meant
    model = AutoModelForSequenceClassification.from_pretrained(ctx.sft_dir, num_labels=1)
    transformers.logging.set_verbosity_warning()
    config = RewardConfig(output_dir=str(ctx.reward_dir), learning_rate=1e-3,
                          **_common_config(ctx, ctx.sizes.reward_steps))
    trainer = RewardTrainer(model, args=config, processing_class=ctx.tokenizer, train_dataset=train,
                            eval_dataset=held_out)
    before = trainer.evaluate()["eval_accuracy"]
    print(f"Training a reward model on {len(train)} pairs (positive review preferred over negative)...")
    trainer.train()
    after = trainer.evaluate()["eval_accuracy"]
    trainer.save_model(str(ctx.reward_dir))
    print(f"Held-out pairwise accuracy {before:.2f} -> {after:.2f}; model saved to {ctx.reward_dir}")
    scorer = ctx.reward_scorer = RewardModelScorer(trainer.model, ctx.tokenizer)
    examples = ["this movie was truly wonderful, i would watch it again.", "the plot was dull and the acting weak.",
                "the film was about two hours long."]
    print("Scores of a few sentences:")
    for text, score in zip(examples, scorer.score_texts(examples)):
        print(f"  {score:+6.2f}  {text}")
    ctx.results["reward"] = f"held-out accuracy {before:.2f} -> {after:.2f}, model in {ctx.reward_dir}"


def _reward_scorer(ctx: DemoContext) -> Any:
    """The stage-2 reward model as a scorer, loaded once for the later stages."""
    from ..rollout.rewards import RewardModelScorer

    if ctx.reward_scorer is None:
        ctx.reward_scorer = RewardModelScorer(str(ctx.reward_dir), ctx.tokenizer)
    return ctx.reward_scorer


def _mean_reward(ctx: DemoContext, samples: list[tuple[str, str, str]]) -> float:
    scores = _reward_scorer(ctx)([p for p, _, _ in samples] * 2, [g for _, g, _ in samples] + [s for _, _, s in samples])
    return sum(scores) / len(scores)


def ppo_stage(ctx: DemoContext) -> None:
    """PPO from the SFT model (plus a value head) against the reward model, with a KL penalty to the SFT
    model: the classic RLHF loop through `PPOTrainer.train()`."""
    from datasets import Dataset

    from ..models.value_head import AutoModelForCausalLMWithValueHead
    from ..trainers.ppo import PPOTrainer
    from ..trainers.ppo_config import PPOConfig

    prompts = _demo_prompts(ctx)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(ctx.sft_dir))
    samples_before = sample_reviews(model.pretrained_model, ctx.tokenizer, prompts, ctx.seed)
    reward_before = _mean_reward(ctx, samples_before)
    config = PPOConfig(batch_size=16, mini_batch_size=8, ppo_epochs=2, learning_rate=1.5e-4, init_kl_coef=0.1,
                       total_steps=ctx.sizes.ppo_steps, max_new_tokens=20, output_dir=str(ctx.ppo_dir),
                       logging_steps=max(1, ctx.sizes.ppo_steps // 5), seed=ctx.seed, missing_eos_penalty=1.0)
    scorer = _reward_scorer(ctx)
    trainer = PPOTrainer(config, model, None, ctx.tokenizer, dataset=Dataset.from_dict({"prompt": review_prompts() * 4}),
                         reward_funcs=scorer)
    print(f"PPO for {config.total_steps} steps x {config.batch_size} sampled reviews, rewarded by the reward "
          "model, KL-penalised against the SFT model...")
    history = trainer.train()
    samples_after = sample_reviews(trainer.accelerator.unwrap_model(trainer.model).pretrained_model,
                                   ctx.tokenizer, prompts, ctx.seed)
    print_samples("Samples AFTER PPO:", samples_after)
    reward_after = _mean_reward(ctx, samples_after)
    first, last = history[0], history[-1]
    print(f"Mean reward of rollouts {first['env/reward_mean']:+.2f} -> {last['env/reward_mean']:+.2f}; "
          f"KL to the SFT model {last['objective/kl']:.2f} nats; reward-model score of samples "
          f"{reward_before:+.2f} -> {reward_after:+.2f}")
    ctx.results["ppo"] = (f"rollout reward {first['env/reward_mean']:+.2f} -> {last['env/reward_mean']:+.2f}, "
                          f"KL {last['objective/kl']:.2f}")


def group_rl_stage(ctx: DemoContext, method: str) -> None:
    """GRPO or RLOO from the SFT model against the reward model: groups of sampled reviews per prompt, each
    review's advantage measured against its group, no value model."""
    from datasets import Dataset

    from ..trainers.grpo import GRPOConfig, GRPOTrainer
    from ..trainers.rloo import RLOOConfig, RLOOTrainer

    trainer_class, config_class = {"grpo": (GRPOTrainer, GRPOConfig), "rloo": (RLOOTrainer, RLOOConfig)}[method]
    prompts = _demo_prompts(ctx)
    config = config_class(
        output_dir=str(ctx.output_dir / method), per_device_train_batch_size=16, num_generations=4,
        max_completion_length=20, learning_rate=3e-4, beta=0.04, max_steps=ctx.sizes.ppo_steps,
        logging_steps=max(1, ctx.sizes.ppo_steps // 5), seed=ctx.seed, report_to=[], save_strategy="no",
        use_cpu=True, disable_tqdm=True)
    trainer = trainer_class(str(ctx.sft_dir), reward_funcs=_reward_scorer(ctx), args=config,
                            train_dataset=Dataset.from_dict({"prompt": review_prompts() * 8}),
                            processing_class=ctx.tokenizer)
    reward_before = _mean_reward(ctx, sample_reviews(trainer.model, ctx.tokenizer, prompts, ctx.seed))
    print(f"{method.upper()} for {config.max_steps} steps x {config.per_device_train_batch_size} sampled reviews "
          f"({config.num_generations} per prompt), rewarded by the reward model, KL to the SFT model...")
    trainer.train()
    samples_after = sample_reviews(trainer.model, ctx.tokenizer, prompts, ctx.seed)
    print_samples(f"Samples AFTER {method.upper()}:", samples_after)
    reward_after = _mean_reward(ctx, samples_after)
    rewards = [row["reward"] for row in trainer.state.log_history if "reward" in row]
    kl = [row["kl"] for row in trainer.state.log_history if "kl" in row]
    print(f"Mean reward of sampled reviews {rewards[0]:+.2f} -> {rewards[-1]:+.2f}; KL to the SFT model "
          f"{kl[-1]:.2f}; reward-model score of samples {reward_before:+.2f} -> {reward_after:+.2f}")
    ctx.results[method] = f"rollout reward {rewards[0]:+.2f} -> {rewards[-1]:+.2f}, KL {kl[-1]:.2f}"


def dpo_stage(ctx: DemoContext) -> None:
    """DPO from the SFT model on the same preference pairs, against its frozen copy as the reference."""
    from ..trainers.dpo import DPOConfig, DPOTrainer

    train, held_out = _preference_splits(ctx)
    config = DPOConfig(output_dir=str(ctx.dpo_dir), learning_rate=2.5e-4, beta=0.1, max_prompt_length=16,
                       precompute_ref_log_probs=True, **_common_config(ctx, ctx.sizes.dpo_steps))
    trainer = DPOTrainer(str(ctx.sft_dir), args=config, processing_class=ctx.tokenizer, train_dataset=train,
                         eval_dataset=held_out)
    prompts = _demo_prompts(ctx)
    samples_before = sample_reviews(trainer.model, ctx.tokenizer, prompts, ctx.seed)
    print_samples("Samples BEFORE DPO:", samples_before)
    print(f"DPO on {len(train)} pairs, reference log-probs precomputed once (no reference model held)...")
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(str(ctx.dpo_dir))
    samples_after = sample_reviews(trainer.model, ctx.tokenizer, prompts, ctx.seed)
    print_samples("Samples AFTER DPO:", samples_after)
    reward_before, reward_after = _mean_reward(ctx, samples_before), _mean_reward(ctx, samples_after)
    print(f"Held-out rewards/accuracies {metrics['eval_rewards/accuracies']:.2f}, "
          f"rewards/margins {metrics['eval_rewards/margins']:.2f}; "
          f"reward-model score of samples {reward_before:+.2f} -> {reward_after:+.2f}")
    ctx.results["dpo"] = (f"accuracies {metrics['eval_rewards/accuracies']:.2f}, margins "
                          f"{metrics['eval_rewards/margins']:.2f}, sample reward {reward_before:+.2f} -> "
                          f"{reward_after:+.2f}")


STAGES: list[Stage] = [
    Stage("setup", "Data, tokenizer and an untrained model", setup_stage),
    Stage("sft", "Supervised fine-tuning (SFTTrainer)", sft_stage),
    Stage("reward", "A sentiment reward model (RewardTrainer)", reward_stage),
    Stage("ppo", "RLHF with PPO against the reward model (PPOTrainer)", ppo_stage),
    Stage("dpo", "Preference optimisation towards positive reviews (DPOTrainer)", dpo_stage),
]
# `tether demo --method grpo|rloo`: the same task, learned online with a group baseline instead of PPO + DPO.
GROUP_RL_STAGES = {
    method: STAGES[:3] + [Stage(method, f"Online RL with {method.upper()} against the reward model "
                                        f"({method.upper()}Trainer)", lambda ctx, m=method: group_rl_stage(ctx, m))]
    for method in ("grpo", "rloo")
}


def _quiet_libraries() -> None:
    """Keep the Trainer's progress bar and logs; drop per-map dataset bars and load reports."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()  # weight loading/saving bars, not the Trainer's tqdm


def run_demo(output_dir: str | os.PathLike = "./tether-demo", quick: bool = False, seed: int = 0,
             stages: list[Stage] | None = None) -> DemoContext:
    """Run the demo stages in order, printing a header per stage and a summary; returns the context."""
    from transformers import set_seed

    start = time.perf_counter()
    _quiet_libraries()
    set_seed(seed)  # python, numpy and torch, so a rerun prints the same samples
    ctx = DemoContext(Path(output_dir), QUICK if quick else FULL, seed)
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    stages = STAGES if stages is None else stages
    for k, stage in enumerate(stages, 1):
        print(f"\n{RULE}\nStage {k}/{len(stages)}: {stage.title}\n{RULE}", flush=True)
        t0 = time.perf_counter()
        stage.run(ctx)
        ctx.timings[stage.name] = time.perf_counter() - t0

    total = time.perf_counter() - start
    print(f"\n{RULE}\nSummary{' (--quick)' if quick else ''}: {total:.0f} s, everything under {ctx.output_dir}\n{RULE}")
    for stage in stages:
        print(f"  {stage.name:<6} {ctx.timings[stage.name]:6.1f} s  {ctx.results.get(stage.name, '')}")
    s = ctx.sizes
    print("\nThe same fine-tuning from the command line:\n"
          f"  tether sft --model_name_or_path {ctx.base_dir} --dataset_name {ctx.corpus_file} "
          f"--output_dir {ctx.output_dir / 'sft-cli'} --packing --max_length {s.max_length} "
          f"--per_device_train_batch_size {s.batch_size} --learning_rate {s.learning_rate:g} "
          f"--lr_scheduler_type cosine --warmup_steps {max(1, s.sft_steps // 20)} --max_steps {s.sft_steps}")
    report = write_demo_report(ctx, stages)
    print(f"\nReport of the whole pipeline (plots, samples, configs): {report}")
    return ctx


def write_demo_report(ctx: DemoContext, stages: list[Stage]) -> Path:
    """One page over the stages that trained (a section each, from their output dirs), with the summary;
    `tether report OUTPUT_DIR` rebuilds the same page."""
    from ..reports import METRICS_FILE, write_report

    runs = [(stage.title, ctx.output_dir / stage.name) for stage in stages
            if (ctx.output_dir / stage.name / METRICS_FILE).is_file()]
    notes = [f"{stage.name}: {ctx.results[stage.name]} ({ctx.timings[stage.name]:.1f} s)" for stage in stages
             if stage.name in ctx.results]
    return write_report(ctx.output_dir, title="tether demo", notes=notes, runs=runs).path
