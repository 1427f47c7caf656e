"""Deterministic synthetic movie-review corpus for the offline demo.

Every review is ``opening + continuation``: the opening is one of a few fixed subject phrases, so it can
serve as a prompt for online RL, and the continuation carries the sentiment. The vocabulary is kept small
on purpose so a tiny LM fits it in about a minute, while the slot combinatorics keep lines mostly unique.
"""

from __future__ import annotations

import random
import re

SENTIMENTS = ("positive", "negative", "neutral")

# Word banks stay packed so the vocabulary can be read at a glance.
# fmt: off
# Every opening is a singular subject, so any continuation (which starts with a verb) reads grammatically.
_OPENINGS = (
    "this movie", "the film", "i thought the acting", "the plot", "honestly, the ending", "the story",
    "overall, this film", "the soundtrack", "in my opinion, the movie", "the script", "the cast",
    "to be honest, the pacing", "the whole thing", "for me, the second half",
)
# Aspects avoid the openings' nouns so a two-clause review does not talk about the same thing twice.
_ASPECTS = (
    "the lead performance", "the direction", "the editing", "the final scene", "the dialogue", "the music",
    "the camera work", "the villain", "the twist", "the humor", "the supporting cast", "the score",
)
_VERBS = ("was", "felt", "seemed", "turned out to be")
_SHORT_VERBS = ("was", "felt", "seemed")
_ADJ = {
    "positive": (
        "wonderful", "brilliant", "delightful", "moving", "charming", "superb", "excellent", "great",
        "beautiful", "clever", "gripping", "fun", "touching", "stunning", "fantastic", "lovely", "memorable",
        "enjoyable", "fresh", "funny",
    ),
    "negative": (
        "boring", "dull", "awful", "terrible", "weak", "bland", "tedious", "clumsy", "messy", "lifeless",
        "bad", "poor", "silly", "painful", "dreadful", "flat", "stale", "forgettable", "annoying",
        "disappointing",
    ),
    "neutral": (
        "okay", "average", "ordinary", "typical", "standard", "predictable", "mild", "modest", "plain",
        "uneven", "simple", "familiar", "conventional", "routine",
    ),
}
_INTENS = {
    "positive": ("really", "truly", "very", "quite", "incredibly", "absolutely", "genuinely", "so"),
    "negative": ("really", "truly", "very", "quite", "incredibly", "absolutely", "painfully", "so"),
    "neutral": ("fairly", "mostly", "somewhat", "largely", "kind of", "more or less"),
}
# Negation phrasings are the cases a naive bag-of-words reward gets wrong, so the corpus should teach them.
_NEGATED = {
    "positive": (
        "was not bad at all", "was never boring for a second", "had no dull moments",
        "was not disappointing in the least", "never felt weak or tedious", "was not a bad way to spend an evening",
        "was worth every minute",
    ),
    "negative": (
        "was not worth it", "was not good at all", "was not worth the ticket", "was never funny or clever",
        "had no memorable moments", "was not fun in the least", "was hardly worth watching", "was nothing special",
    ),
}
_REACTIONS = {
    "positive": (
        "would gladly watch it again", "would recommend it to anyone", "loved every minute",
        "left the theater smiling", "enjoyed every scene", "was hooked until the end",
    ),
    "negative": (
        "would not recommend it", "nearly fell asleep", "regret buying a ticket", "wasted two hours",
        "was bored until the end", "left the theater annoyed",
    ),
    "neutral": (
        "might watch it again someday", "have no strong feelings about it", "will probably forget it soon",
        "watched it once and moved on",
    ),
}
_VERDICT = {"positive": "best", "negative": "worst"}
_EARLY = ("at first", "early on", "for a while", "in the opening scenes")
_START_NEUTRAL = ("slow", "quiet", "familiar", "uneven")
# Cue words: every polar adjective plus the few other words the templates use to carry a verdict.
_POS_CUES = frozenset(_ADJ["positive"]) | {
    "worth", "good", "special", "best", "loved", "enjoyed", "smiling", "recommend", "hooked", "gladly",
}
_NEG_CUES = frozenset(_ADJ["negative"]) | {"worst", "asleep", "regret", "wasted", "bored", "annoyed"}
# fmt: on

_NEGATORS = frozenset({"not", "never", "no", "hardly", "nothing", "neither", "nor", "without"})
_NEGATION_WINDOW = 4  # reaches "tedious" in "never felt weak or tedious"
_TOKEN_RE = re.compile(r"[a-z']+|[,.;!?]")


def _polar_rest(rng: random.Random, s: str) -> str:
    """One continuation for a positive or negative review."""
    o = "negative" if s == "positive" else "positive"
    v, i, a, asp = rng.choice(_VERBS), rng.choice(_INTENS[s]), rng.choice(_ADJ[s]), rng.choice(_ASPECTS)
    a2 = rng.choice([x for x in _ADJ[s] if x != a])
    kind = rng.randrange(11)
    if kind == 0:
        return f" {v} {i} {a}."
    if kind == 1:
        return f" {v} {i} {a} and {a2}."
    if kind == 2:
        return f" {v} {i} {a} from start to finish."
    if kind == 3:
        return f" {rng.choice(_NEGATED[s])}."
    if kind == 4:
        return f" {rng.choice(_NEGATED[s])}, and {asp} {v} {i} {a}."
    if kind == 5:  # two clauses, the last one decides
        return (
            f" {rng.choice(_SHORT_VERBS)} {rng.choice(_ADJ[o])} {rng.choice(_EARLY)}, but {asp} {v} {i} {a}."
        )
    if kind == 6:
        return f" might look {rng.choice(_ADJ[o])} on paper, but it {v} {i} {a}."
    if kind == 7:
        start = rng.choice(_START_NEUTRAL)
        return f" {rng.choice(_SHORT_VERBS)} {start} to start, and then {asp} {v} {i} {a}."
    if kind == 8:
        return f" {v} {i} {a}, so i {rng.choice(_REACTIONS[s])}."
    if kind == 9:
        return f" {v} {a}, and {asp} {v} {i} {a2}."
    return f" {v} {i} {a}, one of the {_VERDICT[s]} films this year."


def _neutral_rest(rng: random.Random) -> str:
    """One continuation that avoids every sentiment cue word (or cancels them out)."""
    v, i, asp = rng.choice(_VERBS), rng.choice(_INTENS["neutral"]), rng.choice(_ASPECTS)
    a, a2 = rng.sample(_ADJ["neutral"], 2)
    kind = rng.randrange(7)
    if kind == 0:
        return f" {v} {i} {a}."
    if kind == 1:
        return f" {v} {a}, about what i expected."
    if kind == 2:
        return f" {v} {i} {a} and {a2}."
    if kind == 3:
        return f" {v} {a}, but {asp} {v} {i} {a2}."
    if kind == 4:
        return f" {v} {i} {a}, neither great nor terrible."
    if kind == 5:
        return f" {v} {a}, with some scenes that worked and some that did not."
    return f" {v} {i} {a}, so i {rng.choice(_REACTIONS['neutral'])}."


def _review(rng: random.Random, sentiment: str, opening: str) -> str:
    """A continuation (with leading space) for ``opening`` whose full review is 6-25 words long."""
    if sentiment not in SENTIMENTS:
        raise ValueError(f"unknown sentiment {sentiment!r}; expected one of {SENTIMENTS}")
    while True:  # a handful of slot combinations overshoot 25 words; redraw rather than truncate mid-clause
        rest = _neutral_rest(rng) if sentiment == "neutral" else _polar_rest(rng, sentiment)
        if 6 <= len((opening + rest).split()) <= 25:
            return rest


def generate_reviews(n: int = 3000, seed: int = 0) -> list[dict]:
    """``n`` reviews ``{"text", "sentiment"}``, balanced over :data:`SENTIMENTS`, deterministic in ``seed``."""
    if n < 0:
        raise ValueError("n must be non-negative")
    rng = random.Random(seed)
    labels = [SENTIMENTS[k % len(SENTIMENTS)] for k in range(n)]
    rng.shuffle(labels)
    out = []
    for label in labels:
        opening = rng.choice(_OPENINGS)
        out.append({"text": opening + _review(rng, label, opening), "sentiment": label})
    return out


def review_prompts() -> list[str]:
    """The distinct opening phrases every review starts with (the prompts for online RL)."""
    return list(_OPENINGS)


def split_prompt(text: str) -> tuple[str, str]:
    """Split a review into ``(opening, rest)``; ``rest`` keeps its leading space so ``opening + rest == text``."""
    # Longest match first, so an opening that happens to prefix another one cannot steal its text.
    for opening in sorted(_OPENINGS, key=len, reverse=True):
        if text.startswith(opening) and text[len(opening) : len(opening) + 1] in (" ", ""):
            return opening, text[len(opening) :]
    raise ValueError(f"text does not start with a known opening: {text[:40]!r}")


def preference_pairs(n: int = 1000, seed: int = 0, implicit_prompt: bool = False) -> list[dict]:
    """``n`` pairs preferring a positive over a negative continuation of the same opening.

    Returns ``{"prompt", "chosen", "rejected"}`` (completions with a leading space), or with
    ``implicit_prompt=True`` ``{"chosen", "rejected"}`` holding the full texts.
    """
    if n < 0:
        raise ValueError("n must be non-negative")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = rng.choice(_OPENINGS)
        chosen, rejected = _review(rng, "positive", prompt), _review(rng, "negative", prompt)
        if implicit_prompt:
            out.append({"chosen": prompt + chosen, "rejected": prompt + rejected})
        else:
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def sentiment_lexicon() -> tuple[frozenset[str], frozenset[str]]:
    """``(positive_cues, negative_cues)``: the words :func:`positivity_score` counts."""
    return _POS_CUES, _NEG_CUES


def _clause_score(tokens: list[str]) -> tuple[int, int]:
    pos = neg = 0
    for k, tok in enumerate(tokens):
        polarity = 1 if tok in _POS_CUES else -1 if tok in _NEG_CUES else 0
        if not polarity:
            continue
        for prev in reversed(tokens[max(0, k - _NEGATION_WINDOW) : k]):
            if prev in ",.;!?":  # negation does not reach across a clause boundary
                break
            if prev in _NEGATORS or prev.endswith("n't"):
                polarity = -polarity
                break
        if polarity > 0:
            pos += 1
        else:
            neg += 1
    return pos, neg


def positivity_score(text: str) -> float:
    """Lexicon score in [-1, 1]: (positive - negative) / (positive + negative) cue counts, 0 with no cues.

    Cue words right after a negator ("not bad", "not worth it") flip polarity, and after a ", but" only
    the final clause counts when it has a cue, because there the last clause carries the verdict.
    """
    tokens = _TOKEN_RE.findall(text.lower())
    # A comma before "but" marks a clause contrast; a bare "but" could be "anything but dull".
    cuts = [k for k in range(1, len(tokens)) if tokens[k] == "but" and tokens[k - 1] == ","]
    pos, neg = _clause_score(tokens[cuts[-1] + 1 :]) if cuts else (0, 0)
    if not pos + neg:
        pos, neg = _clause_score(tokens)
    return 0.0 if not pos + neg else (pos - neg) / (pos + neg)
