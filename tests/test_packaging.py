"""Packaging holds: every third-party module tether's source imports is declared, the installed versions satisfy
the declared ranges, and the LICENSE file is the license pyproject.toml names.

The source is parsed (ast), never imported, so an import hidden in a rarely used function is checked too.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "tether"

# Imported by tether's source (always behind a guard) but declared nowhere on purpose: each needs an install
# that a pip extra would get wrong.
INSTALLED_SEPARATELY = {
    "vllm": "pins its own (CUDA) torch build; installed by hand on a CUDA machine for use_vllm=True",
    "deepspeed": "built against the installed torch with --no-build-isolation (see .ci/run); an extra would "
                 "build it in an isolated env with another torch",
}
# Import names whose distribution is named differently, for modules that are not installed here
# (installed ones are looked up in importlib.metadata.packages_distributions()).
DISTRIBUTION_OF = {"yaml": "pyyaml"}
GUARD_EXCEPTIONS = {"ImportError", "ModuleNotFoundError", "Exception"}


@dataclass(frozen=True)
class ImportSite:
    module: str  # the top-level module name, e.g. "transformers"
    where: str  # "path:line"
    guarded: bool  # runs only when called (inside a function) or falls back on ImportError


def _handler_names(handler: ast.ExceptHandler) -> set[str]:
    kinds = handler.type
    if kinds is None:
        return {"Exception"}  # a bare except
    elts = kinds.elts if isinstance(kinds, ast.Tuple) else [kinds]
    return {e.id if isinstance(e, ast.Name) else e.attr if isinstance(e, ast.Attribute) else "" for e in elts}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_sites(path: Path, root: Path = ROOT) -> list[ImportSite]:
    """Every absolute import in one file, with whether it is guarded. Imports under `if TYPE_CHECKING:` never
    run and are left out; `importlib.import_module("literal")` counts as an import."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    sites: list[ImportSite] = []

    def visit(node: ast.AST, guarded: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            guarded = True  # its body runs when called, not when the module loads
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for stmt in node.orelse:  # only the else branch runs
                visit(stmt, guarded)
            return
        if isinstance(node, ast.Try) and any(_handler_names(h) & GUARD_EXCEPTIONS for h in node.handlers):
            for stmt in node.body:
                visit(stmt, True)
            for rest in (*node.handlers, *node.orelse, *node.finalbody):
                visit(rest, guarded)
            return
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]
        for name in names:
            sites.append(ImportSite(name.split(".")[0], f"{path.relative_to(root)}:{node.lineno}", guarded))
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return sites


@functools.cache
def third_party_sites() -> tuple[ImportSite, ...]:
    stdlib = set(sys.stdlib_module_names)
    return tuple(site for path in sorted(SOURCE.rglob("*.py")) for site in import_sites(path)
                 if site.module not in stdlib and site.module != "tether")


def pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def declared() -> tuple[dict[str, Requirement], dict[str, set[str]]]:
    """(required: canonical name -> Requirement, optional: canonical name -> the extras declaring it)."""
    project = pyproject()
    required = {canonicalize_name(r.name): r for r in map(Requirement, project["dependencies"])}
    optional: dict[str, set[str]] = {}
    for extra, deps in project.get("optional-dependencies", {}).items():
        for dep in deps:
            optional.setdefault(canonicalize_name(Requirement(dep).name), set()).add(extra)
    return required, optional


@functools.cache
def _installed_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()  # scans every installed distribution: once


def distributions(module: str) -> set[str]:
    installed = _installed_distributions().get(module)
    if installed:
        return {canonicalize_name(d) for d in installed}
    return {canonicalize_name(DISTRIBUTION_OF.get(module, module))}


# ----- the import scanner itself ------------------------------------------------------------------------------
def test_import_scanner_tells_guarded_from_unguarded(tmp_path):
    """The scanner must see each of these shapes right, or the declared-dependency checks below prove nothing."""
    source = tmp_path / "m.py"
    source.write_text(
        "from __future__ import annotations\n"
        "import importlib\n"
        "from typing import TYPE_CHECKING\n"
        "import alpha.sub\n"                                     # 4: module level
        "if TYPE_CHECKING:\n    import never_runs\n"
        "try:\n    import beta\nexcept ImportError:\n    beta = None\n"   # 8: guarded by try
        "try:\n    import gamma\nexcept KeyError:\n    pass\n"            # 12: a try that guards nothing
        "def f():\n    import delta\n    return importlib.import_module('epsilon.x')\n"  # 16, 17: in a function
        "class C:\n    from zeta import z\n"                       # 19: class body runs at import
        "from . import sibling\n",
        encoding="utf-8")
    found = {(s.module, s.guarded) for s in import_sites(source, root=tmp_path)}
    assert found == {("__future__", False), ("importlib", False), ("typing", False), ("alpha", False),
                     ("beta", True), ("gamma", False), ("delta", True), ("epsilon", True), ("zeta", False)}


def test_scanner_finds_the_imports_tether_is_known_to_make():
    """A few imports that exist in tether's source, so that an empty scan cannot pass the checks below."""
    by_module: dict[str, set[bool]] = {}
    for site in third_party_sites():
        by_module.setdefault(site.module, set()).add(site.guarded)
    assert False in by_module["torch"] and False in by_module["transformers"]
    assert by_module["bitsandbytes"] == {True}  # loaded only to check it is usable before quantizing


# ----- declared dependencies ----------------------------------------------------------------------------------
def test_every_module_imported_at_import_time_is_a_required_dependency():
    required, _ = declared()
    missing = sorted({f"{s.module} ({s.where})" for s in third_party_sites()
                      if not s.guarded and not distributions(s.module) & required.keys()})
    assert not missing, ("imported when a tether module loads, but not in [project].dependencies of "
                         f"pyproject.toml: {missing}. Declare it, or import it inside the function that needs it.")


def test_every_optional_import_is_declared_somewhere():
    required, optional = declared()
    known = required.keys() | optional.keys() | {canonicalize_name(m) for m in INSTALLED_SEPARATELY}
    missing = sorted({f"{s.module} ({s.where})" for s in third_party_sites()
                      if s.guarded and not distributions(s.module) & known})
    assert not missing, (f"imported on demand but declared nowhere: {missing}. Add it to an extra in "
                         "pyproject.toml (and name the extra in the ImportError), or to INSTALLED_SEPARATELY "
                         "here with the reason.")


def test_separately_installed_packages_are_only_imported_behind_a_guard():
    unguarded = sorted(f"{s.module} ({s.where})" for s in third_party_sites()
                       if s.module in INSTALLED_SEPARATELY and not s.guarded)
    assert not unguarded, f"`import tether...` would fail without these: {unguarded}"


def test_installed_versions_satisfy_the_declared_ranges():
    """The environment the tests run in (torch 2.13.0 CPU included) is one pyproject.toml admits, so that
    `pip install -e .` keeps it rather than replacing torch."""
    required, _ = declared()
    for name, requirement in required.items():
        version = importlib.metadata.version(name)
        assert requirement.specifier.contains(version, prereleases=True), (
            f"installed {name} {version} is outside pyproject.toml's {requirement}")


def test_torch_is_a_floor_only():
    """An upper bound or a pin on torch could make pip swap the user's (CUDA or CPU) build for another."""
    required, _ = declared()
    operators = {spec.operator for spec in required["torch"].specifier}
    assert operators == {">="}, required["torch"]


def test_floors_are_at_least_what_the_transformers_floor_requires():
    """transformers' own requirements on the shared packages, read from the installed transformers' metadata
    (it changes rarely within 5.x): tether's floors must not promise an older release transformers refuses."""
    required, _ = declared()
    for line in importlib.metadata.requires("transformers") or []:
        dep = Requirement(line)
        name = canonicalize_name(dep.name)
        if dep.marker is not None or name not in required:
            continue
        for floor in (spec.version for spec in dep.specifier if spec.operator == ">="):
            ours = [Version(spec.version) for spec in required[name].specifier if spec.operator == ">="]
            assert ours and max(ours) >= Version(floor), (
                f"transformers needs {dep}; pyproject.toml declares {required[name]}")


# ----- license ------------------------------------------------------------------------------------------------
def test_license_file_is_the_license_pyproject_names():
    project = pyproject()
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    words = re.sub(r"\s+", " ", text).strip()
    assert words.startswith("Apache License Version 2.0, January 2004 http://www.apache.org/licenses/")
    # the full text, not a stub: all nine sections and the appendix
    for heading in ("1. Definitions.", "2. Grant of Copyright License.", "3. Grant of Patent License.",
                    "4. Redistribution.", "5. Submission of Contributions.", "6. Trademarks.",
                    "7. Disclaimer of Warranty.", "8. Limitation of Liability.",
                    "9. Accepting Warranty or Additional Liability.", "END OF TERMS AND CONDITIONS",
                    "APPENDIX: How to apply the Apache License to your work."):
        assert heading in words, heading
    assert len(words.split()) > 1500
