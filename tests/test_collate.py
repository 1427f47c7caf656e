"""data/collate.py: best-fit-decreasing packing against a brute-force optimum, packed rows, and the
exact tensors the collators build (right/left padding, packed rows, flattened batches)."""

from __future__ import annotations

import random
from functools import cache

import pytest
import torch
from datasets import Dataset

from tether.data import DatasetError, LanguageModelingCollator, Seq2SeqCollator, pack_best_fit_decreasing
from tether.data.collate import pack_examples
from tether.data.prepare import prepare_language_modeling


def optimal_bins(lengths: list[int], capacity: int) -> int:
    """Fewest bins, by trying every assignment (items in decreasing order; an item goes into an open
    bin with room or one new bin; bins with equal room are interchangeable)."""
    items = sorted(lengths, reverse=True)

    @cache
    def solve(i: int, rooms: tuple[int, ...]) -> int:
        if i == len(items):
            return len(rooms)
        options = [solve(i + 1, tuple(sorted(rooms[:j] + (rooms[j] - items[i],) + rooms[j + 1:])))
                   for j in range(len(rooms)) if rooms[j] >= items[i] and rooms[j] not in rooms[:j]]
        options.append(solve(i + 1, tuple(sorted(rooms + (capacity - items[i],)))))
        return min(options)

    return solve(0, ())


def check_bins(bins, lengths, capacity):
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # each index exactly once
    assert all(b and sum(lengths[i] for i in b) <= capacity for b in bins)


def test_bfd_hand_example_prefers_the_tightest_bin():
    # capacity 10, lengths 7, 4, 4, 1 (already decreasing):
    #   7 -> new bin A (room 3); 4 -> new bin B (room 6); 4 -> B (room 2);
    #   1 -> fits A (room 3) and B (room 2): best fit takes B, the one with the least room left.
    # (First fit decreasing would put the 1 into A.)
    assert pack_best_fit_decreasing([7, 4, 4, 1], 10) == [[0], [1, 2, 3]]
    # Longest first, whatever the input order; ties keep index order.
    assert pack_best_fit_decreasing([1, 4, 7, 4], 10) == [[2], [1, 3, 0]]
    assert pack_best_fit_decreasing([3, 3, 3], 3) == [[0], [1], [2]]
    assert pack_best_fit_decreasing([], 5) == []


def test_bfd_perfect_fit():
    lengths = [6, 4, 5, 5, 3, 7]  # 7+3, 6+4, 5+5
    bins = pack_best_fit_decreasing(lengths, 10)
    check_bins(bins, lengths, 10)
    assert sorted(sorted(lengths[i] for i in b) for b in bins) == [[3, 7], [4, 6], [5, 5]]


def test_bfd_too_long_example():
    with pytest.raises(DatasetError, match="Example 1 has 11 tokens, more than the packing length 10"):
        pack_best_fit_decreasing([3, 11], 10)


def test_bfd_against_brute_force_optimum():
    rng = random.Random(0)
    at_optimum = 0
    trials = 150
    for _ in range(trials):
        capacity = rng.randint(5, 20)
        lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 8))]
        bins = pack_best_fit_decreasing(lengths, capacity)
        check_bins(bins, lengths, capacity)
        opt = optimal_bins(lengths, capacity)
        assert opt >= -(-sum(lengths) // capacity)  # the brute force respects the volume bound
        # Dosa (2007): BFD <= 11/9 OPT + 6/9, and for these sizes never more than one bin over.
        assert len(bins) <= min((11 * opt + 6) // 9, opt + 1), (lengths, capacity)
        at_optimum += len(bins) == opt
    assert at_optimum >= 0.9 * trials


def test_bfd_equal_to_optimum_on_easy_instances():
    rng = random.Random(1)
    for _ in range(50):
        # Items larger than half the capacity never share a bin: OPT = their count, and each small item
        # (<= capacity - the largest) fits with some large one.
        capacity = 20
        large = [rng.randint(11, 16) for _ in range(rng.randint(1, 5))]
        small = [rng.randint(1, 4) for _ in range(len(large))]
        lengths = rng.sample(large + small, len(large) + len(small))
        assert len(pack_best_fit_decreasing(lengths, capacity)) == len(large)
        assert optimal_bins(lengths, capacity) == len(large)


def test_pack_examples_rows_and_positions():
    seqs = [[10, 11, 12, 13], [20, 21], [30, 31, 32], [40], [50, 51, 52, 53, 54]]
    masks = [[False] + [True] * (len(s) - 1) for s in seqs]
    extra = [[i] * len(s) for i, s in enumerate(seqs)]  # any other per-token column is packed alike
    packed = pack_examples({"input_ids": seqs, "loss_mask": masks, "extra": extra}, capacity=6)
    bins = pack_best_fit_decreasing([len(s) for s in seqs], 6)
    assert len(packed["input_ids"]) == len(bins)
    for row, members in enumerate(bins):
        assert packed["input_ids"][row] == [t for i in members for t in seqs[i]]
        assert packed["loss_mask"][row] == [m for i in members for m in masks[i]]
        assert packed["extra"][row] == [e for i in members for e in extra[i]]
        assert packed["position_ids"][row] == [p for i in members for p in range(len(seqs[i]))]
        assert len(packed["input_ids"][row]) <= 6
    # Every sequence is found again by splitting rows where positions restart at 0.
    found = []
    for ids, pos in zip(packed["input_ids"], packed["position_ids"], strict=True):
        starts = [j for j, p in enumerate(pos) if p == 0] + [len(pos)]
        found += [ids[a:b] for a, b in zip(starts, starts[1:], strict=False)]
    assert sorted(found) == sorted(seqs)


def test_prepare_with_packing(tokenizer):
    texts = ["hello world", "two plus two is four.", "the capital of france is paris.", "0 1 2 3", "hello"]
    ds = Dataset.from_dict({"text": texts})
    unpacked = prepare_language_modeling(ds, tokenizer, max_length=16)
    packed = prepare_language_modeling(ds, tokenizer, max_length=16, packing=True)
    assert packed.column_names == ["input_ids", "loss_mask", "position_ids"]
    assert len(packed) < len(unpacked) and all(len(r) <= 16 for r in packed["input_ids"])
    pieces = []
    for row in packed:
        pos = row["position_ids"]
        starts = [j for j, p in enumerate(pos) if p == 0] + [len(pos)]
        for a, b in zip(starts, starts[1:], strict=False):
            pieces.append((row["input_ids"][a:b], row["loss_mask"][a:b]))
    assert sorted(pieces) == sorted(zip(unpacked["input_ids"], unpacked["loss_mask"], strict=True))


# ---------------------------------------------------------------------------------------- collators

EXAMPLES = [
    {"input_ids": [5, 6, 7], "loss_mask": [False, True, True]},
    {"input_ids": [8, 9], "loss_mask": [False, True]},
]


def _lists(batch):
    return {k: v.tolist() for k, v in batch.items()}


def test_collate_right_padding():
    batch = LanguageModelingCollator(pad_token_id=0)(EXAMPLES)
    assert batch["input_ids"].dtype == torch.long and batch["loss_mask"].dtype == torch.bool
    assert _lists(batch) == {
        "input_ids": [[5, 6, 7], [8, 9, 0]],
        "loss_mask": [[False, True, True], [False, True, False]],
        "attention_mask": [[1, 1, 1], [1, 1, 0]],
    }


def test_collate_left_padding_and_multiple_of():
    batch = LanguageModelingCollator(pad_token_id=0, padding_side="left", pad_to_multiple_of=4)(EXAMPLES)
    assert _lists(batch) == {
        "input_ids": [[0, 5, 6, 7], [0, 0, 8, 9]],
        "loss_mask": [[False, False, True, True], [False, False, False, True]],
        "attention_mask": [[0, 1, 1, 1], [0, 0, 1, 1]],
    }


def test_collate_first_token_is_never_a_target():
    examples = [{"input_ids": [5, 6], "loss_mask": [True, True]}]
    assert LanguageModelingCollator(0)(examples)["loss_mask"].tolist() == [[False, True]]


PACKED = [
    # two sequences (3 + 2 tokens); the second one's first token is marked True by mistake
    {"input_ids": [5, 6, 7, 8, 9], "loss_mask": [False, True, True, True, True],
     "position_ids": [0, 1, 2, 0, 1]},
    {"input_ids": [3, 4], "loss_mask": [False, True], "position_ids": [0, 1]},
]


def test_collate_packed_right():
    batch = LanguageModelingCollator(pad_token_id=0)(PACKED)
    assert _lists(batch) == {
        "input_ids": [[5, 6, 7, 8, 9], [3, 4, 0, 0, 0]],
        # A sequence's first token (position 0) never counts, whatever the example said.
        "loss_mask": [[False, True, True, False, True], [False, True, False, False, False]],
        # The padding tail is one more sequence, positions from 0; no attention_mask.
        "position_ids": [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]],
    }


def test_collate_packed_left():
    batch = LanguageModelingCollator(pad_token_id=0, padding_side="left")(PACKED)
    assert _lists(batch) == {
        "input_ids": [[5, 6, 7, 8, 9], [0, 0, 0, 3, 4]],
        "loss_mask": [[False, True, True, False, True], [False, False, False, False, True]],
        # The padding comes first here, so its positions do too; the sequence still starts at 0.
        "position_ids": [[0, 1, 2, 0, 1], [0, 1, 2, 0, 1]],
    }


def test_collate_flatten():
    batch = LanguageModelingCollator(pad_token_id=0, flatten=True)(EXAMPLES)
    assert _lists(batch) == {
        "input_ids": [[5, 6, 7, 8, 9]],
        "loss_mask": [[False, True, True, False, True]],
        "position_ids": [[0, 1, 2, 0, 1]],
    }
    collator = LanguageModelingCollator(pad_token_id=0, flatten=True, pad_to_multiple_of=8)
    batch = collator(EXAMPLES + PACKED[1:])
    assert _lists(batch) == {
        "input_ids": [[5, 6, 7, 8, 9, 3, 4, 0]],
        "loss_mask": [[False, True, True, False, True, False, True, False]],
        "position_ids": [[0, 1, 2, 0, 1, 0, 1, 0]],
    }


def test_collate_rejects_unknown_padding_side():
    with pytest.raises(ValueError, match="padding_side"):
        LanguageModelingCollator(pad_token_id=0, padding_side="Left")


def test_seq2seq_collator():
    batch = Seq2SeqCollator(pad_token_id=0)([
        {"input_ids": [5, 6, 7], "labels": [8, 1]},
        {"input_ids": [9], "labels": [4, 5, 1]},
    ])
    assert _lists(batch) == {
        "input_ids": [[5, 6, 7], [9, 0, 0]],
        "attention_mask": [[1, 1, 1], [1, 0, 0]],
        "labels": [[8, 1, 0], [4, 5, 1]],
        "decoder_attention_mask": [[1, 1, 0], [1, 1, 1]],
        "decoder_loss_mask": [[True, True, False], [True, True, True]],
    }
