"""`tether demo`: the post-training story on a laptop CPU, offline, one stage after another.

Stages are plain functions of one shared `DemoContext` (paths, sizes, the tokenizer, results so far), run in
the order of `STAGES`; each reads what the earlier ones left in the context (`ctx.corpus`, `ctx.sft_dir`, ...).

    setup:  generate a review corpus, train a byte-level BPE tokenizer on it, build an untrained tiny Llama
    sft:    supervised fine-tuning (SFTTrainer); samples before (gibberish) and after (reviews)
    reward: a reward model (RewardTrainer) ranking positive > neutral > negative reviews, checked on hand-written
            sentences that follow none of the corpus' templates
    ppo:    PPO against that reward model, KL-penalised to the SFT model (PPOTrainer)
    dpo:    DPO on preference pairs of the same kind (DPOTrainer)
    grpo / rloo (`tether demo --method grpo|rloo`): online RL with a group baseline instead of PPO and DPO

Every policy stage is judged the same way (demo/evaluate.py), on review openings that no policy stage trains
on: the reward model's score of many sampled reviews, the hand-written lexicon's score (which no model saw, so
gaming the reward model does not fool it), and their perplexity under the SFT model (broken words make it
soar), for the SFT model and after the stage. The numbers are printed, saved to `story.json` and shown in the
report.

A stage's trainer settings are a plain dict (`STAGE_ARGS`) and its sizes come from `DemoSizes`, so a stage
maps onto a section of a pipeline YAML. The whole demo should finish in under 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .corpus import RANKED_PAIRS, TOWARDS_POSITIVE, generate_reviews, review_prompts

RULE = "=" * 78
STORY_FILE = "story.json"


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
    n_samples: int  # held-out openings whose samples are printed
    n_pairs: int
    reward_steps: int
    dpo_steps: int
    ppo_steps: int
    group_rl_steps: int  # GRPO / RLOO
    eval_samples: int  # sampled reviews per held-out opening in each stage's evaluation


# The corpus has ~300 distinct words: a 1024-token BPE (it stops at ~840, out of merges) makes nearly every
# word one token, and a ~0.9M-parameter model fits it. A high learning rate with a short warmup and cosine
# decay gets the held-out loss from ~6.8 to ~0.9 nats/token (about the corpus' own entropy) in 200 steps,
# about 6 passes over the corpus; 120 steps already read as reviews, 300 barely improve on 200.
FULL = DemoSizes(n_reviews=4000, n_eval=200, vocab_size=1024, hidden_size=128, num_layers=4, num_heads=4,
                 sft_steps=200, batch_size=16, max_length=128, learning_rate=3e-3, n_samples=4,
                 n_pairs=3000, reward_steps=300, dpo_steps=120, ppo_steps=80, group_rl_steps=160,
                 eval_samples=16)
QUICK = DemoSizes(n_reviews=600, n_eval=50, vocab_size=400, hidden_size=64, num_layers=2, num_heads=4,
                  sft_steps=12, batch_size=8, max_length=64, learning_rate=3e-3, n_samples=2,
                  n_pairs=64, reward_steps=4, dpo_steps=4, ppo_steps=2, group_rl_steps=2, eval_samples=4)

# Openings no policy stage (PPO, DPO, GRPO, RLOO) trains on: samples on them show what the policy learned, not
# what it memorised. The others are the prompts of online RL and the prompts of DPO's pairs.
HELD_OUT_OPENINGS = ("this movie", "the plot", "the soundtrack", "for me, the second half")
TRAIN_OPENINGS = tuple(o for o in review_prompts() if o not in HELD_OUT_OPENINGS)
MAX_NEW_TOKENS = 24  # reviews are 6-25 words; the longest continuations take ~22 tokens with their EOS

# Each stage's trainer settings beyond the sizes (steps, batch size, max_length come from DemoSizes).
STAGE_ARGS: dict[str, dict[str, Any]] = {
    # center_rewards_coefficient pulls the mean score to 0, so neutral reviews land near 0 and the sign reads.
    "reward": dict(learning_rate=5e-4, per_device_train_batch_size=32, center_rewards_coefficient=0.01),
    # A fixed KL coefficient high enough that the policy keeps the SFT model's words: the reward model cannot
    # tell every broken review from a whole one, the KL penalty is what keeps the samples fluent.
    "ppo": dict(batch_size=32, mini_batch_size=16, ppo_epochs=2, learning_rate=1.5e-4, init_kl_coef=0.3,
                adap_kl_ctrl=False, max_new_tokens=MAX_NEW_TOKENS, missing_eos_penalty=1.0),
    # GRPO and RLOO: 160 steps and these KL coefficients stop short of the collapse that comes next (at 200 steps
    # with beta 0.1, GRPO wrote "was not bad at all." for 50 of 64 held-out samples).
    "grpo": dict(per_device_train_batch_size=16, num_generations=4, max_completion_length=MAX_NEW_TOKENS,
                 learning_rate=2e-4, beta=0.2),
    "rloo": dict(per_device_train_batch_size=16, num_generations=4, max_completion_length=MAX_NEW_TOKENS,
                 learning_rate=2e-4, beta=0.1),
    # DPO plus an NLL term on the chosen reviews (RPO): DPO alone lowers the rejected reviews' tokens faster than
    # it raises the chosen ones', and the mass it frees lands on broken words.
    "dpo": dict(learning_rate=4e-4, beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 3.0],
                max_prompt_length=16, precompute_ref_log_probs=True),
}
# One thread: the model's matrices are 128 wide, too small for a second thread to pay off much, and on a
# machine whose cores are busy with anything else, two OpenMP threads wait on each other: measured on 2
# shared cores, an SFT step took 0.25-0.5 s with one thread and 1.3-2.7 s with two.
DEMO_THREADS = 1


@dataclass
class DemoContext:
    """What the stages share: where files go, how big things are, and what earlier stages produced."""

    output_dir: Path
    sizes: DemoSizes
    seed: int = 0
    corpus: list[dict] = field(default_factory=list)
    tokenizer: Any = None
    results: dict[str, str] = field(default_factory=dict)  # summary lines, in stage order
    story: dict[str, dict[str, Any]] = field(default_factory=dict)  # each stage's numbers, saved to story.json
    reward: Any = None  # the stage-2 reward model as a reward function (RewardModelScorer), once loaded
    reference: Any = None  # the SFT model, once loaded: the yardstick of fluency
    sft_eval: Any = None  # the SFT model's evaluation (PolicyEval), the "before" of every policy stage
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

    def stage_seed(self, stage: str) -> int:
        """A seed of its own for each stage's samples, so that stages do not print the same draws."""
        return self.seed + zlib.crc32(stage.encode()) % 9973


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


def _shown_prompts(ctx: DemoContext) -> list[str]:
    """The openings whose samples are printed: held-out ones, which no policy stage trains on."""
    return list(HELD_OUT_OPENINGS[: ctx.sizes.n_samples])


def _training_prompts(repeat: int) -> list[str]:
    """The prompts of online RL: the openings that are not held out, `repeat` times over."""
    return list(TRAIN_OPENINGS) * repeat


def _reward(ctx: DemoContext) -> Any:
    """The stage-2 reward model as a reward function, loaded once."""
    from ..rollout.rewards import RewardModelScorer

    if ctx.reward is None:
        ctx.reward = RewardModelScorer(str(ctx.reward_dir), ctx.tokenizer)
    return ctx.reward


def _reference(ctx: DemoContext) -> Any:
    """The SFT model, loaded once: the perplexity of every stage's samples is measured under it."""
    from transformers import AutoModelForCausalLM

    if ctx.reference is None:
        ctx.reference = AutoModelForCausalLM.from_pretrained(ctx.sft_dir).eval()
    return ctx.reference


def _evaluate(ctx: DemoContext, model: Any, stage: str) -> Any:
    from .evaluate import evaluate_policy

    return evaluate_policy(model, ctx.tokenizer, HELD_OUT_OPENINGS, ctx.sizes.eval_samples, ctx.stage_seed(stage),
                           _reward(ctx), _reference(ctx), max_new_tokens=MAX_NEW_TOKENS)


def _sft_eval(ctx: DemoContext) -> Any:
    """The SFT model's evaluation, the "before" of every policy stage (computed once)."""
    if ctx.sft_eval is None:
        ctx.sft_eval = _evaluate(ctx, _reference(ctx), "sft")
    return ctx.sft_eval


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
    before, after = _sft_eval(ctx), _evaluate(ctx, model.eval(), stage)
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
    prompts, seed = _shown_prompts(ctx), ctx.stage_seed("sft")
    print_samples("Samples BEFORE training (random weights):", sample_reviews(trainer.model, ctx.tokenizer, prompts,
                                                                             seed))
    loss_before = trainer.evaluate()["eval_loss"]
    print(f"Training {sizes.sft_steps} steps x {sizes.batch_size} packed rows of {sizes.max_length} tokens "
          f"(learning rate {sizes.learning_rate:g}, cosine schedule)...")
    trainer.train()
    loss_after = trainer.evaluate()["eval_loss"]
    trainer.save_model(str(ctx.sft_dir))
    print_samples("Samples AFTER training:", sample_reviews(trainer.model, ctx.tokenizer, prompts, seed))
    print(f"Held-out loss {loss_before:.2f} -> {loss_after:.2f} nats/token; model saved to {ctx.sft_dir}")
    ctx.story["sft"] = {"loss_before": loss_before, "loss_after": loss_after}
    ctx.results["sft"] = f"held-out loss {loss_before:.2f} -> {loss_after:.2f}, model in {ctx.sft_dir}"


def _preference_splits(ctx: DemoContext, rankings: tuple[tuple[str, str], ...],
                       openings: tuple[str, ...] | None = None) -> tuple[Any, Any]:
    """Preference pairs of continuations of the same opening, ranked by `rankings` (see corpus.preference_pairs),
    10% held out."""
    from datasets import Dataset

    from .corpus import preference_pairs

    pairs = preference_pairs(ctx.sizes.n_pairs, seed=ctx.seed + 1, rankings=rankings, openings=openings)
    split = max(1, len(pairs) // 10)
    return Dataset.from_list(pairs[split:]), Dataset.from_list(pairs[:split])


def _trainer_args(ctx: DemoContext, stage: str, steps: int) -> dict[str, Any]:
    """The TrainingArguments-style settings of an offline stage: the common ones, then `STAGE_ARGS[stage]`."""
    common = dict(max_steps=steps, per_device_train_batch_size=ctx.sizes.batch_size, per_device_eval_batch_size=32,
                  logging_steps=max(1, steps // 4), save_strategy="no", report_to="none", seed=ctx.seed,
                  data_seed=ctx.seed, dataloader_pin_memory=False, max_length=ctx.sizes.max_length)
    return {**common, **STAGE_ARGS[stage]}


REWARD_EXAMPLES = ("this movie was truly wonderful, i would watch it again.",
                   "the plot was predictable and the acting was average.", "the plot was dull and the acting weak.")


def reward_stage(ctx: DemoContext) -> None:
    """A sentiment reward model, initialised from the SFT model (as in InstructGPT), on preference pairs that
    rank positive over neutral over negative reviews; checked on hand-written sentences."""
    import transformers
    from transformers import AutoModelForSequenceClassification

    from ..trainers.reward import RewardConfig, RewardTrainer
    from .corpus import CHECK_SENTENCES, CONTRADICTED, TRUNCATED
    from .evaluate import check_reward_model

    train, held_out = _preference_splits(ctx, RANKED_PAIRS)
    transformers.logging.set_verbosity_error()  # the load report only says the score head is new, as meant
    model = AutoModelForSequenceClassification.from_pretrained(ctx.sft_dir, num_labels=1)
    transformers.logging.set_verbosity_warning()
    config = RewardConfig(output_dir=str(ctx.reward_dir), **_trainer_args(ctx, "reward", ctx.sizes.reward_steps))
    trainer = RewardTrainer(model, args=config, processing_class=ctx.tokenizer, train_dataset=train,
                            eval_dataset=held_out)
    before = trainer.evaluate()["eval_accuracy"]
    print(f"Training a reward model on {len(train)} pairs (positive > neutral > negative reviews, and positive "
          "reviews > the same cut short or contradicting themselves)...")
    trainer.train()
    after = trainer.evaluate()["eval_accuracy"]
    trainer.save_model(str(ctx.reward_dir))
    print(f"Held-out pairwise accuracy {before:.2f} -> {after:.2f}; model saved to {ctx.reward_dir}")
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


def ppo_stage(ctx: DemoContext) -> None:
    """PPO from the SFT model (plus a value head) against the reward model, with a KL penalty to the SFT
    model: the classic RLHF loop through `PPOTrainer.train()`."""
    from datasets import Dataset

    from ..models.value_head import AutoModelForCausalLMWithValueHead
    from ..trainers.ppo import PPOTrainer
    from ..trainers.ppo_config import PPOConfig

    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(ctx.sft_dir))
    args = STAGE_ARGS["ppo"]
    config = PPOConfig(**args, total_steps=ctx.sizes.ppo_steps, output_dir=str(ctx.ppo_dir),
                       logging_steps=max(1, ctx.sizes.ppo_steps // 5), seed=ctx.seed)
    trainer = PPOTrainer(config, model, None, ctx.tokenizer, reward_funcs=_reward(ctx),
                         dataset=Dataset.from_dict({"prompt": _training_prompts(4)}))
    _sft_eval(ctx)
    print(f"PPO for {config.total_steps} steps x {config.batch_size} sampled reviews, rewarded by the reward "
          f"model, KL-penalised against the SFT model (coefficient {config.init_kl_coef:g})...")
    history = trainer.train()
    policy = trainer.accelerator.unwrap_model(trainer.model).pretrained_model
    summary = report_policy(ctx, "ppo", "PPO", policy)
    first, last = history[0], history[-1]
    print(f"Mean reward of rollouts {first['env/reward_mean']:+.2f} -> {last['env/reward_mean']:+.2f}; "
          f"KL to the SFT model {last['objective/kl']:.2f} nats per review")
    ctx.story["ppo"].update(rollout_reward_first=first["env/reward_mean"], rollout_reward_last=last["env/reward_mean"],
                            kl=last["objective/kl"])
    ctx.results["ppo"] = f"{summary}, KL {last['objective/kl']:.2f}"


def group_rl_stage(ctx: DemoContext, method: str) -> None:
    """GRPO or RLOO from the SFT model against the reward model: groups of sampled reviews per prompt, each
    review's advantage measured against its group, no value model."""
    from datasets import Dataset

    from ..trainers.grpo import GRPOConfig, GRPOTrainer
    from ..trainers.rloo import RLOOConfig, RLOOTrainer

    trainer_class, config_class = {"grpo": (GRPOTrainer, GRPOConfig), "rloo": (RLOOTrainer, RLOOConfig)}[method]
    config = config_class(
        output_dir=str(ctx.output_dir / method), **STAGE_ARGS[method], max_steps=ctx.sizes.group_rl_steps,
        logging_steps=max(1, ctx.sizes.group_rl_steps // 5), seed=ctx.seed, report_to=[], save_strategy="no",
        use_cpu=True, disable_tqdm=True)
    trainer = trainer_class(str(ctx.sft_dir), reward_funcs=_reward(ctx), args=config,
                            train_dataset=Dataset.from_dict({"prompt": _training_prompts(8)}),
                            processing_class=ctx.tokenizer)
    _sft_eval(ctx)
    print(f"{method.upper()} for {config.max_steps} steps x {config.per_device_train_batch_size} sampled reviews "
          f"({config.num_generations} per prompt), rewarded by the reward model, KL to the SFT model "
          f"(beta {config.beta:g})...")
    trainer.train()
    summary = report_policy(ctx, method, method.upper(), trainer.model)
    rewards = [row["reward"] for row in trainer.state.log_history if "reward" in row]
    kl = [row["kl"] for row in trainer.state.log_history if "kl" in row]
    print(f"Mean reward of sampled reviews {rewards[0]:+.2f} -> {rewards[-1]:+.2f} (training rollouts); KL to "
          f"the SFT model {kl[-1]:.2f}")
    ctx.story[method].update(rollout_reward_first=rewards[0], rollout_reward_last=rewards[-1], kl=kl[-1])
    ctx.results[method] = f"{summary}, KL {kl[-1]:.2f}"


def dpo_stage(ctx: DemoContext) -> None:
    """DPO from the SFT model on preference pairs (positive > neutral > negative), against its frozen copy as
    the reference."""
    import transformers

    from ..trainers.dpo import DPOConfig, DPOTrainer

    train, held_out = _preference_splits(ctx, TOWARDS_POSITIVE, openings=TRAIN_OPENINGS)
    config = DPOConfig(output_dir=str(ctx.dpo_dir), **_trainer_args(ctx, "dpo", ctx.sizes.dpo_steps))
    # DPOTrainer's construction logs transformers' "no DefaultFlowCallback" warning, which does not apply (its
    # callback handler is swapped for one that passes the reference model, callbacks unchanged): keep it out.
    transformers.logging.set_verbosity_error()
    try:
        trainer = DPOTrainer(str(ctx.sft_dir), args=config, processing_class=ctx.tokenizer, train_dataset=train,
                             eval_dataset=held_out)
    finally:
        transformers.logging.set_verbosity_warning()
    _sft_eval(ctx)
    print(f"DPO on {len(train)} pairs, reference log-probs precomputed once (no reference model held)...")
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(str(ctx.dpo_dir))
    summary = report_policy(ctx, "dpo", "DPO", trainer.model)
    print(f"Held-out rewards/accuracies {metrics['eval_rewards/accuracies']:.2f}, "
          f"rewards/margins {metrics['eval_rewards/margins']:.2f} (DPO's implicit reward on held-out pairs)")
    ctx.story["dpo"].update(pair_accuracy=metrics["eval_rewards/accuracies"], margin=metrics["eval_rewards/margins"])
    ctx.results["dpo"] = f"{summary}, pair accuracy {metrics['eval_rewards/accuracies']:.2f}"


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
             stages: list[Stage] | None = None, num_threads: int | None = DEMO_THREADS) -> DemoContext:
    """Run the demo stages in order, printing a header per stage and a summary; returns the context.
    `num_threads` sets torch's threads while it runs (None, or OMP_NUM_THREADS set: leave them)."""
    import torch
    from transformers import set_seed

    start = time.perf_counter()
    threads = torch.get_num_threads()
    if num_threads is not None and "OMP_NUM_THREADS" not in os.environ:  # a user's own choice stands
        torch.set_num_threads(num_threads)
    try:
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
    finally:
        torch.set_num_threads(threads)

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
    with open(ctx.output_dir / STORY_FILE, "w", encoding="utf-8") as f:
        json.dump({**ctx.story, "timings": ctx.timings, "total_seconds": total, "quick": quick}, f, indent=2)
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
