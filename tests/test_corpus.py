"""Tests for the synthetic demo corpus in tether.demo.corpus."""

import random
import re
from collections import Counter

import pytest

from tether.demo.corpus import (
    CONTRADICTED,
    RANKED_PAIRS,
    SENTIMENTS,
    TOWARDS_POSITIVE,
    TRUNCATED,
    check_sentences,
    contradict,
    generate_reviews,
    positivity_score,
    preference_pairs,
    review_prompts,
    sentiment_lexicon,
    split_prompt,
    truncate,
    unknown_words,
)

N = 3000


@pytest.fixture(scope="module")
def reviews() -> list[dict]:
    return generate_reviews(N, seed=0)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def test_deterministic_under_seed(reviews):
    assert generate_reviews(N, seed=0) == reviews
    assert generate_reviews(N, seed=1) != reviews
    assert preference_pairs(50, seed=3) == preference_pairs(50, seed=3)
    assert preference_pairs(50, seed=3) != preference_pairs(50, seed=4)


def test_does_not_touch_global_random_state():
    import random

    random.seed(123)
    expected = random.random()
    random.seed(123)
    generate_reviews(100, seed=7)
    preference_pairs(20, seed=7)
    assert random.random() == expected


def test_schema_and_balance(reviews):
    assert len(reviews) == N
    assert all(set(r) == {"text", "sentiment"} for r in reviews)
    counts = Counter(r["sentiment"] for r in reviews)
    assert set(counts) == set(SENTIMENTS)
    assert max(counts.values()) - min(counts.values()) <= 1
    assert sorted(Counter(r["sentiment"] for r in generate_reviews(10)).values()) == [3, 3, 4]


def test_mostly_unique(reviews):
    assert len({r["text"] for r in reviews}) / len(reviews) > 0.9


def test_word_count_and_format(reviews):
    for r in reviews:
        assert 6 <= len(r["text"].split()) <= 25, r["text"]
        assert r["text"].endswith(".")
        assert r["text"] == r["text"].lower()
        assert "  " not in r["text"]


def test_small_vocabulary(reviews):
    vocab = {w for r in reviews for w in _words(r["text"])}
    assert len(vocab) < 600


def test_prompts_are_prefixes(reviews):
    prompts = review_prompts()
    assert 10 <= len(prompts) <= 20
    assert len(set(prompts)) == len(prompts)
    assert all(any(r["text"].startswith(p + " ") for p in prompts) for r in reviews)
    # Every opening is actually used, so each RL prompt has SFT data behind it.
    used = {split_prompt(r["text"])[0] for r in reviews}
    assert used == set(prompts)


def test_split_prompt_round_trips(reviews):
    prompts = set(review_prompts())
    for r in reviews:
        prompt, rest = split_prompt(r["text"])
        assert prompt in prompts
        assert rest.startswith(" ") and not rest.startswith("  ")
        assert prompt + rest == r["text"]


def test_split_prompt_rejects_unknown_opening():
    with pytest.raises(ValueError):
        split_prompt("a completely different sentence.")


def test_preference_pairs_share_prompt_and_differ_in_sentiment():
    pairs = preference_pairs(500, seed=0)
    assert len(pairs) == 500
    prompts = set(review_prompts())
    for p in pairs:
        assert set(p) == {"prompt", "chosen", "rejected"}
        assert p["prompt"] in prompts
        assert p["chosen"].startswith(" ") and p["rejected"].startswith(" ")
        assert p["chosen"] != p["rejected"]
        assert split_prompt(p["prompt"] + p["chosen"])[0] == p["prompt"]
        assert positivity_score(p["prompt"] + p["chosen"]) > 0 > positivity_score(p["prompt"] + p["rejected"])
        assert 6 <= len((p["prompt"] + p["chosen"]).split()) <= 25


def test_preference_pairs_implicit_prompt():
    explicit = preference_pairs(100, seed=2)
    implicit = preference_pairs(100, seed=2, implicit_prompt=True)
    for e, i in zip(explicit, implicit, strict=True):
        assert set(i) == {"chosen", "rejected"}
        assert i["chosen"] == e["prompt"] + e["chosen"]
        assert i["rejected"] == e["prompt"] + e["rejected"]
        assert split_prompt(i["chosen"])[0] == split_prompt(i["rejected"])[0]


def test_lexicon_is_disjoint_and_nonempty():
    pos, neg = sentiment_lexicon()
    assert isinstance(pos, frozenset) and isinstance(neg, frozenset)
    assert pos and neg and not pos & neg


def test_positivity_score_accuracy(reviews):
    for sentiment, sign in (("positive", 1), ("negative", -1)):
        scores = [positivity_score(r["text"]) for r in reviews if r["sentiment"] == sentiment]
        assert all(-1.0 <= s <= 1.0 for s in scores)
        assert sum(s * sign > 0 for s in scores) / len(scores) > 0.95
    neutral = [positivity_score(r["text"]) for r in reviews if r["sentiment"] == "neutral"]
    assert sum(abs(s) < 0.5 for s in neutral) / len(neutral) > 0.9


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("this movie was not bad at all.", 1.0),
        ("this movie was not worth it.", -1.0),
        ("this movie was not good at all.", -1.0),
        ("the plot was never boring for a second.", 1.0),
        ("the plot never felt weak or tedious.", 1.0),
        ("the film was nothing special.", -1.0),
        ("the film was dull at first, but the music was truly wonderful.", 1.0),
        ("the film was wonderful at first, but the music was truly dull.", -1.0),
        ("the cast was okay, neither great nor terrible.", 0.0),
        ("the script was average.", 0.0),
        ("", 0.0),
    ],
)
def test_positivity_score_cases(text, expected):
    assert positivity_score(text) == expected


def test_negative_n_rejected():
    with pytest.raises(ValueError):
        generate_reviews(-1)
    with pytest.raises(ValueError):
        preference_pairs(-1)


# ----- ranked pairs, damaged reviews, the check set ----------------------------------------------------------
def _sentiment(continuation: str) -> str:
    score = positivity_score(continuation)
    return "positive" if score > 0 else "negative" if score < 0 else "neutral"


def test_ranked_pairs_cover_each_ranking_and_order_it():
    """Each ranking is drawn about equally often, and the chosen side is the better one: by the lexicon for the
    three classes, the same review whole rather than cut short or contradicting itself for the damaged ones."""
    pairs = preference_pairs(2000, seed=4, rankings=RANKED_PAIRS)
    counts = Counter()
    for p in pairs:
        assert p["prompt"] in review_prompts() and p["chosen"] != p["rejected"]
        assert not unknown_words(p["chosen"]) and not unknown_words(p["rejected"])
        chosen = _sentiment(p["chosen"])
        if p["rejected"].rstrip(".") in p["chosen"]:  # a prefix: cut short
            kind = (chosen, TRUNCATED)
        elif len(p["chosen"].split()) == len(p["rejected"].split()) and chosen == "positive" and (
                sum(a != b for a, b in zip(p["chosen"].split(), p["rejected"].split())) == 1):
            kind = (chosen, CONTRADICTED)  # one word swapped for a worse one
        else:
            kind = (chosen, _sentiment(p["rejected"]))
        counts[kind] += 1
    assert set(counts) <= set(RANKED_PAIRS) | {("positive", "positive"), ("neutral", "neutral")}, counts
    # the lexicon misreads a few reviews (test_positivity_score_accuracy); every ranking still shows up often
    for ranking in RANKED_PAIRS:
        assert counts[ranking] > 0.8 * len(pairs) / len(RANKED_PAIRS), (ranking, counts)


def test_policy_pairs_always_prefer_a_positive_review():
    pairs = preference_pairs(600, seed=1, rankings=TOWARDS_POSITIVE)
    chosen = Counter(_sentiment(p["chosen"]) for p in pairs)
    rejected = Counter(_sentiment(p["rejected"]) for p in pairs)
    assert chosen["positive"] > 0.95 * len(pairs), chosen  # as often as the lexicon reads reviews right
    assert rejected["positive"] < 0.05 * len(pairs) and min(rejected["negative"], rejected["neutral"]) > 0.4 * len(
        pairs), rejected


def test_pairs_keep_to_the_given_openings():
    openings = review_prompts()[:3]
    assert {p["prompt"] for p in preference_pairs(200, seed=0, openings=openings)} == set(openings)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"rankings": [("positive", "positive")]}, "rankings"),
    ({"rankings": [("great", "negative")]}, "rankings"),
    ({"rankings": [(TRUNCATED, "positive")]}, "rankings"),
    ({"rankings": []}, "rankings"),
    ({"openings": ["a new opening"]}, "openings"),
    ({"openings": []}, "openings"),
])
def test_pair_options_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        preference_pairs(10, **kwargs)


def test_truncate_cuts_inside_a_clause():
    rng = random.Random(0)
    for r in generate_reviews(300, seed=6):
        opening, rest = split_prompt(r["text"])
        cut = truncate(rng, rest)
        assert cut.startswith(" ") and cut.endswith(".") and not cut.endswith(",.")
        words, kept = rest.strip().rstrip(".").split(), cut.strip().rstrip(".").split()
        assert 0 < len(kept) < len(words) and words[: len(kept)] == kept
        assert not words[len(kept) - 1].endswith(","), (rest, cut)  # never a whole clause


def test_contradict_turns_one_positive_word_negative():
    rng = random.Random(0)
    positive, negative = sentiment_lexicon()
    for r in [r for r in generate_reviews(300, seed=7) if r["sentiment"] == "positive"]:
        out = contradict(rng, r["text"])
        before, after = r["text"].split(), out.split()
        if len(before) != len(after):  # no positive adjective to turn: cut short instead
            assert r["text"].startswith(out.rstrip("."))
            continue
        changed = [(a, b) for a, b in zip(before, after) if a != b]
        assert len(changed) == 1, (r["text"], out)
        old, new = (w.strip(",.") for w in changed[0])
        assert old in positive and new in negative, changed


def test_check_set_is_labelled_as_the_lexicon_reads_it_and_is_not_in_the_corpus():
    """The hand-written check set: every class as the hand-written lexicon reads it (an independent judge of
    the labels), in the corpus' words, and none of its sentences a review the templates can write."""
    sentences = check_sentences()
    assert set(sentences) == set(SENTIMENTS) and all(len(v) >= 15 for v in sentences.values())
    corpus = {r["text"] for r in generate_reviews(20000, seed=11)}
    for label, texts in sentences.items():
        for text in texts:
            assert _sentiment(text) == label, (label, text)
            assert text not in corpus
            assert len(unknown_words(text)) <= 1, text  # a word or so the corpus lacks is fine, not more


def test_unknown_words_finds_what_the_corpus_never_writes(reviews):
    assert not any(unknown_words(r["text"]) for r in reviews)
    assert unknown_words("the plot was goodish and \ufffd 10") == ["goodish", "\ufffd", "1", "0"]
