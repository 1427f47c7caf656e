"""The `tether` command: one subcommand per training method, plus `demo` and `report`.

    tether sft --model_name_or_path DIR --dataset_name data.jsonl --output_dir OUT --max_steps 100
    tether sft --config run.yaml --learning_rate 1e-4      # YAML sets defaults, flags override them
    tether ppo --model_name_or_path SFT --dataset_name prompts.jsonl --reward_funcs REWARD_MODEL
    tether demo [--output_dir ./tether-demo] [--quick]
    tether pipeline run.yaml [--stages sft,reward]         # sft -> reward -> ppo (or dpo...) from one YAML file
    tether report OUTPUT_DIR                               # rebuild a run's report.html and plots
    tether vllm-serve --model DIR [--backend transformers] # generation server for vllm_mode="server"

A training subcommand is one `TrainCommand` row: its script-arguments dataclass, its config dataclass and
its trainer class. Flags and help strings come from those dataclasses through `transformers.HfArgumentParser`,
so the CLI, YAML files and the Python API share one definition of every option. Classes are named by dotted
path and torch/transformers are imported only once a command runs, so `tether --help` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tether.launch import (
    ACCELERATE_CONFIG_FLAG,
    NUM_PROCESSES_FLAG,
    add_launch_flags,
    launch,
)
from tether.scripts.strict import make_strict, unknown_flags_message

CONFIG_FLAG = "--config"
# Written next to the trained model; it is a valid `--config` file, so a run can be repeated from it.
RESOLVED_CONFIG_NAME = "tether_config.yaml"


@dataclass
class ScriptArguments:
    """What to train on: the model and dataset, shared by every training subcommand."""

    # Required in practice, but not by argparse: a value may come from the YAML file instead of a flag.
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Model to train: a hub id or a local folder (required)."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "Dataset: a hub id, a folder saved by Dataset.save_to_disk, or a "
                                        "json/jsonl/csv/parquet file (required)."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(
        default=None, metadata={"help": "Split to evaluate on (optional): of a folder with a file per split or a "
                                        "saved DatasetDict (a single file holds one split). Evaluated at the end "
                                        "of training unless --eval_strategy asks for more often."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer, when it is not stored with the model."})
    resume: bool = field(default=False, metadata={
        "help": "Resume from the last complete checkpoint-N folder of --output_dir (weights, optimizer, data "
                "position, random state): a killed run then ends as an uninterrupted one would. "
                "--resume_from_checkpoint PATH resumes from a given folder instead."})

    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA path."})
    lora_target_modules: str = field(default="all-linear", metadata={
        "help": "Modules that get adapters: 'all-linear' or comma-separated names (e.g. q_proj,v_proj)."})

    load_in_4bit: bool = field(default=False, metadata={
        "help": "Load the model's linear layers in 4 bits and train a LoRA adapter over them (QLoRA; needs "
                "bitsandbytes and --use_peft)."})
    load_in_8bit: bool = field(default=False, metadata={
        "help": "Load the model's linear layers in 8 bits (needs bitsandbytes and --use_peft)."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={
        "help": "4-bit data type with --load_in_4bit: nf4 (QLoRA's NormalFloat) or fp4.", "choices": ["nf4", "fp4"]})
    use_bnb_nested_quant: bool = field(default=False, metadata={
        "help": "With --load_in_4bit, quantize the quantization constants too (double quantization)."})

    required = ("model_name_or_path", "dataset_name")

    def __post_init__(self) -> None:
        if self.dataset_test_split and self.dataset_name and os.path.isfile(self.dataset_name):
            # load_any_dataset reads a single file as whatever split is asked for: its training rows would be
            # evaluated as the test split without a word.
            raise ValueError(
                f"--dataset_test_split {self.dataset_test_split!r} with --dataset_name {self.dataset_name}: a single "
                "file holds one split, so the test split would be its training rows. Fix: a folder with a file per "
                "split (train.jsonl, test.jsonl), a DatasetDict saved with save_to_disk, or no --dataset_test_split.")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("--load_in_4bit and --load_in_8bit are both set; choose one.")
        if (self.load_in_4bit or self.load_in_8bit) and not self.use_peft:
            raise ValueError("Quantized weights cannot be trained directly: add --use_peft to train a LoRA "
                             "adapter over the quantized model (QLoRA), or drop --load_in_4bit/--load_in_8bit.")
        if not self.load_in_4bit and (self.use_bnb_nested_quant or self.bnb_4bit_quant_type != "nf4"):
            raise ValueError("--bnb_4bit_quant_type and --use_bnb_nested_quant apply only with --load_in_4bit.")

    def quantization_kwargs(self) -> dict[str, Any]:
        """The `model_init_kwargs` entries of the quantization flags (mapped to a BitsAndBytesConfig at load
        time; plain values, so the resolved config stays a YAML file)."""
        if self.load_in_8bit:
            return {"load_in_8bit": True}
        if self.load_in_4bit:
            return {"load_in_4bit": True, "bnb_4bit_quant_type": self.bnb_4bit_quant_type,
                    "use_bnb_nested_quant": self.use_bnb_nested_quant}
        return {}

    def trainer_kwargs(self, peft_task_type: str) -> dict[str, Any]:
        """Extra keyword arguments for the trainer. Methods that need more models (reward, value, reference)
        subclass this dataclass, add their fields, and return them here."""
        if not self.use_peft:
            return {}
        from peft import LoraConfig

        targets = self.lora_target_modules
        return {"peft_config": LoraConfig(
            r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout, task_type=peft_task_type,
            target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
        )}


@dataclass
class ReferenceScriptArguments(ScriptArguments):
    """Script arguments of methods with a reference model."""

    ref_model_name_or_path: str | None = field(default=None, metadata={
        "help": "Reference model (default: the adapter-disabled policy with --use_peft, else a frozen copy)."})

    def trainer_kwargs(self, peft_task_type: str) -> dict[str, Any]:
        return {**super().trainer_kwargs(peft_task_type), "ref_model": self.ref_model_name_or_path}


REWARD_FUNCS_HELP = (
    "Rewards, one or more (weights: --reward_weights, same order). A reward function f(prompts, completions, "
    "**columns) -> list[float]: `path/to/file.py:function`, `package.module:function` (the working directory "
    "is searched first) or TRL's `package.module.function`. A reward model: a local folder or a hub id "
    "`namespace/name`. A bare name is an error, never a hub lookup. Reward functions are code: the file or "
    "module is imported and RUN inside the training process, with your permissions, so name only code you "
    "trust. See also --reward_timeout (GRPO/RLOO).")


@dataclass
class OnlineScriptArguments(ScriptArguments):
    """Script arguments of the online methods: where the rewards come from."""

    reward_funcs: list[str] = field(default_factory=list, metadata={"help": REWARD_FUNCS_HELP})
    environment: str | None = field(default=None, metadata={"help": (
        "Multi-turn episodes: `path/to/file.py:factory` or `package.module:factory`, a callable (e.g. a class) "
        "returning a new environment per episode: reset(prompt) and step(text) -> (observation, reward, done), or "
        "TRL's form (tool methods, reset, get_reward). Its reward is one more reward function. User code, run in "
        "the training process.")})
    tools: list[str] = field(default_factory=list, metadata={"help": (
        "Tools the model may call in its turns (multi-turn episodes): `file.py:function` or `module:function` "
        "each, a str -> str callable (classic <request><Tool>...<call> syntax) or a typed, documented function "
        "(chat-template tool calls). User code, run in the training process (see tether.rollout.tools).")})

    def trainer_kwargs(self, peft_task_type: str) -> dict[str, Any]:
        if not self.reward_funcs and self.environment is None:
            raise SystemExit("error: --reward_funcs is required (or --environment, whose reward counts): "
                             "file.py:function, module:function, or a reward model's folder or hub id "
                             "namespace/name (several allowed).")
        kwargs = {**super().trainer_kwargs(peft_task_type),
                  "reward_funcs": [resolve_reward(r) for r in self.reward_funcs] or None}
        if self.environment is not None:
            kwargs["environment_factory"] = resolve_code(self.environment, "--environment")
        if self.tools:
            kwargs["tools"] = [resolve_code(spec, "--tools") for spec in self.tools]
        return kwargs


def resolve_reward(spec: str) -> Any:
    """The function or reward model a `--reward_funcs` string names (forms: tether.rollout.reward_specs);
    a string that names neither exits with an error that lists the forms."""
    from tether.rollout.reward_specs import resolve_reward_spec

    try:
        return resolve_reward_spec(spec)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: --reward_funcs {spec}: {error}") from error


def resolve_code(spec: str, flag: str) -> Any:
    """The object a `path/to/file.py:name` or `package.module:name` string names (user code: it is imported)."""
    from tether.rollout.reward_specs import import_module_function, load_file_function

    where, colon, name = spec.rpartition(":")
    if not colon or not where or not name:
        raise SystemExit(f"error: {flag} {spec}: expected `path/to/file.py:name` or `package.module:name`.")
    try:
        if where.endswith(".py"):
            return load_file_function(where, name, spec)
        return import_module_function(where, name, spec)
    except (ValueError, FileNotFoundError, ImportError) as error:
        raise SystemExit(f"error: {flag} {spec}: {error}") from error


@dataclass(frozen=True)
class TrainCommand:
    """A training subcommand; classes are "module:Name" strings so they are imported only when used."""

    help: str
    config: str
    trainer: str
    script_args: str = "tether.cli:ScriptArguments"
    peft_task_type: str = "CAUSAL_LM"
    # "module:function(argv) -> exit code" for a trainer that is not a transformers.Trainer (PPO's own loop).
    runner: str | None = None


TRAIN_COMMANDS: dict[str, TrainCommand] = {
    "sft": TrainCommand("Supervised fine-tuning (language modeling, prompt-completion or chat data).",
                        "tether.trainers.sft:SFTConfig", "tether.trainers.sft:SFTTrainer"),
    "reward": TrainCommand("Reward modeling on preference pairs (Bradley-Terry).",
                           "tether.trainers.reward:RewardConfig", "tether.trainers.reward:RewardTrainer",
                           peft_task_type="SEQ_CLS"),
    "dpo": TrainCommand("Direct Preference Optimization and its loss family on preference pairs.",
                        "tether.trainers.dpo:DPOConfig", "tether.trainers.dpo:DPOTrainer",
                        "tether.cli:ReferenceScriptArguments"),
    "kto": TrainCommand("KTO on unpaired (prompt, completion, label) or paired preference data.",
                        "tether.trainers.kto:KTOConfig", "tether.trainers.kto:KTOTrainer",
                        "tether.cli:ReferenceScriptArguments"),
    "orpo": TrainCommand("ORPO: NLL plus an odds-ratio preference term, no reference model.",
                         "tether.trainers.orpo:ORPOConfig", "tether.trainers.orpo:ORPOTrainer"),
    "cpo": TrainCommand("CPO or SimPO (--loss_type simpo): reference-free preference optimisation.",
                        "tether.trainers.cpo:CPOConfig", "tether.trainers.cpo:CPOTrainer"),
    "grpo": TrainCommand("GRPO (and Dr. GRPO, DAPO via --loss_type / --scale_rewards) on prompts with reward "
                         "functions or reward models.", "tether.trainers.grpo:GRPOConfig",
                         "tether.trainers.grpo:GRPOTrainer", script_args="tether.cli:OnlineScriptArguments"),
    "rloo": TrainCommand("RLOO (REINFORCE with a leave-one-out baseline) on prompts with reward functions or "
                         "reward models.", "tether.trainers.rloo:RLOOConfig", "tether.trainers.rloo:RLOOTrainer",
                         script_args="tether.cli:OnlineScriptArguments"),
    "online-dpo": TrainCommand("Online DPO: two completions per prompt sampled from the policy, ranked by reward "
                               "functions, reward models (--reward_funcs, or --reward_model_path) or a pairwise "
                               "judge (--judge); DPO or IPO loss (--loss_type) against the reference.",
                               "tether.trainers.online_dpo:OnlineDPOConfig",
                               "tether.trainers.online_dpo:OnlineDPOTrainer",
                               script_args="tether.cli_online_dpo:OnlineDPOScriptArguments"),
    "ppo": TrainCommand("PPO with a value head (or a separate critic) against reward functions or reward models; "
                        "PPO-ptx, LoRA, resume.", "tether.trainers.ppo_config:PPOConfig",
                        "tether.trainers.ppo:PPOTrainer", script_args="tether.cli_ppo:PPOScriptArguments",
                        runner="tether.cli_ppo:train_ppo"),
    "gkd": TrainCommand("GKD: distill a teacher (--teacher_model_name_or_path) into the model on prompt-completion "
                        "or chat data, mixing dataset and self-generated completions (--lmbda, --seq_kd, --beta).",
                        "tether.trainers.gkd:GKDConfig", "tether.trainers.gkd:GKDTrainer"),
    "distillation": TrainCommand("On-policy distillation of a teacher (--teacher_model_name_or_path) into the model "
                                 "on prompts: every completion sampled by the student (--beta, --temperature).",
                                 "tether.trainers.gkd:DistillationConfig", "tether.trainers.gkd:DistillationTrainer"),
}


def _import(dotted: str) -> Any:
    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)


# ----- parsing ---------------------------------------------------------------------------------------------
def build_parser(command: str) -> Any:
    """The `HfArgumentParser` of a training subcommand: script arguments + the method's config + `--config`."""
    from transformers import HfArgumentParser

    from tether.scripts.parser import json_dict_flags

    spec = TRAIN_COMMANDS[command]
    parser = HfArgumentParser((_import(spec.script_args), _import(spec.config)), prog=f"tether {command}",
                              description=spec.help, allow_abbrev=False)
    # argparse's generated usage lists all ~150 options and buries error messages under it.
    parser.usage = f"tether {command} --model_name_or_path M --dataset_name D [--config YAML] [OPTIONS]"
    parser.add_argument(CONFIG_FLAG, metavar="YAML", default=None,
                        help="YAML file of option: value pairs; they set the defaults, explicit flags override.")
    add_launch_flags(parser)  # read by main() before parsing; listed here for --help
    json_dict_flags(parser)
    return make_strict(parser)


def _yaml_defaults(path: str, parser: Any) -> dict[str, Any]:
    """The YAML file's options, checked against the parser's: a typo must fail, not be silently ignored."""
    import yaml

    if not os.path.isfile(path):
        parser.error(f"{CONFIG_FLAG} {path}: no such file.")
    with open(path, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        parser.error(f"{path}: expected a mapping of option: value pairs, got {type(values).__name__}.")
    known = {a.dest for a in parser._actions} - {"help", "config", "accelerate_config", "num_processes"}
    unknown = sorted(k for k in values if k not in known)
    if unknown:
        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, known, n=1)) else repr(k)
                 for k in unknown]
        parser.error(f"{path}: unknown option(s) {', '.join(hints)}. Run `{parser.prog} --help` for the options.")
    return values


def _config_flag(argv: Sequence[str]) -> argparse.Namespace:
    """Just `--config PATH` out of argv (None when absent), read before the full parse."""
    pre = make_strict(argparse.ArgumentParser(add_help=False, allow_abbrev=False))
    pre.add_argument(CONFIG_FLAG, default=None)
    return pre.parse_known_args(list(argv))[0]


def parse_command_args(command: str, argv: Sequence[str]) -> tuple[Any, Any]:
    """(script arguments, config) for a training subcommand, from flags and an optional `--config` YAML."""
    parser = build_parser(command)
    known = _config_flag(argv)
    if known.config:
        defaults = _yaml_defaults(known.config, parser)
        # argparse keeps a flag given on the command line over its default, which is exactly the precedence
        # we want; string defaults still go through the field's type (YAML reads `1e-4` as a string).
        parser.set_defaults(**defaults)
    _, unknown = parser.parse_known_args(list(argv))  # before the configs are built: a typo is named first
    if unknown:
        parser.error(unknown_flags_message(parser, unknown))
    script_args, config, _extra = parser.parse_args_into_dataclasses(args=list(argv))
    missing = [name for name in getattr(script_args, "required", ()) if getattr(script_args, name) is None]
    if missing:
        parser.error(f"missing {', '.join('--' + m for m in missing)} (a flag or a key of the {CONFIG_FLAG} file).")
    if script_args.resume:
        from tether.trainers.checkpoints import latest_checkpoint

        if getattr(config, "resume_from_checkpoint", None):
            parser.error("--resume (the last checkpoint of --output_dir) and --resume_from_checkpoint (a given "
                         "folder) are both set; use one, not both.")
        if latest_checkpoint(config.output_dir) is None:
            parser.error(f"--resume: no checkpoint-N folder in {config.output_dir} to resume from (runs write one "
                         "every --save_steps steps); drop --resume to start a new run.")
    return script_args, config


# ----- running ---------------------------------------------------------------------------------------------
def _write_resolved_config(script_args: Any, config: Any, path: str) -> None:
    import yaml

    options = config.to_dict()
    # TrainingArguments.to_dict hides the value of every field named *_token (a secret like hub_token); the
    # ones that are not secrets (e.g. SFTConfig.chars_per_token) are numbers, kept as they are.
    options.update({k: getattr(config, k) for k, v in options.items()
                    if k.endswith("_token") and v == f"<{k.upper()}>" and isinstance(getattr(config, k), (int, float))})
    values = {**dataclasses.asdict(script_args), **options}
    values.pop("resume", None)  # how this run started, not an option of the run: repeating it must not resume
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(values, f, sort_keys=False)


def check_model_paths(script_args: Any) -> None:
    """Before anything loads: every `--*_name_or_path` that can only be a local path must exist (a
    FileNotFoundError naming the flag otherwise); hub ids are left to the loaders."""
    from tether.models.loading import resolve_model_source

    for name, value in dataclasses.asdict(script_args).items():
        if name.endswith("_name_or_path") and isinstance(value, str):
            resolve_model_source(value, f"--{name}")


def train(command: str, argv: Sequence[str]) -> int:
    """Run a training subcommand: load, train, save model + tokenizer (and the resolved config) to output_dir."""
    script_args, config = parse_command_args(command, argv)
    spec = TRAIN_COMMANDS[command]
    check_model_paths(script_args)
    trainer_kwargs = script_args.trainer_kwargs(spec.peft_task_type)  # reward functions loaded before the data
    from tether.data import load_any_dataset
    from tether.models.loading import load_tokenizer

    name, subset = script_args.dataset_name, script_args.dataset_config
    train_dataset = load_any_dataset(name, script_args.dataset_train_split, subset)
    eval_dataset = (load_any_dataset(name, script_args.dataset_test_split, subset)
                    if script_args.dataset_test_split else None)
    tokenizer = load_tokenizer(script_args.tokenizer_name_or_path) if script_args.tokenizer_name_or_path else None
    quantization = script_args.quantization_kwargs()
    if quantization:
        config.model_init_kwargs = {**(config.model_init_kwargs or {}), **quantization}
        if getattr(script_args, "ref_model_name_or_path", None) and hasattr(config, "ref_model_init_kwargs"):
            # A separate reference is loaded the same way (TRL's scripts do too): frozen, it needs no adapter.
            config.ref_model_init_kwargs = {**(config.ref_model_init_kwargs or {}), **quantization}
    trainer = _import(spec.trainer)(
        script_args.model_name_or_path, args=config, train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer, **trainer_kwargs,
    )
    # True: the trainer resumes from the last complete checkpoint-N of output_dir (checked to exist above).
    trainer.train(resume_from_checkpoint=True if script_args.resume else config.resume_from_checkpoint)
    if eval_dataset is not None and config.eval_strategy == "no":
        # A test split was asked for but no periodic evaluation: evaluate once, at the end.
        trainer.log_metrics("eval", trainer.evaluate())
    trainer.save_model(config.output_dir)
    if trainer.is_world_process_zero():
        _write_resolved_config(script_args, config, os.path.join(config.output_dir, RESOLVED_CONFIG_NAME))
        print(f"Saved the model and tokenizer to {config.output_dir}")
        from tether.reports import write_report

        # Rebuilt now that the page can show the resolved config and any final evaluation.
        print(f"Report: {write_report(config.output_dir).path}")
    return 0


def demo(argv: Sequence[str]) -> int:
    """`tether demo`: the offline demo, stage by stage (see tether.demo.pipeline)."""
    parser = argparse.ArgumentParser(
        prog="tether demo", description="Offline demo on CPU: a generated review corpus, a tokenizer and a tiny Llama "
                                        "built from a config, then SFT, a reward model, PPO and DPO (or GRPO/RLOO) "
                                        "as a `tether pipeline` (--print-config shows its YAML), each stage judged "
                                        "on held-out prompts; one report with embedded plots.")
    parser.add_argument("--output_dir", default="./tether-demo", help="Where every file is written.")
    parser.add_argument("--quick", action="store_true", help="A ~20 s smoke version (tiny sizes, few steps).")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the corpus, the model and sampling.")
    parser.add_argument("--method", choices=["ppo", "grpo", "rloo", "tools", "ddpo"], default="ppo",
                        help="RL stage after SFT and the reward model: PPO then DPO (default), or GRPO / RLOO; "
                             "`tools`: a separate demo where GRPO teaches a tiny model to call a calculator; "
                             "`ddpo`: DDPO on a tiny Stable Diffusion pipeline (needs diffusers).")
    parser.add_argument("--print-config", "--print_config", action="store_true", dest="print_config",
                        help="Print the pipeline YAML these options run (for `tether pipeline`) and stop.")
    args = make_strict(parser).parse_args(argv)
    from tether.demo.pipeline import print_config, run_demo

    if args.method == "tools":  # multi-turn episodes with a tool: its own task and model (tether/demo/tools_task.py)
        if args.print_config:
            raise SystemExit("error: --method tools is a Python demo (an environment object), not a pipeline YAML: "
                             "see tether/demo/tools_task.py.")
        from tether.demo.tools_task import run_tools_demo

        output_dir = args.output_dir if args.output_dir != "./tether-demo" else "./tether-demo-tools"
        run_tools_demo(output_dir, quick=args.quick, seed=args.seed)
        return 0
    if args.method == "ddpo":  # a diffusion model: its own demo (tether/demo/ddpo.py)
        if args.print_config:
            raise SystemExit("error: --method ddpo is a Python demo (DDPOTrainer), not a pipeline YAML: see "
                             "tether/demo/ddpo.py.")
        from tether.demo.ddpo import run_ddpo_demo

        run_ddpo_demo(args.output_dir if args.output_dir != "./tether-demo" else "./tether-demo-ddpo",
                      quick=args.quick, seed=args.seed)
        return 0
    options = dict(quick=args.quick, seed=args.seed, method=args.method)
    if args.print_config:
        print_config(args.output_dir, **options)
    else:
        run_demo(args.output_dir, **options)
    return 0


def report(argv: Sequence[str]) -> int:
    """`tether report DIR`: rebuild a run's report (report.html, plots/) from the files in its output dir."""
    parser = argparse.ArgumentParser(
        prog="tether report", description="Rebuild the report of a training run from its output dir (metrics.jsonl, "
                                          "samples.jsonl, its config): report.html and PNG plots under plots/. "
                                          "Given a folder of runs (e.g. the demo's), one page with a section per run.")
    parser.add_argument("directory", help="A run's output_dir, or a folder of them.")
    parser.add_argument("--title", default=None, help="Title of the page (default: the run's name).")
    args = make_strict(parser).parse_args(argv)
    if not os.path.isdir(args.directory):
        parser.error(f"{args.directory}: no such folder.")
    from tether.reports import write_report

    try:
        built = write_report(args.directory, title=args.title)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(f"Report: {built.path}")
    return 0


def vllm_serve(argv: Sequence[str]) -> int:
    """`tether vllm-serve --model M`: the generation server of `use_vllm=True, vllm_mode="server"` runs (TRL's
    flag names; see tether.rollout.vllm_server)."""
    from transformers import HfArgumentParser

    from tether.rollout.vllm_server import ServeArguments, serve

    parser = HfArgumentParser(ServeArguments, prog="tether vllm-serve", allow_abbrev=False, description=(
        "Serve a model for GRPO/RLOO with use_vllm=True, vllm_mode='server': generation and weight updates over "
        "HTTP, on a vLLM engine or on tether's own sampler (--backend transformers, no GPU needed)."))
    parser.usage = "tether vllm-serve --model M [--backend vllm|transformers] [--host H] [--port P] [OPTIONS]"
    parser.add_argument(CONFIG_FLAG, metavar="YAML", default=None,
                        help="YAML file of option: value pairs; they set the defaults, explicit flags override.")
    make_strict(parser)
    known = _config_flag(argv)
    if known.config:
        parser.set_defaults(**_yaml_defaults(known.config, parser))
    try:
        # The second value is the namespace of --config, which the dataclass does not hold.
        args, _extra = parser.parse_args_into_dataclasses(args=list(argv))
    except ValueError as error:  # ServeArguments.__post_init__
        parser.error(str(error))
    if args.model is None:
        parser.error(f"missing --model (a flag or a key of the {CONFIG_FLAG} file).")
    serve(args)
    return 0


def pipeline(argv: Sequence[str]) -> int:
    """`tether pipeline RUN.yaml`: the stages of a YAML file, each a training command fed by the ones before it
    (see tether.pipeline)."""
    from tether.pipeline.command import main as pipeline_main

    return pipeline_main(argv)


# Subcommands that are not a trainer: name -> (help, function of the remaining argv returning an exit code).
TOOLS: dict[str, tuple[str, Callable[[Sequence[str]], int]]] = {
    "demo": ("Run the offline demo: corpus -> tokenizer -> tiny model -> SFT, with samples.", demo),
    "pipeline": ("Run a pipeline from one YAML file (e.g. sft -> reward -> ppo): each stage's output feeds the next; "
                 "unchanged stages are skipped, stopped ones resumed; one report.", pipeline),
    "report": ("Rebuild a run's report (plots + HTML page) from its output dir.", report),
    "vllm-serve": ("Serve a model for GRPO/RLOO's vllm_mode='server' (generation + weight updates over HTTP).",
                   vllm_serve),
}


def _top_parser() -> argparse.ArgumentParser:
    from tether import __version__

    parser = argparse.ArgumentParser(
        prog="tether", description="Post-training for transformer language models, with TRL's names.",
        epilog="Run `tether COMMAND --help` for the options of a command.")
    parser.add_argument("--version", action="version", version=f"tether {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, spec in TRAIN_COMMANDS.items():
        commands.add_parser(name, help=spec.help, add_help=False)
    for name, (help_text, _) in TOOLS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return make_strict(parser)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tether` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # A known command gets all the remaining flags; the top parser only handles --help/--version/typos.
    if argv and argv[0] in TRAIN_COMMANDS:
        if any(a.split("=", 1)[0] in (ACCELERATE_CONFIG_FLAG, NUM_PROCESSES_FLAG) for a in argv[1:]):
            return launch(argv[0], argv[1:])  # several processes: this command again, under accelerate launch
        runner = TRAIN_COMMANDS[argv[0]].runner
        return _import(runner)(argv[1:]) if runner else train(argv[0], argv[1:])
    if argv and argv[0] in TOOLS:
        return TOOLS[argv[0]][1](argv[1:])
    parser = _top_parser()
    parser.parse_args(argv)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
