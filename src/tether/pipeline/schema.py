"""The pipeline YAML as dataclasses, with every structural mistake named (file, stage, key) before anything runs.

    output_dir: ./rlhf               # each stage writes to output_dir/<stage name>
    model: path/or/hub-id            # the base model the first stage starts from
    tokenizer: path                  # optional: else each stage uses its starting model's
    seed: 0                          # optional: every stage's `seed` unless it sets its own
    peft: {r: 16, lora_alpha: 32}    # optional: LoRA for every stage (a stage's `peft:` adds to it, `false` drops it)
    defaults: {report_to: none}      # optional: config fields for every stage whose command has them
    stages:                          # in order; a mapping name -> stage, or a list of stages with `name:`
      sft:
        kind: sft                    # optional when the name is a kind
        dataset: data/reviews.jsonl  # a file, a save_to_disk folder or a hub id; or {name, split, config, test_split}
        config: {max_steps: 200}     # fields of the method's config (and command flags), as `tether sft --config`
        peft: {r: 8}                 # optional LoRA settings of this stage
        from: {model: other-stage}   # optional: where inputs come from (model, ref, reward, critic)
      ppo:
        critic: reward               # ppo: initialise a separate critic from that stage's output

Field-level checks of `config:` (unknown names, wrong values) need the method's parser and live in plan.py.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .kinds import KINDS

TOP_KEYS = ("output_dir", "model", "tokenizer", "seed", "peft", "defaults", "stages")
STAGE_KEYS = ("kind", "dataset", "config", "peft", "from", "critic")
DATASET_KEYS = ("name", "split", "config", "test_split")
# The pipeline's LoRA keys (peft's LoraConfig names) -> the `tether COMMAND` flags they set.
PEFT_FLAGS = {"r": "lora_r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
              "target_modules": "lora_target_modules"}
STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class PipelineError(ValueError):
    """A pipeline YAML (or `--stages`) that cannot run: the message names the file, the stage and the key, and
    says what to write instead. Raised before any stage runs."""


def _hint(name: str, known: Any) -> str:
    close = difflib.get_close_matches(str(name), list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_keys(values: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    for key in values:
        if key not in known:
            raise PipelineError(f"{where}: unknown key {key!r}{_hint(key, known)}; the keys are {', '.join(known)}.")


@dataclass(frozen=True)
class DatasetSpec:
    """A stage's data, in the forms `tether COMMAND --dataset_name` takes."""

    name: str  # a json/jsonl/csv/parquet file, a folder saved by Dataset.save_to_disk, or a hub id
    split: str = "train"
    config: str | None = None  # a hub dataset's configuration
    test_split: str | None = None  # evaluated at the end of the stage (as --dataset_test_split; not of a single file)


@dataclass(frozen=True)
class LoraSpec:
    """LoRA settings of a stage: it trains an adapter; the next stage starts from the adapter merged into its
    base weights. Defaults are the `tether` command's."""

    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: str = "all-linear"  # "all-linear" or comma-separated module names

    def flags(self) -> dict[str, Any]:
        """The `tether COMMAND` options that train this adapter."""
        return {"use_peft": True, **{PEFT_FLAGS[k]: getattr(self, k) for k in PEFT_FLAGS}}


@dataclass(frozen=True)
class StageSpec:
    """One stage as written (nothing resolved yet)."""

    name: str
    kind: str
    dataset: DatasetSpec | None
    config: dict[str, Any] = field(default_factory=dict)
    peft: LoraSpec | None = None
    sources: dict[str, Any] = field(default_factory=dict)  # `from:` (and `critic:`): role -> stage name or path


@dataclass(frozen=True)
class PipelineSpec:
    """A pipeline as written in its YAML file (`source`), structurally checked."""

    output_dir: str
    model: str
    stages: list[StageSpec]
    tokenizer: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)  # `seed:` is one of them
    source: str = "<pipeline>"  # the file, for messages

    def stage(self, name: str) -> StageSpec:
        return next(s for s in self.stages if s.name == name)

    def with_output_dir(self, output_dir: str | os.PathLike) -> PipelineSpec:
        return replace(self, output_dir=os.fspath(output_dir))


def _text(value: Any, where: str, what: str = "a string") -> str:
    if not isinstance(value, str) or not value.strip():
        raise PipelineError(f"{where}: expected {what}, got {value!r}.")
    return value


def _dataset(value: Any, where: str) -> DatasetSpec:
    if isinstance(value, (str, os.PathLike)):
        return DatasetSpec(_text(os.fspath(value), where, "a dataset file, folder or hub id"))
    if not isinstance(value, Mapping):
        raise PipelineError(f"{where}: expected a dataset file, folder or hub id, or a mapping with keys "
                            f"{', '.join(DATASET_KEYS)}; got {value!r}.")
    _unknown_keys(value, DATASET_KEYS, where)
    if "name" not in value:
        raise PipelineError(f"{where}: missing `name:` (the dataset file, folder or hub id).")
    parts = {k: _text(v, f"{where}.{k}") for k, v in value.items() if v is not None}
    return DatasetSpec(**parts)


def _peft(value: Any, inherited: LoraSpec | None, where: str) -> LoraSpec | None:
    """`peft:` of a stage (or the top level, with `inherited` None): True (the defaults), False/None (no LoRA),
    or a mapping of LoRA settings added to the inherited ones."""
    if value is None or value is False:
        return None
    if value is True:
        return inherited or LoraSpec()
    if not isinstance(value, Mapping):
        raise PipelineError(f"{where}: expected true, false or a mapping of LoRA settings ({', '.join(PEFT_FLAGS)}), "
                            f"got {value!r}.")
    _unknown_keys(value, tuple(PEFT_FLAGS), where)
    values = dict(value)
    if isinstance(values.get("target_modules"), (list, tuple)):
        values["target_modules"] = ",".join(str(m) for m in values["target_modules"])
    for key, types, what in (("r", (int,), "an integer"), ("lora_alpha", (int,), "an integer"),
                             ("lora_dropout", (int, float), "a number"), ("target_modules", (str,), "a string")):
        if key in values and (isinstance(values[key], bool) or not isinstance(values[key], types)):
            raise PipelineError(f"{where}.{key}: expected {what}, got {values[key]!r}.")
    return replace(inherited or LoraSpec(), **values)


def _sources(stage: Mapping[str, Any], kind: str, where: str) -> dict[str, Any]:
    sources = stage.get("from") or {}
    if not isinstance(sources, Mapping):
        raise PipelineError(f"{where}.from: expected a mapping role: stage name or path (roles of a {kind} stage: "
                            f"{', '.join(KINDS[kind].inputs)}), got {sources!r}.")
    sources = dict(sources)
    if "critic" in stage:
        if "critic" in sources:
            raise PipelineError(f"{where}: `critic:` and `from: {{critic: ...}}` are both set; keep one.")
        sources["critic"] = stage["critic"]
    roles = KINDS[kind].inputs
    for role, value in sources.items():
        if role not in roles:
            raise PipelineError(f"{where}.from.{role}: a {kind} stage takes no {role!r}{_hint(role, roles)}; its "
                                f"inputs are {', '.join(roles)}.")
        items = value if isinstance(value, list) else [value]
        if not items or len(items) > 1 and not roles[role].many:
            raise PipelineError(f"{where}.from.{role}: expected one stage name or path, got {value!r}.")
        for item in items:
            _text(item, f"{where}.from.{role}", "a stage name or a path")
    return sources


def _stage(name: str, values: Any, inherited_peft: LoraSpec | None, where: str) -> StageSpec:
    if not isinstance(values, Mapping):
        raise PipelineError(f"{where}: expected a mapping (kind, dataset, config, ...), got {values!r}.")
    _unknown_keys(values, STAGE_KEYS, where)
    if not STAGE_NAME.match(name):
        raise PipelineError(f"{where}: the stage name {name!r} is used as a folder name: letters, digits, '_', '-' "
                            "and '.' only.")
    kind = values.get("kind", name if name in KINDS else None)
    if kind is None:
        raise PipelineError(f"{where}: missing `kind:` (one of {', '.join(KINDS)}).")
    if kind not in KINDS:
        raise PipelineError(f"{where}.kind: unknown kind {kind!r}{_hint(kind, KINDS)}; the kinds are "
                            f"{', '.join(KINDS)}.")
    if "critic" in values and "critic" not in KINDS[kind].inputs:
        raise PipelineError(f"{where}.critic: a {kind} stage has no critic (only ppo stages do).")
    if values.get("dataset") is None:
        raise PipelineError(f"{where}: missing `dataset:` (a data file, a save_to_disk folder or a hub id).")
    config = values.get("config") or {}
    if not isinstance(config, Mapping):
        raise PipelineError(f"{where}.config: expected a mapping of {kind} config fields, got {config!r}.")
    peft = _peft(values["peft"], inherited_peft, f"{where}.peft") if "peft" in values else inherited_peft
    return StageSpec(name=name, kind=kind, dataset=_dataset(values["dataset"], f"{where}.dataset"),
                     config=dict(config), peft=peft, sources=_sources(values, kind, where))


def _stage_list(stages: Any, where: str) -> list[tuple[str, Any]]:
    """(name, stage mapping) pairs in order, from a mapping name -> stage or a list of stages with `name:`."""
    if isinstance(stages, Mapping):
        for name, values in stages.items():
            if isinstance(values, Mapping) and "name" in values:
                raise PipelineError(f"{where}.{name}: `name:` is for stages written as a list; here the key is the "
                                    "name.")
        return [(str(name), values) for name, values in stages.items()]
    if isinstance(stages, list):
        pairs = []
        for k, values in enumerate(stages):
            if not isinstance(values, Mapping):
                raise PipelineError(f"{where}[{k}]: expected a mapping (name, kind, dataset, config, ...), got "
                                    f"{values!r}.")
            values = dict(values)
            name = values.pop("name", values.get("kind"))
            if name is None:
                raise PipelineError(f"{where}[{k}]: missing `name:` (or `kind:`, which then names it).")
            pairs.append((str(name), values))
        return pairs
    raise PipelineError(f"{where}: expected the stages, as a mapping name -> stage or a list of stages; got "
                        f"{stages!r}.")


def parse_pipeline(values: Any, source: str = "<pipeline>") -> PipelineSpec:
    """A `PipelineSpec` from the YAML's contents (a mapping), checked for structure: unknown keys, unknown
    kinds, missing datasets, duplicate stage names. PipelineError names the first problem."""
    if not isinstance(values, Mapping):
        raise PipelineError(f"{source}: expected a mapping with keys {', '.join(TOP_KEYS)}; got "
                            f"{type(values).__name__}.")
    _unknown_keys(values, TOP_KEYS, source)
    for key in ("output_dir", "model", "stages"):
        if values.get(key) is None:
            raise PipelineError(f"{source}: missing `{key}:`" + {
                "output_dir": " (the folder every stage writes under; or pass --output_dir).",
                "model": " (the base model the first stage starts from: a local folder or a hub id).",
                "stages": " (the ordered stages: sft, reward, ppo, ...)."}[key])
    defaults = values.get("defaults") or {}
    if not isinstance(defaults, Mapping):
        raise PipelineError(f"{source}.defaults: expected a mapping of config fields, got {defaults!r}.")
    defaults = dict(defaults)
    if values.get("seed") is not None:
        if "seed" in defaults and defaults["seed"] != values["seed"]:
            raise PipelineError(f"{source}: `seed:` and `defaults.seed` differ; set the seed once.")
        if isinstance(values["seed"], bool) or not isinstance(values["seed"], int):
            raise PipelineError(f"{source}.seed: expected an integer, got {values['seed']!r}.")
        defaults["seed"] = values["seed"]
    peft = _peft(values.get("peft"), None, f"{source}.peft")
    stages, seen = [], set()
    for name, stage in _stage_list(values["stages"], f"{source}.stages"):
        if name in seen:
            raise PipelineError(f"{source}.stages: two stages are named {name!r}; give each its own `name:` (it is "
                                "its folder under output_dir).")
        seen.add(name)
        stages.append(_stage(name, stage, peft, f"{source}: stage {name!r}"))
    if not stages:
        raise PipelineError(f"{source}.stages: no stages.")
    tokenizer = values.get("tokenizer")
    return PipelineSpec(output_dir=_text(os.fspath(values["output_dir"]), f"{source}.output_dir"),
                        model=_text(os.fspath(values["model"]), f"{source}.model"), stages=stages,
                        tokenizer=None if tokenizer is None else _text(tokenizer, f"{source}.tokenizer"),
                        defaults=defaults, source=source)


def load_pipeline(path: str | os.PathLike) -> PipelineSpec:
    """The pipeline of a YAML file (see the module docstring), structurally checked."""
    import yaml

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PipelineError(f"{path}: no such file (the pipeline YAML).")
    with open(path, encoding="utf-8") as f:
        try:
            values = yaml.safe_load(f)
        except yaml.YAMLError as error:
            raise PipelineError(f"{path}: not valid YAML: {error}") from error
    return parse_pipeline(values, source=path)
