"""The stage kinds of a pipeline: which `tether COMMAND` a stage runs, what it produces, and what it takes from
the stages before it.

A stage of kind K is exactly `tether K --config STAGE_DIR/pipeline_stage.yaml`: the pipeline fills that file's
script arguments (the model to start from, the dataset, the reward model, the LoRA flags...) from the stages
before it. Adding a method is one row of `KINDS`, e.g. for a distillation command whose script arguments have
a `teacher_model_name_or_path` field:

    "gkd": StageKind("gkd", POLICY, {"model": MODEL, "teacher": Input("teacher_model_name_or_path",
                                                                      required=True, what="teacher model")}),
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# What a stage's output is, and so which later inputs it can fill.
POLICY = "policy"  # a language model: the next policy stage starts from it
REWARD = "reward"  # a reward model (sequence classifier with one score)


@dataclass(frozen=True)
class Input:
    """A model a stage takes from outside itself, named by a role (`model`, `ref`, `reward`, `critic`, ...) in
    the stage's `from:` mapping."""

    field: str  # the script-arguments field of `tether COMMAND` it fills (e.g. ref_model_name_or_path)
    # Without `from:`, the output of the latest earlier stage producing this (POLICY or REWARD) fills it; None:
    # only `from:` does (else the command's own default applies, e.g. a frozen copy of the policy as reference).
    default: str | None = None
    required: bool = False  # a stage that gets none is an error before anything runs
    many: bool = False  # a list field (reward_funcs): `from:` may name several
    accepts: str | None = None  # the kind of stage output it takes (POLICY or REWARD); None: any stage
    what: str = ""  # its name in messages


MODEL = Input("model_name_or_path", default=POLICY, required=True, accepts=POLICY, what="starting model")
REFERENCE = Input("ref_model_name_or_path", accepts=POLICY, what="reference model")
REWARD_MODELS = Input("reward_funcs", default=REWARD, required=True, many=True, accepts=REWARD,
                      what="reward model (or reward functions)")
# A value model initialised from a reward model (InstructGPT), or from any other stage's weights (a fresh head).
CRITIC = Input("critic_model_name_or_path", what="critic (value model) initialisation")


@dataclass(frozen=True)
class StageKind:
    """A kind of stage: the `tether` training command it runs, what it produces, the inputs it takes."""

    command: str  # a key of tether.cli.TRAIN_COMMANDS
    produces: str  # POLICY or REWARD
    inputs: Mapping[str, Input]  # role -> input; every kind has "model", the weights it starts from


KINDS: dict[str, StageKind] = {
    "sft": StageKind("sft", POLICY, {"model": MODEL}),
    # Initialised from the latest policy (the SFT model, as InstructGPT does) with a fresh score head.
    "reward": StageKind("reward", REWARD, {"model": MODEL}),
    "dpo": StageKind("dpo", POLICY, {"model": MODEL, "ref": REFERENCE}),
    "kto": StageKind("kto", POLICY, {"model": MODEL, "ref": REFERENCE}),
    "orpo": StageKind("orpo", POLICY, {"model": MODEL}),
    "cpo": StageKind("cpo", POLICY, {"model": MODEL}),
    "ppo": StageKind("ppo", POLICY, {"model": MODEL, "ref": REFERENCE, "reward": REWARD_MODELS, "critic": CRITIC}),
    "grpo": StageKind("grpo", POLICY, {"model": MODEL, "reward": REWARD_MODELS}),
    "rloo": StageKind("rloo", POLICY, {"model": MODEL, "reward": REWARD_MODELS}),
    # Rewarded by the latest reward stage when there is one; else the stage's own --judge or --reward_funcs.
    "online-dpo": StageKind("online-dpo", POLICY, {
        "model": MODEL, "ref": REFERENCE,
        "reward": Input("reward_funcs", default=REWARD, many=True, accepts=REWARD, what="reward model")}),
    # The teacher is named by `from: {teacher: STAGE}` or the stage's own teacher_model_name_or_path.
    "gkd": StageKind("gkd", POLICY, {"model": MODEL, "teacher": Input("teacher_model_name_or_path", accepts=POLICY,
                                                                      what="teacher model")}),
    "distillation": StageKind("distillation", POLICY, {
        "model": MODEL, "teacher": Input("teacher_model_name_or_path", accepts=POLICY, what="teacher model")}),
}
