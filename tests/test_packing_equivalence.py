"""Packed == padded == padding-free: the summed log-probs of each sequence do not depend on how the
batch was built.

Packed rows carry `position_ids` that restart at 0 for each sequence and no attention_mask;
transformers (masking_utils.find_packed_sequence_indices) turns the restarts into a block-diagonal
causal mask, so no sequence attends to another. Checked with SDPA and eager attention, against each
sequence run alone through the model (the slow, obvious reference).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tether.data import LanguageModelingCollator, pack_best_fit_decreasing
from tether.data.collate import pack_examples
from tether.models.forward import causal_token_log_probs

# Six sequences of different lengths (ids within the tiny vocabulary), loss masks with a masked prompt.
SEQUENCES = [
    [5, 17, 33, 41, 9, 1],
    [7, 8, 9],
    [12, 40, 80, 120, 160, 200, 240, 1],
    [300, 301, 302, 303],
    [250, 60, 61, 62, 63, 64, 65, 66, 67, 1],
    [90, 91],
]
PROMPT_LENGTHS = [2, 1, 3, 1, 4, 1]
LOSS_MASKS = [[False] * p + [True] * (len(s) - p) for s, p in zip(SEQUENCES, PROMPT_LENGTHS, strict=True)]
CAPACITY = 17  # total 33 tokens: two or three rows


@pytest.fixture(params=["sdpa", "eager"])
def model(request, tiny_decoder_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir, attn_implementation=request.param)
    assert model.config._attn_implementation == request.param
    return model.eval()


def alone(model) -> torch.Tensor:
    """Per-sequence sum of log p(token_j | tokens_<j) over loss-masked j, each sequence run by itself."""
    sums = []
    with torch.no_grad():
        for seq, mask in zip(SEQUENCES, LOSS_MASKS, strict=True):
            logits = model(input_ids=torch.tensor([seq])).logits[0]  # [t, v]
            logp = torch.log_softmax(logits[:-1].float(), -1).gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
            sums.append(logp[torch.tensor(mask[1:])].sum())
    return torch.stack(sums)


def examples():
    return [{"input_ids": s, "loss_mask": m} for s, m in zip(SEQUENCES, LOSS_MASKS, strict=True)]


def packed_rows():
    packed = pack_examples({"input_ids": SEQUENCES, "loss_mask": LOSS_MASKS}, CAPACITY)
    bins = pack_best_fit_decreasing([len(s) for s in SEQUENCES], CAPACITY)
    rows = [dict(zip(packed, values, strict=True)) for values in zip(*packed.values(), strict=True)]
    return rows, bins


def per_sequence(out, position_ids, owners) -> torch.Tensor:
    """Sum the token log-probs of a packed/flattened batch per original sequence: a token belongs to
    the k-th sequence of its row, k = number of position restarts up to it, minus one."""
    seq_in_row = (position_ids == 0).cumsum(-1) - 1  # [b, t]
    sums = torch.zeros(len(SEQUENCES))
    for logp, row, pos in zip(out.logps, out.rows, out.positions, strict=True):
        sums[owners[int(row)][int(seq_in_row[row, pos])]] += logp
    return sums


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_batch_equals_sequences_alone(model, padding_side):
    batch = LanguageModelingCollator(pad_token_id=0, padding_side=padding_side)(examples())
    with torch.no_grad():
        out = causal_token_log_probs(model, batch)
    torch.testing.assert_close(out.sum_per_row(len(SEQUENCES)), alone(model), atol=1e-4, rtol=0)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_packed_batch_equals_sequences_alone(model, padding_side):
    rows, bins = packed_rows()
    assert 2 <= len(rows) < len(SEQUENCES) and any(len(b) > 2 for b in bins)
    batch = LanguageModelingCollator(pad_token_id=0, padding_side=padding_side)(rows)
    assert "attention_mask" not in batch
    assert batch["input_ids"].shape[1] > min(len(r["input_ids"]) for r in rows)  # some row is padded
    with torch.no_grad():
        out = causal_token_log_probs(model, batch)
    # Every loss-masked token is scored exactly once.
    assert len(out.logps) == sum(sum(m[1:]) for m in LOSS_MASKS)
    # A left-padded row starts with its padding, one more "sequence" (it holds no target).
    width = batch["input_ids"].shape[1]
    left = padding_side == "left"
    owners = [[None, *b] if left and len(r["input_ids"]) < width else b
              for r, b in zip(rows, bins, strict=True)]
    sums = per_sequence(out, batch["position_ids"], owners)
    torch.testing.assert_close(sums, alone(model), atol=1e-4, rtol=0)


def test_flattened_batch_equals_sequences_alone(model):
    batch = LanguageModelingCollator(pad_token_id=0, flatten=True)(examples())
    assert batch["input_ids"].shape == (1, sum(map(len, SEQUENCES)))
    with torch.no_grad():
        out = causal_token_log_probs(model, batch)
    sums = per_sequence(out, batch["position_ids"], [list(range(len(SEQUENCES)))])
    torch.testing.assert_close(sums, alone(model), atol=1e-4, rtol=0)


def test_packed_rows_need_their_position_ids(model):
    """The check above can fail: the same packed rows with an all-ones attention_mask and default
    positions let later sequences attend to earlier ones, and their log-probs change."""
    rows, bins = packed_rows()
    batch = LanguageModelingCollator(pad_token_id=0)(rows)
    position_ids = batch.pop("position_ids")
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    with torch.no_grad():
        out = causal_token_log_probs(model, batch)
    diff = (per_sequence(out, position_ids, bins) - alone(model)).abs()
    first = [b[0] for b in bins]  # the first sequence of each row sees nothing else: unchanged
    later = [i for b in bins for i in b[1:]]
    assert diff[first].max() < 1e-4 and diff[later].min() > 1e-3


def test_model_logits_on_packed_row_equal_sequences_alone(model):
    """The transformers side on its own: full logits of one packed row, position_ids only.

    use_cache=False is required: with a cache (the default whenever config.use_cache is set, in
    training too), transformers 5 skips the packed-sequence detection and the sequences attend to
    each other. models/forward.py passes use_cache=False; any other caller of a packed batch must too.
    """
    ids = [t for s in SEQUENCES[:3] for t in s]
    positions = [p for s in SEQUENCES[:3] for p in range(len(s))]
    with torch.no_grad():
        packed = model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([positions]),
                       use_cache=False).logits[0]
        start = 0
        for seq in SEQUENCES[:3]:
            single = model(input_ids=torch.tensor([seq])).logits[0]
            torch.testing.assert_close(packed[start:start + len(seq)], single, atol=1e-5, rtol=1e-5)
            start += len(seq)


def test_packed_preference_batches_match_padded(tiny_decoder_dir, tokenizer):
    """Reward scores and completion log-probs of packed preference batches equal the padded ones."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from tether.data.preference import PreferenceCollator
    from tether.demo.corpus import preference_pairs
    from tether.models.forward import completion_log_probs
    from tether.models.scoring import batch_sequence_scores

    rows = []
    for pair in preference_pairs(5, seed=7):
        prompt = tokenizer(pair["prompt"]).input_ids
        row = {}
        for side in ("chosen", "rejected"):
            completion = tokenizer(pair[side], add_special_tokens=False).input_ids
            row[f"{side}_input_ids"] = prompt + completion
            row[f"{side}_loss_mask"] = [False] * len(prompt) + [True] * len(completion)
        rows.append(row)
    padded = PreferenceCollator(tokenizer.pad_token_id)(rows)
    packed = PreferenceCollator(tokenizer.pad_token_id, pack_to=64)(rows)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # sequences really share rows
    torch.manual_seed(0)
    scorer = AutoModelForSequenceClassification.from_pretrained(tiny_decoder_dir, num_labels=1).eval()
    lm = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(batch_sequence_scores(scorer, packed), batch_sequence_scores(scorer, padded),
                                   atol=1e-5, rtol=1e-5)
        sums_packed, counts_packed, _ = completion_log_probs(lm, packed)
        sums_padded, counts_padded, _ = completion_log_probs(lm, padded)
    assert torch.equal(counts_packed, counts_padded)
    torch.testing.assert_close(sums_packed, sums_padded, atol=1e-4, rtol=1e-5)
