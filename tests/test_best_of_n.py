"""BestOfNSampler: n samples per query in one batch, scored, the best kept. Checked against scoring every
sample in the test; one length draw per query; seeding; TRL's query forms; generation_config; bad input.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from tether import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead
from tether.rollout.best_of_n import BestOfNSampler


class Recorder:
    """queries_to_scores that prefers the letter 'e' (count, then length as a tie-break fraction), keeping
    every (texts, scores) call so the test can pick the best itself."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[float]]] = []

    def __call__(self, texts: list[str]) -> list[float]:
        scores = [text.count("e") + len(text) / 1000 for text in texts]
        self.calls.append((list(texts), scores))
        return scores


class Lengths:
    """A length sampler that cycles through fixed values and records its draws."""

    def __init__(self, values=(3, 6, 4)) -> None:
        self.values, self.drawn = values, []

    def __call__(self) -> int:
        self.drawn.append(self.values[len(self.drawn) % len(self.values)])
        return self.drawn[-1]


@pytest.fixture()
def model(tiny_decoder_dir):
    return AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir)


QUERIES = [torch.tensor([5, 17, 42]), torch.tensor([8, 9]), torch.tensor([20, 21, 22, 23])]
SAMPLING = {"do_sample": True, "top_k": 0, "top_p": 1.0}


@pytest.mark.parametrize("n_candidates", [1, 3])
def test_returns_the_best_scored_samples(model, tokenizer, n_candidates):
    scorer, lengths = Recorder(), Lengths()
    sampler = BestOfNSampler(model, tokenizer, scorer, length_sampler=lengths, sample_size=5,
                             n_candidates=n_candidates, seed=0)
    best = sampler.generate(QUERIES, **SAMPLING)
    assert len(best) == 3 and all(len(texts) == n_candidates for texts in best)
    assert len(scorer.calls) == 3 and lengths.drawn == [3, 6, 4]  # one scoring call and one length per query
    for query, texts, (samples, scores) in zip(QUERIES, best, scorer.calls):
        assert len(samples) == 5
        prompt = tokenizer.decode(query.tolist(), skip_special_tokens=True)
        assert all(sample.startswith(prompt) for sample in samples)  # query + response, as TRL decoded them
        ranked = sorted(range(5), key=lambda i: -scores[i])
        assert texts == [samples[i] for i in ranked[:n_candidates]]
        assert len(set(samples)) > 1  # sampled, not five copies of one text


def test_one_batch_per_query_with_its_own_length(model, tokenizer, monkeypatch):
    import tether.rollout.best_of_n as best_of_n

    batches = []

    def spy(model, queries, pad_token_id, batch_size, length_sampler, **kwargs):
        def draw() -> int:
            batches.append(length_sampler())
            return batches[-1]

        return generate_responses(model, queries, pad_token_id, batch_size=batch_size, length_sampler=draw, **kwargs)

    generate_responses = best_of_n.generate_responses
    outputs = []
    monkeypatch.setattr(best_of_n, "generate_responses", lambda *a, **k: outputs.extend(spy(*a, **k)) or outputs)
    BestOfNSampler(model, tokenizer, Recorder(), Lengths(), sample_size=4, seed=0).generate(QUERIES, **SAMPLING)
    assert batches == [3, 6, 4] and len(outputs) == 12
    for i, output in enumerate(outputs):  # rows 4g..4g+3 answer query g, within its drawn length
        query = QUERIES[i // 4]
        assert torch.equal(output[: len(query)], query) and 0 < len(output) - len(query) <= batches[i // 4]


def test_seed_repeats_the_samples(model, tokenizer):
    results = []
    for _ in range(2):
        scorer = Recorder()
        BestOfNSampler(model, tokenizer, scorer, Lengths(), sample_size=4, seed=3).generate(QUERIES[:2], **SAMPLING)
        results.append(scorer.calls)
    assert results[0] == results[1]


def test_query_forms(model, tokenizer):
    """One query as a tensor or a list of ids; several as a list of tensors, of lists, or a 2-D tensor."""
    config = GenerationConfig(do_sample=False, max_new_tokens=4)
    sampler = BestOfNSampler(model, tokenizer, Recorder(), length_sampler=None, sample_size=2,
                             generation_config=config)
    one = sampler.generate(torch.tensor([5, 17, 42]))
    assert one == sampler.generate([5, 17, 42]) and len(one) == 1
    several = sampler.generate([torch.tensor([5, 17, 42]), torch.tensor([8, 9, 10])])
    assert several == sampler.generate([[5, 17, 42], [8, 9, 10]]) == sampler.generate(torch.tensor([[5, 17, 42],
                                                                                                  [8, 9, 10]]))
    assert several[0] == one[0]
    # greedy: both samples of a query are the same text, the LM's own greedy continuation
    expected = model.generate(input_ids=torch.tensor([[5, 17, 42]]), max_new_tokens=4, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)
    assert one[0][0] == tokenizer.decode(expected[0], skip_special_tokens=True)


def test_generation_kwargs_override_the_config(model, tokenizer):
    scorer = Recorder()
    sampler = BestOfNSampler(model, tokenizer, scorer, length_sampler=None, sample_size=3,
                             generation_config=GenerationConfig(do_sample=False, max_new_tokens=4))
    sampler.generate(QUERIES[:1], do_sample=True, top_k=0)
    assert len(set(scorer.calls[0][0])) > 1  # sampled despite the greedy config


def test_encoder_decoder_texts_are_the_responses(tiny_seq2seq_dir, tokenizer):
    model = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(tiny_seq2seq_dir)
    scorer = Recorder()
    best = BestOfNSampler(model, tokenizer, scorer, Lengths((5,)), sample_size=3, seed=0).generate(
        QUERIES[:2], **SAMPLING)
    assert len(best) == 2 and len(scorer.calls) == 2
    for texts, (samples, scores) in zip(best, scorer.calls):
        assert texts == [samples[max(range(3), key=lambda i: (scores[i], -i))]]


def test_bad_input(model, tokenizer):
    def make(**overrides):
        values = dict(model=model, tokenizer=tokenizer, queries_to_scores=Recorder(), length_sampler=Lengths())
        return BestOfNSampler(**{**values, **overrides})

    with pytest.raises(ValueError, match="model must be"):
        make(model=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="tokenizer must be"):
        make(tokenizer="gpt2")
    with pytest.raises(ValueError, match="queries_to_scores must be callable"):
        make(queries_to_scores=[1.0])
    with pytest.raises(ValueError, match="length_sampler must be callable"):
        make(length_sampler=8)
    with pytest.raises(ValueError, match="sample_size"):
        make(sample_size=0)
    with pytest.raises(ValueError, match="n_candidates must be between 1 and sample_size=4"):
        make(n_candidates=5)
    with pytest.raises(ValueError, match="generation_config"):
        make(generation_config={"do_sample": True})
    sampler = make()
    with pytest.raises(ValueError, match="non-empty"):
        sampler.generate([])
    with pytest.raises(ValueError, match="Query 1"):
        sampler.generate([torch.tensor([5, 6]), torch.tensor([], dtype=torch.long)])
    with pytest.raises(ValueError, match="1-D"):
        sampler.generate(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="max_new_tokens"):
        make(length_sampler=None).generate([5, 6])
    with pytest.raises(ValueError, match="one number per text: got 1 values for 4 texts"):
        make(queries_to_scores=lambda texts: [1.0]).generate([5, 6])


def test_trl_docs_usage(model, tokenizer):
    """best_of_n.mdx / the notebook: LengthSampler, TRL's gen_kwargs (min_length=-1, top_k=0.0, pad = EOS)."""
    from tether.core import LengthSampler
    from tether.extras import BestOfNSampler as ExtrasSampler

    assert ExtrasSampler is BestOfNSampler
    scorer = Recorder()
    best_of_n = ExtrasSampler(model, tokenizer, scorer, length_sampler=LengthSampler(4, 16), sample_size=8,
                              n_candidates=2)
    gen_kwargs = {"min_length": -1, "top_k": 0.0, "top_p": 1.0, "do_sample": True,
                  "pad_token_id": tokenizer.eos_token_id}
    best = best_of_n.generate([query.tolist() for query in QUERIES], device="cpu", **gen_kwargs)
    assert [len(texts) for texts in best] == [2, 2, 2]
    for texts, (samples, scores) in zip(best, scorer.calls):
        assert len(samples) == 8 and texts == [samples[i] for i in sorted(range(8), key=lambda i: -scores[i])[:2]]
