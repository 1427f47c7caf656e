"""Deterministic synthetic movie-review corpus for the offline demo.

Every review is ``opening + continuation``: the opening is one of a few fixed subject phrases, so it can
serve as a prompt for online RL, and the continuation carries the sentiment. The vocabulary is kept small
on purpose so a tiny LM fits it in about a minute, while the slot combinatorics keep lines mostly unique.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Sequence

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


# Rankings of preference pairs, (chosen, rejected). With positive-vs-negative pairs alone, the score of a
# neutral review is whatever a reward model extrapolates, and RL finds and exploits it; RANKED_PAIRS places every
# class, and the two shortcuts RL takes next, which a reward model that never saw them scores like the
# positive review they came from. As the rejected side, TRUNCATED means the chosen review itself cut short
# mid-clause ("... turned out to be."), CONTRADICTED the chosen review with one of its positive words turned
# negative ("quite weak and enjoyable", "so clever, one of the worst films this year").
TRUNCATED = "truncated"
CONTRADICTED = "contradicted"
DAMAGED = (TRUNCATED, CONTRADICTED)
POLAR_PAIRS = (("positive", "negative"),)
RANKED_PAIRS = (("positive", "negative"), ("positive", "neutral"), ("neutral", "negative"),
                ("positive", TRUNCATED), ("positive", CONTRADICTED))
TOWARDS_POSITIVE = (("positive", "negative"), ("positive", "neutral"))  # for a policy: always prefer positive


def truncate(rng: random.Random, text: str) -> str:
    """``text`` (a review or a continuation, ending with a period) cut short inside a clause, with its period:
    "... but the editing was truly great." -> "... but the editing." Never after a comma, where the cut could
    leave a whole review ("was never boring, and ..." -> "was never boring.")."""
    lead = " " if text.startswith(" ") else ""
    words = text.strip().rstrip(".").split()
    cuts = [k for k in range(1, len(words) - 1) if not words[k - 1].endswith(",")]
    return lead + " ".join(words[: rng.choice(cuts)] if cuts else words[:-1] or ["and"]) + "."


def contradict(rng: random.Random, text: str) -> str:
    """``text`` with one of its positive adjectives (or "best") replaced by a negative one (or "worst"), so that
    it contradicts itself; cut short (:func:`truncate`) when it has none ("was not bad at all")."""
    words = _TOKEN_RE.findall(text)
    spots = [k for k, w in enumerate(words) if w in _ADJ["positive"] or w == "best"]
    if not spots:
        return truncate(rng, text)
    k = rng.choice(spots)
    words[k] = "worst" if words[k] == "best" else rng.choice(_ADJ["negative"])
    out = " ".join(words).replace(" ,", ",").replace(" .", ".")
    return (" " if text.startswith(" ") else "") + out


def preference_pairs(n: int = 1000, seed: int = 0, implicit_prompt: bool = False,
                     rankings: Sequence[tuple[str, str]] = POLAR_PAIRS,
                     openings: Sequence[str] | None = None) -> list[dict]:
    """``n`` pairs, each a chosen and a rejected continuation of the same opening.

    Each pair's ``(chosen, rejected)`` sentiments are drawn uniformly from ``rankings`` (by default positive over
    negative; :data:`RANKED_PAIRS` places all three classes and damaged reviews, see :data:`TRUNCATED`), its
    opening from ``openings`` (default: all of :func:`review_prompts`). Returns ``{"prompt", "chosen",
    "rejected"}`` (completions with a leading space), or with ``implicit_prompt=True`` ``{"chosen", "rejected"}``
    holding the full texts.
    """
    if n < 0:
        raise ValueError("n must be non-negative")
    rankings = [tuple(r) for r in rankings]
    bad = [r for r in rankings if len(r) != 2 or r[0] == r[1] or r[0] not in SENTIMENTS
           or r[1] not in (*SENTIMENTS, *DAMAGED)]
    if not rankings or bad:
        raise ValueError(f"rankings must be (chosen, rejected) pairs: a sentiment out of {SENTIMENTS}, then another "
                         f"one or one of {DAMAGED}; got {bad or rankings!r}")
    openings = _OPENINGS if openings is None else tuple(openings)
    unknown = sorted(set(openings) - set(_OPENINGS))
    if not openings or unknown:
        raise ValueError(f"openings must be a non-empty subset of review_prompts(); unknown: {unknown}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = rng.choice(openings)
        # Only several rankings take a draw, so the default pairs stay those of earlier releases.
        good, worse = rankings[0] if len(rankings) == 1 else rng.choice(rankings)
        chosen = _review(rng, good, prompt)
        rejected = ({TRUNCATED: truncate, CONTRADICTED: contradict}[worse](rng, chosen) if worse in DAMAGED
                    else _review(rng, worse, prompt))
        if implicit_prompt:
            out.append({"chosen": prompt + chosen, "rejected": prompt + rejected})
        else:
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


@functools.lru_cache(maxsize=1)
def corpus_vocabulary() -> frozenset[str]:
    """Every word the corpus' templates produce (found by generating enough reviews that each one shows up)."""
    return frozenset(w for r in generate_reviews(5000, seed=0) for w in _TOKEN_RE.findall(r["text"]))


def unknown_words(text: str) -> list[str]:
    """The words of ``text`` that no review of the corpus uses; a character the corpus never writes (a stray
    byte decoded as U+FFFD, a digit) counts as a word of its own. ``[]`` for text in the corpus' language."""
    vocabulary = corpus_vocabulary()
    return [w for w in re.findall(r"[a-z']+|[^a-z',.;!?\s]", text.lower()) if w not in vocabulary]


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


# ----- a held-out check set ----------------------------------------------------------------------------------
# Hand-written sentences in the corpus' vocabulary but not in its templates (other word orders, other clause
# shapes, most without one of the openings), to check what a reward model learned rather than what it memorised.
# fmt: off
CHECK_SENTENCES: dict[str, tuple[str, ...]] = {
    "positive": (
        "this movie was truly wonderful, i would watch it again.",
        "i loved the music, and the cast was superb.",
        "a brilliant film, and the story was moving from start to finish.",
        "the dialogue was clever and the humor was fresh.",
        "a beautiful, touching story with a stunning final scene.",
        "the acting was excellent, and i enjoyed every minute.",
        "the villain was memorable and the twist was gripping.",
        "i was hooked from the first scene, the editing was superb.",
        "the soundtrack was lovely and the direction was clever.",
        "a fun, charming and funny movie.",
        "the cast was fantastic and the script was great.",
        "the ending was delightful, i left the theater smiling.",
        "the lead performance was brilliant and the score was beautiful.",
        "the story was fresh and the pacing was excellent.",
        "everything about it was wonderful.",
        "the humor was funny and the final scene was moving.",
        "such an enjoyable film, i would recommend it.",
        "the plot was gripping and the camera work was stunning.",
    ),
    "negative": (
        "the plot was dull and the acting weak.",
        "a boring film with a terrible script.",
        "the dialogue was clumsy and the music was annoying.",
        "a dreadful movie, i nearly fell asleep.",
        "the story was stale and the twist was silly.",
        "the cast was poor and the direction was messy.",
        "i regret the ticket, the pacing was tedious.",
        "the humor was flat and the villain was forgettable.",
        "the final scene was painful and the editing was awful.",
        "the soundtrack was bland and the script was lifeless.",
        "a disappointing movie, two wasted hours.",
        "the lead performance was weak and the story was dull.",
        "the plot was terrible, i was bored until the end.",
        "the camera work was clumsy and the score was annoying.",
        "everything about it was boring.",
        "such a tedious film, i would not recommend it.",
        "the acting was bad and the ending was dreadful.",
        "the twist was silly and the dialogue was poor.",
    ),
    "neutral": (
        "the film was about two hours long.",
        "the plot was predictable and the acting was average.",
        "the music was ordinary and the pacing was standard.",
        "a typical film with a familiar story.",
        "the story was simple and the ending was predictable.",
        "the dialogue was plain and the camera work was conventional.",
        "the film felt modest and routine.",
        "i watched it once.",
        "the soundtrack was mild and the direction was standard.",
        "the villain was typical and the twist was predictable.",
        "a conventional story, told in a simple way.",
        "the humor was mild and the editing was plain.",
        "an ordinary film, about what i expected.",
        "the final scene was familiar and the score was average.",
        "the lead performance was okay and the script was uneven.",
        "everything about it was average.",
        "the cast was okay and the story was simple.",
        "a routine movie with a standard plot.",
    ),
}
# fmt: on


def check_sentences() -> dict[str, list[str]]:
    """The held-out check set, ``{sentiment: [sentence, ...]}`` for each of :data:`SENTIMENTS`."""
    return {label: list(CHECK_SENTENCES[label]) for label in SENTIMENTS}
