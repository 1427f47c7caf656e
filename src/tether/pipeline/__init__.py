"""`tether pipeline run.yaml`: the RLHF pipeline (SFT -> reward model -> PPO, SFT -> DPO, ...) as one YAML file.

Each stage is one `tether KIND` command whose inputs the pipeline chooses from the stages before it (the SFT
model becomes the policy and reference, the reward model the reward and optionally the critic; LoRA adapters
are merged before the next stage); a completed, unchanged stage is skipped, a stopped one resumed from its
checkpoint, and one report covers them all.

- schema.py: the YAML as dataclasses (`load_pipeline`, `PipelineSpec`, `PipelineError`)
- kinds.py:  the stage kinds, one row each (`KINDS`)
- plan.py:   inputs, each stage's command file and fingerprint, every check (`make_plan`)
- runner.py: running the plan (`run_pipeline`)
- command.py: the `tether pipeline` command line

Nothing heavy is imported until a pipeline runs, so `tether pipeline --help` stays instant.
"""

from __future__ import annotations

from .kinds import KINDS, Input, StageKind
from .runner import PipelineResult, StageOutcome, run_pipeline
from .schema import PipelineError, PipelineSpec, StageSpec, load_pipeline, parse_pipeline

__all__ = ["KINDS", "Input", "PipelineError", "PipelineResult", "PipelineSpec", "StageKind", "StageOutcome",
           "StageSpec", "load_pipeline", "parse_pipeline", "run_pipeline"]
