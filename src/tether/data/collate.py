"""Batches from tokenized examples: padded, packed, or padding-free.

Each example is a dict with `input_ids` and `loss_mask` (lists), and after packing `position_ids`.
Batches carry `input_ids`, `loss_mask` (bool, True where a token counts) and either `attention_mask`
(padded) or `position_ids` (packed: each run of positions starting at 0 is its own sequence, and the
model's mask keeps sequences from attending to each other).
"""

from __future__ import annotations

import bisect
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DataCollatorForLanguageModeling

from .formats import DatasetError

# Label value that marks a position as ignored, in Hugging Face's convention (and its models' losses).
IGNORE_INDEX = -100


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


PACKING_STRATEGIES = ("bfd", "bfd_split", "wrapped")


def _split_long(columns: dict[str, list[list[Any]]], capacity: int) -> dict[str, list[list[Any]]]:
    """Examples longer than `capacity` cut into pieces of `capacity` tokens (the last one shorter), each piece
    its own example."""
    out: dict[str, list[list[Any]]] = {key: [] for key in columns}
    for i, ids in enumerate(columns["input_ids"]):
        for start in range(0, max(len(ids), 1), capacity):
            for key, values in columns.items():
                out[key].append(values[i][start:start + capacity])
    return out


def pack_examples(columns: dict[str, list[list[Any]]], capacity: int, strategy: str = "bfd",
                  ) -> dict[str, list[list[Any]]]:
    """Batched `datasets.map` function: examples (columns of per-token lists) -> rows of at most `capacity`
    tokens, with `position_ids`. What happens to an example longer than `capacity` depends on `strategy`
    (TRL's packing strategies):

    - "bfd": best fit decreasing; a long example keeps its first `capacity` tokens. Examples stay whole and
      apart (positions restart at 0 at each, so attention stays within it).
    - "bfd_split": best fit decreasing; a long example is cut into pieces of `capacity` tokens, each packed as
      an example of its own (no token lost; a piece starts without the context before it).
    - "wrapped": every example concatenated in order and cut into rows of exactly `capacity` tokens (the last
      one shorter); an example may run over a row boundary, and each row is one sequence (positions 0..L-1,
      tokens attend to the earlier examples of the row), as a pre-training stream is packed.
    """
    if strategy not in PACKING_STRATEGIES:
        raise ValueError(f"packing_strategy={strategy!r}; use one of {PACKING_STRATEGIES}.")
    columns = {key: [list(v) for v in values] for key, values in columns.items() if key != "position_ids"}
    if strategy == "wrapped":
        packed = {key: [] for key in columns}
        flat = {key: [v for values in column for v in values] for key, column in columns.items()}
        total = len(flat["input_ids"])
        for start in range(0, total, capacity):
            for key in columns:
                packed[key].append(flat[key][start:start + capacity])
        packed["position_ids"] = [list(range(len(ids))) for ids in packed["input_ids"]]
        return packed
    if strategy == "bfd_split":
        columns = _split_long(columns, capacity)
    else:
        columns = {key: [v[:capacity] for v in values] for key, values in columns.items()}
    lengths = [len(ids) for ids in columns["input_ids"]]
    packed = {key: [] for key in columns}
    packed["position_ids"] = []
    for members in pack_best_fit_decreasing(lengths, capacity):
        for key, values in columns.items():
            packed[key].append([v for i in members for v in values[i]])
        packed["position_ids"].append([p for i in members for p in range(lengths[i])])
    return packed


def resolve_pad_to_multiple_of(value: int | str | None) -> int | None:
    """The `pad_to_multiple_of` config value as a collator takes it: a positive int, or None for no rounding
    ("auto", None, and the CLI's "none"/"null"; TRL's "auto" rounds only on AWS Neuron, which torch here
    does not drive). Digits given as a string (the CLI) are read as an int."""
    if value is None or (isinstance(value, str) and value.lower() in ("auto", "none", "null")):
        return None
    try:
        multiple = int(value)
    except (TypeError, ValueError):
        multiple = 0
    if multiple < 1 or (isinstance(value, float) and value != multiple):
        raise ValueError(f"pad_to_multiple_of={value!r}; use a positive int, 'auto' or None.")
    return multiple


def pad_rows(rows: Sequence[Sequence[Any] | torch.Tensor], value: Any, width: int | None = None, left: bool = False,
             dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Rows of different lengths (lists or 1-D tensors) -> [b, width] filled with `value` where a row has no
    entry: right padding, or left padding (`left=True`, every row ending at the last column, as generation
    wants). width defaults to the longest row."""
    width = max((len(row) for row in rows), default=0) if width is None else width
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, row in enumerate(rows):
        if len(row):
            row = torch.as_tensor(row, dtype=dtype)
            if left:
                out[i, width - len(row):] = row
            else:
                out[i, : len(row)] = row
    return out


def pad_with_mask(rows: Sequence[Sequence[int] | torch.Tensor], value: int, left: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [b, t], mask [b, t] bool, True at each row's real entries), padded as `pad_rows` does."""
    return pad_rows(rows, value, left=left), pad_rows([[True] * len(row) for row in rows], False, left=left,
                                                       dtype=torch.bool)


def _as_list(values: Any) -> list:
    return values.tolist() if isinstance(values, torch.Tensor) else list(values)


def _example_loss_mask(example: Mapping[str, Any], ids: list[int]) -> list[bool]:
    """An example's loss mask: its `loss_mask`; else, for Hugging Face-style rows (e.g. from a
    ConstantLengthDataset), True where its `labels` name the input token; else every token."""
    if "loss_mask" in example:
        return _as_list(example["loss_mask"])
    if "labels" in example:
        labels = torch.tensor([_as_list(example["labels"])])
        return loss_mask_from_labels(torch.tensor([ids]), labels)[0].tolist()
    return [True] * len(ids)


def loss_mask_from_labels(input_ids: torch.Tensor, labels: torch.Tensor,
                          ignore_index: int | None = None) -> torch.Tensor:
    """Hugging Face-style causal labels -> tether's loss mask: [b, t] long, [b, t] long -> [b, t] bool.

    `labels[i, j]` is the token to predict at position j (the model shifts), and where nothing is predicted
    any negative value (-100 by convention), or exactly `ignore_index` when given (a collator's own label
    pad id; every other value is then a label). tether's
    losses predict the input tokens themselves, so a counted label must be the input token; a label naming
    another token is an error rather than silently dropped.
    """
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels have shape {tuple(labels.shape)} but input_ids {tuple(input_ids.shape)}; "
                         "causal LM labels must align with input_ids (the model shifts them).")
    counted = labels >= 0 if ignore_index is None else labels != ignore_index
    ignore_index = IGNORE_INDEX if ignore_index is None else ignore_index  # for the message
    other = counted & (labels != input_ids)
    if other.any():
        row, column = other.nonzero()[0].tolist()
        raise ValueError(
            f"labels[{row}, {column}] = {int(labels[row, column])} but input_ids[{row}, {column}] = "
            f"{int(input_ids[row, column])}: tether trains a causal LM on its input tokens, so each label must be "
            f"the input token (trained) or {ignore_index} (ignored). Fix: build labels as input_ids with "
            f"{ignore_index} where a token should not count (or set the label pad id your collator uses)."
        )
    return counted


def collate_columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Rows -> columns of lists, nothing padded or converted: for batches of prompts that online methods
    read as they are (the rollout builds tensors later)."""
    return {key: [row[key] for row in rows] for key in rows[0]}


@dataclass
class LanguageModelingCollator:
    """Collate token examples for causal LM losses.

    pad_token_id: id written in padding. padding_side: "right" or "left". pad_to_multiple_of: round the
    batch width up to a multiple of this (a config's value: an int, or "auto"/None for no rounding).
    flatten: put the whole batch in one row with position_ids (padding-free; for attention kernels that
    take variable-length sequences, e.g. flash attention). Packed examples (with `position_ids`) are
    padded per row and keep their position_ids, so attention stays within each row's sequences.
    pack_to: pack this batch's examples into rows of at most this many tokens (best fit decreasing) and
    return `sequence_ids` [r, L] (the example each token belongs to, -1 in padding), so per-example
    results (sums, last-token scores) can be read back out of the packed rows.
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | str | None = None
    flatten: bool = False
    pack_to: int | None = None

    def __post_init__(self):
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}.")
        self.pad_to_multiple_of = resolve_pad_to_multiple_of(self.pad_to_multiple_of)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not isinstance(examples[0], Mapping) or "input_ids" not in examples[0]:
            shown = sorted(examples[0]) if isinstance(examples[0], Mapping) else type(examples[0]).__name__
            raise DatasetError(
                f"The collator got a row without `input_ids` ({shown}). Rows of a torch dataset reach it as they "
                "are, so they must be tokenized. Fix: yield dicts with input_ids (and labels or loss_mask), or "
                "pass a datasets.Dataset / datasets.IterableDataset with a text column to be tokenized."
            )
        ids = [_as_list(e["input_ids"]) for e in examples]
        # The first token of a sequence is never a target (nothing of its own precedes it).
        masks = [[False, *m[1:]] if m else [] for m in (_example_loss_mask(e, i) for e, i in zip(examples, ids))]
        positions = [_as_list(e["position_ids"]) if "position_ids" in e else list(range(len(i)))
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
            "input_ids": pad_rows(ids, self.pad_token_id, width, left, torch.long),
            "loss_mask": pad_rows(masks, False, width, left, torch.bool),
        }
        if owners is not None:
            batch["sequence_ids"] = pad_rows(owners, -1, width, left, torch.long)
        if self.flatten or owners is not None or "position_ids" in examples[0]:
            # Padding becomes one more (masked-out) sequence: positions restart at 0, on the side
            # where the padding is.
            padding = [list(range(width - len(p))) for p in positions]
            positions = [pad + p if left else p + pad for p, pad in zip(positions, padding, strict=True)]
            batch["position_ids"] = torch.tensor(positions, dtype=torch.long)
            batch["loss_mask"] &= batch["position_ids"] != 0  # likewise for each packed sequence
        else:
            batch["attention_mask"] = pad_rows([[1] * len(i) for i in ids], 0, width, left, torch.long)
        return batch


@dataclass
class Seq2SeqCollator:
    """Encoder inputs (the prompt) and decoder labels (the completion) for encoder-decoder models."""

    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        enc = [list(e["input_ids"]) for e in examples]
        dec = [list(e["labels"]) for e in examples]
        enc_width, dec_width = max(map(len, enc)), max(map(len, dec))
        decoder_mask = pad_rows([[1] * len(d) for d in dec], 0, dec_width, False, torch.long)
        return {
            "input_ids": pad_rows(enc, self.pad_token_id, enc_width, False, torch.long),
            "attention_mask": pad_rows([[1] * len(e) for e in enc], 0, enc_width, False, torch.long),
            "labels": pad_rows(dec, self.pad_token_id, dec_width, False, torch.long),
            "decoder_attention_mask": decoder_mask,
            "decoder_loss_mask": decoder_mask.bool(),
        }


def _find_all(ids: list[int], pattern: list[int]) -> list[int]:
    """Start positions of every occurrence of `pattern` in `ids`."""
    n = len(pattern)
    return [i for i in range(len(ids) - n + 1) if ids[i] == pattern[0] and ids[i:i + n] == pattern]


def completion_token_mask(ids: list[int], response_ids: list[int], instruction_ids: list[int] | None = None,
                          ) -> list[bool] | None:
    """Which tokens of a formatted text are completion tokens, found by template token ids, [t] bools.

    Without `instruction_ids`: the tokens after the LAST occurrence of the response template (earlier
    ones, e.g. in few-shot examples inside the prompt, are prompt). With `instruction_ids` (multi-turn
    chats): the tokens of every assistant turn, i.e. those after a response template and before the next
    instruction template. Template tokens themselves never count. None when a template is missing.
    """
    responses = _find_all(ids, response_ids)
    instructions = _find_all(ids, instruction_ids) if instruction_ids is not None else []
    if not responses or (instruction_ids is not None and not instructions):
        return None
    if instruction_ids is None:
        start = responses[-1] + len(response_ids)
        return [j >= start for j in range(len(ids))]
    # Walk the text: a response template ending opens an assistant turn, an instruction template closes it.
    opens = {i + len(response_ids) for i in responses}
    closes = set(instructions)
    template = {i + k for i in responses for k in range(len(response_ids))}
    template |= {i + k for i in instructions for k in range(len(instruction_ids))}
    mask, inside = [], False
    for j in range(len(ids)):
        if j in closes:
            inside = False
        elif j in opens:
            inside = True
        mask.append(inside and j not in template)
    return mask


class DataCollatorForCompletionOnlyLM(DataCollatorForLanguageModeling):
    """Pads like `DataCollatorForLanguageModeling(mlm=False)` and sets the labels of every token that is
    not a completion to `ignore_index`, so only completions are trained (TRL's collator of this name).

    response_template: the text (or its token ids) that precedes each completion, e.g. " ### Answer:".
    Some tokenizers split a string differently alone than in context; then pass the ids as they appear in
    the formatted texts, e.g. `tokenizer.encode("\\n### Assistant:", add_special_tokens=False)[2:]`.
    instruction_template: for multi-turn chats, the text (or ids) that starts each user turn; only the
    assistant turns between a response template and the next instruction template are trained.
    The tokenizer is the `tokenizer=` keyword (or the next positional argument), as for the parent class.

    Returns {"input_ids", "attention_mask", "labels"}: [b, t] each. A row whose template is not found
    (e.g. cut off by truncation) is left out of the loss, all labels `ignore_index`, with a warning that
    names the row and the template.
    """

    def __init__(self, response_template: str | list[int], instruction_template: str | list[int] | None = None,
                 *args: Any, mlm: bool = False, ignore_index: int = IGNORE_INDEX, **kwargs: Any) -> None:
        super().__init__(*args, mlm=mlm, **kwargs)
        self.response_template = response_template
        self.instruction_template = instruction_template
        self.response_token_ids = self._template_ids(response_template, "response_template")
        self.instruction_token_ids = (None if instruction_template is None
                                      else self._template_ids(instruction_template, "instruction_template"))
        self.ignore_index = ignore_index
        pads_with_eos = self.tokenizer.pad_token_id == self.tokenizer.eos_token_id
        if instruction_template is not None and not mlm and pads_with_eos:
            warnings.warn(
                "The tokenizer pads with its EOS token, and padding is never a target, so in multi-turn training "
                "the model never learns to end a turn with EOS. Fix: give the tokenizer a pad token of its own.",
                UserWarning, stacklevel=2,
            )

    def _template_ids(self, template: str | Sequence[int], name: str) -> list[int]:
        if isinstance(template, str):
            ids = self.tokenizer.encode(template, add_special_tokens=False)
        else:
            try:
                ids = [int(t) for t in template]
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be a string or a list of token ids, got {template!r}.") from None
        if not ids:
            raise ValueError(f"{name}={template!r} has no tokens. Fix: pass the text that precedes each "
                             f"{'completion' if name == 'response_template' else 'user turn'}.")
        return ids

    def torch_call(self, examples: list[Any]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        for row, labels in enumerate(batch["labels"]):
            keep = completion_token_mask(labels.tolist(), self.response_token_ids, self.instruction_token_ids)
            if keep is None:
                self._warn_missing(row, labels)
                labels[:] = self.ignore_index
            else:
                labels[~torch.tensor(keep)] = self.ignore_index
        return batch

    def _warn_missing(self, row: int, labels: torch.Tensor) -> None:
        ids = labels.tolist()
        if not _find_all(ids, self.response_token_ids):
            name, template, template_ids = "response", self.response_template, self.response_token_ids
        else:
            name, template, template_ids = "instruction", self.instruction_template, self.instruction_token_ids
        text = self.tokenizer.decode([i for i in ids if i >= 0])
        warnings.warn(
            f"Row {row} of the batch: the {name} template {template!r} (token ids {template_ids}) is not in its "
            f"tokens, so the row is left out of the loss (every label {self.ignore_index}). Text: {text[:120]!r}"
            f"{'...' if len(text) > 120 else ''}. If the text was truncated (max_seq_length), the template may be "
            "cut off; if the template tokenizes differently in context, pass its token ids as they appear in "
            "the text.",
            UserWarning, stacklevel=3,
        )


class LabelsToLossMask:
    """Wraps a Hugging Face-style collator (batches with `labels`, -100 where nothing is predicted) so
    tether's losses can read its batches: adds `loss_mask` (causal) or the decoder masks (seq2seq).

    Causal: input_ids, attention_mask, labels [b, t] -> + loss_mask [b, t] (True where the label is the
    input token, and the token before it is not padding). Seq2seq: labels [b, t] -> labels with -100
    replaced by the pad id, decoder_loss_mask and decoder_attention_mask [b, t]. Other attributes are the
    wrapped collator's.
    """

    def __init__(self, collator: Callable, pad_token_id: int, seq2seq: bool = False) -> None:
        self.collator, self.pad_token_id, self.seq2seq = collator, pad_token_id, seq2seq

    def __getattr__(self, name: str) -> Any:
        if name == "collator":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.collator, name)

    def __call__(self, examples: list[Any]) -> dict[str, torch.Tensor]:
        batch = dict(self.collator(examples))
        if "loss_mask" in batch or "decoder_loss_mask" in batch:
            return batch
        if "labels" not in batch:
            raise ValueError(f"The data collator {type(self.collator).__name__} returned no `labels` "
                             f"(keys {sorted(batch)}), so there is nothing to train on.")
        labels = batch["labels"]
        if self.seq2seq:
            counted = labels != IGNORE_INDEX
            batch.pop("decoder_input_ids", None)  # rebuilt from the labels, behind the start token
            batch["labels"] = labels.masked_fill(~counted, self.pad_token_id)
            batch["decoder_loss_mask"] = counted
            batch.setdefault("decoder_attention_mask", counted.long())
            batch.setdefault("attention_mask", torch.ones_like(batch["input_ids"]))
            return batch
        attention = batch.setdefault("attention_mask", torch.ones_like(batch["input_ids"])).bool()
        loss_mask = loss_mask_from_labels(batch["input_ids"], labels) & attention
        loss_mask[:, 1:] &= attention[:, :-1]  # a sequence's first token (after left padding) has no context
        loss_mask[:, 0] = False
        batch["loss_mask"] = loss_mask
        return batch
