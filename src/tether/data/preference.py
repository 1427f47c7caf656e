"""Preference pairs (prompt, chosen, rejected): tokenized once, collated chosen-then-rejected so that
both halves of every pair go through the model in one forward pass."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from .collate import IGNORE_INDEX, LanguageModelingCollator, loss_mask_from_labels, resolve_pad_to_multiple_of
from .formats import (
    LEGACY_TOKENIZED_PAIRS,
    TOKENIZED_PAIRS,
    DatasetError,
    DatasetType,
    detect_format,
    has_columns,
    is_stream,
)
from .prepare import drop_untrainable, map_rows, sample_of
from .tokenize import tokenize_conversation, tokenize_prompt_completion, tokenize_text
from .validate import (
    IDENTICAL,
    PAIR_FLAGS_COLUMN,
    RowCheck,
    StreamPairWarnings,
    chat_roles,
    finish_pair_flags,
    pair_flags,
    warn_if_no_eos,
    warn_pair_flags,
)

_SIDES = ("chosen", "rejected")
# Scalar columns carried into batches as [b] tensors: the reward margin, precomputed reference log-probs.
_PER_PAIR_VALUES = ("margin", "ref_chosen_logps", "ref_rejected_logps")
# Which end of a prompt longer than max_prompt_length is kept (TRL's `truncation_mode`).
TRUNCATION_MODES = ("keep_end", "keep_start")


def check_truncation_mode(truncation_mode: str) -> None:
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be 'keep_end' (keep the prompt's last max_prompt_length tokens) or "
                         f"'keep_start' (keep its first ones), got {truncation_mode!r}.")


def split_implicit_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """(prompt, chosen completion, rejected completion) from two texts that share a beginning.

    Conversations split at the longest common run of whole messages; strings at the last whitespace
    inside their longest common prefix, so each completion starts at a word boundary.
    """
    if isinstance(chosen, list):
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        return chosen[:n], chosen[n:], rejected[n:]
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(" ", 0, n + 1) if n < len(chosen) or n < len(rejected) else n
    cut = max(cut, 0)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _tokenize_side(tokenizer: PreTrainedTokenizerBase, prompt: Any, completion: Any) -> dict[str, list]:
    if (isinstance(prompt, list) and len(prompt) == 0) or prompt == "":
        # No shared prompt: the whole text is the completion.
        whole = tokenize_conversation(tokenizer, completion) if isinstance(completion, list) else (
            tokenize_text(tokenizer, completion))
        return {**whole, "prompt_length": 1}
    return tokenize_prompt_completion(tokenizer, prompt, completion, completion_only_loss=True)


def _tokenized_side(prompt_ids: list[int], completion_ids: list[int], column: str, check: RowCheck,
                    index: int) -> dict[str, list]:
    """A pre-tokenized side: prompt ids then completion ids, the completion counting; with no prompt ids the
    whole sequence counts (but its first token, which nothing precedes)."""
    ids = prompt_ids + completion_ids
    if not completion_ids:
        check.fail(index, column, "it is empty; each side of a pair needs at least one token",
                   f"drop such rows: dataset.filter(lambda row: len(row[{column!r}]) > 0)")
    if not prompt_ids:
        return {"input_ids": ids, "loss_mask": [False] + [True] * (len(ids) - 1), "prompt_length": 1}
    return {"input_ids": ids, "loss_mask": [False] * len(prompt_ids) + [True] * len(completion_ids),
            "prompt_length": len(prompt_ids)}


def _tokenized_pair_columns(sample: Any, what: str) -> tuple[str, str] | None:
    """The (chosen, rejected) id columns of pre-tokenized preference rows, or None for text rows. TRL's
    names are `chosen_ids`/`rejected_ids` (after an optional `prompt_ids`); its deprecated
    `chosen_input_ids`/`rejected_input_ids` are read with a FutureWarning, as TRL does."""
    if has_columns(sample, TOKENIZED_PAIRS):
        return TOKENIZED_PAIRS
    if has_columns(sample, LEGACY_TOKENIZED_PAIRS):
        warnings.warn(f"The {what} dataset has the deprecated columns chosen_input_ids/rejected_input_ids; "
                      "rename them chosen_ids/rejected_ids (TRL's names).", FutureWarning, stacklevel=4)
        return LEGACY_TOKENIZED_PAIRS
    return None


def prepare_preference(
    dataset: Any,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None = 1024,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    truncation_mode: str = "keep_end",
    label_pad_token_id: int | None = None,
    num_proc: int | None = None,
    what: str = "train",
) -> Any:
    """Rows with `{chosen,rejected}_input_ids`, `{chosen,rejected}_loss_mask` (completion tokens),
    `prompt_length`, and `margin` when the dataset has that column.

    Text rows (prompt/chosen/rejected, or chosen/rejected with an implicit prompt), or pre-tokenized ones:
    `chosen_ids`/`rejected_ids` (TRL's reward rows: whole sequences) after an optional `prompt_ids` (then
    they are completions, as in TRL's tokenized DPO rows); ids are used as they are. A stream is tokenized
    lazily, its format read from its first rows.

    Every row is checked as it is tokenized (a DatasetError names `what`, the row and the column); pairs whose
    chosen and rejected are the same, or whose chosen or rejected completion is empty, are kept and counted in
    one warning per kind (a stream's: its first such row).

    A prompt longer than `max_prompt_length` keeps its last that many tokens (`truncation_mode="keep_end"`)
    or its first ones ("keep_start"); each completion keeps its first `max_completion_length`, each whole
    sequence its first `max_length`.

    With `label_pad_token_id`, rows also carry TRL 0.7's tokenized columns, for data collators written for
    them (e.g. `DPODataCollatorWithPadding`): `prompt_{input_ids,attention_mask}` and
    `{chosen,rejected}_{attention_mask,labels}`, labels being the input ids with `label_pad_token_id` wherever
    the loss mask is False (`PairBatch` turns such batches back into loss masks).
    """
    check_truncation_mode(truncation_mode)
    sample = sample_of(dataset, what)
    if has_columns(sample, [f"{side}_loss_mask" for side in _SIDES]):
        return dataset  # already prepared by this function
    id_columns = _tokenized_pair_columns(sample, what)
    stream = is_stream(dataset)
    check = RowCheck(what, stream=stream, roles=chat_roles(tokenizer))
    fmt = None if id_columns is not None else detect_format(sample, expected=(DatasetType.PREFERENCE,), check=check)
    has_margin = "margin" in sample.column_names
    stream_warnings = StreamPairWarnings(what) if stream else None
    if fmt is not None and not fmt.conversational:
        warn_if_no_eos(tokenizer, "the plain chosen and rejected completions")

    def sides(row: dict[str, Any], index: int) -> tuple[list[dict[str, list]], int]:
        """Both sides tokenized, and the pair's warning flags."""
        if id_columns is not None:
            prompt_ids = check.token_ids(row, index, "prompt_ids", optional=True) or []
            chosen, rejected = (check.token_ids(row, index, column) for column in id_columns)
            return ([_tokenized_side(prompt_ids, ids, column, check, index)
                     for ids, column in zip((chosen, rejected), id_columns)], IDENTICAL if chosen == rejected else 0)
        check.format_row(fmt, row, index)
        if fmt.implicit_prompt:
            prompt, chosen, rejected = split_implicit_prompt(row["chosen"], row["rejected"])
        else:
            prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
        flags = pair_flags(row["chosen"], row["rejected"], chosen, rejected)
        return [_tokenize_side(tokenizer, prompt, completion) for completion in (chosen, rejected)], flags

    def tokenize(row: dict[str, Any], index: int = 0) -> dict[str, Any]:
        out: dict[str, Any] = {}
        tokenized, flags = sides(row, index)
        for side, tokens in zip(_SIDES, tokenized):
            ids, mask, prompt_length = tokens["input_ids"], tokens["loss_mask"], tokens["prompt_length"]
            if max_prompt_length is not None and prompt_length > max_prompt_length:
                if truncation_mode == "keep_end":
                    cut = prompt_length - max_prompt_length
                    ids, mask = ids[cut:], mask[cut:]
                else:  # keep_start: the prompt's first tokens, then the whole completion
                    ids = ids[:max_prompt_length] + ids[prompt_length:]
                    mask = mask[:max_prompt_length] + mask[prompt_length:]
                prompt_length = max_prompt_length
            if max_completion_length is not None:
                ids, mask = ids[:prompt_length + max_completion_length], mask[:prompt_length + max_completion_length]
            if max_length is not None:
                ids, mask = ids[:max_length], mask[:max_length]
            out[f"{side}_input_ids"], out[f"{side}_loss_mask"] = ids, mask
            if label_pad_token_id is not None:
                out[f"{side}_attention_mask"] = [1] * len(ids)
                out[f"{side}_labels"] = [t if m else label_pad_token_id for t, m in zip(ids, mask)]
        out["prompt_length"] = prompt_length
        if label_pad_token_id is not None:
            out["prompt_input_ids"] = out["chosen_input_ids"][:prompt_length]
            out["prompt_attention_mask"] = [1] * len(out["prompt_input_ids"])
        if has_margin:
            out["margin"] = check.number(row, index, "margin")
        if stream_warnings is not None:
            stream_warnings(flags, index)
        else:  # counted over the whole dataset once it is mapped (finish_pair_flags)
            out[PAIR_FLAGS_COLUMN] = flags
        return out

    if stream:
        for index, row in enumerate(sample):  # a bad row among the first ones fails here, before training
            tokenize(row, index)
    dataset = map_rows(dataset, tokenize, columns=sample.column_names, num_proc=num_proc,
                       desc=f"Tokenizing {what} preference pairs", with_indices=True)
    if not stream:
        dataset = finish_pair_flags(dataset, what)
    for side in _SIDES:
        dataset = drop_untrainable(dataset, max_length, f"{what} ({side})", mask_column=f"{side}_loss_mask")
    return dataset


@dataclass
class PreferenceCollator:
    """[2b, t] batch: the b chosen sequences, then the b rejected ones, padded together (or packed:
    then sequence k of `sequence_ids` is chosen k for k < b and rejected k - b after).

    Keys: input_ids, attention_mask, loss_mask (completion tokens), and the per-pair values present
    (margin, ref_chosen_logps, ref_rejected_logps) as [b]. `pad_to_multiple_of`: t is rounded up to a
    multiple of it (None or "auto": no rounding).
    """

    pad_token_id: int
    padding_side: str = "right"
    pack_to: int | None = None  # pack the 2b sequences into rows of this many tokens (see LanguageModelingCollator)
    pad_to_multiple_of: int | str | None = None

    def __post_init__(self) -> None:
        self.pad_to_multiple_of = resolve_pad_to_multiple_of(self.pad_to_multiple_of)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences = [
            {"input_ids": e[f"{side}_input_ids"], "loss_mask": e[f"{side}_loss_mask"]}
            for side in _SIDES for e in examples
        ]
        collate = LanguageModelingCollator(self.pad_token_id, padding_side=self.padding_side, pack_to=self.pack_to,
                                           pad_to_multiple_of=self.pad_to_multiple_of)
        batch = collate(sequences)
        for key in _PER_PAIR_VALUES:
            if key in examples[0]:
                batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
        return batch


def _widen(rows: torch.Tensor, width: int, value: int) -> torch.Tensor:
    """[b, t] -> [b, width], filled with `value` on the right."""
    return torch.nn.functional.pad(rows, (0, width - rows.shape[1]), value=value)


@dataclass
class PairBatch:
    """A user's data collator made to give the batches `PreferenceCollator` gives: [2b, t] `input_ids`,
    `attention_mask` and `loss_mask`, the b chosen rows first, plus the per-pair values as [b].

    The wrapped collator may return tether's batch (it has `loss_mask`; passed on as it is), TRL 0.7's
    (`{chosen,rejected}_{input_ids,attention_mask,labels}`, [b, t] each, as `DPODataCollatorWithPadding`
    builds from the TRL columns of `prepare_preference(..., label_pad_token_id=...)`), or one with
    `input_ids` and Hugging Face-style `labels` [2b, t], or TRL 1.x's (`input_ids`, `attention_mask` and
    `completion_mask` [2b, t], as its `DataCollatorForPreference` builds). Labels equal to `label_pad_token_id` are not targets;
    every other label must be the input token there (tether's losses predict the input tokens). Chosen and
    rejected halves are padded to one width with `padding_value` (ids), 0 (attention) and the label pad id.
    """

    collator: Callable[[list[dict[str, Any]]], dict[str, Any]]
    padding_value: int
    label_pad_token_id: int = IGNORE_INDEX

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = dict(self.collator(examples))
        if "loss_mask" in batch:
            return batch
        if all(f"{side}_{key}" in batch for side in _SIDES for key in ("input_ids", "labels")):
            halves = [{key: torch.as_tensor(batch[f"{side}_{key}"]) for key in ("input_ids", "labels")}
                      for side in _SIDES]
            for side, half in zip(_SIDES, halves):
                mask = batch.get(f"{side}_attention_mask")
                half["attention_mask"] = (torch.as_tensor(mask) if mask is not None
                                          else torch.ones_like(half["input_ids"]))
            width = max(half["input_ids"].shape[1] for half in halves)
            fills = {"input_ids": self.padding_value, "attention_mask": 0, "labels": self.label_pad_token_id}
            ids, attention, labels = (torch.cat([_widen(half[key], width, fills[key]) for half in halves])  # [2b, t]
                                      for key in ("input_ids", "attention_mask", "labels"))
        elif "input_ids" in batch and "completion_mask" in batch:
            ids = torch.as_tensor(batch["input_ids"])  # [2b, t]
            attention = torch.as_tensor(batch["attention_mask"]) if "attention_mask" in batch else torch.ones_like(ids)
            counted = torch.as_tensor(batch["completion_mask"]).bool() & attention.bool()
            return self._with_values({"input_ids": ids.long(), "attention_mask": attention.long(),
                                      "loss_mask": counted}, batch)
        elif "input_ids" in batch and "labels" in batch:
            ids, labels = torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["labels"])  # [2b, t]
            attention = torch.as_tensor(batch["attention_mask"]) if "attention_mask" in batch else torch.ones_like(ids)
        else:
            raise ValueError(
                f"The data collator {type(self.collator).__name__} returned keys {sorted(batch)}; a preference batch "
                "needs `loss_mask` (tether's PreferenceCollator), chosen_/rejected_ input_ids and labels (TRL's "
                "DPODataCollatorWithPadding), input_ids and completion_mask (TRL's DataCollatorForPreference), or "
                "input_ids and labels with the chosen rows first.")
        counted = loss_mask_from_labels(ids, labels, self.label_pad_token_id) & attention.bool()
        return self._with_values({"input_ids": ids.long(), "attention_mask": attention.long(), "loss_mask": counted},
                                 batch)

    @staticmethod
    def _with_values(out: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        for key in _PER_PAIR_VALUES:
            if key in batch:
                out[key] = torch.as_tensor(batch[key], dtype=torch.float32)
        return out


# ----- unpaired preference (KTO) ---------------------------------------------------------------------
def unpair_preference(dataset: Any, sample: Any = None, what: str = "train", tokenizer: Any = None,
                      warn: bool = True) -> Any:
    """Paired rows (prompt, chosen, rejected) -> unpaired rows (prompt, completion, label): the chosen
    completion labelled desirable (True), the rejected one undesirable (False). `sample`: a stream's first
    rows, read for its format (default: read here). Every pair is checked as it is split (errors name its row
    in the paired dataset `what`; `tokenizer` gives the accepted chat roles), and pairs with chosen == rejected
    are counted in one warning (`warn`)."""
    sample = sample_of(dataset) if sample is None else sample
    stream = is_stream(dataset)
    check = RowCheck(what, stream=stream, roles=chat_roles(tokenizer))
    fmt = detect_format(sample, expected=(DatasetType.PREFERENCE,), check=check)
    stream_warnings = StreamPairWarnings(what) if stream and warn else None

    def split(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"prompt": [], "completion": [], "label": []}
        if not stream:
            out[PAIR_FLAGS_COLUMN] = []
        for i, index in enumerate(indices):
            row = {column: batch[column][i] for column in fmt.text_columns}
            check.format_row(fmt, row, index)
            if fmt.implicit_prompt:
                prompt, chosen, rejected = split_implicit_prompt(row["chosen"], row["rejected"])
            else:
                prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
            # Only ties matter here: an empty completion is an ordinary (short) unpaired example.
            flags = IDENTICAL if row["chosen"] == row["rejected"] else 0
            for completion, label in ((chosen, True), (rejected, False)):
                out["prompt"].append(prompt)
                out["completion"].append(completion)
                out["label"].append(label)
                if not stream:
                    out[PAIR_FLAGS_COLUMN].append(flags)
            if stream_warnings is not None:
                stream_warnings(flags, index)
        return out

    unpaired = map_rows(dataset, split, columns=sample.column_names, batched=True, with_indices=True)
    if stream:
        return unpaired
    if not warn:
        return unpaired.remove_columns(PAIR_FLAGS_COLUMN)
    # Each pair gave two rows with its flags: count the pairs (the even rows), as rows of the paired dataset.
    warn_pair_flags(unpaired[PAIR_FLAGS_COLUMN][::2], what)
    return unpaired.remove_columns(PAIR_FLAGS_COLUMN)


_TOKENIZED_UNPAIRED = ("prompt_ids", "completion_ids", "label")  # TRL's tokenized KTO rows


def prepare_unpaired(
    dataset: Any,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None = 1024,
    max_prompt_length: int | None = None,
    num_proc: int | None = None,
    what: str = "train",
    kl_chunk_size: int | None = None,
) -> Any:
    """Rows with `prompt_ids`, `completion_ids` and bool `label`; paired preference data is unpaired
    first, and rows that already have those columns (TRL's tokenized KTO rows) are only truncated. Prompt
    and completion stay apart so a collator can also build mismatched pairs. A stream is prepared lazily.

    With `kl_chunk_size`, rows also get a fixed mismatched completion, `KL_completion_ids` (see
    `add_kl_completions`). Rows this function prepared that already carry reference log-probs
    (`ref_logps`) are returned as they are: their columns belong together.
    """
    sample = sample_of(dataset, what)
    if has_columns(sample, (*_TOKENIZED_UNPAIRED, "ref_logps")):
        return dataset
    tokenized = has_columns(sample, _TOKENIZED_UNPAIRED)
    fmt = None
    check = RowCheck(what, stream=is_stream(dataset), roles=chat_roles(tokenizer))
    if not tokenized:
        fmt = detect_format(sample, expected=(DatasetType.UNPAIRED_PREFERENCE, DatasetType.PREFERENCE), check=check)
        if not fmt.conversational:
            warn_if_no_eos(tokenizer, "the plain completions")
        if fmt.type is DatasetType.PREFERENCE:  # checked pair by pair as it is unpaired
            dataset = unpair_preference(dataset, sample, what, tokenizer)
            sample = unpair_preference(sample, sample, what, tokenizer, warn=False) if is_stream(dataset) else dataset
            fmt = None

    def tokenize(row: dict[str, Any], index: int = 0) -> dict[str, Any]:
        if tokenized:
            prompt_ids = check.token_ids(row, index, "prompt_ids")
            completion_ids = check.token_ids(row, index, "completion_ids")
        else:
            if fmt is not None:
                check.format_row(fmt, row, index)
            tokens = tokenize_prompt_completion(tokenizer, row["prompt"], row["completion"])
            split_at = tokens["prompt_length"]
            prompt_ids, completion_ids = tokens["input_ids"][:split_at], tokens["input_ids"][split_at:]
        label = check.label(row, index)
        if max_prompt_length is not None:
            prompt_ids = prompt_ids[-max_prompt_length:]
        if max_length is not None:
            completion_ids = completion_ids[: max(max_length - len(prompt_ids), 0)]
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "label": label}

    dataset = map_rows(dataset, tokenize, columns=sample.column_names, num_proc=num_proc,
                       desc=f"Tokenizing {what} unpaired examples", with_indices=True)
    if is_stream(dataset):
        dataset = dataset.filter(lambda row: len(row["completion_ids"]) > 0)
    else:
        keep = [len(ids) > 0 for ids in dataset["completion_ids"]]
        if not any(keep):
            raise DatasetError(
                f"No {what} example has a completion token left within max_length={max_length}. "
                "Fix: raise max_length or lower max_prompt_length."
            )
        dataset = dataset if all(keep) else dataset.select([i for i, k in enumerate(keep) if k])
    # After the filter, so that the chunks are those of the rows that are trained on.
    return dataset if kl_chunk_size is None else add_kl_completions(dataset, kl_chunk_size)


def add_kl_completions(dataset: Any, chunk_size: int) -> Any:
    """A `KL_completion_ids` column: within each run of `chunk_size` consecutive rows (the last run may be
    shorter), row i gets the completion of row i - 1 and the first row that of the last, so every
    completion of a run is used once, paired with another row's prompt. KTO's KL reference point is
    estimated on these (prompt, other completion) pairs; fixing them here, rather than per batch, lets
    reference log-probs be computed for them ahead of training. With batches read in order in runs of
    `chunk_size`, a batch's mismatched completions are exactly its own completions. A run of one row
    (a last, short one) pairs the row with its own completion: there is no other."""
    if chunk_size < 1:
        raise ValueError(f"kl_chunk_size must be a positive number of rows, got {chunk_size}.")

    def rotate(batch: dict[str, list]) -> dict[str, list]:
        completions = batch["completion_ids"]
        return {"KL_completion_ids": completions[-1:] + completions[:-1]}

    if is_stream(dataset):
        return dataset.map(rotate, batched=True, batch_size=chunk_size)
    return dataset.map(rotate, batched=True, batch_size=chunk_size, desc="Fixing mismatched KL completions")


# Per-example scalars carried into KTO batches as [b] float32: precomputed reference log-probs of the
# (prompt, completion) pair and of the (prompt, KL completion) pair.
UNPAIRED_REFERENCE_COLUMNS = ("ref_logps", "ref_KL_logps")


@dataclass
class UnpairedCollator:
    """[2b, t] batch: the b (prompt_i, completion_i) sequences, then b mismatched ones whose log-probs
    estimate KTO's KL reference point: (prompt_i, KL_completion_ids_i) when the rows carry that fixed
    column (`add_kl_completions`), else (prompt_i, completion_{i+1 mod b}) within the batch. Plus `label`
    [b] and the reference log-probs present (`ref_logps`, `ref_KL_logps`) as [b] float32.
    `pad_to_multiple_of`: t is rounded up to a multiple of it (None or "auto": no rounding)."""

    pad_token_id: int
    pad_to_multiple_of: int | str | None = None

    def __post_init__(self) -> None:
        self.pad_to_multiple_of = resolve_pad_to_multiple_of(self.pad_to_multiple_of)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = len(examples)
        if "KL_completion_ids" in examples[0]:
            mismatched = [e["KL_completion_ids"] for e in examples]
        else:
            mismatched = [examples[(i + 1) % n]["completion_ids"] for i in range(n)]
        pairs = [(e["prompt_ids"], e["completion_ids"]) for e in examples] + [
            (e["prompt_ids"], completion) for e, completion in zip(examples, mismatched)]
        sequences = [
            {"input_ids": list(prompt) + list(completion),
             "loss_mask": [False] * len(prompt) + [True] * len(completion)}
            for prompt, completion in pairs
        ]
        batch = LanguageModelingCollator(self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of)(sequences)
        batch["label"] = torch.tensor([bool(e["label"]) for e in examples])
        for key in UNPAIRED_REFERENCE_COLUMNS:
            if key in examples[0]:
                batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
        return batch
