"""Rewards named by a string, as `tether grpo|rloo|ppo --reward_funcs SPEC` takes them.

A SPEC is read as the first of these forms it fits:

    path/to/file.py:function   the file is run (as a module under a name of its own) and `function` taken from it
    package.module:function    the module is imported, the working directory searched first
    package.module.function    the same, written as TRL's scripts take it (a dotted path, no colon)
    a local folder             a reward model saved with save_pretrained (or a PEFT adapter of one)
    namespace/name             a reward model on the hub

Anything else is a `RewardSpecError` that lists these forms, in particular a bare name (`length_reward`,
`gpt2`): as a function it lacks its module, as a hub id its namespace, and looking it up on the hub would
answer with a confusing download error. TRL's built-in reward names (`accuracy_reward`, ...) are named as
such in the error: tether does not ship those functions.

The first three forms run the user's code in this process. Loading them leaves `sys.path` exactly as it was
(the folder searched first is added for the import only), and a file is registered in `sys.modules` under a
name derived from its full path, so it never shadows (or is shadowed by) a real module of the same name.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

FORMS = ("`path/to/file.py:function`, `package.module:function` (or TRL's `package.module.function`), a local "
         "reward-model folder, or a hub reward-model id `namespace/name`")

# The names TRL 1.16's grpo/rloo scripts resolve from trl.rewards; tether has no such functions.
TRL_BUILTIN_REWARDS = ("accuracy_reward", "reasoning_accuracy_reward", "think_format_reward",
                       "get_soft_overlong_punishment")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]$")


class RewardSpecError(ValueError):
    """A `--reward_funcs` string names no reward function or model that can be loaded."""


def _is_module_path(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


@contextlib.contextmanager
def _searched_first(folder: str) -> Iterator[None]:
    """`folder` first on sys.path within the block; afterwards sys.path is exactly what it was before."""
    saved = list(sys.path)
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        sys.path[:] = saved


def _function_of(module: ModuleType, attribute: str, spec: str, where: str) -> Callable[..., Any]:
    value = getattr(module, attribute, None)
    if value is None:
        raise RewardSpecError(f"{where} has no function {attribute!r} (reward spec {spec!r}).")
    if not callable(value):
        raise RewardSpecError(f"{where}.{attribute} is a {type(value).__name__}, not a function (reward spec "
                              f"{spec!r}).")
    return value


def load_file_function(path: str, attribute: str, spec: str | None = None) -> Callable[..., Any]:
    """`attribute` of the Python file at `path`, which is run for it (once per process: a second spec naming
    the same file gets the same module). The file's folder is first on sys.path while it runs (so it can
    import its neighbours), and not afterwards."""
    spec = spec or f"{path}:{attribute}"
    if not os.path.isfile(path):
        raise RewardSpecError(f"No file {path!r} (reward spec {spec!r}; relative paths start at the working "
                              f"directory, {os.getcwd()}).")
    full = os.path.realpath(path)
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(full))[0])
    name = f"tether_reward_file_{stem}_{hashlib.sha1(full.encode()).hexdigest()[:10]}"
    module = sys.modules.get(name)
    if module is None:
        module_spec = importlib.util.spec_from_file_location(name, full)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # while it runs too: dataclasses and pickling look their module up there
        try:
            with _searched_first(os.path.dirname(full)):
                module_spec.loader.exec_module(module)
        except Exception as error:
            del sys.modules[name]
            raise RewardSpecError(f"Running {path} (reward spec {spec!r}) raised {type(error).__name__}: "
                                  f"{error}") from error
    return _function_of(module, attribute, spec, path)


def import_module_function(module_name: str, attribute: str, spec: str | None = None) -> Callable[..., Any]:
    """`attribute` of the module `module_name`, imported with the working directory first on sys.path (as
    `python -m` would find the user's own modules), which is removed again afterwards."""
    spec = spec or f"{module_name}:{attribute}"
    cwd = os.getcwd()
    try:
        with _searched_first(cwd):
            module = importlib.import_module(module_name)
    except ImportError as error:
        raise RewardSpecError(f"Cannot import {module_name!r} (reward spec {spec!r}): {error}. The module must "
                              f"be importable, or a file next to the working directory ({cwd}).") from error
    except Exception as error:
        raise RewardSpecError(f"Importing {module_name!r} (reward spec {spec!r}) raised {type(error).__name__}: "
                              f"{error}") from error
    top = module_name.split(".")[0]
    local = [os.path.join(cwd, top + ".py"), os.path.join(cwd, top, "__init__.py")]
    origin = getattr(sys.modules.get(top), "__file__", None)
    if any(os.path.isfile(p) for p in local) and origin and os.path.dirname(os.path.realpath(origin)) not in (
            os.path.realpath(cwd), os.path.realpath(os.path.join(cwd, top))):
        raise RewardSpecError(f"Reward spec {spec!r}: a module named {top!r} was already imported from {origin}, "
                              f"so the {top} in the working directory is not the one used. Rename your file, or "
                              "give it as path/to/file.py:function.")
    return _function_of(module, attribute, spec, module_name)


def resolve_reward_spec(spec: str) -> Callable[..., Any] | str:
    """The reward a `--reward_funcs` string names: a function (file or module forms), or the string itself
    for a reward model (a local folder, or a hub id `namespace/name`); see the module docstring for the
    forms and the order they are tried in. Raises RewardSpecError (a ValueError) naming `spec` and the forms
    when it fits none; a path-like spec that does not exist raises FileNotFoundError."""
    target, colon, attribute = spec.rpartition(":")
    if colon and target and attribute.isidentifier():
        if target.endswith(".py"):
            return load_file_function(target, attribute, spec)
        if _is_module_path(target):
            return import_module_function(target, attribute, spec)
        raise RewardSpecError(f"Reward spec {spec!r}: {target!r} is neither a .py file nor a module name. "
                              f"Accepted forms: {FORMS}.")
    local = os.path.expanduser(spec)
    if os.path.isdir(local):
        return local  # a reward model's folder
    if os.path.isfile(local):
        hint = (f"name the function too: {spec}:function_name" if spec.endswith(".py")
                else "a reward model is given by its folder, not one of its files")
        raise RewardSpecError(f"Reward spec {spec!r} is a file; {hint}. Accepted forms: {FORMS}.")
    if spec in TRL_BUILTIN_REWARDS:
        raise RewardSpecError(
            f"Reward spec {spec!r} is one of TRL's built-in reward functions (trl.rewards), which tether does not "
            f"ship. Fix: with TRL installed, pass trl.rewards:{spec}; or write the function in a file and pass "
            f"file.py:{spec}. Accepted forms: {FORMS}.")
    if spec.endswith(".py"):
        raise RewardSpecError(f"Reward spec {spec!r}: no such file (relative paths start at the working directory, "
                              f"{os.getcwd()}), and a file needs its function too: file.py:function_name.")
    from ..models.loading import resolve_model_source

    resolve_model_source(spec, "reward model")  # a path that does not exist: FileNotFoundError, named
    if "/" not in spec and "." in spec and _is_module_path(spec):  # TRL's `package.module.function`
        module_name, _, attribute = spec.rpartition(".")
        try:
            return import_module_function(module_name, attribute, spec)
        except RewardSpecError as error:  # perhaps not meant as a module at all: say what else it could be
            raise RewardSpecError(f"{error} Accepted forms: {FORMS}.") from error.__cause__
    if _HUB_ID.match(spec) and "--" not in spec and ".." not in spec:
        return spec  # a hub reward model, fetched when the trainer loads it
    example = spec if spec.isidentifier() else "function_name"
    raise RewardSpecError(f"Reward spec {spec!r} names no reward function (one needs its module or file, e.g. "
                          f"my_rewards:{example} or my_rewards.py:{example}) and no reward model (no local folder "
                          f"{spec!r} exists, and a hub model is given as namespace/name). Accepted forms: {FORMS}.")
