"""Module-level names imported on first use (PEP 562), for tether's public and TRL-compatibility modules.

`exports` maps a public name to "package.module" (the same name there) or "package.module:attribute"
(another name there). Importing a module that uses this imports nothing from the mapped modules, so
`import tether` stays light and a name whose module fails to import breaks only itself.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def resolve(target: str, name: str) -> Any:
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute or name)


def lazy_exports(module_name: str, exports: dict[str, str], module_globals: dict[str, Any],
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """(__getattr__, __dir__) for a module whose public names are `exports`; each resolved name is cached
    in the module's globals, so later lookups do not come back here."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        value = resolve(exports[name], name)
        module_globals[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*module_globals, *exports})

    return __getattr__, __dir__
