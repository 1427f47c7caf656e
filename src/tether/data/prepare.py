"""From a raw dataset to the tokenized rows a trainer trains on; validation happens here, first."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from transformers import PreTrainedTokenizerBase

from .collate import pack_examples
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
) -> Any:
    """Rows with `input_ids`, `loss_mask` (and `position_ids` when packed) for causal LM training.

    Accepts language modeling (`text_field` or `messages`) and prompt-completion data, plain or
    conversational; `formatting_func` turns any row into a `text` first.
    """
    if formatting_func is not None:
        if len(dataset) == 0:
            raise DatasetError(f"The {what} dataset is empty (0 rows). Fix: pass at least one example.")
        to_text, batched = formatting_func_to_text(formatting_func, dataset)
        dataset = dataset.map(to_text, batched=batched, remove_columns=dataset.column_names, num_proc=num_proc)
        text_field = "text"
    if packing and max_length is None:
        raise DatasetError("packing=True needs max_length, the length of a packed row. Fix: set max_length.")
    fmt = detect_format(dataset, text_field=text_field, expected=LANGUAGE_MODELING_TYPES)
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
            out = tokenize_prompt_completion(tokenizer, row["prompt"], row["completion"], completion_only)
            out.pop("prompt_length")
        elif fmt.conversational:
            out = tokenize_conversation(tokenizer, row[fmt.text_columns[0]], assistant_only_loss)
        else:
            out = tokenize_text(tokenizer, row[fmt.text_columns[0]])
        return truncate(out, max_length)

    dataset = dataset.map(tokenize, remove_columns=dataset.column_names, num_proc=num_proc,
                          desc=f"Tokenizing {what} dataset")
    dataset = drop_untrainable(dataset, max_length, what)
    if packing:
        dataset = dataset.map(lambda cols: pack_examples(cols, max_length), batched=True, batch_size=10_000,
                              num_proc=num_proc, desc=f"Packing {what} dataset")
    return dataset


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
