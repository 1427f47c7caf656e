"""`tether ppo`: the command-line form of `PPOTrainer.train()`.

    tether ppo --model_name_or_path SFT_DIR --dataset_name prompts.jsonl --reward_funcs REWARD_DIR \
        --output_dir out --batch_size 16 --mini_batch_size 4 --total_steps 200
    tether ppo --config ppo.yaml --critic_model_name_or_path REWARD_DIR --use_peft --resume

The policy is loaded with a value head (a LoRA adapter over it with --use_peft, on 4/8-bit weights with
--load_in_4bit/--load_in_8bit); the reference is the adapter-disabled policy with --use_peft, a frozen copy
otherwise, or --ref_model_name_or_path. Rewards are reward functions (`module:function`,
`file.py:function`) or reward models, as for `tether grpo`. Every PPOConfig field is a flag.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tether.cli import RESOLVED_CONFIG_NAME, OnlineScriptArguments, check_model_paths, parse_command_args


@dataclass
class PPOScriptArguments(OnlineScriptArguments):
    """Script arguments of `tether ppo`: the online ones, plus the critic, the reference and PPO-ptx data."""

    ref_model_name_or_path: str | None = field(default=None, metadata={
        "help": "Reference model (default: the adapter-disabled policy with --use_peft, else a frozen copy)."})
    critic_model_name_or_path: str | None = field(default=None, metadata={
        "help": "A separate value model, initialised from this reward model (full or LoRA); default: the "
                "policy's value head."})
    ptx_dataset_name: str | None = field(default=None, metadata={
        "help": "Language-modeling data for the PPO-ptx term (with --ptx_coef > 0): a file, folder or hub id."})
    ptx_dataset_split: str = field(default="train", metadata={"help": "Split of --ptx_dataset_name."})


def train_ppo(argv: Sequence[str]) -> int:
    """Load the policy (with a value head), the prompts and the rewards; run PPOTrainer.train(); save."""
    script_args, config = parse_command_args("ppo", argv)
    check_model_paths(script_args)
    from tether.data import load_any_dataset
    from tether.models.loading import load_tokenizer
    from tether.models.value_head import AutoModelForCausalLMWithValueHead
    from tether.trainers.ppo import PPOTrainer

    kwargs = script_args.trainer_kwargs("CAUSAL_LM")  # reward functions resolved, LoRA config if --use_peft
    tokenizer = load_tokenizer(script_args.tokenizer_name_or_path or script_args.model_name_or_path)
    dataset = load_any_dataset(script_args.dataset_name, script_args.dataset_train_split, script_args.dataset_config)
    ptx = (load_any_dataset(script_args.ptx_dataset_name, script_args.ptx_dataset_split)
           if script_args.ptx_dataset_name else None)
    config.model_name = script_args.model_name_or_path  # recorded for tracking, as the classic scripts set it
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        script_args.model_name_or_path, peft_config=kwargs.get("peft_config"), **script_args.quantization_kwargs())
    ref_model = (AutoModelForCausalLMWithValueHead.from_pretrained(script_args.ref_model_name_or_path)
                 if script_args.ref_model_name_or_path else None)
    trainer = PPOTrainer(config, model, ref_model, tokenizer, dataset=dataset, reward_funcs=kwargs["reward_funcs"],
                         ptx_dataset=ptx, critic=script_args.critic_model_name_or_path)
    trainer.train(resume_from_checkpoint=True if script_args.resume else None)
    if trainer.accelerator.is_main_process:
        _write_resolved_config(script_args, config)
        print(f"Saved the policy, its value head and the tokenizer to {config.output_dir}")
        print(f"Report: {os.path.join(config.output_dir, 'report.html')}")
    return 0


def _write_resolved_config(script_args: Any, config: Any) -> None:
    import yaml

    runtime = {"world_size", "is_encoder_decoder", "is_peft_model", "backward_batch_size",
               "global_backward_batch_size", "global_batch_size", "forward_batch_size", "optimize_cuda_cache"}
    values = {**dataclasses.asdict(script_args),
              **{k: v for k, v in dataclasses.asdict(config).items() if k not in runtime}}
    values.pop("resume", None)  # how this run started, not an option of the run
    with open(os.path.join(config.output_dir, RESOLVED_CONFIG_NAME), "w", encoding="utf-8") as f:
        yaml.safe_dump(values, f, sort_keys=False)
