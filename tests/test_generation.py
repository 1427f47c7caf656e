"""Rollout generation: batched left-padded generation equals one query at a time, each response stops at
its own EOS (kept), return_prompt, length_sampler, encoder-decoder responses, respond_to_batch's fixed
length, and truncate_after_eos on hand-made rows.

Shapes: b = batch, q = query tokens, r = response tokens.
"""

from __future__ import annotations

import pytest
import torch

from tether import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead, respond_to_batch
from tether.rollout.generation import generate_responses, truncate_after_eos

PAD = 0


def queries() -> list[torch.Tensor]:
    """Four queries of different lengths (so the batch is left-padded), no special tokens."""
    return [torch.tensor(ids) for ids in ([338, 310, 340, 289, 373, 304, 274], [72, 361], [5, 17, 42, 99],
                                           [120, 121, 122, 123, 124, 125, 126, 127, 128, 129])]


GREEDY = dict(do_sample=False, max_new_tokens=8)


# ----- truncate_after_eos ---------------------------------------------------------------------------------
def test_truncate_after_eos():
    row = torch.tensor([5, 6, 1, 7, 1, 0, 0])
    assert truncate_after_eos(row, [1]).tolist() == [5, 6, 1]  # first EOS kept, the rest dropped
    assert truncate_after_eos(row, [7, 1]).tolist() == [5, 6, 1]  # any of several EOS ids
    assert truncate_after_eos(row, [9]).tolist() == row.tolist()  # no EOS: untouched
    assert truncate_after_eos(row, []).tolist() == row.tolist()
    assert truncate_after_eos(torch.tensor([1, 5]), [1]).tolist() == [1]


# ----- batched == one at a time; EOS ------------------------------------------------------------------------
def test_batched_left_padded_greedy_equals_one_at_a_time(tiny_decoder):
    batched = generate_responses(tiny_decoder, queries(), PAD, batch_size=4, eos_token_id=None, **GREEDY)
    for query, response in zip(queries(), batched):
        alone = generate_responses(tiny_decoder, [query], PAD, batch_size=1, eos_token_id=None, **GREEDY)[0]
        assert response.shape == (8,)
        assert torch.equal(response, alone)
        # and both equal the model's own unpadded greedy continuation
        direct = tiny_decoder.generate(input_ids=query[None], attention_mask=torch.ones_like(query[None]),
                                       pad_token_id=PAD, eos_token_id=None, **GREEDY)[0, len(query):]
        assert torch.equal(response, direct)


def test_each_response_stops_at_its_own_eos(tiny_decoder):
    full = generate_responses(tiny_decoder, queries(), PAD, batch_size=4, eos_token_id=None, **GREEDY)
    # Call the token that query 0 emits third "EOS": row 0 must stop there, the others where they emit it.
    eos = int(full[0][2])
    assert eos not in full[0][:2].tolist()
    stopped = generate_responses(tiny_decoder, queries(), PAD, batch_size=4, eos_token_id=eos, **GREEDY)
    for before, after in zip(full, stopped):
        hits = (before == eos).nonzero()
        expected = before[: int(hits[0]) + 1] if len(hits) else before  # cut after the first EOS, EOS kept
        assert torch.equal(after, expected)
    assert len(stopped[0]) == 3 and stopped[0][-1] == eos
    assert any(len(r) == 8 for r in stopped), "some row should run to max_new_tokens (no EOS in it)"


def test_return_prompt_and_length_sampler(tiny_decoder):
    plain = generate_responses(tiny_decoder, queries(), PAD, batch_size=4, eos_token_id=None, **GREEDY)
    with_prompt = generate_responses(tiny_decoder, queries(), PAD, batch_size=4, return_prompt=True,
                                     eos_token_id=None, **GREEDY)
    for query, response, both in zip(queries(), plain, with_prompt):
        assert torch.equal(both, torch.cat([query, response]))

    lengths = iter([3, 5])
    calls = []

    def sampler() -> int:
        calls.append(1)
        return next(lengths)

    sampled = generate_responses(tiny_decoder, queries(), PAD, batch_size=2, length_sampler=sampler,
                                 eos_token_id=None, do_sample=False, max_new_tokens=50)
    assert len(calls) == 2  # once per generation batch
    assert [len(r) for r in sampled] == [3, 3, 5, 5]
    for short, long in zip(sampled, plain):
        assert torch.equal(short, long[: len(short)])  # greedy: a prefix of the longer run


def test_generation_restores_training_mode_and_checks_queries(tiny_decoder):
    tiny_decoder.train()
    generate_responses(tiny_decoder, queries()[:1], PAD, max_new_tokens=2)
    assert tiny_decoder.training
    with pytest.raises(ValueError, match="1-D"):
        generate_responses(tiny_decoder, [torch.tensor([[5, 6]])], PAD, max_new_tokens=2)
    with pytest.raises(ValueError, match="non-empty"):
        generate_responses(tiny_decoder, [torch.tensor([], dtype=torch.long)], PAD, max_new_tokens=2)
    with pytest.raises(ValueError, match="No queries"):
        generate_responses(tiny_decoder, [], PAD, max_new_tokens=2)


def test_value_head_model_generates_like_its_lm(tiny_decoder_dir, tiny_decoder):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir)
    got = generate_responses(model, queries(), PAD, batch_size=4, eos_token_id=None, **GREEDY)
    expected = generate_responses(tiny_decoder, queries(), PAD, batch_size=4, eos_token_id=None, **GREEDY)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


# ----- encoder-decoder --------------------------------------------------------------------------------------
def test_seq2seq_responses_are_decoder_tokens_from_the_start_token(tiny_seq2seq_dir):
    model = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(tiny_seq2seq_dir).pretrained_model
    start = model.config.decoder_start_token_id
    responses = generate_responses(model, queries(), PAD, batch_size=4, eos_token_id=None, do_sample=True,
                                   max_new_tokens=6)
    for query, response in zip(queries(), responses):
        assert response[0] == start and len(response) == 7  # start token + 6 new tokens
        alone = model.generate(input_ids=query[None], do_sample=False, max_new_tokens=6, eos_token_id=None)[0]
        assert len(alone) == 7 and alone[0] == start
    with pytest.raises(ValueError, match="return_prompt"):
        generate_responses(model, queries(), PAD, return_prompt=True, max_new_tokens=2)


# ----- respond_to_batch -------------------------------------------------------------------------------------
@pytest.mark.parametrize("txt_len", [1, 7])
def test_respond_to_batch_returns_exactly_txt_len_tokens(tiny_decoder_dir, txt_len):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir)
    batch = torch.tensor([[338, 310, 340], [72, 361, 5]])
    # Make EOS the model's favourite first token: top_k=1 would stop at once if EOS were honoured.
    first = respond_to_batch(model, batch, txt_len=1, top_k=1)
    model.pretrained_model.generation_config.eos_token_id = int(first[0, 0])
    torch.manual_seed(0)
    out = respond_to_batch(model, batch, txt_len=txt_len, top_k=1)
    assert out.shape == (2, txt_len) and out.dtype == torch.long
    assert not (out == int(first[0, 0])).any()  # EOS is never sampled: every row runs txt_len tokens
    sampled = respond_to_batch(model, batch, txt_len=txt_len)  # plain sampling (no top-k, no top-p)
    assert sampled.shape == (2, txt_len)


def test_classic_keywords_with_a_length_sampler_take_tethers_sampler(tiny_decoder, monkeypatch):
    """TRL's usual gen_kwargs (min_length=-1, top_k=0.0, top_p=1.0) with a length sampler mean plain sampling:
    tether's sampler serves them; model.generate is never called."""
    monkeypatch.setattr(tiny_decoder, "generate", lambda *a, **k: pytest.fail("model.generate was called"))
    lengths = iter([3, 5])
    out = generate_responses(tiny_decoder, queries(), PAD, batch_size=2, length_sampler=lambda: next(lengths),
                             min_length=-1, top_k=0.0, top_p=1.0, do_sample=True, eos_token_id=None)
    assert [len(r) for r in out] == [3, 3, 5, 5]  # no EOS: each batch runs to its own drawn length
