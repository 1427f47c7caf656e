"""A run knows its checkpoints: each one records the run's id and the configuration that shapes its math.

- A fresh run (not resuming) into an output folder that already holds `checkpoint-N` folders would mix two runs
  there: `resume_from_checkpoint=True` later picks the largest N, which may be the older run's. So a fresh run
  refuses such a folder before training, naming the fixes (a new folder, `overwrite_output_dir=True`, or
  resuming the run that wrote them); with `overwrite_output_dir=True` those checkpoints are deleted first.
- Resuming compares the checkpoint's recorded configuration with the current one and refuses a difference in
  anything that changes the math (learning rate, batch sizes, loss options, seed, the data's row count, the
  adapter config, ...), listing each field with both values. Operational fields (logging, saving, evaluation,
  paths, hub and tracker settings, process and kernel choices that give the same numbers) may change. The
  training length (max_steps, num_train_epochs) may change too, the usual way to extend a run, with a
  warning, since a learning-rate schedule depends on it.

The record is `tether_run.json` in every checkpoint: {"run_id", "config": {field: value}, "length": {...}}.
A checkpoint without it (written before tether kept one, or by TRL) resumes with a warning.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Mapping
from typing import Any

from .checkpoints import PARTIAL_SUFFIX, checkpoint_steps

RUN_FILE = "tether_run.json"

# Fields that may change between a run and its resumption: they do not change what is computed.
_OPERATIONAL_FIELDS = frozenset({
    "output_dir", "overwrite_output_dir", "run_name", "project", "disable_tqdm", "report_to", "debug",
    "resume_from_checkpoint", "ignore_data_skip", "restore_callback_states_from_checkpoint", "local_rank",
    "do_train", "do_eval", "do_predict", "prediction_loss_only", "include_for_metrics", "batch_eval_metrics",
    "bf16_full_eval", "fp16_full_eval", "per_device_eval_batch_size", "load_best_model_at_end",
    "metric_for_best_model", "greater_is_better", "skip_memory_metrics", "include_num_input_tokens_seen",
    "use_cpu", "accelerator_config", "parallelism_config", "fsdp", "fsdp_config", "deepspeed", "tf32",
    "full_determinism", "auto_find_batch_size", "torch_empty_cache_steps", "use_cache", "remove_unused_columns",
    "label_names", "length_column_name", "activation_checkpointing", "activation_checkpointing_kwargs",
    "gradient_checkpointing", "gradient_checkpointing_kwargs", "torch_compile", "torch_compile_backend",
    "torch_compile_mode", "use_liger_kernel", "liger_kernel_config", "activation_offloading",
    "max_nonfinite_steps", "dataset_num_proc", "trust_remote_code", "generate_during_eval", "num_generations_eval",
    "num_completions_to_print", "cast_lm_head_to_fp32", "ds3_gather_for_generation", "optimize_device_cache",
    "optimize_cuda_cache", "tracker_project_name", "tracker_kwargs", "project_kwargs", "accelerator_kwargs",
    "push_to_hub_if_best_kwargs", "compare_steps", "exp_name", "log_with", "query_dataset", "reward_model",
    "model_name", "use_vllm", "vllm_mode", "vllm_gpu_memory_utilization", "vllm_tensor_parallel_size",
    "vllm_enable_sleep_mode", "vllm_model_impl", "vllm_structured_outputs_regex",
})
_OPERATIONAL_PREFIXES = ("log_", "logging_", "save_", "eval_", "hub_", "push_", "trackio_", "wandb_", "ddp_",
                         "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
                         "dataloader_prefetch_factor", "dataloader_multiprocessing_context", "vllm_server_",
                         "mlflow_", "tensorboard_")
# Fields that set how long a run is: extending a run changes them, so they warn instead of refusing.
LENGTH_FIELDS = ("max_steps", "num_train_epochs", "steps", "total_ppo_epochs", "total_steps")


class ForeignCheckpointsError(ValueError):
    """A fresh run's output folder already holds another run's checkpoints."""


class ResumeMismatchError(ValueError):
    """The checkpoint to resume was written by a run whose configuration differs in what changes the math."""


def _is_operational(name: str) -> bool:
    return name in _OPERATIONAL_FIELDS or name.startswith(_OPERATIONAL_PREFIXES)


def _plain(value: Any) -> Any:
    """`value` as JSON would give it back (tuples as lists, enums as their values); None for what has no stable
    text form (objects printed with their address)."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_plain(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if hasattr(value, "to_dict"):  # peft and quantization configs
        return _plain(value.to_dict())
    text = repr(value)
    return None if " at 0x" in text else text


def describe_run(config: Any, **extra: Any) -> dict[str, dict[str, Any]]:
    """The record of a run compared on resume: {"config": the fields that change the math (and `extra`, e.g.
    the data's row count or the adapter config), "length": the training-length fields}. `config` is a dataclass
    (a TrainingArguments subclass or PPOConfig)."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init and hasattr(config, f.name)}
    math = {name: _plain(value) for name, value in fields.items()
            if not _is_operational(name) and name not in LENGTH_FIELDS}
    math.update({name: _plain(value) for name, value in extra.items()})
    length = {name: _plain(fields[name]) for name in LENGTH_FIELDS if name in fields}
    return json.loads(json.dumps({"config": math, "length": length}, default=repr))


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def write_run_file(folder: str, run_id: str, description: dict[str, dict[str, Any]]) -> None:
    """Record the run in a checkpoint folder being written."""
    with open(os.path.join(folder, RUN_FILE), "w", encoding="utf-8") as f:
        json.dump({"run_id": run_id, **description}, f, indent=1, sort_keys=True)


def check_fresh_output_dir(output_dir: str, overwrite: bool, *, main_process: bool = True) -> None:
    """Before a fresh run trains: refuse an output folder holding checkpoints of an earlier run
    (ForeignCheckpointsError naming them and the fixes), or, with `overwrite`, delete them (the main process does;
    the caller waits for it before the others go on)."""
    steps = checkpoint_steps(output_dir)
    if not steps:
        return
    names = [f"checkpoint-{s}" for s in steps]
    if not overwrite:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise ForeignCheckpointsError(
            f"{output_dir} already holds checkpoints of an earlier run ({shown}). A new run there would mix its "
            "checkpoints with those, and resuming would pick the latest, possibly the old run's. Fix: choose a new "
            "output_dir, or set overwrite_output_dir=True (--overwrite_output_dir) to delete them and start afresh, "
            "or resume that run with resume_from_checkpoint=True (--resume).")
    if main_process:
        warnings.warn(f"overwrite_output_dir: deleting the earlier run's {', '.join(names)} in {output_dir}.",
                      UserWarning, stacklevel=3)
        for name in names:
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
        for name in os.listdir(output_dir):
            if name.startswith("checkpoint-") and name.endswith(PARTIAL_SUFFIX):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def check_resume(checkpoint: str, description: dict[str, dict[str, Any]]) -> str:
    """Before resuming from `checkpoint`: ResumeMismatchError if its run's configuration differs from
    `description` (from `describe_run`) in a field that changes the math, naming each with both values; a warning
    if only the training length differs. Returns the run id to continue (a new one for a checkpoint without a
    record, which also warns)."""
    path = os.path.join(checkpoint, RUN_FILE)
    if not os.path.isfile(path):
        warnings.warn(f"{checkpoint} has no {RUN_FILE} (written before tether recorded runs, or by another "
                      "library): its configuration cannot be compared with this one; make sure it is the same.",
                      UserWarning, stacklevel=3)
        return new_run_id()
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    before, now = saved.get("config", {}), description["config"]
    changed = sorted(name for name in before.keys() | now.keys()
                     if name in before and name in now and before[name] != now[name])
    if changed:
        lines = "\n".join(f"  {name}: {before[name]!r} in the checkpoint, {now[name]!r} now" for name in changed)
        raise ResumeMismatchError(
            f"Cannot resume from {checkpoint}: it was written by a run configured differently in what changes the "
            f"training itself:\n{lines}\nFix: resume with the checkpoint's values, or start a new run (a new "
            "output_dir, or overwrite_output_dir=True) with the new ones.")
    lengths = {name: (value, description["length"].get(name)) for name, value in saved.get("length", {}).items()
               if name in description["length"] and description["length"][name] != value}
    if lengths:
        said = ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in lengths.items())
        warnings.warn(f"Resuming {checkpoint} with a different training length ({said}); a learning-rate schedule "
                      "that depends on the length continues on the new one.", UserWarning, stacklevel=3)
    return saved.get("run_id") or new_run_id()
