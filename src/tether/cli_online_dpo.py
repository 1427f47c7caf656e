"""`tether online-dpo`: the script arguments of OnlineDPOTrainer (where the pairs' ranking comes from).

    tether online-dpo --model_name_or_path SFT_DIR --dataset_name prompts.jsonl --reward_funcs REWARD_DIR \
        --output_dir out --per_device_train_batch_size 8 --max_new_tokens 64 --beta 0.1
    tether online-dpo ... --judge my_judges.py:longer_is_better      # a pairwise judge instead of rewards
    tether online-dpo ... --reward_model_path REWARD_DIR             # TRL's config field, same as --reward_funcs

Every OnlineDPOConfig field is a flag (`--beta 0.1 0.05` gives one beta per epoch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tether.cli import REWARD_FUNCS_HELP, OnlineScriptArguments, ScriptArguments, resolve_reward


@dataclass
class OnlineDPOScriptArguments(OnlineScriptArguments):
    """Script arguments of `tether online-dpo`: rewards (optional here: --judge or --reward_model_path may rank the
    pairs instead), a pairwise judge, and the reference model."""

    reward_funcs: list[str] = field(default_factory=list, metadata={
        "help": REWARD_FUNCS_HELP + " Or rank the pairs with --judge, or a reward model via --reward_model_path."})
    judge: str | None = field(default=None, metadata={
        "help": "A pairwise judge, `file.py:name` or `module:name`: a function judge(prompt, completion_a, "
                "completion_b) -> 0 or 1 (the better one), or a judge class with judge(prompts, pairs) built without "
                "arguments. Code: imported and RUN in this process, so name only code you trust."})
    ref_model_name_or_path: str | None = field(default=None, metadata={
        "help": "Reference model (default: the adapter-disabled policy with --use_peft, else a frozen copy)."})

    def trainer_kwargs(self, peft_task_type: str) -> dict[str, Any]:
        kwargs = ScriptArguments.trainer_kwargs(self, peft_task_type)
        if self.reward_funcs:
            kwargs["reward_funcs"] = [resolve_reward(r) for r in self.reward_funcs]
        if self.judge:
            kwargs["judge"] = resolve_judge(self.judge)
        if self.ref_model_name_or_path:
            kwargs["ref_model"] = self.ref_model_name_or_path
        return kwargs


def resolve_judge(spec: str) -> Any:
    """The judge `--judge SPEC` names (`file.py:name` or `module:name`); a class is instantiated."""
    from tether.rollout.reward_specs import import_module_function, load_file_function

    target, colon, name = spec.rpartition(":")
    if not (colon and target and name.isidentifier()):
        raise SystemExit(f"error: --judge {spec}: give the judge as file.py:name or module:name.")
    try:
        judge = load_file_function(target, name, spec) if target.endswith(".py") else \
            import_module_function(target, name, spec)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: --judge {spec}: {error}") from error
    return judge() if isinstance(judge, type) else judge
