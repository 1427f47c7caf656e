"""Group sampling (rollout/sampling.py): greedy completions equal `model.generate` prompt by prompt, with
rows stopping at EOS at different steps and finished rows dropped from the cache; the returned log-probs
equal a full forward pass's log_softmax(logits / T); the completion mask / truncated / padding
semantics; the group layout; reproducibility with a torch.Generator; `filter_logits` against a slow
reference; and `sample_next_tokens`'s empirical frequencies against softmax(logits / T).

Shapes: p = prompts, k = generations per prompt, n = p * k, c = completion tokens, v = vocabulary.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from tether.rollout import sampling
from tether.rollout.sampling import filter_logits, sample_groups, sample_next_tokens

PAD = 0
MAX_NEW = 10
# Six prompts of different lengths (left-padded inside sample_groups), no special tokens.
PROMPTS = [[338, 310, 340, 289, 373, 304, 274], [72, 361], [5, 17, 42, 99],
           [120, 121, 122, 123, 124, 125, 126, 127, 128, 129], [200, 7], [33, 44, 55, 66, 77]]
# For sampled rows: a tenth of the vocabulary counts as EOS, so the untrained model's nearly uniform
# distribution ends about one row in ten at each step and rows stop at many different steps.
SAMPLING_EOS = list(range(100, 140))


@pytest.fixture(scope="module")
def model(tiny_decoder_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_decoder_dir).eval()


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos: list[int] | None) -> list[int]:
    """The reference: transformers' own greedy decoding of one unpadded prompt (stops after an EOS, kept)."""
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=PAD, eos_token_id=eos)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def eos_ids(model) -> list[int]:
    """EOS ids that greedy decoding emits at different steps for different prompts: for prompt i < 5 the
    token it emits at step stops[i] (a row may stop earlier at another row's token), minus the last
    prompt's tokens, so that row runs to MAX_NEW. The tests check that the lengths really differ."""
    stops = [1, 6, 3, 8, 4]
    full = [hf_greedy(model, prompt, MAX_NEW, None) for prompt in PROMPTS]
    assert all(len(row) == MAX_NEW for row in full)
    return sorted({full[i][step] for i, step in enumerate(stops)} - set(full[5]))


def check_row_semantics(sampled, eos: list[int], max_new_tokens: int) -> list[int]:
    """Each row: mask True on a prefix; the prefix contains no EOS except as its last token; truncated iff
    the prefix has no EOS (then it is max_new_tokens long); pad ids and 0 log-probs after it."""
    ids, mask, logps = sampled.completion_ids, sampled.completion_mask, sampled.logps
    assert mask.dtype == torch.bool and logps.dtype == torch.float32
    assert ids.shape == mask.shape == logps.shape and ids.shape[1] <= max_new_tokens
    lengths = []
    for i in range(ids.shape[0]):
        length = int(mask[i].sum())
        assert mask[i, :length].all() and not mask[i, length:].any()
        row = ids[i, :length].tolist()
        hits = [j for j, tok in enumerate(row) if tok in eos]
        assert hits in ([], [length - 1])  # no EOS but the last real token
        assert bool(sampled.truncated[i]) == (hits == [])
        if not hits:
            assert length == max_new_tokens
        assert (ids[i, length:] == PAD).all() and (logps[i, length:] == 0).all()
        assert (logps[i, :length] < 0).all()
        lengths.append(length)
    assert ids.shape[1] == max(lengths)  # trimmed to the longest row
    return lengths


# ----- greedy == model.generate ---------------------------------------------------------------------------------
@pytest.fixture()
def count_compactions(monkeypatch):
    """Counts the calls that drop finished rows from the preallocated cache layers."""
    calls = []
    original = sampling.PreallocatedLayer._gather

    def counting(self, indices):
        calls.append(len(indices))
        return original(self, indices)

    monkeypatch.setattr(sampling.PreallocatedLayer, "_gather", counting)
    return calls


def test_greedy_without_eos_equals_generate(model):
    sampled = sample_groups(model, PROMPTS, 1, MAX_NEW, PAD, [], temperature=0)
    for i, prompt in enumerate(PROMPTS):
        assert sampled.completion_ids[i].tolist() == hf_greedy(model, prompt, MAX_NEW, None)
    assert sampled.completion_mask.all() and sampled.truncated.all()


@pytest.mark.parametrize("compact_when", ["default", 0.0, 2.0])
def test_greedy_with_early_eos_equals_generate(model, eos_ids, monkeypatch, count_compactions, compact_when):
    """Rows stop at their first EOS at different steps; with the default threshold, with compaction
    after every step with a finished row (0.0), and never (2.0), the completions are generate's."""
    if compact_when != "default":
        monkeypatch.setattr(sampling, "_COMPACT_WHEN_FINISHED", compact_when)
    sampled = sample_groups(model, PROMPTS, 1, MAX_NEW, PAD, eos_ids, temperature=0)
    lengths = check_row_semantics(sampled, eos_ids, MAX_NEW)
    for i, prompt in enumerate(PROMPTS):
        expected = hf_greedy(model, prompt, MAX_NEW, eos_ids)
        assert sampled.completion_ids[i, : lengths[i]].tolist() == expected
    # Non-vacuous: rows end at several different steps, some hit EOS and some are truncated.
    assert len(set(lengths)) >= 3 and sampled.truncated.any() and not sampled.truncated.all()
    if compact_when == 2.0:
        assert count_compactions == []
    else:  # finished rows were dropped from the cache before the last row ended
        assert count_compactions and min(count_compactions) < len(PROMPTS)


def test_row_ending_exactly_at_max_new_tokens_is_not_truncated(model, eos_ids):
    reference = [hf_greedy(model, prompt, MAX_NEW, eos_ids) for prompt in PROMPTS]
    ended = sorted({len(r) for r in reference if r[-1] in eos_ids and len(r) > 1})
    limit = ended[-1] if len(ended) == 1 else ended[-2]  # some rows end at the limit, longer ones cut there
    sampled = sample_groups(model, PROMPTS, 1, limit, PAD, eos_ids, temperature=0)
    lengths = check_row_semantics(sampled, eos_ids, limit)
    assert sampled.completion_ids.shape[1] == limit
    for i, expected in enumerate(reference):
        assert sampled.completion_ids[i, : lengths[i]].tolist() == expected[:limit]
        assert bool(sampled.truncated[i]) == (expected[:limit][-1] not in eos_ids)
    exact = [i for i, r in enumerate(reference) if len(r) == limit and r[-1] in eos_ids]
    assert exact and not sampled.truncated[exact].any()  # an EOS at the very last step ends the row
    assert sampled.truncated.any()


def test_groups_of_greedy_rows_continue_their_prompt(model, eos_ids):
    k = 3
    sampled = sample_groups(model, PROMPTS, k, MAX_NEW, PAD, eos_ids, temperature=0)
    assert sampled.completion_ids.shape[0] == len(PROMPTS) * k
    lengths = check_row_semantics(sampled, eos_ids, MAX_NEW)
    for g, prompt in enumerate(PROMPTS):
        expected = hf_greedy(model, prompt, MAX_NEW, eos_ids)
        for i in range(g * k, (g + 1) * k):  # rows [g k, (g + 1) k) answer prompt g
            assert sampled.completion_ids[i, : lengths[i]].tolist() == expected
            torch.testing.assert_close(sampled.logps[i], sampled.logps[g * k], rtol=0, atol=0)


# ----- log-probs of sampled rows == a full forward pass -------------------------------------------------------------
@pytest.mark.parametrize("temperature, top_k", [(0.7, 0), (1.6, 5), (0.0, 0)])
def test_logps_equal_full_forward_log_softmax(model, eos_ids, temperature, top_k):
    """logps[i, j] = log_softmax(logits / T)[token] (T = 1 for greedy), with the logits of one forward pass
    over prompt g + completion i, unpadded; top-k filtering changes which tokens are drawn, not the
    distribution their log-probs are taken under. Also: every drawn token is within the top k."""
    k = 2
    gen = torch.Generator().manual_seed(3)
    eos = eos_ids if temperature == 0 else SAMPLING_EOS
    sampled = sample_groups(model, PROMPTS, k, MAX_NEW, PAD, eos, temperature=temperature, top_k=top_k,
                            generator=gen)
    lengths = check_row_semantics(sampled, eos, MAX_NEW)
    scale = temperature if temperature > 0 else 1.0
    for i in range(len(PROMPTS) * k):
        prompt, completion = PROMPTS[i // k], sampled.completion_ids[i, : lengths[i]]
        ids = torch.cat([torch.tensor(prompt), completion])[None]  # [1, q + c]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1].float()  # [c, v], predicting each token
        expected = (logits / scale).log_softmax(-1).gather(-1, completion[:, None]).squeeze(-1)  # [c]
        torch.testing.assert_close(sampled.logps[i, : lengths[i]], expected, rtol=0, atol=1e-5)
        chosen = logits.gather(-1, completion[:, None])  # [c, 1]
        if top_k:
            assert ((logits > chosen + 1e-4).sum(-1) < top_k).all()
        if temperature == 0:
            assert ((logits > chosen + 1e-4).sum(-1) == 0).all()  # greedy: the argmax
    assert len(set(lengths)) >= 3  # non-vacuous: rows stopped at different steps


@pytest.fixture(params=["shared", "re-encoded", "no-cache"])
def sampler_path(request, monkeypatch):
    """The sampler's three paths on the same model: the prompt encoded once per group and its cache gathered
    by rows (fast path); a cache that cannot be gathered (no gatherer passes its check), so each completion's
    prompt is encoded and no row is dropped; a model that returns no cache, so every step re-reads the whole
    sequence."""
    if request.param == "re-encoded":
        monkeypatch.setattr(sampling, "_GATHERERS", ())
    if request.param == "no-cache":
        original = sampling.CachedForward.prefill
        monkeypatch.setattr(sampling.CachedForward, "prefill",
                            lambda self, ids, mask, use_cache=True: original(self, ids, mask, use_cache=False))
    return request.param


def test_every_sampler_path_equals_generate_and_full_forward(model, eos_ids, sampler_path, monkeypatch):
    """Greedy groups equal generate() prompt by prompt and sampled rows' log-probs equal a full forward's
    log_softmax, whichever path the sampler takes; compaction after every finished row (threshold 0) also
    runs on the no-cache path."""
    monkeypatch.setattr(sampling, "_COMPACT_WHEN_FINISHED", 0.0)
    k = 2
    greedy = sample_groups(model, PROMPTS, k, MAX_NEW, PAD, eos_ids, temperature=0)
    lengths = check_row_semantics(greedy, eos_ids, MAX_NEW)
    assert len(set(lengths)) >= 3
    for g, prompt in enumerate(PROMPTS):
        expected = hf_greedy(model, prompt, MAX_NEW, eos_ids)
        for i in range(g * k, (g + 1) * k):
            assert greedy.completion_ids[i, : lengths[i]].tolist() == expected
    sampled = sample_groups(model, PROMPTS, k, MAX_NEW, PAD, SAMPLING_EOS, temperature=0.8,
                            generator=torch.Generator().manual_seed(5))
    lengths = check_row_semantics(sampled, SAMPLING_EOS, MAX_NEW)
    for i in range(len(PROMPTS) * k):
        prompt, completion = PROMPTS[i // k], sampled.completion_ids[i, : lengths[i]]
        ids = torch.cat([torch.tensor(prompt), completion])[None]  # [1, q + c]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1].float()  # [c, v]
        expected = (logits / 0.8).log_softmax(-1).gather(-1, completion[:, None]).squeeze(-1)  # [c]
        torch.testing.assert_close(sampled.logps[i, : lengths[i]], expected, rtol=0, atol=1e-5)


def test_sampling_is_reproducible_with_a_generator(model):
    def draw(seed):
        return sample_groups(model, PROMPTS, 3, MAX_NEW, PAD, SAMPLING_EOS, temperature=1.0,
                             generator=torch.Generator().manual_seed(seed))

    a, b, c = draw(11), draw(11), draw(12)
    for field in ("completion_ids", "completion_mask", "logps", "truncated"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.completion_ids, c.completion_ids)
    # Rows of one group are independent draws: they share the prompt, not their tokens.
    assert not torch.equal(a.completion_ids[0], a.completion_ids[1])


def test_model_mode_restored_and_bad_arguments(model):
    model.train()
    try:
        sample_groups(model, PROMPTS[:2], 2, 3, PAD, [1], temperature=0)
        assert model.training
    finally:
        model.eval()
    for prompts, k, max_new in (([], 1, 3), ([[5], []], 1, 3), (PROMPTS, 0, 3), (PROMPTS, 1, 0)):
        with pytest.raises(ValueError):
            sample_groups(model, prompts, k, max_new, PAD, [1])


# ----- filter_logits against a slow reference ----------------------------------------------------------------------
def softmax(values: dict[int, float]) -> dict[int, float]:
    top = max(values.values())
    exps = {j: math.exp(x - top) for j, x in values.items()}
    total = sum(exps.values())
    return {j: e / total for j, e in exps.items()}


def ref_kept(row: list[float], top_k: int, top_p: float, min_p: float) -> set[int]:
    """The tokens filter_logits keeps, filters applied in order, each to what the previous kept:
    top-k: logits >= the k-th largest (ties at the k-th value stay);
    top-p: walk the tokens from most to least likely (renormalised over the kept ones), adding each, and
           stop once the mass taken reaches p: the smallest prefix of mass >= p;
    min-p: probability (renormalised) >= min_p * the largest probability."""
    kept = set(range(len(row)))
    if top_k and top_k < len(row):
        kth = sorted(row, reverse=True)[top_k - 1]
        kept = {j for j in kept if row[j] >= kth}
    if top_p < 1.0:
        probs = softmax({j: row[j] for j in kept})
        nucleus, mass = set(), 0.0
        for j in sorted(kept, key=lambda j: -probs[j]):
            nucleus.add(j)
            mass += probs[j]
            if mass >= top_p:
                break
        kept = nucleus
    if min_p > 0.0:
        probs = softmax({j: row[j] for j in kept})
        kept = {j for j in kept if probs[j] >= min_p * max(probs.values())}
    return kept


def filter_rows() -> torch.Tensor:
    """Hand-made rows plus random ones, [5, 8], float64 (no ties except in row 2, on purpose)."""
    hand = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0, 0.0, -2.0, 1.5],
                         [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
                         [1.0, 2.0, 2.0, 0.0, 2.0, -1.0, -3.0, 0.5]], dtype=torch.float64)
    rand = 2 * torch.randn(2, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return torch.cat([hand, rand])


@pytest.mark.parametrize("top_k, top_p, min_p", [
    (0, 1.0, 0.0), (1, 1.0, 0.0), (2, 1.0, 0.0), (5, 1.0, 0.0), (8, 1.0, 0.0),
    (0, 0.5, 0.0), (0, 0.83, 0.0), (0, 1e-6, 0.0), (0, 0.999, 0.0),
    (0, 1.0, 0.1), (0, 1.0, 0.5), (0, 1.0, 0.999),
    (4, 0.7, 0.0), (5, 0.9, 0.2), (0, 0.8, 0.3),
])
def test_filter_logits_against_reference(top_k, top_p, min_p):
    rows = filter_rows()
    out = filter_logits(rows, top_k, top_p, min_p)
    for i, row in enumerate(rows.tolist()):
        kept = ref_kept(row, top_k, top_p, min_p)
        assert {j for j in range(8) if out[i, j] != float("-inf")} == kept
        assert all(out[i, j] == rows[i, j] for j in kept)  # kept logits are untouched
        assert max(range(8), key=lambda j: row[j]) in kept  # the most likely token always survives


def test_filter_logits_hand_cases():
    row = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0, 0.0, -2.0, 1.5]])
    # probs, sorted: 3.0 -> 0.53, 2.0 -> 0.20, 1.5 -> 0.12, 1.0 -> 0.07, ...
    keep = lambda out: (out[0] != float("-inf")).nonzero().squeeze(-1).tolist()  # noqa: E731
    assert keep(filter_logits(row, top_k=3)) == [0, 4, 7]
    assert keep(filter_logits(row, top_p=0.4)) == [4]  # 0.53 alone reaches 0.4
    assert keep(filter_logits(row, top_p=0.6)) == [0, 4]  # 0.53 < 0.6 <= 0.53 + 0.20
    assert keep(filter_logits(row, min_p=0.3)) == [0, 4]  # p / p_max: exp(-1) = 0.37 stays, exp(-1.5) = 0.22 goes
    ties = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    assert keep(filter_logits(ties, top_k=1)) == [1, 2]  # ties at the k-th value are kept


# ----- sample_next_tokens follows softmax(logits / T) ----------------------------------------------------------------------
LOGITS = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -2.0, 1.5, 0.7])
DRAWS = 20000


def max_z(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Largest |observed - expected| frequency in standard errors sqrt(p (1 - p) / N), over tokens with p > 0."""
    freq = counts.double() / DRAWS
    se = (probs * (1 - probs) / DRAWS).sqrt()
    assert (counts[probs == 0] == 0).all()  # a token of probability 0 never appears
    live = probs > 0
    return float(((freq - probs)[live] / se[live]).abs().max())


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [
    (0.7, 0, 1.0, 0.0), (1.0, 0, 1.0, 0.0), (1.8, 0, 1.0, 0.0),
    (0.7, 3, 1.0, 0.0), (1.3, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.2), (1.3, 5, 0.9, 0.0),
])
def test_sample_frequencies_follow_the_filtered_softmax(temperature, top_k, top_p, min_p):
    """N = 20000 draws (one row per draw) from one row of logits: token frequencies match
    softmax(logits / T) renormalised over the tokens the filters keep (applied to logits / T), within 4.5
    standard errors; filtered tokens never appear; the log-probs returned are the unfiltered
    log_softmax(logits / T) of the drawn tokens."""
    logits = LOGITS.expand(DRAWS, -1)  # [N, v]
    tokens, logps = sample_next_tokens(logits, temperature, top_k, top_p, min_p, torch.Generator().manual_seed(0))
    scaled = (LOGITS.double() / temperature).tolist()
    kept = ref_kept(scaled, top_k, top_p, min_p)
    kept_probs = softmax({j: scaled[j] for j in kept})
    probs = torch.tensor([kept_probs.get(j, 0.0) for j in range(8)], dtype=torch.float64)
    counts = torch.bincount(tokens, minlength=8)
    assert max_z(counts, probs) < 4.5
    # The check has power: the unscaled softmax (T = 1) or the unfiltered one is rejected by far.
    wrong = torch.softmax(LOGITS.double() / (1.0 if temperature != 1.0 else 0.7), -1)
    if len(kept) == 8:
        assert max_z(counts, wrong) > 10
    else:
        assert (counts[probs == 0] == 0).all() and not set(range(8)) <= set(tokens.tolist())
    expected_logps = torch.log_softmax(LOGITS / temperature, -1)[tokens]  # [N], the policy's own log-probs
    torch.testing.assert_close(logps, expected_logps, rtol=0, atol=1e-6)


def test_sample_greedy_takes_the_argmax_and_logps_at_t1():
    logits = torch.stack([LOGITS, LOGITS.flip(0), -LOGITS])  # [3, v]
    tokens, logps = sample_next_tokens(logits, 0.0, 0, 1.0, 0.0, None)
    assert tokens.tolist() == logits.argmax(-1).tolist()
    torch.testing.assert_close(logps, logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1),
                               rtol=0, atol=0)
