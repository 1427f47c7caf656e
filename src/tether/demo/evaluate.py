"""The demo's yardsticks, so that its story can be checked rather than believed.

- `check_reward_model`: a reward model's scores of the hand-written check set (`corpus.check_sentences`):
  how often it ranks a clearly positive sentence above a clearly negative one (and above a neutral one), and
  each class' mean score.
- `evaluate_policy`: many samples of a policy on prompts it never trained on, scored three ways: by the reward
  model (what RL optimised), by the hand-written lexicon (`corpus.positivity_score`, which no model saw, so a
  policy that games the reward model does not fool it), by their perplexity under the SFT model (broken
  words and word salad make it soar; fluent reviews keep it near that of the SFT model's own samples), and
  by the share with a word the corpus never uses (`corpus.unknown_words`: broken words).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import product
from typing import Any

import torch

from .corpus import (
    CONTRADICTED,
    DAMAGED,
    TRUNCATED,
    check_sentences,
    contradict,
    positivity_score,
    truncate,
    unknown_words,
)


@dataclass
class RewardCheck:
    """A reward model's scores of the check set, and how well they rank its classes."""

    scores: dict[str, list[float]]  # sentiment -> scores of its sentences, in check-set order

    def mean(self, sentiment: str) -> float:
        values = self.scores[sentiment]
        return sum(values) / len(values)

    def ranking_accuracy(self, higher: str, lower: str) -> float:
        """Share of (a, b) pairs, a from `higher` and b from `lower`, with score(a) > score(b)."""
        pairs = list(product(self.scores[higher], self.scores[lower]))
        return sum(a > b for a, b in pairs) / len(pairs)

    def paired_accuracy(self, higher: str, lower: str) -> float:
        """Share of indices k with score(higher[k]) > score(lower[k]) (e.g. a sentence and itself cut short)."""
        pairs = list(zip(self.scores[higher], self.scores[lower], strict=True))
        return sum(a > b for a, b in pairs) / len(pairs)

    @property
    def accuracy(self) -> float:
        """The headline number: clearly positive ranked above clearly negative."""
        return self.ranking_accuracy("positive", "negative")

    def summary(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "positive_over_neutral": self.ranking_accuracy("positive", "neutral"),
                "neutral_over_negative": self.ranking_accuracy("neutral", "negative"),
                **{f"positive_over_{kind}": self.paired_accuracy("positive", kind) for kind in DAMAGED
                   if kind in self.scores},
                **{f"mean_{s}": self.mean(s) for s in self.scores}}


def check_reward_model(score_texts: Callable[[list[str]], list[float]],
                       sentences: dict[str, list[str]] | None = None, seed: int = 0) -> RewardCheck:
    """Score each class of the check set (default: `check_sentences()`) with `score_texts` (texts -> scores),
    and each positive sentence damaged the ways of `corpus.DAMAGED` (classes `TRUNCATED`, `CONTRADICTED`, in the
    order of "positive"; seeded)."""
    sentences = dict(check_sentences() if sentences is None else sentences)
    rng = random.Random(seed)
    for kind, damage in ((TRUNCATED, truncate), (CONTRADICTED, contradict)):
        if "positive" in sentences and kind not in sentences:
            sentences[kind] = [damage(rng, text) for text in sentences["positive"]]
    return RewardCheck({label: [float(s) for s in score_texts(list(texts))] for label, texts in sentences.items()})


@dataclass
class PolicyEval:
    """Samples of a policy and their scores; the means are over all samples."""

    prompts: list[str]
    completions: list[str]
    rewards: list[float] = field(default_factory=list)
    perplexity: float = float("nan")  # under the reference (SFT) model, over all completion tokens

    @property
    def reward(self) -> float:
        return sum(self.rewards) / len(self.rewards)

    @property
    def positivity(self) -> float:
        """Mean lexicon score in [-1, 1] of the full reviews."""
        return sum(positivity_score(p + c) for p, c in zip(self.prompts, self.completions)) / len(self.prompts)

    @property
    def positive_share(self) -> float:
        """Share of reviews the lexicon reads as positive (score > 0)."""
        return sum(positivity_score(p + c) > 0 for p, c in zip(self.prompts, self.completions)) / len(self.prompts)

    @property
    def broken_share(self) -> float:
        """Share of reviews with a word (or character) that no review of the corpus uses: broken words."""
        return sum(bool(unknown_words(c)) for c in self.completions) / len(self.completions)

    @property
    def distinct_share(self) -> float:
        """Share of distinct completions: near 1 for a policy that still varies, low for one collapsed on a phrase."""
        return len(set(self.completions)) / len(self.completions)

    def summary(self) -> dict[str, float]:
        return {"reward": self.reward, "positivity": self.positivity, "positive_share": self.positive_share,
                "perplexity": self.perplexity, "broken_share": self.broken_share,
                "distinct_share": self.distinct_share}


def sample_completions(model: Any, tokenizer: Any, prompts: Sequence[str], per_prompt: int, seed: int,
                       max_new_tokens: int = 24) -> tuple[list[str], list[list[int]]]:
    """`per_prompt` completions of each prompt, sampled from the model's full distribution (temperature 1, no
    top-k: what the model really learned, broken tails included), seeded. Returns the prompt of each sample
    and its completion's token ids, up to and including the first EOS (prompt-major order)."""
    model.eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out_prompts, out_ids = [], []
    for k, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]  # [1, t]
        torch.manual_seed(seed * 1_000 + k)  # the same draws whatever ran before
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                 num_return_sequences=per_prompt, eos_token_id=eos, pad_token_id=pad)
        for row in gen[:, ids.shape[1]:].tolist():  # [per_prompt, <= max_new_tokens]
            out_prompts.append(prompt)
            out_ids.append(row[: row.index(eos) + 1] if eos in row else row)
    return out_prompts, out_ids


@torch.no_grad()
def completion_perplexity(model: Any, tokenizer: Any, prompts: Sequence[str],
                          completions: Sequence[Sequence[int]]) -> float:
    """exp(mean negative log-likelihood per completion token) of `completions` (token ids, EOS included where
    generated) after their prompts, under `model`; all tokens of all completions weigh the same."""
    model.eval()
    total, count = 0.0, 0
    for prompt in dict.fromkeys(prompts):  # one batch per prompt: same prompt length, no left padding
        rows = [list(c) for p, c in zip(prompts, completions) if p == prompt and len(c)]
        if not rows:
            continue
        prompt_ids = tokenizer(prompt)["input_ids"]
        width = max(len(r) for r in rows)
        ids = torch.tensor([prompt_ids + r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])  # [n, t]
        mask = torch.tensor([[1] * (len(prompt_ids) + len(r)) + [0] * (width - len(r)) for r in rows])
        logits = model(input_ids=ids, attention_mask=mask).logits[:, len(prompt_ids) - 1: -1].float()  # [n, w, V]
        targets = ids[:, len(prompt_ids):]  # [n, w]
        nll = -torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [n, w]
        keep = mask[:, len(prompt_ids):].bool()
        total += float(nll[keep].sum())
        count += int(keep.sum())
    return math.exp(total / count) if count else float("nan")


def evaluate_policy(model: Any, tokenizer: Any, prompts: Sequence[str], per_prompt: int, seed: int,
                    reward: Callable[[list[str], list[str]], list[float]], reference: Any,
                    max_new_tokens: int = 24) -> PolicyEval:
    """Sample `per_prompt` completions of each prompt from `model`, score them with `reward(prompts,
    completions)` and measure their perplexity under `reference` (a causal LM)."""
    sample_prompts, ids = sample_completions(model, tokenizer, prompts, per_prompt, seed, max_new_tokens)
    completions = [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    result = PolicyEval(sample_prompts, completions)
    result.rewards = [float(r) for r in reward(sample_prompts, completions)]
    result.perplexity = completion_perplexity(reference, tokenizer, sample_prompts, ids)
    return result
