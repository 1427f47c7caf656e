"""`tether COMMAND ... --accelerate_config NAME [--num_processes N]`: the same command re-executed under
`accelerate launch` with one of the accelerate configs shipped in tether/accelerate_configs (DDP, DeepSpeed
ZeRO-2/3, ZeRO-3 with CPU offload, FSDP) or a YAML file of the user's."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

ACCELERATE_CONFIG_FLAG = "--accelerate_config"
NUM_PROCESSES_FLAG = "--num_processes"
ACCELERATE_CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "accelerate_configs")


def shipped_accelerate_configs() -> dict[str, str]:
    """Name -> path of the accelerate configs shipped with tether: ddp, fsdp, zero2, zero3, zero3_offload."""
    return {name.removesuffix(".yaml"): os.path.join(ACCELERATE_CONFIGS_DIR, name)
            for name in sorted(os.listdir(ACCELERATE_CONFIGS_DIR)) if name.endswith(".yaml")}


def add_launch_flags(parser: argparse.ArgumentParser, what: str = "Run") -> None:
    """--accelerate_config and --num_processes in their own --help group (read before parsing: the command is
    re-executed under `accelerate launch`). `what`: the start of the first flag's help ("Run", "Run every stage")."""
    launching = parser.add_argument_group("several processes (DDP, DeepSpeed ZeRO, FSDP)")
    launching.add_argument(ACCELERATE_CONFIG_FLAG, metavar="NAME", default=None, help=(
        f"{what} under `accelerate launch` with a shipped config ({', '.join(shipped_accelerate_configs())}) or an "
        "accelerate YAML file of yours."))
    launching.add_argument(NUM_PROCESSES_FLAG, metavar="N", type=int, default=None, help=(
        f"Processes to launch with {ACCELERATE_CONFIG_FLAG} (default: one per GPU; required without GPUs)."))


def resolve_accelerate_config(value: str) -> str:
    """The path of `--accelerate_config VALUE`: a shipped config's name, or a YAML file."""
    shipped = shipped_accelerate_configs()
    if value in shipped:
        return shipped[value]
    if os.path.isfile(value):
        return os.path.abspath(value)
    raise ValueError(f"{ACCELERATE_CONFIG_FLAG} {value}: neither a shipped config ({', '.join(shipped)}) nor an "
                     "existing YAML file (write one with `accelerate config --config_file FILE`).")


def _pop_flag(argv: Sequence[str], flag: str) -> tuple[str | None, list[str]]:
    """(value of `flag VALUE` or `flag=VALUE` in argv, argv without it)."""
    rest, value, items = [], None, list(argv)
    while items:
        item = items.pop(0)
        if item == flag:
            if not items or items[0].startswith("--"):
                raise ValueError(f"{flag} needs a value.")
            value = items.pop(0)
        elif item.startswith(flag + "="):
            value = item.split("=", 1)[1]
        else:
            rest.append(item)
    return value, rest


@dataclass
class Launch:
    """A training command re-executed under `accelerate launch`: the command line, and the environment
    variables to set on top of the current environment."""

    command: list[str]
    env: dict[str, str]


def accelerate_launch(command: str, argv: Sequence[str], gpu_count: int | None = None) -> Launch:
    """`tether COMMAND ... --accelerate_config NAME [--num_processes N]` as
    `accelerate launch --config_file FILE [--num_processes N] -m tether.cli COMMAND ...` (the same flags
    minus these two). Raises ValueError for a bad config name or file, or a setup that cannot run.

    Without GPUs (`gpu_count` 0; None detects) the processes run on the CPU with the gloo backend:
    accelerate needs ACCELERATE_USE_CPU for that under DDP, DeepSpeed its CPU accelerator (and the
    trainer asks for gloo itself, see tether.distributed); accelerate runs FSDP on GPUs only.
    """
    import yaml

    name, rest = _pop_flag(argv, ACCELERATE_CONFIG_FLAG)
    processes, rest = _pop_flag(rest, NUM_PROCESSES_FLAG)
    if name is None:
        raise ValueError(f"{NUM_PROCESSES_FLAG} applies with {ACCELERATE_CONFIG_FLAG} NAME only.")
    if processes is not None and (not processes.isdigit() or int(processes) < 1):
        raise ValueError(f"{NUM_PROCESSES_FLAG} must be a positive integer, got {processes!r}.")
    path = resolve_accelerate_config(name)
    with open(path, encoding="utf-8") as f:
        settings = yaml.safe_load(f)
    if not isinstance(settings, dict) or "distributed_type" not in settings:
        raise ValueError(f"{path}: not an accelerate config (no distributed_type); write one with "
                         "`accelerate config --config_file FILE`.")
    if gpu_count is None:
        import torch

        gpu_count = torch.cuda.device_count()
    env = {}
    if gpu_count == 0:
        kind = str(settings["distributed_type"]).upper()
        if kind == "FSDP":
            raise ValueError(f"{path}: accelerate runs FSDP on GPUs only and this machine has none; on the CPU use "
                             f"{ACCELERATE_CONFIG_FLAG} ddp, zero2 or zero3.")
        env = {"DS_ACCELERATOR": "cpu"} if kind == "DEEPSPEED" else {"ACCELERATE_USE_CPU": "true"}
    if processes is None and settings.get("num_processes", -1) in (-1, None):
        if gpu_count == 0:
            raise ValueError(f"This machine has no GPU: say how many processes to run on the CPU with "
                             f"{NUM_PROCESSES_FLAG} N.")
        processes = str(gpu_count)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", path]
    if processes is not None:
        launch += [NUM_PROCESSES_FLAG, processes]
    if "main_process_port" not in settings:
        launch += ["--main_process_port", "0"]  # a free port: several runs can share a machine
    return Launch(launch + ["-m", "tether.cli", command, *rest], env)


def launch(command: str, argv: Sequence[str]) -> int:
    """Run `tether COMMAND argv` under `accelerate launch` (see `accelerate_launch`); its exit code."""
    import subprocess

    try:
        spec = accelerate_launch(command, argv)
    except ValueError as error:
        print(f"tether {command}: error: {error}", file=sys.stderr)
        return 2
    shown = " ".join([f"{k}={v}" for k, v in spec.env.items()] + spec.command)
    print(f"tether: {shown}", file=sys.stderr, flush=True)
    return subprocess.run(spec.command, env={**os.environ, **spec.env}).returncode
