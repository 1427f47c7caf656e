"""Rewrite a TRL test module so that it exercises tether instead of trl.

    python benchmarks/trl_tests_replay/rewrite_imports.py tests/test_sft_trainer.py [tether|trl] > out.py

Only the imports and the module-path strings change; the tests themselves run verbatim:

- ``import trl`` -> ``import tether as trl``;
- ``from trl.x.y import a, b as c`` -> ``a = _replay_import("tether.x.y", "a"); c = _replay_import(...)``:
  each name is looked up on its own, and a name tether lacks becomes a stub that raises ImportError when a test
  uses it, so one missing private helper fails only the tests that touch it, not the whole module
  (``is_<pkg>_available`` probes tether lacks answer whether <pkg> is installed, so both runs skip alike);
- string literals starting with ``trl.`` (logger names, ``mock.patch`` targets) -> ``tether.``.

``_replay_import`` lives in ``replay_compat.py``, copied next to the rewritten module as ``_replay_compat.py``.
"""

from __future__ import annotations

import ast
import re
import sys

_STRING_RE = re.compile(r"""(["'])trl\.""")


def _replacement(node: ast.stmt, package: str) -> str | None:
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
        node.module == "trl" or node.module.startswith("trl.")
    ):
        module = package + node.module[3:]
        parts = [f'{alias.asname or alias.name} = _replay_import("{module}", "{alias.name}")' for alias in node.names]
        return "; ".join(parts)
    if isinstance(node, ast.Import) and any(a.name == "trl" or a.name.startswith("trl.") for a in node.names):
        parts = []
        for alias in node.names:
            if alias.name == "trl" or alias.name.startswith("trl."):
                target = package + alias.name[3:]
                parts.append(f"import {target} as {alias.asname or alias.name.split('.')[0]}")
            else:
                parts.append(f"import {alias.name}" + (f" as {alias.asname}" if alias.asname else ""))
        return "; ".join(parts)
    return None


def rewrite(source: str, package: str = "tether", package_relative: bool = True) -> str:
    """The `package` version of one TRL test module (see the module docstring).

    With package="trl" only the imports become per-name (the TRL run uses that too: the tests of TRL's git HEAD
    import a few names TRL 1.16 does not have, which must fail only the tests using them).
    """
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    edits = []
    for node in ast.walk(tree):
        text = _replacement(node, package) if isinstance(node, (ast.Import, ast.ImportFrom)) else None
        if text is not None:
            edits.append((node.lineno, node.end_lineno, node.col_offset, text))
    # Apply bottom-up so earlier line numbers stay valid; keep the line count so tracebacks match the original.
    for start, end, col, text in sorted(edits, reverse=True):
        span = end - start + 1
        lines[start - 1:end] = [" " * col + text + "\n"] + ["\n"] * (span - 1)
    out = "".join(lines)
    if package != "trl":
        out = _STRING_RE.sub(rf"\1{package}.", out)
    if edits:
        first_import = min(n.lineno for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)))
        helper = ("from ._replay_compat import replay_import as _replay_import\n" if package_relative
                  else "from _replay_compat import replay_import as _replay_import\n")
        out_lines = out.splitlines(keepends=True)
        # Prefix the first import's line rather than inserting one, so line numbers stay those of TRL's file.
        out_lines[first_import - 1] = helper.rstrip("\n") + "; " + out_lines[first_import - 1].lstrip()
        out = "".join(out_lines)
    return out


if __name__ == "__main__":
    sys.stdout.write(rewrite(open(sys.argv[1]).read(), *sys.argv[2:3]))
