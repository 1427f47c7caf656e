"""Row checks: every raw value a trainer reads is checked in the same map that tokenizes its row, so the whole
dataset is validated (not its first rows) without a second pass over it, and a bad value stops preparation
with a `DatasetError` naming the split, the row, the column, what is wrong and the fix.

The row index is the row's position in the dataset as the user passed it (a streaming dataset: its position in
the stream, checked when the row is read). With `dataset_num_proc` > 1 it is still the global index: the maps
run `with_indices=True`, which datasets offsets per shard.

What is an error, and what is only a warning:
- errors (nothing sensible can be trained from the row): a missing (None) or wrongly typed value, an empty
  list of messages, a message without a role or with a role no chat template knows, a message whose content
  is None (and that has no tool calls), token ids that are not non-negative integers, a label that is not a
  boolean, a margin that is not a finite number, an empty prompt for an online method (nothing to generate from);
- warnings, counted once per dataset (see `PairFlags`): preference pairs whose chosen and rejected are the
  same, or whose chosen or rejected completion is empty; a tokenizer without an EOS token where one is
  appended to plain text (`warn_if_no_eos`).
"""

from __future__ import annotations

import difflib
import math
import operator
import re
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

from .formats import DatasetError, DatasetFormat, DatasetType

# The roles TRL's data utilities accept; a role the tokenizer's chat template names (e.g. Llama 3.1's "ipython",
# gpt-oss's "developer", GLM-4's "observation") is accepted too (`chat_roles`).
KNOWN_ROLES = ("system", "user", "assistant", "tool")
# Likely meanings of roles that are not chat roles, to suggest in the fix.
_ROLE_GUESSES = {"usr": "user", "human": "user", "bot": "assistant", "gpt": "assistant", "ai": "assistant",
                 "model": "assistant", "sys": "system", "function": "tool", "observation": "tool"}
_TEMPLATE_LITERAL = re.compile(r"""(['"])([A-Za-z_][A-Za-z0-9_-]{0,31})\1""")


def chat_roles(tokenizer: Any) -> frozenset[str]:
    """The roles a conversation may use with `tokenizer`: KNOWN_ROLES, and every word the tokenizer's chat
    template writes as a quoted string literal (a template that handles a role compares it with one)."""
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(template, dict):
        template = " ".join(str(t) for t in template.values())
    literals = {m.group(2) for m in _TEMPLATE_LITERAL.finditer(template)} if isinstance(template, str) else set()
    return frozenset(KNOWN_ROLES) | frozenset(literals)


def _shown(value: Any) -> str:
    return f"{type(value).__name__} {repr(value)[:60]}"


def is_empty_text(value: Any) -> bool:
    """Whether a completion has no text: a blank string, or messages whose contents are all blank strings."""
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list):
        return all(isinstance(m, dict) and isinstance(m.get("content"), str) and not m["content"].strip()
                   and not m.get("tool_calls") for m in value)
    return False


class RowCheck:
    """The checks of one dataset's rows, built once per preparation and called per row with its index.

    what: the split, as trainers name it ("train", "eval", "eval <name>"); None: just "the dataset".
    stream: the rows come from a stream (the index is the stream position).
    roles: the chat roles accepted (`chat_roles(tokenizer)`); None: any role name (no tokenizer to judge by).
    row_numbers: the user's row index of each position, when the rows were reordered before preparation
    (SFT's shuffle_dataset); default: the position itself.
    sharegpt: the rows were ShareGPT `conversations` of {"from", "value"} messages, renamed `messages` of
    {"role", "content"} ones before the check: messages name the original column and keys.
    """

    def __init__(self, what: str | None = None, *, stream: bool = False, roles: Iterable[str] | None = None,
                 row_numbers: Sequence[int] | None = None, sharegpt: bool = False) -> None:
        self.what, self.stream = what, stream
        self.roles = frozenset(roles) if roles is not None else None
        self.row_numbers = row_numbers
        self.column_names = {"messages": "conversations"} if sharegpt else {}
        self.keys = {"role": "from", "content": "value"} if sharegpt else {"role": "role", "content": "content"}

    # ----- messages ----------------------------------------------------------------------------------------
    def row_number(self, index: int) -> int:
        return int(self.row_numbers[index]) if self.row_numbers is not None else int(index)

    def where(self, index: int, column: str) -> str:
        split = f"the {self.what} dataset" if self.what else "the dataset"
        position = " (stream position)" if self.stream else ""
        return f"Row {self.row_number(index)}{position} of {split}, column {self.column_names.get(column, column)!r}"

    def fail(self, index: int, column: str, problem: str, fix: str) -> NoReturn:
        raise DatasetError(f"{self.where(index, column)}: {problem}. Fix: {fix}")

    def _drop_fix(self, column: str, condition: str) -> str:
        column = self.column_names.get(column, column)
        return f"correct that row, or drop such rows: dataset.filter(lambda row: {condition.format(c=repr(column))})"

    # ----- values ------------------------------------------------------------------------------------------
    def present(self, row: dict[str, Any], index: int, column: str) -> Any:
        """row[column], which must not be None (nor absent)."""
        value = row.get(column)
        if value is None:
            self.fail(index, column, "the value is missing (None)", self._drop_fix(column, "row[{c}] is not None"))
        return value

    def text(self, row: dict[str, Any], index: int, column: str, conversational: bool) -> Any:
        """row[column] as the dataset's format has it: a string, or (conversational) a non-empty list of valid
        messages."""
        value = self.present(row, index, column)
        if not conversational:
            if not isinstance(value, str):
                self.fail(index, column, f"it holds {_shown(value)}, but this dataset's {column!r} values are "
                          "strings (plain text, as in its first rows)",
                          "convert the value to a string, or drop that row")
            return value
        if not isinstance(value, list):
            self.fail(index, column, f"it holds {_shown(value)}, but this dataset's {column!r} values are lists "
                      "of {'role': ..., 'content': ...} messages (as in its first rows)",
                      "use one representation for every row (a list of messages), or drop that row")
        if not value:
            self.fail(index, column, "it is an empty list of messages", self._drop_fix(column, "len(row[{c}]) > 0"))
        for position, message in enumerate(value):
            self._message(message, index, column, position)
        return value

    def _message(self, message: Any, index: int, column: str, position: int) -> None:
        role_key, content_key = self.keys["role"], self.keys["content"]
        if not isinstance(message, dict):
            self.fail(index, column, f"message {position} is {_shown(message)}, not a {{{role_key!r}: ..., "
                      f"{content_key!r}: ...}} dict", "make every message such a dict, or drop that row")
        role = message.get("role")
        if role is None:
            self.fail(index, column, f"message {position} has no {role_key!r}",
                      f"give every message a {role_key!r} ({', '.join(map(repr, KNOWN_ROLES))}), or drop that row")
        if not isinstance(role, str) or (self.roles is not None and role not in self.roles):
            guess = _ROLE_GUESSES.get(role) if isinstance(role, str) else None
            if guess is None and isinstance(role, str):
                guess = next(iter(difflib.get_close_matches(role, KNOWN_ROLES, n=1, cutoff=0.6)), None)
            hint = f" ({role!r} -> {guess!r}?)" if guess else ""
            self.fail(index, column, f"message {position} has {role_key} {role!r}, which is not a chat role (known: "
                      f"{', '.join(map(repr, KNOWN_ROLES))}, and the roles the tokenizer's chat template names)",
                      f"map it to one of those roles{hint} before training, e.g. with dataset.map, or drop that row")
        content = message.get("content")
        if content is None:
            if message.get("tool_calls"):  # an assistant turn that only calls tools
                return
            self.fail(index, column, f"message {position} ({role}) has {content_key} None",
                      "give it a string ('' for no text), or drop that row")
        if not isinstance(content, (str, list)):
            self.fail(index, column, f"message {position} ({role}) has {content_key} {_shown(content)}",
                      "make the content a string (or a list of {'type': ..., ...} parts), or drop that row")

    def format_row(self, fmt: DatasetFormat, row: dict[str, Any], index: int) -> None:
        """Check every column `fmt` reads from the row (text columns, and `label` for unpaired preference)."""
        for column in fmt.text_columns:
            self.text(row, index, column, fmt.conversational)
        if fmt.type is DatasetType.UNPAIRED_PREFERENCE:
            self.label(row, index)

    def label(self, row: dict[str, Any], index: int) -> bool:
        value = row.get("label")
        if not isinstance(value, bool) and value not in (0, 1):
            self.fail(index, "label", f"it is {value!r}; unpaired preference labels must be booleans (True = "
                      "desirable; 0/1 are read as False/True)", "map the column to bool, or drop that row")
        return bool(value)

    def number(self, row: dict[str, Any], index: int, column: str) -> float:
        """row[column] as a finite float."""
        value = row.get(column)
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            self.fail(index, column, f"it holds {value!r}; {column} values must be finite numbers",
                      "fill or drop those rows")
        return number

    def token_ids(self, row: dict[str, Any], index: int, column: str, optional: bool = False) -> list[int] | None:
        """row[column] as a list of token ids (non-negative integers); None when `optional` and absent."""
        value = row.get(column)
        if value is None:
            if optional:
                return None
            self.fail(index, column, "the value is missing (None)", self._drop_fix(column, "row[{c}] is not None"))
        if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
            self.fail(index, column, f"it holds {_shown(value)}, not a list of token ids",
                      "store the token ids as a list of integers")
        try:
            ids = [operator.index(t) for t in value]
        except TypeError:
            wrong = next(t for t in value if not _is_index(t))
            self.fail(index, column, f"it holds {_shown(wrong)} among its token ids, which must be integers",
                      "store the token ids as a list of integers")
        if ids and min(ids) < 0:
            self.fail(index, column, f"it holds the negative token id {min(ids)}",
                      "store the real token ids (-100 marks ignored tokens in `labels` only)")
        return ids

    def values(self, row: dict[str, Any], index: int, column: str) -> list:
        """row[column] as a list (a per-token mask or labels) that must be present in every row."""
        value = self.present(row, index, column)
        if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__"):
            self.fail(index, column, f"it holds {_shown(value)}, not a list with one value per token",
                      "store one value per token")
        return list(value)

    def nonempty_prompt(self, prompt: Any, index: int) -> None:
        """An online method's prompt must hold text to generate from."""
        if isinstance(prompt, str) and not prompt.strip():
            self.fail(index, "prompt", f"the prompt is empty ({prompt!r}), so there is nothing to generate from",
                      self._drop_fix("prompt", "row[{c}].strip() != ''"))


def _is_index(value: Any) -> bool:
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


# ----- counted warnings ------------------------------------------------------------------------------------------
IDENTICAL, EMPTY_CHOSEN, EMPTY_REJECTED = 1, 2, 4
PAIR_FLAGS_COLUMN = "_tether_pair_flags"  # per-row bit flags a map emits, counted and dropped after it

_FLAG_TEXT = {
    IDENTICAL: ("have chosen == rejected",
                "such a pair states no preference: DPO-style and reward losses get no gradient from it (CPO/ORPO's "
                "NLL term still trains on the chosen side; KTO sees the same completion as desirable and "
                "undesirable)", "dataset.filter(lambda row: row['chosen'] != row['rejected'])"),
    EMPTY_CHOSEN: ("have an empty chosen completion",
                   "that side is trained on its end-of-sequence token alone (an immediate stop is preferred)",
                   "dataset.filter(lambda row: row['chosen'].strip() != '') (plain text)"),
    EMPTY_REJECTED: ("have an empty rejected completion",
                     "that side is trained on its end-of-sequence token alone (an immediate stop is dispreferred)",
                     "dataset.filter(lambda row: row['rejected'].strip() != '') (plain text)"),
}


def pair_flags(chosen: Any, rejected: Any, chosen_completion: Any, rejected_completion: Any) -> int:
    """The warning flags of one preference pair: the raw chosen/rejected values, and their completions once
    the prompt is split off (the same values when the prompt is explicit)."""
    flags = IDENTICAL if chosen == rejected else 0
    if not flags:
        flags |= EMPTY_CHOSEN if is_empty_text(chosen_completion) else 0
        flags |= EMPTY_REJECTED if is_empty_text(rejected_completion) else 0
    return flags


def _pair_warning(flag: int, count: int, total: int, rows: list[int], what: str) -> str:
    has, effect, fix = _FLAG_TEXT[flag]
    listed = ", ".join(map(str, rows[:10])) + (", ..." if count > len(rows[:10]) else "")
    return (f"{count} of {total} {what} preference pairs {has} ({'row' if count == 1 else 'rows'} {listed}): "
            f"{effect}. They are kept, as TRL keeps them. Fix: drop them, e.g. {fix}.")


def warn_pair_flags(flags: Sequence[int], what: str, row_numbers: Sequence[int] | None = None) -> None:
    """One warning per kind of flagged pair of a whole dataset, counting them and naming the first rows."""
    for flag in _FLAG_TEXT:
        rows = [i for i, f in enumerate(flags) if f & flag]
        if rows:
            rows = [int(row_numbers[i]) for i in rows] if row_numbers is not None else rows
            warnings.warn(_pair_warning(flag, len(rows), len(flags), rows, what), UserWarning, stacklevel=4)


class StreamPairWarnings:
    """For a stream, whose rows are not counted ahead: the first flagged pair of each kind warns, once."""

    def __init__(self, what: str) -> None:
        self.what, self.seen = what, 0

    def __call__(self, flags: int, index: int) -> None:
        for flag in _FLAG_TEXT:
            if flags & flag and not self.seen & flag:
                self.seen |= flag
                has, effect, fix = _FLAG_TEXT[flag]
                warnings.warn(f"Row {index} (stream position) of the {self.what} stream is a preference pair that "
                              f"{has.replace('have', 'has')} ({effect}; later such rows of the stream are not "
                              f"reported). Fix: drop them, e.g. {fix}.", UserWarning, stacklevel=2)


def finish_pair_flags(dataset: Any, what: str, row_numbers: Sequence[int] | None = None) -> Any:
    """Warn about the flagged pairs of a prepared datasets.Dataset and drop the flag column (a cheap column
    read, not a pass over the data)."""
    if PAIR_FLAGS_COLUMN not in (dataset.column_names or []):
        return dataset
    warn_pair_flags(dataset[PAIR_FLAGS_COLUMN], what, row_numbers)
    return dataset.remove_columns(PAIR_FLAGS_COLUMN)


def warn_if_no_eos(tokenizer: Any, appended_to: str) -> None:
    """One warning when `tokenizer` has no EOS token although the data path appends one to `appended_to`."""
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is None:
        warnings.warn(
            f"The tokenizer ({type(tokenizer).__name__}) has no EOS token, so {appended_to} end without one and the "
            "model does not learn where a text ends (generation runs to its length limit). Fix: set "
            "tokenizer.eos_token to the token that ends a text (SFTConfig and RewardConfig also take eos_token=...).",
            UserWarning, stacklevel=3)
