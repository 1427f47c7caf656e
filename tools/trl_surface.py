"""Enumerate TRL 0.7.11's public module surface from its source, mechanically, into a JSON file.

    python tools/trl_surface.py [--repo /work/.mirror/huggingface+trl/repo] [--tag v0.7.11]
                                [--out tests/data/trl_0_7_11_surface.json]

The source is read with `git show <tag>:<path>` from a git mirror of huggingface/trl (no checkout, no
import of TRL) and parsed with `ast`. What counts as a module's public names:

- names the module defines at top level: `def`, `class`, and assignments to a plain name;
- in a package `__init__.py`, also every name bound by a relative `from .x import y` (a re-export);
  a plain module's imports (`from ..import_utils import is_npu_available` in core.py) are its own
  dependencies, not its surface;
- statements inside top-level `if`/`try` blocks count too, with the condition recorded (TRL binds the
  DDPO names only `if is_diffusers_available()`);
- names starting with an underscore are private and skipped (`__version__` included).

For the config dataclasses (PPOConfig, RewardConfig, ModelConfig) it records each annotated class-level
field with its annotation and default: `default` when the default is a Python literal (directly or as
`field(default=...)`), else `default_expr` / `default_factory` with the source text; and, separately,
the attributes `__post_init__` sets that are not fields (`PPOConfig.total_ppo_epochs`).

tests/test_trl_surface.py reads only the JSON this writes (CI has no mirror).
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
from pathlib import Path
from typing import Any

DEFAULT_REPO = "/work/.mirror/huggingface+trl/repo"
DEFAULT_TAG = "v0.7.11"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "trl_0_7_11_surface.json"

# module path -> source file at the tag
MODULES = {
    "trl": "trl/__init__.py",
    "trl.core": "trl/core.py",
    "trl.trainer": "trl/trainer/__init__.py",
    "trl.trainer.utils": "trl/trainer/utils.py",
    "trl.models": "trl/models/__init__.py",
    "trl.import_utils": "trl/import_utils.py",
    "trl.extras": "trl/extras/__init__.py",
    "trl.environment": "trl/environment/__init__.py",
}

# config class -> source file at the tag
CONFIGS = {
    "PPOConfig": "trl/trainer/ppo_config.py",
    "RewardConfig": "trl/trainer/reward_config.py",
    "ModelConfig": "trl/trainer/model_config.py",
}


def git_show(repo: str, tag: str, path: str) -> str:
    return subprocess.run(["git", "-C", repo, "show", f"{tag}:{path}"], check=True, capture_output=True,
                          text=True).stdout


def resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute module of `from <level dots><target> import ...` written in `module`."""
    parts = module.split(".")
    package = parts if is_package else parts[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _walk(body: list[ast.stmt], condition: str | None):
    """(statement, condition) for top-level statements, descending into if/try blocks."""
    for node in body:
        if isinstance(node, ast.If):
            test = ast.unparse(node.test)
            yield from _walk(node.body, test if condition is None else f"{condition} and {test}")
            yield from _walk(node.orelse, f"not ({test})")
        elif isinstance(node, ast.Try):
            yield from _walk(node.body, condition or "try")
            for handler in node.handlers:
                yield from _walk(handler.body, "except")
        else:
            yield node, condition


def public_names(module: str, source: str, is_package: bool) -> list[dict[str, Any]]:
    """[{name, kind, source module?, condition?}] sorted by name; the first binding of a name wins."""
    found: dict[str, dict[str, Any]] = {}

    def add(name: str, entry: dict[str, Any]) -> None:
        if not name.startswith("_") and name not in found:
            found[name] = {"name": name, **entry}

    for node, condition in _walk(ast.parse(source).body, None):
        extra = {"condition": condition} if condition else {}
        if isinstance(node, ast.ClassDef):
            add(node.name, {"kind": "class", **extra})
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            add(node.name, {"kind": "function", **extra})
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    add(target.id, {"kind": "constant", **extra})
        elif isinstance(node, ast.ImportFrom) and is_package and node.level > 0:
            origin = resolve_relative(module, is_package, node.level, node.module)
            for alias in node.names:
                add(alias.asname or alias.name, {"kind": "re-export", "from": f"{origin}", **extra})
    return sorted(found.values(), key=lambda entry: entry["name"])


def _default_of(value: ast.expr | None) -> dict[str, Any]:
    if value is None:
        return {"required": True}
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "field":
        for keyword in value.keywords:
            if keyword.arg == "default":
                return _default_of(keyword.value)
            if keyword.arg == "default_factory":
                return {"default_factory": ast.unparse(keyword.value)}
        return {"required": True}
    try:
        return {"default": ast.literal_eval(value)}
    except (ValueError, SyntaxError):
        return {"default_expr": ast.unparse(value)}


def config_fields(source: str, class_name: str) -> dict[str, Any]:
    """{"fields": [{name, annotation, default | default_expr | default_factory | required}],
    "computed_attributes": [names __post_init__ assigns that are not fields]}."""
    tree = ast.parse(source)
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name), None)
    if cls is None:
        raise SystemExit(f"class {class_name} not found")
    fields = []
    for node in cls.body:  # class-level statements only: an `if` in the body only rebinds a field
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            fields.append({"name": node.target.id, "annotation": ast.unparse(node.annotation),
                           **_default_of(node.value)})
    names = {f["name"] for f in fields}
    computed: list[str] = []
    post_init = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__post_init__"), None)
    for node in ast.walk(post_init) if post_init else ():
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AnnAssign, ast.AugAssign)) else []
        for target in targets:
            if (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self"
                    and target.attr not in names and target.attr not in computed):
                computed.append(target.attr)
    return {"fields": fields, "computed_attributes": sorted(computed)}


def build(repo: str, tag: str) -> dict[str, Any]:
    commit = subprocess.run(["git", "-C", repo, "rev-list", "-n", "1", tag], check=True, capture_output=True,
                            text=True).stdout.strip()
    modules = {
        module: public_names(module, git_show(repo, tag, path), path.endswith("__init__.py"))
        for module, path in MODULES.items()
    }
    configs = {name: config_fields(git_show(repo, tag, path), name) for name, path in CONFIGS.items()}
    return {
        "trl_tag": tag,
        "trl_commit": commit,
        "generated_by": "tools/trl_surface.py",
        "rules": "top-level def/class/assignments; in package __init__ also relative re-exports; names "
                 "inside top-level if/try carry their condition; underscore names skipped",
        "modules": modules,
        "configs": configs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=DEFAULT_REPO, help="git directory of a huggingface/trl mirror")
    parser.add_argument("--tag", default=DEFAULT_TAG)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()
    surface = build(args.repo, args.tag)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(surface, indent=1, sort_keys=False) + "\n")
    counts = {module: len(names) for module, names in surface["modules"].items()}
    print(f"wrote {out}: {counts}, config fields "
          f"{ {name: len(c['fields']) for name, c in surface['configs'].items()} }")


if __name__ == "__main__":
    main()
