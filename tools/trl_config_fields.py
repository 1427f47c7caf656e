"""Every field of TRL's configs, and whether tether's config of the same name accepts it.

    # with a Python that has TRL installed (e.g. a throwaway venv: pip install --no-deps trl==1.16.0):
    python tools/trl_config_fields.py --write tests/data/trl_1_16_config_fields.json
    # with tether installed: try each field with TRL's default on tether's config, print the table
    python tools/trl_config_fields.py --check tests/data/trl_1_16_config_fields.json

`--write` lists the fields that TRL adds to `TrainingArguments` (those every config inherits are tether's too,
since tether's configs subclass it) for TRL's top-level configs and the experimental CPO/ORPO ones, with their
defaults. `--check` builds each tether config with one field set to TRL's default at a time; a field tether
rejects (TypeError) or does not store is reported, and the exit code is the number of such fields.
tests/test_trl_config_fields.py runs the same check on the stored snapshot.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import warnings
from typing import Any

# TRL configs that belong to later work: the check names the issue instead of failing on them.
NOT_YET = {"DistillationConfig": "distillation (GKD) is issue 14"}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        value = None
    try:
        json.dumps(value)
    except TypeError:
        value = repr(value)
    return value


def trl_config_fields() -> dict[str, dict[str, Any]]:
    """{config name: {field: TRL default}} for the fields TRL's configs add to TrainingArguments."""
    import transformers
    import trl

    base = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    classes = {name: getattr(trl, name) for name in dir(trl) if name.endswith("Config")}
    for module, name in (("trl.experimental.cpo", "CPOConfig"), ("trl.experimental.orpo", "ORPOConfig")):
        classes[name] = getattr(__import__(module, fromlist=[name]), name)
    fields = {}
    for name, cls in sorted(classes.items()):
        if not dataclasses.is_dataclass(cls):
            continue
        inherits = issubclass(cls, transformers.TrainingArguments)
        fields[name] = {f.name: _default(f) for f in dataclasses.fields(cls)
                        if f.init and not (inherits and f.name in base)}
    return fields


def required_arguments(config_name: str) -> dict[str, Any]:
    """What a config needs besides the field under test (an output folder for TrainingArguments ones)."""
    if config_name == "DatasetMixtureConfig":
        return {}
    if config_name == "ModelConfig":
        return {}
    return {"output_dir": tempfile.gettempdir()}


def check_field(config_name: str, field: str, value: Any) -> str | None:
    """None if tether's `config_name` accepts `field=value` and stores it; else what went wrong."""
    import tether

    cls = getattr(tether, config_name, None)
    if cls is None:
        return f"tether has no {config_name}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            config = cls(**required_arguments(config_name), **{field: value})
        except TypeError as error:
            return f"TypeError: {error}"
        except Exception as error:  # noqa: BLE001 - reported, not hidden
            return f"{type(error).__name__}: {error}"
    if not hasattr(config, field):
        return "accepted but not stored"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", metavar="JSON", help="List TRL's config fields (needs trl) into this file.")
    parser.add_argument("--check", metavar="JSON", help="Check tether accepts every field listed in this file.")
    args = parser.parse_args(argv)
    if args.write:
        with open(args.write, "w") as f:
            json.dump(trl_config_fields(), f, indent=1, sort_keys=True)
            f.write("\n")
    failures = 0
    if args.check:
        with open(args.check) as f:
            snapshot = json.load(f)
        for config_name, fields in snapshot.items():
            if config_name in NOT_YET:
                print(f"{config_name:22} {len(fields):3} fields: not yet ({NOT_YET[config_name]})")
                continue
            problems = {field: check_field(config_name, field, value) for field, value in fields.items()}
            problems = {k: v for k, v in problems.items() if v}
            failures += len(problems)
            print(f"{config_name:22} {len(fields):3} fields: {len(fields) - len(problems)} accepted")
            for field, problem in problems.items():
                print(f"    {field}: {problem}")
    return failures


if __name__ == "__main__":
    sys.exit(main())
