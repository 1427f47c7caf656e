"""Two argparse rules every parser tether builds follows (the `tether` command and `TrlParser`):

- no abbreviated flags: argparse would read `--learning_rat 1e-3` as `--learning_rate 1e-3`, so a typo (or a
  flag that a later version adds and makes ambiguous) silently sets some other option;
- negative numbers in any notation are values: argparse's own test (`-5`, `-0.5`) misses `-1e-2`, `-1E3`,
  `-5.` and `-inf`, which it then takes for a flag, failing with "expected one argument" instead of letting
  the config say what is wrong with the value.

Imports nothing heavy: the `tether` command applies it before torch is loaded.
"""

from __future__ import annotations

import argparse
import difflib
import re

# What float() reads as a negative number: digits with an optional point and exponent, or inf / nan.
NEGATIVE_NUMBER = re.compile(r"^-(?:(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|inf|infinity|nan)$", re.IGNORECASE)


def make_strict(parser: argparse.ArgumentParser, allow_abbrev: bool = False) -> argparse.ArgumentParser:
    """Turn off abbreviations (unless `allow_abbrev`) and accept negative numbers as values in `parser` and its
    subparsers (both are read at parse time, so this works on a parser already built). Returns `parser`."""
    parser.allow_abbrev = allow_abbrev
    parser._negative_number_matcher = NEGATIVE_NUMBER
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                make_strict(subparser, allow_abbrev)
    return parser


def unknown_flags_message(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """'unrecognized arguments: --learning_rat 1e-3 (did you mean --learning_rate?)': the strings argparse
    did not take, with the closest real flag for each that looks like a flag."""
    flags = [option for action in parser._actions for option in action.option_strings if option.startswith("--")]
    hints = []
    for text in unknown:
        name = text.split("=", 1)[0]
        close = difflib.get_close_matches(name, flags, n=1) if name.startswith("--") else []
        hints.append(f"{text} (did you mean {close[0]}?)" if close else text)
    return f"unrecognized arguments: {' '.join(hints)}. Abbreviated flags are not accepted: write the full name."
