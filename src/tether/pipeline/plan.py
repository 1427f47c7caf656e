"""From a `PipelineSpec` to a checked plan: each stage's inputs chosen, its `tether COMMAND --config` file
written out in memory and parsed by that command's own parser, and its fingerprint. Everything that can be
wrong with the YAML fails here, before any stage runs.

Chaining (without `from:`): a stage starts from the output of the latest earlier stage that produces a policy
(sft, dpo, ppo, ...), else from the top-level `model`; a reward stage starts from that policy too (InstructGPT),
with a fresh score head. The reward model of ppo/grpo/rloo is the latest earlier reward stage's output; a ppo
stage's critic is initialised from the stage that `critic:` names. A stage trained with LoRA leaves its adapter
in its folder and the adapter merged into its starting weights in `merged/`, which later stages take.

Fingerprints: a stage's fingerprint hashes what shapes its result: its method's configuration as
`run_identity.describe_run` records it (the fields that change the math, and the training length), its
command's other options (LoRA, splits), the identity of its data (a file's SHA-256; a folder's file names,
sizes and modification times; a hub id's name) and of each input: an earlier stage's fingerprint, or a
path's identity. Paths, logging and saving options are not part of it, so a moved output_dir still matches;
nor is the number of processes (a stage completed on one process is not rerun on two), nor a hub model's
revision (a hub id is identified by its name).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .kinds import KINDS, StageKind
from .schema import PipelineError, PipelineSpec, StageSpec, _hint

STAGE_FILE = "pipeline_stage.json"  # a stage's record: status (running/complete), fingerprint, inputs
COMMAND_FILE = "pipeline_stage.yaml"  # the stage as `tether KIND --config COMMAND_FILE`
MERGED_DIR = "merged"  # a LoRA stage's adapter merged into its starting weights: what later stages load

# Command options the pipeline sets itself, and where the YAML says what they should be.
MANAGED_FIELDS = {
    "model_name_or_path": "the stage's starting model comes from the stage before it, or from `from: {model: ...}`",
    "dataset_name": "use the stage's `dataset:`",
    "dataset_config": "use the stage's `dataset: {name: ..., config: ...}`",
    "dataset_train_split": "use the stage's `dataset: {name: ..., split: ...}`",
    "dataset_test_split": "use the stage's `dataset: {name: ..., test_split: ...}`",
    "tokenizer_name_or_path": "use the top-level `tokenizer:`",
    "use_peft": "use the stage's (or the top-level) `peft:`",
    "lora_r": "use `peft: {r: ...}`",
    "lora_alpha": "use `peft: {lora_alpha: ...}`",
    "lora_dropout": "use `peft: {lora_dropout: ...}`",
    "lora_target_modules": "use `peft: {target_modules: ...}`",
    "ref_model_name_or_path": "use `from: {ref: ...}`",
    "reward_funcs": "use `from: {reward: ...}` (a reward stage, a reward model folder or file.py:function)",
    "critic_model_name_or_path": "use the stage's `critic:` (e.g. `critic: reward`)",
    "output_dir": "each stage writes to <output_dir>/<stage name>; set the top-level `output_dir:`",
    "resume": "the pipeline resumes a stage it was stopped in by itself",
    "resume_from_checkpoint": "the pipeline resumes a stage it was stopped in by itself",
}
_LAUNCH_DESTS = {"help", "config", "accelerate_config", "num_processes"}
DATA_FIELDS = ("dataset_name", "ptx_dataset_name")  # command options that name data: identified by content
# What can only be a local file or folder (else a hub id is possible): a data file's extension, or a path's form.
_DATA_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".txt", ".tsv")
_PATH_FORM = re.compile(r"^(\.{1,2}[/\\]|[/\\~])|[/\\].*[/\\]")


@dataclass
class Source:
    """Where an input comes from: an earlier stage's output, or a path / hub id / reward function spec."""

    stage: str | None
    value: str  # for a stage: its output model folder

    def __str__(self) -> str:
        return f"stage {self.stage!r} ({self.value})" if self.stage else self.value


@dataclass
class Record:
    """A stage folder's `pipeline_stage.json`, as read."""

    status: str  # "running" or "complete"
    fingerprint: str
    model: str  # the output model folder, relative to the stage folder ("." or "merged")
    description: dict[str, Any]
    finished: str | None = None

    @staticmethod
    def read(directory: str) -> Record | None:
        path = os.path.join(directory, STAGE_FILE)
        if not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            return Record(saved["status"], saved["fingerprint"], saved.get("model", "."),
                          saved.get("description", {}), saved.get("finished"))
        except (OSError, ValueError, KeyError):  # cut short by a kill: as good as absent
            return None


@dataclass
class PlannedStage:
    """A stage, resolved: inputs, the values of its command file, its parsed configuration and fingerprint."""

    spec: StageSpec
    kind: StageKind
    directory: str  # <output_dir>/<name>
    selected: bool  # among the stages to run (all, or --stages)
    inputs: dict[str, list[Source]]
    values: dict[str, Any]  # the `tether KIND --config` file (script arguments + config fields)
    config: Any  # the method's config dataclass, as the command parses it
    description: dict[str, Any]  # what the fingerprint hashes (kept in the record, to say what changed)
    fingerprint: str
    record: Record | None  # what the stage folder holds from an earlier run

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def model_subdir(self) -> str:
        """Where the stage's output model is, relative to its folder: `merged/` for a LoRA stage."""
        if not self.selected and self.complete:
            return self.record.model
        return MERGED_DIR if self.spec.peft is not None else "."

    @property
    def model_dir(self) -> str:
        return os.path.normpath(os.path.join(self.directory, self.model_subdir))

    @property
    def complete(self) -> bool:
        """Whether the folder holds a finished output (of whatever configuration)."""
        record = self.record
        return (record is not None and record.status == "complete"
                and os.path.isfile(os.path.join(self.directory, record.model, "config.json")))

    @property
    def output_fingerprint(self) -> str | None:
        """The fingerprint of the output later stages will read: this plan's for a stage that runs, the
        recorded one for a stage left out of --stages (None if it never completed)."""
        if self.selected:
            return self.fingerprint
        return self.record.fingerprint if self.complete else None


@dataclass
class Plan:
    spec: PipelineSpec
    output_dir: str
    stages: list[PlannedStage] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def stage(self, name: str) -> PlannedStage:
        return next(s for s in self.stages if s.name == name)


# ----- identities ------------------------------------------------------------------------------------------
def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _folder_listing(path: str) -> str:
    """A hash of a folder's file names, sizes and modification times: cheap for a model of many GiB, and
    changed by any rewrite of it."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            stat = os.stat(full)
            digest.update(f"{os.path.relpath(full, path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def path_identity(value: str) -> dict[str, str]:
    """What identifies a model, dataset or reward function given by path or name (see the module docstring)."""
    path = os.path.expanduser(value)
    if os.path.isfile(path):
        return {"file_sha256": _file_sha256(path)}
    if os.path.isdir(path):
        return {"folder": _folder_listing(path)}
    file, colon, function = value.rpartition(":")
    if colon and file.endswith(".py") and os.path.isfile(file):
        return {"file_sha256": _file_sha256(file), "function": function}
    return {"name": value}


def fingerprint_of(description: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:16]


def changed_keys(before: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the leaves that differ between two descriptions, e.g. 'run.config.learning_rate'."""
    keys = []
    for key in sorted(before.keys() | now.keys()):
        a, b = before.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


# ----- checks ----------------------------------------------------------------------------------------------
def _looks_local(value: str) -> bool:
    """Whether `value` can only be a local path (so it must exist), not a hub id."""
    return value.lower().endswith(_DATA_EXTENSIONS) or bool(_PATH_FORM.search(value)) or value.startswith(".")


def _existing(value: str) -> str:
    """An existing local path as an absolute one (stage files are then valid from any folder); else as is."""
    path = os.path.expanduser(value)
    return os.path.abspath(path) if os.path.exists(path) else value


def _check_dataset(value: str, where: str) -> str:
    if not os.path.exists(os.path.expanduser(value)) and _looks_local(value):
        raise PipelineError(f"{where}: no such file or folder {value!r} (relative paths start at the working "
                            f"directory, {os.getcwd()}). A dataset is a json/jsonl/csv/parquet file, a folder saved "
                            "by Dataset.save_to_disk, or a hub id.")
    return _existing(value)


def _check_model(value: str, where: str) -> str:
    from tether.models.loading import resolve_model_source

    try:
        resolve_model_source(value, "model")
    except FileNotFoundError as error:
        raise PipelineError(f"{where}: {error}") from error
    return _existing(value)


def _check_reward_spec(value: str, where: str) -> str:
    """A reward function spec or reward model path given in `from: {reward: ...}`: what can be checked
    without running anything (the file of `file.py:function` exists; a local path exists)."""
    file, colon, _ = value.rpartition(":")
    if colon and file.endswith(".py"):
        if not os.path.isfile(file):
            raise PipelineError(f"{where}: no file {file!r} for the reward function {value!r}.")
        return os.path.abspath(file) + value[len(file):]
    if colon:
        return value  # package.module:function, resolved when the stage runs
    return _check_model(value, where)


# ----- resolution ------------------------------------------------------------------------------------------
def _inputs(spec: PipelineSpec, index: int, planned: list[PlannedStage], where: str) -> dict[str, list[Source]]:
    """Each input of stage `index`: from `from:`, else by the kind's default rule (see the module docstring)."""
    stage = spec.stages[index]
    kind = KINDS[stage.kind]
    names = [s.name for s in spec.stages]
    inputs: dict[str, list[Source]] = {}
    for role, needed in kind.inputs.items():
        if role in stage.sources:
            given = stage.sources[role]
            sources = []
            for item in given if isinstance(given, list) else [given]:
                if item in names:
                    position = names.index(item)
                    if position >= index:
                        raise PipelineError(f"{where}.from.{role}: stage {item!r} comes "
                                            f"{'later' if position > index else 'here'}; a stage takes inputs from "
                                            "the stages before it.")
                    source = planned[position]
                    if needed.accepts is not None and source.kind.produces != needed.accepts:
                        raise PipelineError(f"{where}.from.{role}: stage {item!r} ({source.spec.kind}) produces a "
                                            f"{source.kind.produces} model, not the {needed.what} ({needed.accepts} "
                                            "model) this role takes.")
                    sources.append(Source(item, source.model_dir))
                elif role == "reward":
                    sources.append(Source(None, _check_reward_spec(item, f"{where}.from.{role}")))
                else:
                    sources.append(Source(None, _check_model(item, f"{where}.from.{role}")))
            inputs[role] = sources
            continue
        earlier = [p for p in planned[:index] if p.kind.produces == needed.default] if needed.default else []
        if earlier:
            inputs[role] = [Source(earlier[-1].name, earlier[-1].model_dir)]
        elif role == "model":
            inputs[role] = [Source(None, _check_model(spec.model, f"{spec.source}.model"))]
        elif needed.required:
            raise PipelineError(f"{where}: a {stage.kind} stage needs a {needed.what}, and no stage before it produces "
                                f"one. Add a stage of kind {needed.default} before it, or set `from: {{{role}: ...}}`"
                                + (" (a reward model folder, or file.py:function)." if role == "reward" else "."))
    return inputs


def _command_values(spec: PipelineSpec, stage: StageSpec, kind: StageKind, directory: str,
                    inputs: dict[str, list[Source]], known: set[str], where: str) -> dict[str, Any]:
    """The stage's `tether KIND --config` file: shared defaults the command has, the stage's config, and the
    options the pipeline sets (model, data, LoRA, inputs, output_dir)."""
    for key in stage.config:
        if key in MANAGED_FIELDS:
            raise PipelineError(f"{where}.config.{key}: set by the pipeline; {MANAGED_FIELDS[key]}.")
        if key not in known:
            raise PipelineError(f"{where}.config.{key}: {stage.kind} has no option {key!r}{_hint(key, known)}. Run "
                                f"`tether {kind.command} --help` for its options.")
    values = {k: v for k, v in spec.defaults.items() if k in known}
    values.update(stage.config)
    dataset = stage.dataset
    values.update(dataset_name=_check_dataset(dataset.name, f"{where}.dataset"), dataset_train_split=dataset.split,
                  dataset_config=dataset.config, dataset_test_split=dataset.test_split, output_dir=directory)
    for name in DATA_FIELDS[1:]:
        if values.get(name):
            values[name] = _check_dataset(values[name], f"{where}.config.{name}")
    if spec.tokenizer is not None:
        values["tokenizer_name_or_path"] = _check_model(spec.tokenizer, f"{spec.source}.tokenizer")
    if stage.peft is not None:
        values.update(stage.peft.flags())
    for role, sources in inputs.items():
        needed = kind.inputs[role]
        values[needed.field] = [s.value for s in sources] if needed.many else sources[0].value
    return values


def _parse(command: str, values: dict[str, Any], where: str) -> tuple[Any, Any]:
    """(script arguments, config) as `tether COMMAND --config FILE` would parse `values`: the same parser, types
    and checks; its complaints become PipelineErrors naming the stage."""
    from tether.cli import build_parser

    parser = build_parser(command)

    def fail(message: str) -> None:
        flag = re.match(r"argument --([\w-]+)\S*: (.*)", message, re.DOTALL)  # said as the YAML key, not the flag
        raise PipelineError(f"{where}.config.{flag[1]}: {flag[2]}" if flag else f"{where}.config: {message}")

    parser.error = fail  # argparse reports bad values through error(), which would exit
    parser.set_defaults(**values)
    try:
        script_args, config, _ = parser.parse_args_into_dataclasses(args=[])
    except PipelineError:
        raise
    except (ValueError, TypeError) as error:  # the configs' own checks (__post_init__)
        raise PipelineError(f"{where}.config: {error}") from error
    return script_args, config


def known_options(command: str) -> set[str]:
    """The option names `tether COMMAND --config` accepts (script arguments and config fields)."""
    from tether.cli import build_parser

    return {a.dest for a in build_parser(command)._actions} - _LAUNCH_DESTS


def _describe(stage: StageSpec, script_args: Any, config: Any, inputs: dict[str, list[Source]],
              planned: list[PlannedStage]) -> dict[str, Any]:
    from tether.trainers.run_identity import describe_run

    fields = {f for f in MANAGED_FIELDS if f not in ("use_peft", "lora_r", "lora_alpha", "lora_dropout",
                                                     "lora_target_modules")}
    options = {k: v for k, v in dataclasses.asdict(script_args).items()
               if k not in fields and k not in DATA_FIELDS}
    by_name = {p.name: p for p in planned}
    data = {name: path_identity(getattr(script_args, name)) for name in DATA_FIELDS
            if getattr(script_args, name, None)}
    data["splits"] = [stage.dataset.split, stage.dataset.config, stage.dataset.test_split]
    return {
        "kind": stage.kind,
        "run": describe_run(config, **options),
        "data": data,
        "inputs": {role: [{"stage_output": by_name[s.stage].output_fingerprint} if s.stage else path_identity(s.value)
                          for s in sources] for role, sources in inputs.items()},
        "tokenizer": path_identity(script_args.tokenizer_name_or_path) if script_args.tokenizer_name_or_path else None,
    }


def make_plan(spec: PipelineSpec, stages: Sequence[str] | None = None) -> Plan:
    """Check and resolve every stage of `spec` (all of them, whichever `stages` run) and fingerprint them.
    `stages`: the names to run (None: all). PipelineError names the first problem, before anything runs."""
    names = [s.name for s in spec.stages]
    selected = set(names if stages is None else stages)
    for name in selected - set(names):
        raise PipelineError(f"--stages: {spec.source} has no stage {name!r}{_hint(name, names)}; its stages are "
                            f"{', '.join(names)}.")
    if not selected:
        raise PipelineError("--stages: no stage named.")
    output_dir = os.path.abspath(os.path.expanduser(spec.output_dir))
    plan = Plan(spec, output_dir)
    options_of: dict[str, set[str]] = {}
    for index, stage in enumerate(spec.stages):
        where = f"{spec.source}: stage {stage.name!r}"
        kind = KINDS[stage.kind]
        known = options_of.setdefault(kind.command, known_options(kind.command))
        directory = os.path.join(output_dir, stage.name)
        inputs = _inputs(spec, index, plan.stages, where)
        values = _command_values(spec, stage, kind, directory, inputs, known, where)
        script_args, config = _parse(kind.command, values, where)
        description = _describe(stage, script_args, config, inputs, plan.stages)
        plan.stages.append(PlannedStage(stage, kind, directory, stage.name in selected, inputs, values, config,
                                        description, fingerprint_of(description), Record.read(directory)))
    for key in spec.defaults:
        if key in MANAGED_FIELDS:
            raise PipelineError(f"{spec.source}.defaults.{key}: set by the pipeline; {MANAGED_FIELDS[key]}.")
        if not any(key in known for known in options_of.values()):
            every = set().union(*options_of.values())
            raise PipelineError(f"{spec.source}.defaults.{key}: no stage's command has this option"
                                f"{_hint(key, every)}.")
    _check_inputs_exist(plan)
    _check_foreign_checkpoints(plan)
    return plan


def _check_foreign_checkpoints(plan: Plan) -> None:
    """A stage folder holding checkpoints the pipeline did not write (no record): its trainer would refuse them
    mid-pipeline, so say it now."""
    from tether.trainers.checkpoints import checkpoint_steps

    for stage in plan.stages:
        if stage.selected and stage.record is None and not getattr(stage.config, "overwrite_output_dir", False):
            steps = checkpoint_steps(stage.directory)
            if steps:
                raise PipelineError(
                    f"Stage {stage.name!r}: {stage.directory} holds checkpoints (checkpoint-{steps[-1]}, ...) that this "
                    f"pipeline did not write (it has no {STAGE_FILE}). Fix: delete them or the folder, choose another "
                    "output_dir, or set `overwrite_output_dir: true` in the stage's config to have them deleted.")


def _check_inputs_exist(plan: Plan) -> None:
    """Every input of a stage that runs is made by a stage that runs before it, or was completed earlier;
    a completed input made with another configuration than the YAML now gives is used, with a warning."""
    for stage in plan.stages:
        if not stage.selected:
            continue
        for role, sources in stage.inputs.items():
            for source in sources:
                if source.stage is None:
                    continue
                before = plan.stage(source.stage)
                if before.selected:
                    continue
                what = stage.kind.inputs[role].what
                if not before.complete:
                    raise PipelineError(
                        f"Stage {stage.name!r} needs the output of stage {source.stage!r} (its {what}), which is not "
                        f"among the stages to run and has no completed output in {before.directory}. Fix: add "
                        f"{source.stage} to --stages (or run the whole pipeline).")
                if before.record.fingerprint != before.fingerprint:
                    changed = changed_keys(before.record.description, before.description)
                    plan.warnings.append(
                        f"Stage {stage.name!r} uses the output of stage {source.stage!r} in {before.directory}, which "
                        f"was made with another configuration than {plan.spec.source} now gives (changed: "
                        f"{', '.join(changed[:6]) or 'its inputs'}); run {source.stage} too to redo it.")
