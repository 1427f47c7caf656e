"""Running a plan: each stage as its `tether KIND` command, in order, skipping what is done and resuming what
was cut short, then one report over all the stages.

For each stage that runs (all, or `--stages`), in the YAML's order:

    skip     its folder holds a completed output with the same fingerprint (nothing is loaded)
    resume   it was stopped inside this configuration: the command runs with --resume, from its latest
             checkpoint-N (the trainer checks that checkpoint belongs to the same run, see run_identity.py)
    restart  its folder holds an output or checkpoints of another configuration: the folder is emptied first
    run      its folder holds nothing of the pipeline's

A stage's folder gets `pipeline_stage.yaml` (the command's --config file: `tether KIND --config` it to rerun
the stage by hand) and `pipeline_stage.json` (status "running", then "complete", with the fingerprint). A
stage trained with LoRA then gets its adapter merged into its starting weights in `merged/`
(`models.loading.merge_adapter_and_save`): later stages load a plain model, so a reward model becomes a reward
or a critic with no adapter to patch in.

Under `accelerate launch` every process runs every stage (the trainers share the work), the main process
alone writes the pipeline's files and decides what each stage does, and the processes wait for each other
between stages.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .plan import COMMAND_FILE, MERGED_DIR, STAGE_FILE, Plan, PlannedStage, changed_keys, make_plan
from .schema import PipelineSpec, load_pipeline

RULE = "=" * 78


@dataclass
class StageOutcome:
    """What the pipeline did with a stage."""

    name: str
    kind: str
    action: str  # "skip", "resume", "restart", "run", or "not selected"
    reason: str
    directory: str
    model_dir: str  # where its output model is (the stage folder, or merged/ for LoRA)
    inputs: dict[str, list[str]]  # role -> the models (or reward specs) it started from
    seconds: float = 0.0


@dataclass
class PipelineResult:
    output_dir: str
    stages: list[StageOutcome] = field(default_factory=list)
    report: str | None = None  # report.html over every stage that trained


class _Processes:
    """The processes of an `accelerate launch` (one process otherwise): who writes, and waiting for each other."""

    def __init__(self) -> None:
        self.state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            from tether.distributed import default_ddp_backend

            backend = default_ddp_backend()
            self.state = PartialState(**({"backend": backend} if backend else {}))

    @property
    def is_main(self) -> bool:
        return self.state is None or self.state.is_main_process

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def share(self, value: Any) -> Any:
        """The main process's `value`, on every process."""
        if self.state is None:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value])[0]


def decide(stage: PlannedStage) -> tuple[str, str]:
    """(action, reason) for a stage that is to run (see the module docstring)."""
    from tether.trainers.checkpoints import latest_checkpoint

    record = stage.record
    if record is None:
        return "run", "new"
    if record.fingerprint == stage.fingerprint:
        if stage.complete:
            return "skip", f"unchanged since it completed{' at ' + record.finished if record.finished else ''}"
        if record.status == "complete":
            return "restart", f"its output model is missing from {stage.model_dir}"
        checkpoint = latest_checkpoint(stage.directory)
        if record.status == "running" and checkpoint is not None:
            return "resume", f"stopped inside it; resuming from {os.path.basename(checkpoint)}"
        return "restart", "stopped before its first checkpoint"
    changed = changed_keys(record.description, stage.description)
    shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
    return "restart", f"changed since its last run: {shown or 'its inputs'}"


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def _write_json(path: str, values: dict[str, Any]) -> None:
    """Written whole or not at all: a kill mid-write leaves the previous file."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(values, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def write_record(stage: PlannedStage, status: str, started: str) -> None:
    _write_json(os.path.join(stage.directory, STAGE_FILE), {
        "stage": stage.name, "kind": stage.spec.kind, "status": status, "fingerprint": stage.fingerprint,
        "model": stage.model_subdir, "description": stage.description, "started": started,
        "finished": _now() if status == "complete" else None,
        "inputs": {role: [str(s) for s in sources] for role, sources in stage.inputs.items()},
        "command": f"tether {stage.kind.command} --config {os.path.join(stage.directory, COMMAND_FILE)}",
    })


def run_command(command: str, argv: Sequence[str]) -> int:
    """`tether COMMAND argv`, in this process (the way `tether COMMAND` runs it)."""
    import importlib

    from tether.cli import TRAIN_COMMANDS, train

    runner = TRAIN_COMMANDS[command].runner
    if runner is None:
        return train(command, argv)
    module, _, name = runner.partition(":")
    return getattr(importlib.import_module(module), name)(argv)


def _run_stage(stage: PlannedStage, action: str, processes: _Processes) -> None:
    import yaml

    started = _now()
    if processes.is_main:
        if action == "restart":  # the folder is the pipeline's (it holds its record): its old contents go
            stale = stage.directory + ".stale"  # renamed first: a kill while deleting leaves a clean stage folder
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(stage.directory, stale)
            shutil.rmtree(stale)
        os.makedirs(stage.directory, exist_ok=True)
        with open(os.path.join(stage.directory, COMMAND_FILE), "w", encoding="utf-8") as f:
            f.write(f"# Stage {stage.name!r} of a tether pipeline, as `tether {stage.kind.command} --config "
                    f"{COMMAND_FILE}` runs it.\n")
            yaml.safe_dump(stage.values, f, sort_keys=False)
        write_record(stage, "running", started)
    processes.barrier()
    argv = ["--config", os.path.join(stage.directory, COMMAND_FILE)] + (["--resume"] if action == "resume" else [])
    code = run_command(stage.kind.command, argv)
    if code != 0:
        raise RuntimeError(f"Stage {stage.name!r}: `tether {stage.kind.command}` ended with exit code {code}.")
    if stage.spec.peft is not None:
        if processes.is_main:
            from tether.models.loading import merge_adapter_and_save

            merged = os.path.join(stage.directory, MERGED_DIR)
            merge_adapter_and_save(stage.directory, merged, base_model_name_or_path=stage.inputs["model"][0].value)
            print(f"Merged the LoRA adapter of stage {stage.name!r} into its starting weights -> {merged}")
        processes.barrier()
    if processes.is_main:
        write_record(stage, "complete", started)
    processes.barrier()


def _report(plan: Plan, outcomes: list[StageOutcome], title: str | None, notes: Sequence[str]) -> str:
    from tether.reports import METRICS_FILE, write_report

    runs = [(f"{s.name} ({s.spec.kind})", s.directory) for s in plan.stages
            if os.path.isfile(os.path.join(s.directory, METRICS_FILE))]
    notes = list(notes) + [f"{o.name} ({o.kind}): {o.action}, {o.reason}" + (f", {o.seconds:.1f} s" if o.seconds
                                                                             else "") for o in outcomes]
    title = title or f"tether pipeline: {os.path.basename(plan.spec.source)}"
    return str(write_report(plan.output_dir, title=title, notes=notes, runs=runs).path)


def print_plan(plan: Plan, actions: dict[str, tuple[str, str]]) -> None:
    print(f"Pipeline {plan.spec.source} -> {plan.output_dir}")
    for k, stage in enumerate(plan.stages, 1):
        action, reason = actions.get(stage.name, ("not selected", ""))
        inputs = "; ".join(f"{role}: {', '.join(str(s) for s in sources)}" for role, sources in stage.inputs.items())
        print(f"  {k}. {stage.name} ({stage.spec.kind}{', LoRA' if stage.spec.peft else ''}): {action}"
              f"{' (' + reason + ')' if reason else ''}\n       {inputs}")
    for warning in plan.warnings:
        print(f"Warning: {warning}")


def run_pipeline(pipeline: PipelineSpec | str | os.PathLike, stages: Sequence[str] | None = None,
                 output_dir: str | os.PathLike | None = None, plan_only: bool = False,
                 after_stage: Callable[[StageOutcome], None] | None = None, report_title: str | None = None,
                 report_notes: Sequence[str] = ()) -> PipelineResult:
    """Run the pipeline of a YAML file (or a parsed `PipelineSpec`): `stages` (None: all) in the YAML's order,
    each skipped, resumed or (re)run (see the module docstring), then `<output_dir>/report.html` over all
    stages. `output_dir` replaces the YAML's. With `plan_only`, print what each stage would do and stop.
    `after_stage(outcome)` is called on every process after each stage (run or skipped), e.g. to sample from
    its model (`outcome.model_dir`) or evaluate it before the next stage starts. The report gets `report_title`
    (default: the YAML's name) and `report_notes` above the pipeline's own, read when the report is written
    (after the last stage), so `after_stage` may add to them.

    Every problem with the YAML (an unknown kind or config field, a stage needing a reward model with none
    before it, a missing dataset file, a --stages input that was never made) is a PipelineError raised before
    any stage runs."""
    processes = _Processes()  # first: under accelerate launch, the processes can then wait for each other
    spec = pipeline if isinstance(pipeline, PipelineSpec) else load_pipeline(pipeline)
    if output_dir is not None:
        spec = spec.with_output_dir(output_dir)
    plan = make_plan(spec, stages)
    # One process decides from the files it sees, so every process takes the same branch.
    actions = processes.share({s.name: decide(s) for s in plan.stages if s.selected} if processes.is_main else None)
    if processes.is_main:
        print_plan(plan, actions)
    result = PipelineResult(plan.output_dir)
    if plan_only:
        return result
    selected = [s for s in plan.stages if s.selected]
    for k, stage in enumerate(selected, 1):
        action, reason = actions[stage.name]
        if processes.is_main:
            print(f"\n{RULE}\nStage {k}/{len(selected)}: {stage.name} ({stage.spec.kind}) -- {action}: {reason}\n{RULE}",
                  flush=True)
        start = time.perf_counter()
        if action != "skip":
            _run_stage(stage, action, processes)
        outcome = StageOutcome(stage.name, stage.spec.kind, action, reason, stage.directory, stage.model_dir,
                               {role: [s.value for s in sources] for role, sources in stage.inputs.items()},
                               0.0 if action == "skip" else time.perf_counter() - start)
        result.stages.append(outcome)
        if after_stage is not None:
            after_stage(outcome)
    if processes.is_main:
        from tether.reports.runfiles import REPORT_FILE

        report = os.path.join(plan.output_dir, REPORT_FILE)
        nothing_new = all(o.action == "skip" for o in result.stages) and os.path.isfile(report)
        result.report = (report if nothing_new and not report_notes  # plots take seconds to draw
                         else _report(plan, result.stages, report_title, report_notes))
        print(f"\n{RULE}\nPipeline done: everything under {plan.output_dir}\n{RULE}")
        for outcome in result.stages:
            print(f"  {outcome.name:<10} {outcome.action:<8} {outcome.seconds:7.1f} s  model: {outcome.model_dir}")
        print(f"Report of the whole pipeline: {result.report}")
    processes.barrier()
    return result
