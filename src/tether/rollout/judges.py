"""Judges: models or rules that compare completions instead of scoring each alone (TRL's judge interface).

    BasePairwiseJudge.judge(prompts, completions, shuffle_order=True) -> list[int]
        completions[i] is a pair [a, b] for prompts[i]; the answer is the index of the better one (0 or 1), or
        -1 where the judge could not decide (a language-model judge that gave no usable answer)
    BaseRankJudge.judge(prompts, completions, shuffle_order=True) -> list[list[int]]   (a ranking per prompt)
    BaseBinaryJudge.judge(prompts, completions, gold_completions=None, shuffle_order=True) -> list[int]
        1: the completion meets the constraint, 0: it does not, -1: undecided
    AllTrueJudge(judges): 1 where every binary judge says 1, -1 where any is undecided, else 0

Online DPO ranks each pair of sampled completions with a pairwise judge through `PairwiseJudgeReward`, which
makes the judge's verdicts rewards (1 for the pick, 0 for the other), so the online core scores a round with
a judge exactly as with reward functions (same call, timeouts, logging). A judge is either a TRL-shaped object
(any object with a `judge` method of the pairwise form, from TRL or tether) or a plain callable
`judge(prompt, completion_a, completion_b) -> 0 | 1` called once per pair.

Judges compare text: conversational prompts and completions are rendered as plain "Role: content" blocks
(`render_messages`), so a judge never sees the policy's chat-template tokens (TRL 1.0 did the same).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any


class BaseJudge(ABC):
    """Base of the judges: a subclass implements `judge`."""

    @abstractmethod
    def judge(self, prompts: list[str], completions: list[str], shuffle_order: bool = True) -> list:
        raise NotImplementedError


class BaseRankJudge(ABC):
    """A judge that ranks the completions of each prompt: judge(prompts, completions [per prompt a list],
    shuffle_order) -> per prompt the completion indices, best first."""

    @abstractmethod
    def judge(self, prompts: list[str], completions: list[list[str]], shuffle_order: bool = True
              ) -> list[list[int]]:
        raise NotImplementedError


class BasePairwiseJudge(BaseJudge):
    """A judge of pairs: judge(prompts, completions [per prompt a pair], shuffle_order) -> per prompt the index
    (0 or 1) of the better completion, -1 where it could not decide. shuffle_order: the judge may present each
    pair in a random order to counter position bias (its answer still indexes the pair as given)."""

    @abstractmethod
    def judge(self, prompts: list[str], completions: list[list[str]], shuffle_order: bool = True) -> list[int]:
        raise NotImplementedError


class BaseBinaryJudge(BaseJudge):
    """A judge of constraints (CGPO, Xu et al., 2024, sec. 4.1.4): per completion 1 (met), 0 (not met) or -1
    (undecided)."""

    @abstractmethod
    def judge(self, prompts: list[str], completions: list[str], gold_completions: list[str] | None = None,
              shuffle_order: bool = True) -> list[int]:
        raise NotImplementedError


class AllTrueJudge(BaseBinaryJudge):
    """Several binary judges as one (CGPO's mixture of judges): 1 only where all say 1, -1 where any is
    undecided, else 0."""

    def __init__(self, judges: Sequence[BaseBinaryJudge]) -> None:
        self.judges = list(judges)

    def judge(self, prompts: list[str], completions: list[str], gold_completions: list[str] | None = None,
              shuffle_order: bool = True) -> list[int]:
        verdicts = [j.judge(prompts, completions, gold_completions, shuffle_order) for j in self.judges]
        combined = []
        for i, answers in enumerate(zip(*verdicts, strict=True)):
            if any(a not in (0, 1, -1) for a in answers):
                raise ValueError(f"AllTrueJudge: completion {i} got binary verdicts {list(answers)}; each judge "
                                 "must answer 1, 0 or -1.")
            combined.append(-1 if -1 in answers else int(all(a == 1 for a in answers)))
        return combined


def render_messages(value: Any) -> str:
    """Text for a judge: a string as it is; a list of chat messages as "Role: content" blocks, each followed by a
    blank line."""
    if isinstance(value, str):
        return value
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in value)


def judge_name(judge: Any) -> str:
    """A judge's name for metrics and errors: a function's name, else its class name."""
    return getattr(judge, "__name__", None) or type(judge).__name__


def is_pairwise_judge(judge: Any) -> bool:
    """Whether `judge` can judge pairs: an object with a `judge` method, or a plain callable."""
    return callable(getattr(judge, "judge", None)) or callable(judge)


class PairwiseJudgeReward:
    """A pairwise judge as a reward function over a round laid out in pairs: rows (2g, 2g + 1) answer one prompt.
    Each pair is judged once; the judge's pick gets reward 1.0, the other 0.0. An undecided pair (-1) goes to
    the second completion, as TRL's Online DPO trainer reads any answer but 0.

    prompts, completions: 2P entries, each prompt repeated for its pair (strings or chat messages).
    """

    def __init__(self, judge: Any) -> None:
        if not is_pairwise_judge(judge):
            raise ValueError(f"judge must be a pairwise judge (an object with a judge(prompts, completions) method, "
                             f"e.g. a BasePairwiseJudge) or a callable judge(prompt, completion_a, completion_b) -> "
                             f"0 or 1; got {type(judge).__name__}.")
        self.judge = judge
        self.__name__ = judge_name(judge)

    def _verdicts(self, prompts: list[str], pairs: list[list[str]]) -> list[Any]:
        method: Callable[..., Any] | None = getattr(self.judge, "judge", None)
        if callable(method):
            return list(method(prompts, pairs))
        return [self.judge(p, a, b) for p, (a, b) in zip(prompts, pairs)]

    def __call__(self, prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        if len(completions) % 2:
            raise ValueError(f"a pairwise judge needs completions in pairs; got {len(completions)}.")
        texts = [render_messages(c) for c in completions]
        pairs = [[texts[i], texts[i + 1]] for i in range(0, len(texts), 2)]
        verdicts = self._verdicts([render_messages(p) for p in prompts[::2]], pairs)
        if len(verdicts) != len(pairs):
            raise ValueError(f"judge {self.__name__!r} returned {len(verdicts)} verdicts for {len(pairs)} pairs; it "
                             "must return one per pair.")
        rewards = []
        for i, verdict in enumerate(verdicts):
            if isinstance(verdict, bool) or verdict not in (0, 1, -1):
                raise ValueError(f"judge {self.__name__!r} returned {verdict!r} for pair {i}; a pairwise judge "
                                 "answers 0 (the first completion is better), 1 (the second) or -1 (undecided).")
            first_wins = verdict == 0
            rewards += [float(first_wins), float(not first_wins)]
        return rewards
