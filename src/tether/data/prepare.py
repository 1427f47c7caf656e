"""From a raw dataset to the tokenized rows a trainer trains on; validation happens here, row by row.

Every function takes a `datasets.Dataset` (mapped once, cached) or a streaming `datasets.IterableDataset`
(mapped lazily: rows are tokenized as training reads them). A dataset's format is detected on its first rows
(a stream's: `stream_sample`); every row is then checked by the map that tokenizes it (`validate.RowCheck`), so
a bad value anywhere stops preparation before training with an error naming its split, row and column. A
stream's rows are checked as they are read. `num_proc` does not apply to a stream (it is ignored). Besides
text, TRL's other row forms are read: pre-tokenized rows (`input_ids`, optional masks) and ShareGPT
`conversations`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from transformers import PreTrainedTokenizerBase

from .collate import IGNORE_INDEX, pack_examples
from .constant_length import ConstantLengthDataset
from .formats import (
    TOKENIZED_LANGUAGE_MODELING,
    DatasetError,
    DatasetType,
    detect_format,
    has_columns,
    is_sharegpt,
    is_stream,
    sharegpt_to_messages,
    stream_sample,
)
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
from .validate import RowCheck, chat_roles, warn_if_no_eos

logger = logging.getLogger(__name__)

LANGUAGE_MODELING_TYPES = (DatasetType.LANGUAGE_MODELING, DatasetType.PROMPT_COMPLETION)


def drop_untrainable(dataset: Any, max_length: int | None, what: str, mask_column: str = "loss_mask") -> Any:
    """Drop rows left with no target token after truncation; fail if that is every row. A stream is
    filtered as it is read (nothing is counted ahead)."""
    if is_stream(dataset):
        return dataset.filter(lambda row: any(row[mask_column][1:]))
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


def sample_of(dataset: Any, what: str = "train") -> Any:
    """The rows formats are read from: the dataset itself, or a stream's first rows (an error if none)."""
    if not is_stream(dataset):
        return dataset
    sample = stream_sample(dataset)
    if len(sample) == 0:
        raise DatasetError(f"The {what} dataset is empty (its stream yields no row). Fix: check the data files.")
    return sample


def map_rows(dataset: Any, function: Callable, *, columns: list[str] | None = None, num_proc: int | None = None,
             desc: str | None = None, batched: bool = False, batch_size: int = 1000, with_indices: bool = False
             ) -> Any:
    """`dataset.map(function)` with the input `columns` removed (default: all of them), on a Dataset
    (with `num_proc` processes) or lazily on a stream (one process: `num_proc` cannot apply). `with_indices`:
    `function` also gets each row's index (a list of them when batched): its position in the dataset, or in the
    stream, whatever the number of processes."""
    if is_stream(dataset):
        if columns is None:
            columns = dataset.column_names or stream_sample(dataset, 1).column_names
        mapped = dataset.map(function, batched=batched, batch_size=batch_size, remove_columns=columns,
                             with_indices=with_indices)
        if mapped.column_names is None:
            # Declare the output columns (as the first rows give them), so that the stream's column names are
            # known to what reads them, e.g. Trainer's remove_unused_columns.
            mapped = dataset.map(function, batched=batched, batch_size=batch_size, remove_columns=columns,
                                 features=stream_sample(mapped).features, with_indices=with_indices)
        return mapped
    return dataset.map(function, batched=batched, batch_size=batch_size,
                       remove_columns=dataset.column_names if columns is None else columns, num_proc=num_proc,
                       desc=desc, with_indices=with_indices)


def as_messages(dataset: Any, sample: Any, num_proc: int | None = None) -> tuple[Any, Any]:
    """(dataset, sample) with ShareGPT `conversations` rows turned into role/content `messages` (TRL's
    `maybe_convert_to_chatml`); unchanged when the rows are not ShareGPT-style."""
    if not is_sharegpt(sample):
        return dataset, sample
    converted = map_rows(dataset, sharegpt_to_messages, columns=sample.column_names, num_proc=num_proc,
                         desc="Converting conversations to messages")
    return converted, (sample.map(sharegpt_to_messages, remove_columns=sample.column_names)
                       if is_stream(dataset) else converted)


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
    truncation_mode: str = "keep_start",
    packing_strategy: str = "bfd",
    row_numbers: Any = None,
) -> Any:
    """Rows with `input_ids`, `loss_mask` (and `position_ids` when packed) for causal LM training.

    Accepts language modeling (`text_field`, `messages` or ShareGPT `conversations`), prompt-completion data,
    plain or conversational, and pre-tokenized rows (`input_ids`; see `tokenized_rows`). `formatting_func` turns
    any row into a `text` first (a batch-style one in batches of `batch_size`). add_special_tokens: let the
    tokenizer add its special tokens to plain text. A stream is tokenized lazily; packing it packs each run of
    `batch_size` rows. Every row is checked as it is tokenized (DatasetError naming `what`, the row and the
    column); `row_numbers`: the user's row index of each position, when the rows were reordered beforehand.
    """
    stream = is_stream(dataset)
    if formatting_func is not None and not stream and len(dataset) == 0:
        raise DatasetError(f"The {what} dataset is empty (0 rows). Fix: pass at least one example.")
    sample = sample_of(dataset, what)
    if packing and max_length is None:
        raise DatasetError("packing=True needs max_length, the length of a packed row. Fix: set max_length.")
    if has_columns(sample, TOKENIZED_LANGUAGE_MODELING):
        if formatting_func is not None:
            logger.warning("The %s dataset is already tokenized (it has `input_ids`), so formatting_func is not "
                           "used.", what)
        # packing: long rows are left whole for `packing_strategy` to cut or split, as for text
        tokenize = tokenized_rows(sample, completion_only_loss, assistant_only_loss, None if packing else max_length,
                                  truncation_mode, RowCheck(what, stream=stream, row_numbers=row_numbers))
    else:
        if formatting_func is not None:
            to_text, batched = formatting_func_to_text(formatting_func, sample, RowCheck(what, stream=stream,
                                                                                         row_numbers=row_numbers))
            formatted = map_rows(dataset, to_text, columns=sample.column_names, num_proc=num_proc, batched=batched,
                                 batch_size=batch_size, with_indices=True)
            sample = (sample.map(to_text, batched=batched, remove_columns=sample.column_names, with_indices=True)
                      if stream else formatted)
            dataset, text_field = formatted, "text"
        sharegpt = is_sharegpt(sample)
        dataset, sample = as_messages(dataset, sample, num_proc)
        check = RowCheck(what, stream=stream, roles=chat_roles(tokenizer), row_numbers=row_numbers, sharegpt=sharegpt)
        # packing: long examples are left whole for `packing_strategy` to cut or split (tether.data.collate)
        tokenize = _language_modeling_tokenizer(sample, tokenizer, text_field, None if packing else max_length,
                                                completion_only_loss, assistant_only_loss, add_special_tokens,
                                                truncation_mode, check)
    dataset = map_rows(dataset, tokenize, columns=sample.column_names, num_proc=num_proc,
                       desc=f"Tokenizing {what} dataset", with_indices=True)
    dataset = drop_untrainable(dataset, max_length, what)
    if packing:
        pack_rows = batch_size if stream else 10_000
        dataset = map_rows(dataset, lambda cols: pack_examples(cols, max_length, packing_strategy), columns=[],
                           batched=True, batch_size=pack_rows, num_proc=num_proc, desc=f"Packing {what} dataset")
    return dataset


def tokenized_rows(sample: Any, completion_only_loss: bool | None, assistant_only_loss: bool,
                   max_length: int | None, truncation_mode: str = "keep_start", check: RowCheck | None = None
                   ) -> Callable[[dict[str, Any], int], dict[str, list]]:
    """The function that turns one pre-tokenized row into `input_ids` and `loss_mask`, as TRL's SFT reads
    such rows (its loss mask rules; `sample` gives the columns):

    - a `labels` column decides alone: a token counts where its label is not -100 (a label must otherwise be
      the token itself, since tether's losses predict the input tokens);
    - else `assistant_masks` (1 = assistant token) always applies, and `completion_mask` (1 = completion
      token) applies when completion_only_loss is True, or None with `prompt` and `completion` columns too
      (TRL's default: completion_only_loss=None means False for other rows);
    - `attention_mask` zeros never count. Rows longer than `max_length` keep their first tokens (their last with
      truncation_mode="keep_end").

    The function takes the row and its index; `check` names the split in errors (a column the dataset has must
    have a value in every row: a missing mask or labels would silently count every token).
    """
    check = check or RowCheck()
    columns = set(sample.column_names)
    completion_only = completion_only_loss is True or (completion_only_loss is None
                                                       and {"prompt", "completion"} <= columns)
    if "labels" not in columns:
        for wanted, column, option in ((completion_only_loss is True, "completion_mask", "completion_only_loss"),
                                       (assistant_only_loss, "assistant_masks", "assistant_only_loss")):
            if wanted and column not in columns:
                raise DatasetError(
                    f"{option}=True, but the pre-tokenized rows (columns {sorted(columns)}) have no {column!r} "
                    f"column saying which tokens count. Fix: add {column!r} (1 where a token counts) or `labels` "
                    f"(-100 where it does not), or set {option}=False.")
    masks = [c for c, applies in (("assistant_masks", True), ("completion_mask", completion_only))
             if applies and c in columns]

    def convert(row: dict[str, Any], index: int = 0) -> dict[str, list]:
        ids = check.token_ids(row, index, "input_ids")
        if "labels" in columns:
            labels = check.values(row, index, "labels")
            _same_length(ids, labels, "labels", check, index)
            wrong = next((j for j, (t, label) in enumerate(zip(ids, labels)) if label not in (IGNORE_INDEX, t)), None)
            if wrong is not None:
                check.fail(index, "labels",
                           f"labels[{wrong}] = {labels[wrong]} but input_ids[{wrong}] = {ids[wrong]}: each label must "
                           f"be the input token (trained) or {IGNORE_INDEX} (not trained); tether's losses predict the "
                           "input tokens (the model shifts them)",
                           "build labels as input_ids with -100 where a token does not count")
            counts = [label != IGNORE_INDEX for label in labels]
        else:
            counts = [True] * len(ids)
            for column in masks:
                mask = check.values(row, index, column)
                _same_length(ids, mask, column, check, index)
                counts = [c and bool(m) for c, m in zip(counts, mask)]
        if "attention_mask" in columns:
            attention = check.values(row, index, "attention_mask")
            _same_length(ids, attention, "attention_mask", check, index)
            counts = [c and bool(a) for c, a in zip(counts, attention)]
        out = truncate({"input_ids": ids, "loss_mask": counts}, max_length, truncation_mode)
        if out["loss_mask"]:
            out["loss_mask"][0] = False  # nothing precedes the first token
        return out

    return convert


def _same_length(ids: list[int], values: Any, column: str, check: RowCheck, index: int) -> None:
    if len(values) != len(ids):
        check.fail(index, column, f"the row has {len(ids)} input_ids but {len(values)} values in {column!r}; the "
                   "two must align token by token", "build both from the same tokenization")


def _language_modeling_tokenizer(
    sample: Any,
    tokenizer: PreTrainedTokenizerBase,
    text_field: str,
    max_length: int | None,
    completion_only_loss: bool | None,
    assistant_only_loss: bool,
    add_special_tokens: bool,
    truncation_mode: str = "keep_start",
    check: RowCheck | None = None,
) -> Callable[[dict[str, Any], int], dict[str, list]]:
    """The function that tokenizes one row (given with its index) of a language modeling dataset whose format is
    read from `sample` (the dataset itself, or the first rows of a stream); `check` checks the row first."""
    check = check or RowCheck(roles=chat_roles(tokenizer))
    fmt = detect_format(sample, text_field=text_field, expected=LANGUAGE_MODELING_TYPES, check=check)
    if assistant_only_loss and not fmt.conversational:
        raise DatasetError(
            "assistant_only_loss=True needs conversational data (a `messages` column of role/content turns). "
            "Fix: set assistant_only_loss=False, or use completion_only_loss with prompt-completion data."
        )
    if fmt.conversational:
        require_chat_template(tokenizer)  # fail here, not inside dataset.map
    else:
        warn_if_no_eos(tokenizer, "plain-text examples" if fmt.type is DatasetType.LANGUAGE_MODELING
                       else "plain completions")
    completion_only = completion_only_loss is not False

    def tokenize(row: dict[str, Any], index: int = 0) -> dict[str, list]:
        check.format_row(fmt, row, index)
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
        return truncate(out, max_length, truncation_mode)

    return tokenize


def prepare_language_modeling_stream(dataset: Any, tokenizer: PreTrainedTokenizerBase, **options: Any) -> Any:
    """`prepare_language_modeling` for a streaming `datasets.IterableDataset` (kept name: that function
    takes streams itself)."""
    return prepare_language_modeling(dataset, tokenizer, **options)


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
    truncation_mode: str = "keep_start",
    packing_strategy: str = "bfd",
    row_numbers: Any = None,
) -> Any:
    """Any dataset SFT accepts -> what its collator reads.

    - `datasets.Dataset`: tokenized (and with `packing`, packed best-fit into rows of `max_length`).
    - streaming `datasets.IterableDataset`: tokenized on the fly; with `packing`, a `ConstantLengthDataset` of
      rows of `max_length` (buffer sized by num_of_sequences and chars_per_token; `infinite` restarts it), or
      for pre-tokenized rows, best-fit packing of each run of `batch_size` rows.
    - a torch Dataset / IterableDataset (a ConstantLengthDataset included): unchanged; its rows must be
      tokenized (input_ids, and labels or loss_mask).
    `model_rows`: rows for a Hugging Face-style collator (input_ids, attention_mask) instead of tether's
    (input_ids, loss_mask). Every row is checked as it is tokenized (see `prepare_language_modeling`; `what` names
    the split and `row_numbers` the user's index of each row when SFT shuffled them first).
    """
    import datasets
    import torch

    if isinstance(dataset, datasets.IterableDataset):
        if seq2seq:
            raise DatasetError(f"The {what} dataset is a stream, which encoder-decoder SFT does not read. "
                               "Fix: load it without streaming=True.")
        if packing and not has_columns(sample_of(dataset, what), TOKENIZED_LANGUAGE_MODELING):
            return ConstantLengthDataset(
                tokenizer, dataset, dataset_text_field=None if formatting_func else text_field,
                formatting_func=formatting_func, infinite=infinite, seq_length=max_length,
                num_of_sequences=num_of_sequences, chars_per_token=chars_per_token,
                append_concat_token=append_concat_token, add_special_tokens=add_special_tokens, what=what,
            )
        prepared = prepare_language_modeling(
            dataset, tokenizer, text_field=text_field, formatting_func=formatting_func, max_length=max_length,
            packing=packing, completion_only_loss=completion_only_loss, assistant_only_loss=assistant_only_loss,
            add_special_tokens=add_special_tokens, batch_size=batch_size, what=what,
            truncation_mode=truncation_mode, packing_strategy=packing_strategy)
    elif isinstance(dataset, torch.utils.data.Dataset) and not isinstance(dataset, datasets.Dataset):
        return dataset
    elif seq2seq:
        prepared = prepare_seq2seq(dataset, tokenizer, max_length=max_length, num_proc=num_proc, what=what,
                                   row_numbers=row_numbers)
    else:
        prepared = prepare_language_modeling(
            dataset, tokenizer, text_field=text_field, formatting_func=formatting_func, max_length=max_length,
            packing=packing, completion_only_loss=completion_only_loss, assistant_only_loss=assistant_only_loss,
            num_proc=num_proc, what=what, add_special_tokens=add_special_tokens, batch_size=batch_size,
            truncation_mode=truncation_mode, packing_strategy=packing_strategy, row_numbers=row_numbers)
    return as_model_rows(prepared) if model_rows else prepared


def prepare_seq2seq(
    dataset: Any,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None = 1024,
    num_proc: int | None = None,
    what: str = "train",
    row_numbers: Any = None,
) -> Any:
    """Rows with encoder `input_ids` (the prompt) and decoder `labels` (the completion + EOS); every row is checked
    as it is tokenized (`row_numbers`: the user's index of each row, when they were reordered)."""
    check = RowCheck(what, roles=chat_roles(tokenizer), row_numbers=row_numbers)
    fmt = detect_format(dataset, expected=(DatasetType.PROMPT_COMPLETION,), check=check)
    if fmt.conversational:
        require_chat_template(tokenizer)
    warn_if_no_eos(tokenizer, "the decoder targets (labels)")

    def tokenize(row: dict[str, Any], index: int) -> dict[str, list]:
        check.format_row(fmt, row, index)
        completion = row["completion"]
        if fmt.conversational:
            completion = "".join(m["content"] for m in completion)
        # EOS ends every target, whether or not the tokenizer appends it itself (T5's does).
        labels = with_eos(tokenizer, tokenizer(completion)["input_ids"])[:max_length]
        return {"input_ids": tokenize_prompt(tokenizer, row["prompt"])[:max_length], "labels": labels,
                "loss_mask": [False, *([True] * len(labels))]}

    dataset = dataset.map(tokenize, remove_columns=dataset.column_names, num_proc=num_proc,
                          desc=f"Tokenizing {what} dataset", with_indices=True)
    return drop_untrainable(dataset, max_length, what).remove_columns("loss_mask")


def prepare_prompts(
    dataset: Any,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_prompt_length: int | None = None,
    num_proc: int | None = None,
    what: str = "train",
    chat_template_kwargs: dict[str, Any] | None = None,
) -> Any:
    """Prompt-only rows for online methods: adds `prompt_input_ids`; every other column stays, so
    reward functions can receive it. A prompt longer than `max_prompt_length` tokens is an error: before
    training for a Dataset; for a stream, on its first rows ahead and on later ones when they are read.
    chat_template_kwargs go to apply_chat_template for conversational prompts (e.g. {"enable_thinking": False}).
    Every prompt is checked as it is tokenized: a missing, wrongly typed or empty prompt is a DatasetError naming
    its row (there would be nothing to generate from)."""
    stream = is_stream(dataset)
    check = RowCheck(what, stream=stream, roles=chat_roles(tokenizer))
    fmt = detect_format(dataset, expected=(DatasetType.PROMPT_ONLY,), check=check)

    def tokenize(row: dict[str, Any], index: int) -> dict[str, list[int]]:
        prompt = check.text(row, index, "prompt", fmt.conversational)
        check.nonempty_prompt(prompt, index)
        ids = tokenize_prompt(tokenizer, prompt, **(chat_template_kwargs or {}))
        if not ids:
            check.fail(index, "prompt", f"the prompt {repr(prompt)[:60]} tokenizes to no token, so there is nothing "
                       "to generate from", "give it some text, or drop such rows")
        return {"prompt_input_ids": ids}

    if stream:
        sample = sample_of(dataset, what).map(tokenize, with_indices=True)
        _check_prompt_lengths(sample["prompt_input_ids"], max_prompt_length, what)

        def tokenize_checked(row: dict[str, Any], index: int) -> dict[str, list[int]]:
            out = tokenize(row, index)
            length = len(out["prompt_input_ids"])
            if max_prompt_length is not None and length > max_prompt_length:
                check.fail(index, "prompt", f"the prompt is {length} tokens long, more than max_prompt_length="
                           f"{max_prompt_length}", "raise max_prompt_length, or filter or shorten those prompts")
            return out

        return dataset.map(tokenize_checked, with_indices=True)
    dataset = dataset.map(tokenize, num_proc=num_proc, desc=f"Tokenizing {what} prompts", with_indices=True)
    _check_prompt_lengths(dataset["prompt_input_ids"], max_prompt_length, what)
    return dataset


def _check_prompt_lengths(prompts: list[list[int]], max_prompt_length: int | None, what: str) -> None:
    if max_prompt_length is None:
        return
    too_long = [i for i, ids in enumerate(prompts) if len(ids) > max_prompt_length]
    if too_long:
        raise DatasetError(
            f"{len(too_long)} {what} prompt(s) are longer than max_prompt_length={max_prompt_length} tokens "
            f"(first: row {too_long[0]}, {len(prompts[too_long[0]])} tokens). "
            "Fix: raise max_prompt_length, or filter or shorten those prompts."
        )
