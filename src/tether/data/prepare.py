"""From a raw dataset to the tokenized rows a trainer trains on; validation happens here, first."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from transformers import PreTrainedTokenizerBase

from .collate import pack_examples
from .constant_length import ConstantLengthDataset
from .formats import DatasetError, DatasetType, detect_format
from .tokenize import (
    formatting_func_to_text,
    require_chat_template,
    tokenize_conversation,
    tokenize_prompt,
    tokenize_prompt_completion,
    tokenize_text,
    truncate,
    with_eos,
)

logger = logging.getLogger(__name__)

LANGUAGE_MODELING_TYPES = (DatasetType.LANGUAGE_MODELING, DatasetType.PROMPT_COMPLETION)


def drop_untrainable(dataset: Any, max_length: int | None, what: str, mask_column: str = "loss_mask") -> Any:
    """Drop rows left with no target token after truncation; fail if that is every row."""
    keep = [any(mask[1:]) for mask in dataset[mask_column]]
    dropped = len(keep) - sum(keep)
    if dropped == len(keep):
        raise DatasetError(
            f"No example of the {what} dataset has a token left to train on within max_length={max_length} "
            "(the prompt alone fills it, or the text is empty). Fix: raise max_length, or shorten the "
            "prompts / filter long examples."
        )
    if dropped:
        logger.warning("Dropped %d of %d %s examples with no trainable token within max_length=%s.",
                       dropped, len(keep), what, max_length)
        dataset = dataset.select([i for i, k in enumerate(keep) if k])
    return dataset


def keep_columns(dataset: Any, keep: set[str]) -> Any:
    """A datasets.Dataset without the columns not in `keep` (other datasets, e.g. torch ones, unchanged)."""
    if not hasattr(dataset, "remove_columns"):
        return dataset
    unused = [c for c in dataset.column_names if c not in keep]
    return dataset.remove_columns(unused) if unused else dataset


def prepare_language_modeling(
    dataset: Any,
    tokenizer: PreTrainedTokenizerBase,
    *,
    text_field: str = "text",
    formatting_func: Callable | None = None,
    max_length: int | None = 1024,
    packing: bool = False,
    completion_only_loss: bool | None = None,
    assistant_only_loss: bool = False,
    num_proc: int | None = None,
    what: str = "train",
    add_special_tokens: bool = True,
    batch_size: int = 1000,
) -> Any:
    """Rows with `input_ids`, `loss_mask` (and `position_ids` when packed) for causal LM training.

    Accepts language modeling (`text_field` or `messages`) and prompt-completion data, plain or
    conversational; `formatting_func` turns any row into a `text` first (a batch-style one in batches of
    `batch_size`). add_special_tokens: let the tokenizer add its special tokens to plain text.
    """
    if formatting_func is not None:
        if len(dataset) == 0:
            raise DatasetError(f"The {what} dataset is empty (0 rows). Fix: pass at least one example.")
        to_text, batched = formatting_func_to_text(formatting_func, dataset)
        dataset = dataset.map(to_text, batched=batched, batch_size=batch_size, remove_columns=dataset.column_names,
                              num_proc=num_proc)
        text_field = "text"
    if packing and max_length is None:
        raise DatasetError("packing=True needs max_length, the length of a packed row. Fix: set max_length.")
    tokenize = _language_modeling_tokenizer(dataset, tokenizer, text_field, max_length, completion_only_loss,
                                            assistant_only_loss, add_special_tokens)
    dataset = dataset.map(tokenize, remove_columns=dataset.column_names, num_proc=num_proc,
                          desc=f"Tokenizing {what} dataset")
    dataset = drop_untrainable(dataset, max_length, what)
    if packing:
        dataset = dataset.map(lambda cols: pack_examples(cols, max_length), batched=True, batch_size=10_000,
                              num_proc=num_proc, desc=f"Packing {what} dataset")
    return dataset


def _language_modeling_tokenizer(
    sample: Any,
    tokenizer: PreTrainedTokenizerBase,
    text_field: str,
    max_length: int | None,
    completion_only_loss: bool | None,
    assistant_only_loss: bool,
    add_special_tokens: bool,
) -> Callable[[dict[str, Any]], dict[str, list]]:
    """The function that tokenizes one row of a language modeling dataset whose format is read (and
    validated) from `sample` (the dataset itself, or the first rows of a stream)."""
    fmt = detect_format(sample, text_field=text_field, expected=LANGUAGE_MODELING_TYPES)
    if assistant_only_loss and not fmt.conversational:
        raise DatasetError(
            "assistant_only_loss=True needs conversational data (a `messages` column of role/content turns). "
            "Fix: set assistant_only_loss=False, or use completion_only_loss with prompt-completion data."
        )
    if fmt.conversational:
        require_chat_template(tokenizer)  # fail here, not inside dataset.map
    completion_only = completion_only_loss is not False

    def tokenize(row: dict[str, Any]) -> dict[str, list]:
        if fmt.type is DatasetType.PROMPT_COMPLETION and fmt.conversational and assistant_only_loss \
                and not completion_only:
            # Every assistant turn of prompt and completion counts, and nothing else.
            out = tokenize_conversation(tokenizer, row["prompt"] + row["completion"], True)
        elif fmt.type is DatasetType.PROMPT_COMPLETION:
            out = tokenize_prompt_completion(tokenizer, row["prompt"], row["completion"], completion_only,
                                             add_special_tokens)
            out.pop("prompt_length")
        elif fmt.conversational:
            out = tokenize_conversation(tokenizer, row[fmt.text_columns[0]], assistant_only_loss)
        else:
            out = tokenize_text(tokenizer, row[fmt.text_columns[0]], add_special_tokens)
        return truncate(out, max_length)

    return tokenize


# Rows of a stream read ahead to detect its format.
_STREAM_SAMPLE_ROWS = 8


def prepare_language_modeling_stream(
    dataset: Any,
    tokenizer: PreTrainedTokenizerBase,
    *,
    text_field: str = "text",
    formatting_func: Callable | None = None,
    max_length: int | None = 1024,
    completion_only_loss: bool | None = None,
    assistant_only_loss: bool = False,
    add_special_tokens: bool = True,
    batch_size: int = 1000,
    what: str = "train",
) -> Any:
    """`prepare_language_modeling` for a streaming `datasets.IterableDataset`: the same rows, tokenized on
    the fly as training reads them. The format is detected on the first rows; rows left with no target
    token are skipped. (Packing a stream is `ConstantLengthDataset`'s job.)"""
    import datasets

    sample = datasets.Dataset.from_list(list(dataset.take(_STREAM_SAMPLE_ROWS)))
    if len(sample) == 0:
        raise DatasetError(f"The {what} dataset is empty (its stream yields no row). Fix: check the data files.")
    if formatting_func is not None:
        to_text, batched = formatting_func_to_text(formatting_func, sample)
        dataset = dataset.map(to_text, batched=batched, batch_size=batch_size, remove_columns=sample.column_names)
        sample = sample.map(to_text, batched=batched, remove_columns=sample.column_names)
        text_field = "text"
    tokenize = _language_modeling_tokenizer(sample, tokenizer, text_field, max_length, completion_only_loss,
                                            assistant_only_loss, add_special_tokens)
    dataset = dataset.map(tokenize, remove_columns=sample.column_names)
    return dataset.filter(lambda row: any(row["loss_mask"][1:]))


def as_model_rows(dataset: Any) -> Any:
    """Tokenized rows as Hugging Face collators take them: `loss_mask` dropped, `attention_mask` added (for
    a user's data collator, e.g. DataCollatorForCompletionOnlyLM, which makes the labels itself)."""
    names = dataset.column_names  # None for a stream whose columns are not known ahead
    drop = ["loss_mask"] if names is None or "loss_mask" in names else []
    return dataset.map(lambda row: {"attention_mask": [1] * len(row["input_ids"])}, remove_columns=drop)


def prepare_sft_dataset(
    dataset: Any,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seq2seq: bool = False,
    packing: bool = False,
    text_field: str = "text",
    formatting_func: Callable | None = None,
    max_length: int | None = 1024,
    completion_only_loss: bool | None = None,
    assistant_only_loss: bool = False,
    add_special_tokens: bool = True,
    append_concat_token: bool = True,
    num_of_sequences: int = 1024,
    chars_per_token: float = 3.6,
    infinite: bool = False,
    model_rows: bool = False,
    num_proc: int | None = None,
    batch_size: int = 1000,
    what: str = "train",
) -> Any:
    """Any dataset SFT accepts -> what its collator reads.

    - `datasets.Dataset`: tokenized (and with `packing`, packed best-fit into rows of `max_length`).
    - streaming `datasets.IterableDataset`: tokenized on the fly; with `packing`, a `ConstantLengthDataset` of
      rows of `max_length` (buffer sized by num_of_sequences and chars_per_token; `infinite` restarts it).
    - a torch Dataset / IterableDataset (a ConstantLengthDataset included): unchanged; its rows must be
      tokenized (input_ids, and labels or loss_mask).
    `model_rows`: rows for a Hugging Face-style collator (input_ids, attention_mask) instead of tether's
    (input_ids, loss_mask).
    """
    import datasets
    import torch

    if isinstance(dataset, datasets.IterableDataset):
        if seq2seq:
            raise DatasetError(f"The {what} dataset is a stream, which encoder-decoder SFT does not read. "
                               "Fix: load it without streaming=True.")
        if packing:
            return ConstantLengthDataset(
                tokenizer, dataset, dataset_text_field=None if formatting_func else text_field,
                formatting_func=formatting_func, infinite=infinite, seq_length=max_length,
                num_of_sequences=num_of_sequences, chars_per_token=chars_per_token,
                append_concat_token=append_concat_token, add_special_tokens=add_special_tokens,
            )
        prepared = prepare_language_modeling_stream(
            dataset, tokenizer, text_field=text_field, formatting_func=formatting_func, max_length=max_length,
            completion_only_loss=completion_only_loss, assistant_only_loss=assistant_only_loss,
            add_special_tokens=add_special_tokens, batch_size=batch_size, what=what)
    elif isinstance(dataset, torch.utils.data.Dataset) and not isinstance(dataset, datasets.Dataset):
        return dataset
    elif seq2seq:
        prepared = prepare_seq2seq(dataset, tokenizer, max_length=max_length, num_proc=num_proc, what=what)
    else:
        prepared = prepare_language_modeling(
            dataset, tokenizer, text_field=text_field, formatting_func=formatting_func, max_length=max_length,
            packing=packing, completion_only_loss=completion_only_loss, assistant_only_loss=assistant_only_loss,
            num_proc=num_proc, what=what, add_special_tokens=add_special_tokens, batch_size=batch_size)
    return as_model_rows(prepared) if model_rows else prepared


def prepare_seq2seq(
    dataset: Any,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None = 1024,
    num_proc: int | None = None,
    what: str = "train",
) -> Any:
    """Rows with encoder `input_ids` (the prompt) and decoder `labels` (the completion + EOS)."""
    fmt = detect_format(dataset, expected=(DatasetType.PROMPT_COMPLETION,))
    if fmt.conversational:
        require_chat_template(tokenizer)

    def tokenize(row: dict[str, Any]) -> dict[str, list]:
        completion = row["completion"]
        if fmt.conversational:
            completion = "".join(m["content"] for m in completion)
        # EOS ends every target, whether or not the tokenizer appends it itself (T5's does).
        labels = with_eos(tokenizer, tokenizer(completion)["input_ids"])[:max_length]
        return {"input_ids": tokenize_prompt(tokenizer, row["prompt"])[:max_length], "labels": labels,
                "loss_mask": [False, *([True] * len(labels))]}

    dataset = dataset.map(tokenize, remove_columns=dataset.column_names, num_proc=num_proc,
                          desc=f"Tokenizing {what} dataset")
    return drop_untrainable(dataset, max_length, what).remove_columns("loss_mask")


def prepare_prompts(
    dataset: Any,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_prompt_length: int | None = None,
    num_proc: int | None = None,
    what: str = "train",
) -> Any:
    """Prompt-only rows for online methods: adds `prompt_input_ids`; every other column stays, so
    reward functions can receive it."""
    detect_format(dataset, expected=(DatasetType.PROMPT_ONLY,))
    dataset = dataset.map(lambda row: {"prompt_input_ids": tokenize_prompt(tokenizer, row["prompt"])},
                          num_proc=num_proc, desc=f"Tokenizing {what} prompts")
    if max_prompt_length is not None:
        too_long = [i for i, ids in enumerate(dataset["prompt_input_ids"]) if len(ids) > max_prompt_length]
        if too_long:
            raise DatasetError(
                f"{len(too_long)} {what} prompt(s) are longer than max_prompt_length={max_prompt_length} tokens "
                f"(first: row {too_long[0]}, {len(dataset[too_long[0]]['prompt_input_ids'])} tokens). "
                "Fix: raise max_prompt_length, or filter or shorten those prompts."
            )
    return dataset
