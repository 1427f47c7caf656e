"""`tether pipeline RUN.yaml [--stages a,b] [--output_dir DIR] [--plan]`, on one process or, with
`--accelerate_config NAME [--num_processes N]`, re-executed under `accelerate launch` (see tether.launch)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tether.launch import add_launch_flags, launch
from tether.scripts.strict import make_strict

DESCRIPTION = (
    "Run a post-training pipeline described in one YAML file: stages such as sft -> reward -> ppo or sft -> dpo, "
    "each the `tether KIND` command, with each stage's output chosen as the next one's input (the SFT model as "
    "policy and reference, the reward model as reward and optionally critic; LoRA adapters merged). A completed "
    "stage whose configuration is unchanged is skipped, a stage the pipeline was stopped in resumes from its last "
    "checkpoint, and <output_dir>/report.html covers every stage. See examples/pipeline/rlhf.yaml.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tether pipeline", description=DESCRIPTION, allow_abbrev=False)
    parser.add_argument("pipeline", metavar="RUN.yaml", help="The pipeline: output_dir, model, stages (see "
                                                             "tether.pipeline.schema for every key).")
    parser.add_argument("--stages", default=None, metavar="A,B", help=(
        "Run only these stages (comma-separated names, run in the YAML's order); the stages they take inputs "
        "from must have completed before."))
    parser.add_argument("--output_dir", default=None, help="Replaces the YAML's output_dir.")
    parser.add_argument("--plan", action="store_true", help="Print what each stage would do (run, skip, resume, "
                                                            "restart) and its inputs, and stop.")
    add_launch_flags(parser, "Run every stage")
    return make_strict(parser)


def main(argv: Sequence[str]) -> int:
    """The `tether pipeline` command; returns the exit code."""
    argv = list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.accelerate_config is not None or args.num_processes is not None:
        return launch("pipeline", argv)  # every process runs this command again, without these two flags
    from .runner import run_pipeline
    from .schema import PipelineError

    stages = None if args.stages is None else [s.strip() for s in args.stages.split(",") if s.strip()]
    try:
        run_pipeline(args.pipeline, stages=stages, output_dir=args.output_dir, plan_only=args.plan)
    except PipelineError as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
