"""Per-name imports for the rewritten TRL tests (copied next to them as _replay_compat.py).

A name tether does not provide becomes a stub: using it raises ImportError naming the module and the name, so
only the tests that touch it fail. A missing ``is_<pkg>_available`` probe answers whether <pkg> is installed. Every stub made is appended to REPLAY_STUBS (a JSON-lines file) if set.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re


class MissingName:
    """Stands in for `module.name`; any use raises the ImportError the import itself would have raised."""

    def __init__(self, module: str, name: str, reason: str) -> None:
        self._message = f"replay stub: cannot import name '{name}' from '{module}' ({reason})"

    def _fail(self, *args, **kwargs):
        raise ImportError(self._message)

    __call__ = _fail

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        self._fail()

    def __mro_entries__(self, bases):
        self._fail()


def replay_import(module: str, name: str):
    """`from module import name`, or a stub (see the module docstring) when that fails."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    stubs = os.environ.get("REPLAY_STUBS")
    if stubs:
        with open(stubs, "a") as fh:
            fh.write(json.dumps({"module": module, "name": name, "reason": reason}) + "\n")
    match = re.fullmatch(r"is_(\w+)_available", name)
    if match:
        # An optional-dependency probe the package lacks: answer from the environment, as TRL's would, so the
        # TRL run and the tether run skip the same tests (testing_utils builds its require_* marks from these).
        installed = importlib.util.find_spec(match.group(1)) is not None
        return lambda *args, **kwargs: installed
    return MissingName(module, name, reason)
