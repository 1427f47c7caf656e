"""Batches from tokenized examples: padded, packed, or padding-free.

Each example is a dict with `input_ids` and `loss_mask` (lists), and after packing `position_ids`.
Batches carry `input_ids`, `loss_mask` (bool, True where a token counts) and either `attention_mask`
(padded) or `position_ids` (packed: each run of positions starting at 0 is its own sequence, and the
model's mask keeps sequences from attending to each other).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .formats import DatasetError


def pack_best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group example indices into bins of total length <= capacity, best fit decreasing.

    Longest examples first; each goes into the open bin with the least room left that still fits it.
    """
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[index]
        if length > capacity:
            raise DatasetError(f"Example {index} has {length} tokens, more than the packing length {capacity}.")
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            room, bin_index = free.pop(slot)
            bins[bin_index].append(index)
            room -= length
        else:
            bins.append([index])
            bin_index, room = len(bins) - 1, capacity - length
        if room > 0:
            bisect.insort(free, (room, bin_index))
    return bins


def pack_examples(columns: dict[str, list[list[Any]]], capacity: int) -> dict[str, list[list[Any]]]:
    """Batched `datasets.map` function: concatenate examples into bins, adding `position_ids`."""
    lengths = [len(ids) for ids in columns["input_ids"]]
    packed: dict[str, list[list[Any]]] = {key: [] for key in columns}
    packed["position_ids"] = []
    for members in pack_best_fit_decreasing(lengths, capacity):
        for key, values in columns.items():
            packed[key].append([v for i in members for v in values[i]])
        packed["position_ids"].append([p for i in members for p in range(lengths[i])])
    return packed


def _pad(rows: list[list[Any]], value: Any, width: int, left: bool, dtype: torch.dtype) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, row in enumerate(rows):
        if row:
            if left:
                out[i, width - len(row):] = torch.tensor(row, dtype=dtype)
            else:
                out[i, : len(row)] = torch.tensor(row, dtype=dtype)
    return out


def collate_columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Rows -> columns of lists, nothing padded or converted: for batches of prompts that online methods
    read as they are (the rollout builds tensors later)."""
    return {key: [row[key] for row in rows] for key in rows[0]}


@dataclass
class LanguageModelingCollator:
    """Collate token examples for causal LM losses.

    pad_token_id: id written in padding. padding_side: "right" or "left".
    flatten: put the whole batch in one row with position_ids (padding-free; for attention kernels that
    take variable-length sequences, e.g. flash attention). Packed examples (with `position_ids`) are
    padded per row and keep their position_ids, so attention stays within each row's sequences.
    pack_to: pack this batch's examples into rows of at most this many tokens (best fit decreasing) and
    return `sequence_ids` [r, L] (the example each token belongs to, -1 in padding), so per-example
    results (sums, last-token scores) can be read back out of the packed rows.
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None
    flatten: bool = False
    pack_to: int | None = None

    def __post_init__(self):
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}.")

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [list(e["input_ids"]) for e in examples]
        # The first token of a sequence is never a target (nothing of its own precedes it).
        masks = [[False, *m[1:]] if m else [] for m in (list(e["loss_mask"]) for e in examples)]
        positions = [list(e["position_ids"]) if "position_ids" in e else list(range(len(i)))
                     for e, i in zip(examples, ids, strict=True)]
        owners = None
        if self.pack_to is not None:
            packed = pack_examples({"input_ids": ids, "loss_mask": masks,
                                    "sequence_ids": [[k] * len(i) for k, i in enumerate(ids)]},
                                   max(self.pack_to, max(map(len, ids))))
            ids, masks, positions, owners = (packed["input_ids"], packed["loss_mask"], packed["position_ids"],
                                             packed["sequence_ids"])
        if self.flatten:
            ids, masks, positions = [sum(ids, [])], [sum(masks, [])], [sum(positions, [])]
        width = max(len(i) for i in ids)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        left = self.padding_side == "left"
        batch = {
            "input_ids": _pad(ids, self.pad_token_id, width, left, torch.long),
            "loss_mask": _pad(masks, False, width, left, torch.bool),
        }
        if owners is not None:
            batch["sequence_ids"] = _pad(owners, -1, width, left, torch.long)
        if self.flatten or owners is not None or "position_ids" in examples[0]:
            # Padding becomes one more (masked-out) sequence: positions restart at 0, on the side
            # where the padding is.
            padding = [list(range(width - len(p))) for p in positions]
            positions = [pad + p if left else p + pad for p, pad in zip(positions, padding, strict=True)]
            batch["position_ids"] = torch.tensor(positions, dtype=torch.long)
            batch["loss_mask"] &= batch["position_ids"] != 0  # likewise for each packed sequence
        else:
            batch["attention_mask"] = _pad([[1] * len(i) for i in ids], 0, width, left, torch.long)
        return batch


@dataclass
class Seq2SeqCollator:
    """Encoder inputs (the prompt) and decoder labels (the completion) for encoder-decoder models."""

    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        enc = [list(e["input_ids"]) for e in examples]
        dec = [list(e["labels"]) for e in examples]
        enc_width, dec_width = max(map(len, enc)), max(map(len, dec))
        decoder_mask = _pad([[1] * len(d) for d in dec], 0, dec_width, False, torch.long)
        return {
            "input_ids": _pad(enc, self.pad_token_id, enc_width, False, torch.long),
            "attention_mask": _pad([[1] * len(e) for e in enc], 0, enc_width, False, torch.long),
            "labels": _pad(dec, self.pad_token_id, dec_width, False, torch.long),
            "decoder_attention_mask": decoder_mask,
            "decoder_loss_mask": decoder_mask.bool(),
        }
