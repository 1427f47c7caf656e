"""`TrlParser`: transformers' `HfArgumentParser` plus a `--config file.yaml` whose keys set the defaults of
the dataclass fields (command-line flags still override them) and whose `env:` section sets environment
variables, as TRL 1.x scripts parse their arguments; and `init_zero_verbose`, the quiet logging set-up TRL's
command-line modules call first.

    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig))
    script_args, training_args, model_args, dataset_args, rest = parser.parse_args_and_config(
        return_remaining_strings=True)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import types
import typing
from collections.abc import Callable, Iterable
from enum import Enum
from typing import Any

from transformers import HfArgumentParser

from .strict import make_strict, unknown_flags_message

CONFIG_FLAG = "--config"
ENV_SECTION = "env"


def _none_or(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """`convert`, except that "none"/"null" (any case) give None: so `--max_length None` can unset an
    optional number on the command line, which argparse's `type=int` would reject."""

    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its error messages
    return parse


def _settable_to_none(annotation: Any) -> bool:
    """Whether a field annotated `X | None` parses through `type=X` (a plain, non-str X): those are the
    fields that take the "none" sentinel. Lists, bools, Literals and Enums parse otherwise."""
    origin = typing.get_origin(annotation)
    if origin is not typing.Union and origin is not types.UnionType:
        return False
    args = typing.get_args(annotation)
    if len(args) != 2 or type(None) not in args or bool in args or str in args:
        return False
    (inner,) = [a for a in args if a is not type(None)]
    inner_origin = typing.get_origin(inner) or inner
    if inner_origin is typing.Literal or (isinstance(inner_origin, type) and issubclass(inner_origin, (list, Enum))):
        return False
    return True


def json_dict_flags(parser: argparse.ArgumentParser) -> None:
    """Make dict-typed flags (e.g. --model_init_kwargs) parse their text as JSON; argparse would call
    dict("...") on it and fail."""
    for action in parser._actions:
        if action.type is dict or typing.get_origin(action.type) is dict:
            action.type = json.loads


class _SharedFieldsNamespace(argparse.Namespace):
    """argparse's namespace for dataclasses that share field names. HfArgumentParser hands each dataclass
    the namespace entries named like its fields and then deletes them; a shared entry is deleted only
    once the last dataclass that has it has taken it."""

    # Set on a fresh subclass for each parse (a class attribute, so it is no entry of vars(namespace)):
    # field name -> dataclasses that still have to take it.
    takers_left: dict[str, int] = {}

    def __delattr__(self, name: str) -> None:
        if self.takers_left.get(name, 1) > 1:
            self.takers_left[name] -= 1
            return
        super().__delattr__(name)


class TrlParser(HfArgumentParser):
    """An `HfArgumentParser` over `dataclass_types` that also reads `--config file.yaml` (see
    `parse_args_and_config`). No dataclass may have a field named `config`: that name is the flag's.

    A field name several dataclasses have (e.g. `trust_remote_code`, on tether's training configs as in TRL
    1.x and on ModelConfig as in TRL 0.7) is one flag, which sets it on each of them; its type, help and
    default are the first dataclass's.

    Unlike argparse's default, flags are never abbreviated (pass allow_abbrev=True to allow it), and a negative
    number in any notation (`--learning_rate -1e-2`) is a value, which the config then judges.
    """

    def __init__(self, dataclass_types: Any = None, **kwargs: Any) -> None:
        if dataclass_types is None:
            dataclass_types = []
        elif dataclasses.is_dataclass(dataclass_types) or not isinstance(dataclass_types, Iterable):
            dataclass_types = [dataclass_types]
        dataclass_types = list(dataclass_types)
        uses: dict[str, int] = {}
        for dataclass_type in dataclass_types:
            names = {f.name for f in dataclasses.fields(dataclass_type) if f.init}
            if "config" in names:
                raise ValueError(f"Dataclass {dataclass_type.__name__} has a field named 'config', which TrlParser "
                                 "keeps for the --config YAML file. Rename the field.")
            for name in names:
                uses[name] = uses.get(name, 0) + 1
        self._shared_fields = {name: n for name, n in uses.items() if n > 1}
        # No abbreviated flags unless asked for: `--learning_rat` must be an error, not --learning_rate.
        allow_abbrev = kwargs.pop("allow_abbrev", False)
        super().__init__(dataclass_types=dataclass_types, allow_abbrev=allow_abbrev, **kwargs)
        make_strict(self, allow_abbrev)  # and `--learning_rate -1e-2` is a value, for the config to judge
        json_dict_flags(self)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[Any, list[str]]:
        if namespace is None and getattr(self, "_shared_fields", None):
            namespace = type("Namespace", (_SharedFieldsNamespace,), {"takers_left": dict(self._shared_fields)})()
        return super().parse_known_args(args, namespace)

    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
        if any(action.dest == field.name for action in parser._actions):
            return  # a field of an earlier dataclass too: its flag sets both
        none_sentinel = _settable_to_none(field.type)  # read before the base class narrows field.type
        HfArgumentParser._parse_dataclass_field(parser, field)
        if none_sentinel:
            action = next(a for a in reversed(parser._actions) if a.dest == field.name)
            if action.type is not None and action.type is not dict and typing.get_origin(action.type) is not dict:
                action.type = _none_or(action.type)

    def parse_args_and_config(
        self,
        args: Iterable[str] | None = None,
        return_remaining_strings: bool = False,
        fail_with_unknown_args: bool = True,
        separate_remaining_strings: bool = False,
    ) -> tuple[Any, ...]:
        """The dataclass instances (in the order given to the constructor), from `args` (default:
        sys.argv[1:]) and the YAML file named by `--config PATH` in them, if any.

        The file's keys set the fields' defaults, so an explicit flag wins over the file; its `env:`
        mapping is put into os.environ first (values as strings). The file's defaults hold for this call
        only (TRL's parser keeps them for later calls). Keys that are no field of any dataclass:
        with `return_remaining_strings`, they come back as `["--key", "value", ...]` in the last element of
        the tuple, before the unparsed command-line strings (or as their own element before those when
        `separate_remaining_strings`); otherwise a ValueError unless `fail_with_unknown_args=False`. Unknown
        command-line flags are a ValueError naming them (and the closest real flag) unless
        `return_remaining_strings`. Flags are never abbreviated, and a negative number in any notation
        (`-1e-2`) is a value.
        """
        args = list(sys.argv[1:] if args is None else args)
        config_path = _pop_config_path(args)
        config_remaining: list[str] = []
        saved = _defaults(self)
        try:
            if config_path is not None:
                config = _read_yaml_mapping(config_path)
                _apply_env(config.pop(ENV_SECTION, None), config_path)
                config_remaining = self.set_defaults_with_config(**config)
            output = self.parse_args_into_dataclasses(args=args, return_remaining_strings=True)
        finally:
            # The file's values were defaults for this parse only: a later parse without it gets the fields'.
            for action, (default, required) in saved.items():
                action.default, action.required = default, required
        *parsed, args_remaining = output
        if not return_remaining_strings and args_remaining:
            raise ValueError(f"{self.prog}: {unknown_flags_message(self, args_remaining)}")
        if return_remaining_strings:
            if separate_remaining_strings:
                return (*parsed, config_remaining, args_remaining)
            return (*parsed, config_remaining + args_remaining)
        if fail_with_unknown_args and config_remaining:
            unknown = config_remaining[::2]
            raise ValueError(f"Unknown arguments from config file {config_path}: {unknown}. Remove them, add them to "
                             "a dataclass, or call parse_args_and_config(fail_with_unknown_args=False).")
        return tuple(parsed)

    def set_defaults_with_config(self, **kwargs: Any) -> list[str]:
        """Make each value the default of the arguments whose destination is its key, in this parser and its
        subparsers (an argument given a default is no longer required). Returns the keys no argument
        took, as command-line strings: ["--key", "str(value)", ...]."""
        used = _apply_defaults(self, kwargs)
        return [text for key, value in kwargs.items() if key not in used for text in (f"--{key}", str(value))]


def _defaults(parser: argparse.ArgumentParser) -> dict[argparse.Action, tuple[Any, bool]]:
    """(default, required) of every argument of the parser and its subparsers."""
    saved = {}
    for action in parser._actions:
        saved[action] = (action.default, action.required)
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                saved.update(_defaults(subparser))
    return saved


def _apply_defaults(parser: argparse.ArgumentParser, values: dict[str, Any]) -> set[str]:
    used: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                used |= _apply_defaults(subparser, values)
        elif action.dest in values:
            action.default = values[action.dest]
            action.required = False
            used.add(action.dest)
    return used


def _pop_config_path(args: list[str]) -> str | None:
    """Remove `--config PATH` (or `--config=PATH`) from args and return PATH."""
    for i, arg in enumerate(args):
        if arg == CONFIG_FLAG:
            if i + 1 >= len(args):
                raise ValueError(f"{CONFIG_FLAG} needs a path: {CONFIG_FLAG} file.yaml")
            path = args[i + 1]
            del args[i:i + 2]
            return path
        if arg.startswith(CONFIG_FLAG + "="):
            del args[i]
            return arg.split("=", 1)[1]
    return None


def _read_yaml_mapping(path: str) -> dict[str, Any]:
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{CONFIG_FLAG} {path}: no such file.")
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    if config is None:  # an empty file: nothing to set
        return {}
    if not isinstance(config, dict):
        raise ValueError(f"Config file {path} must contain a YAML mapping (key: value lines), got "
                         f"{type(config).__name__}.")
    return config


def _apply_env(env: Any, path: str) -> None:
    if env is None:
        return
    if not isinstance(env, dict):
        raise ValueError(f"{path}: the `{ENV_SECTION}` field should be a dict of VARIABLE: value, got "
                         f"{type(env).__name__}.")
    for key, value in env.items():
        os.environ[str(key)] = str(value)


def init_zero_verbose() -> None:
    """Quiet logging for command-line runs (TRL calls it at the top of its CLI modules, before the heavy
    imports): the root logger shows errors only, with a rich handler when `rich` is installed, and Python
    warnings go through logging (so they show only at that level, as one line each) instead of stderr.

    Like `logging.basicConfig`, it changes nothing when the root logger already has handlers."""
    import warnings

    from transformers.utils import is_rich_available

    if is_rich_available():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler()
    else:
        handler = logging.StreamHandler()
    logging.basicConfig(format="%(message)s", datefmt="[%X]", handlers=[handler], level=logging.ERROR)

    def warning_to_logging(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
                           line: str | None = None) -> None:
        logging.warning(f"{filename}:{lineno}: {category.__name__}: {message}")

    warnings.showwarning = warning_to_logging
