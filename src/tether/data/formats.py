"""Dataset formats: detect which of the known types a dataset is, and reject bad ones early.

Types, by columns:
- language modeling: `text` (or the configured text field), or `messages` (a conversation)
- prompt-completion: `prompt`, `completion`
- prompt-only: `prompt`
- preference: `prompt`, `chosen`, `rejected`, or implicit prompt: `chosen`, `rejected`
- unpaired preference: `prompt`, `completion`, `label`

Each text column holds either strings (plain) or lists of {"role", "content"} dicts (conversational).
A streaming `datasets.IterableDataset` is read through its first rows (`stream_sample`), which restarts
the stream rather than consuming it.
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# Rows of a stream read ahead to detect and validate its format.
STREAM_SAMPLE_ROWS = 8


class DatasetError(ValueError):
    """A dataset that cannot be trained on; the message names the column or row and the fix."""


class DatasetType(str, enum.Enum):
    LANGUAGE_MODELING = "language modeling"
    PROMPT_COMPLETION = "prompt-completion"
    PROMPT_ONLY = "prompt-only"
    PREFERENCE = "preference"
    UNPAIRED_PREFERENCE = "unpaired preference"


# The columns that make each type, in the order detection tries them (most specific first).
_SIGNATURES: list[tuple[DatasetType, tuple[str, ...]]] = [
    (DatasetType.PREFERENCE, ("prompt", "chosen", "rejected")),
    (DatasetType.UNPAIRED_PREFERENCE, ("prompt", "completion", "label")),
    (DatasetType.PREFERENCE, ("chosen", "rejected")),
    (DatasetType.PROMPT_COMPLETION, ("prompt", "completion")),
    (DatasetType.LANGUAGE_MODELING, ("messages",)),
    (DatasetType.PROMPT_ONLY, ("prompt",)),
]
_KNOWN_COLUMNS = {"text", "messages", "prompt", "completion", "chosen", "rejected", "label"}


@dataclass(frozen=True)
class DatasetFormat:
    type: DatasetType
    conversational: bool
    text_columns: tuple[str, ...]  # the columns that carry text or messages

    @property
    def implicit_prompt(self) -> bool:
        return self.type is DatasetType.PREFERENCE and "prompt" not in self.text_columns


def is_stream(dataset: Any) -> bool:
    """Whether `dataset` is a streaming `datasets.IterableDataset` (e.g. `load_dataset(..., streaming=True)`)."""
    import datasets

    return isinstance(dataset, datasets.IterableDataset)


def stream_sample(dataset: Any, rows: int = STREAM_SAMPLE_ROWS) -> Any:
    """The first `rows` rows of a stream as a `datasets.Dataset` (empty if the stream yields none).

    `take` starts a fresh iteration of the source, so the stream a trainer later reads still begins at
    its first row; a generator-backed stream calls its generator again."""
    import datasets
    import pyarrow

    head = [dict(row) for row in dataset.take(rows)]
    try:
        return datasets.Dataset.from_list(head)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError) as error:
        # Arrow gives a column one type; name the column whose first rows mix them, and the rows.
        for column in dict.fromkeys(key for row in head for key in row):
            kinds = [type(row.get(column)).__name__ for row in head]
            if len(set(kinds) - {"NoneType"}) > 1:
                raise DatasetError(
                    f"The first {len(head)} rows of the stream hold values of different types in column {column!r} "
                    f"(row by row: {', '.join(kinds)}). Fix: give every row of a column one type (a string, or a "
                    "list of messages), or drop the others.") from error
        raise


def _column_names(dataset: Any) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if names is None:
        raise DatasetError(f"Expected a datasets.Dataset (or a dict of columns), got {type(dataset).__name__}.")
    return list(names)


def is_conversation(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    )


def _column_hint(columns: list[str], signatures: list[tuple[DatasetType, tuple[str, ...]]]) -> str:
    """Name the columns missing for the closest accepted format, and likely misspellings."""
    hints = []
    overlap = [(sum(c in columns for c in cols), t, cols) for t, cols in signatures]
    best = max((o for o in overlap if o[0] > 0), key=lambda o: o[0], default=None)
    if best is not None:
        _, closest, cols = best
        missing = [c for c in cols if c not in columns]
        hints.append(f"the closest accepted format, {closest.value}, also needs column(s) "
                     f"{', '.join(repr(c) for c in missing)}")
    known = {c for _, cols in signatures for c in cols} | _KNOWN_COLUMNS
    for column in columns:
        if column in known:
            continue
        close = difflib.get_close_matches(column, sorted(known), n=1, cutoff=0.6)
        if close:
            hints.append(f"column {column!r} looks like a misspelling of {close[0]!r}")
    return (" Note: " + "; ".join(hints) + ".") if hints else ""


def detect_format(dataset: Any, text_field: str = "text", expected: Iterable[DatasetType] | None = None,
                  what: str | None = None, check: Any = None) -> DatasetFormat:
    """Detect the dataset's type from its columns and first rows; raise DatasetError naming the problem and the fix.

    `expected` lists the types the calling trainer accepts. A trainer that accepts prompt-only data
    takes any dataset with a `prompt` column (the other columns are extra data, e.g. for reward
    functions), as TRL's online trainers do. Plain or conversational is read from the first rows
    (STREAM_SAMPLE_ROWS of them), which are also checked here by `check` (a `validate.RowCheck`; default: one
    naming the split `what` and accepting any role name); every other row is checked by the map that tokenizes
    it, so this never reads the whole dataset.
    """
    if is_stream(dataset):
        dataset = stream_sample(dataset)
    columns = _column_names(dataset)
    if len(dataset) == 0:
        raise DatasetError("The dataset is empty (0 rows). Fix: pass a dataset with at least one example.")
    signatures = [(DatasetType.LANGUAGE_MODELING, (text_field,)), *_SIGNATURES]
    found = next(((t, cols) for t, cols in signatures if all(c in columns for c in cols)), None)
    expected = list(expected) if expected is not None else None
    if expected is not None and DatasetType.PROMPT_ONLY in expected and found and found[0] not in expected \
            and "prompt" in columns:
        found = (DatasetType.PROMPT_ONLY, ("prompt",))
    if found is None or (expected is not None and found[0] not in expected):
        wanted = expected or [t for t, _ in signatures]
        described = "; ".join(
            f"{t.value}: {', '.join(repr(c) for c in cols)}" for t, cols in signatures if t in wanted
        )
        what_it_is = f"It looks like a {found[0].value} dataset. " if found else ""
        hint = _column_hint(columns, [(t, cols) for t, cols in signatures if t in wanted])
        raise DatasetError(
            f"The dataset's columns {columns} do not match a format this trainer accepts. {what_it_is}"
            f"Accepted formats and their columns: {described}.{hint} "
            "Fix: rename the columns (dataset.rename_column(old, new)) or set the text field option."
        )
    dataset_type, text_columns = found
    text_columns = tuple(c for c in text_columns if c != "label")
    what = what if check is None else check.what
    head = dataset[:STREAM_SAMPLE_ROWS]  # a dict of columns: the first rows only
    rows = [dict(zip(head, values)) for values in zip(*head.values())]
    fmt = DatasetFormat(dataset_type, _conversational(rows, text_columns, what), text_columns)
    if check is None:
        from .validate import RowCheck  # validate imports this module

        check = RowCheck(what)
    for index, row in enumerate(rows):
        check.format_row(fmt, row, index)
    return fmt


def _conversational(rows: list[dict[str, Any]], text_columns: tuple[str, ...], what: str | None) -> bool:
    """Whether the text columns hold message lists (else strings), read from the first value of each column that
    is a string or a list; a column whose first rows hold neither is left to the row check."""
    kinds = {}
    for column in text_columns:
        value = next((row[column] for row in rows if isinstance(row[column], (str, list))), None)
        if value is not None:
            kinds[column] = "conversational" if isinstance(value, list) else "plain"
    if len(set(kinds.values())) > 1:
        split = f" of the {what} dataset" if what else ""
        raise DatasetError(
            f"Columns {list(text_columns)}{split} mix plain strings and message lists "
            f"({', '.join(f'{c!r}: {k}' for c, k in kinds.items())}). "
            "Fix: use one representation for every text column."
        )
    return set(kinds.values()) == {"conversational"}


# ----- other row forms TRL accepts ------------------------------------------------------------------------
def is_sharegpt(dataset: Any) -> bool:
    """Whether the rows of a `datasets.Dataset` (for a stream: its `stream_sample`) hold a ShareGPT-style
    `conversations` column, [{"from": ..., "value": ...}, ...] (decided on the first row, as TRL does)."""
    if "conversations" not in _column_names(dataset) or len(dataset) == 0:
        return False
    first = dataset[0]["conversations"]
    return isinstance(first, list) and bool(first) and isinstance(first[0], dict) and {"from", "value"} <= set(first[0])


def sharegpt_to_messages(row: dict[str, Any]) -> dict[str, Any]:
    """One row with ShareGPT messages -> role/content messages, `conversations` renamed `messages` (TRL's
    `maybe_convert_to_chatml`). Keys are renamed in every message list of the row (prompt, completion, chosen,
    rejected, messages, conversations). ShareGPT's own speaker names become chat roles ("human" -> "user",
    "gpt" -> "assistant"; TRL keeps them, which chat templates then render as unknown roles or refuse); other
    role names are kept as they are."""
    out = {}
    for key, value in row.items():
        if key in _MESSAGE_COLUMNS and isinstance(value, list):
            value = [_chatml_message(m) if isinstance(m, dict) else m for m in value]
        out["messages" if key == "conversations" else key] = value
    return out


def _chatml_message(message: dict[str, Any]) -> dict[str, Any]:
    out = {_SHAREGPT_KEYS.get(k, k): v for k, v in message.items()}
    if isinstance(out.get("role"), str):
        out["role"] = SHAREGPT_ROLES.get(out["role"], out["role"])
    return out


_SHAREGPT_KEYS = {"from": "role", "value": "content"}
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}  # ShareGPT's speaker names -> chat roles
_MESSAGE_COLUMNS = ("prompt", "completion", "chosen", "rejected", "messages", "conversations")

# Pre-tokenized rows: id columns that replace text columns, per kind of data.
TOKENIZED_LANGUAGE_MODELING = ("input_ids",)
TOKENIZED_PAIRS = ("chosen_ids", "rejected_ids")  # whole sequences, or completions after `prompt_ids`
LEGACY_TOKENIZED_PAIRS = ("chosen_input_ids", "rejected_input_ids")  # TRL 1.x's deprecated names of the above


def has_columns(dataset: Any, columns: Iterable[str]) -> bool:
    """Whether a `datasets.Dataset` (for a stream: its `stream_sample`) has every one of `columns`."""
    names = _column_names(dataset)
    return all(c in names for c in columns)
