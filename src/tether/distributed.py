"""Scale-out helpers: where frozen models go under DDP, DeepSpeed ZeRO and FSDP, generation under ZeRO-3,
and batch statistics that do not change when a batch is split over processes.

Every trainer runs under `accelerate launch` (`tether CMD --accelerate_config NAME`, see cli.py); the
trained model is wrapped by accelerate (DDP, a DeepSpeed engine, FSDP). Models that are only evaluated
(a reference, a reward model) are placed by `prepare_frozen_model`:

    engine       frozen model
    DDP / none   on the process's device, not wrapped (DDP refuses modules without trainable parameters)
    ZeRO-1/2     a DeepSpeed stage-0 inference engine: a full copy per process, in the engine's precision
    ZeRO-3       a DeepSpeed stage-3 inference engine: partitioned like the policy, gathered layer by
                 layer during its forward (with offload_param, the partitions stay in CPU memory)
    FSDP         on the process's device, not wrapped: a full frozen copy per process

Generation under ZeRO-3: a partitioned model's forward all-gathers each layer's weights as it runs, and
generate() runs the forward once per new token, so a rollout of T tokens would gather the model T times.
`unwrap_model_for_generation` gathers the whole model once, takes DeepSpeed's per-layer hooks off while
the block runs, and puts them back after (the weights are partitioned again on exit).

Statistics across processes: a PPO batch of B sequences split over W processes must be whitened with
the mean and variance of all B sequences (`ops.stats.masked_whiten(..., accelerator=)`) and its per-token losses
divided by the global token count over W (`token_normalizer_across_processes`), or W processes do not
train like one process with the whole batch.

Shapes: b = batch, t = tokens.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from .models.reference import freeze
from .rollout.rewards import RewardFunctions, RewardModelScorer


# ----- the engine in use ------------------------------------------------------------------------------
def deepspeed_launched() -> bool:
    """Whether `accelerate launch` started this process for DeepSpeed (readable before any Accelerator)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def default_ddp_backend() -> str | None:
    """The process-group backend to ask for, or None for accelerate's own choice.

    accelerate picks gloo for processes on the CPU only when told to use the CPU (ACCELERATE_USE_CPU), and
    that switch turns DeepSpeed off; DeepSpeed on a machine without GPUs therefore needs gloo asked for
    explicitly, or accelerate sees no backend and counts one process out of several.
    """
    return "gloo" if deepspeed_launched() and not torch.cuda.is_available() else None


def accelerator_kwargs() -> dict[str, Any]:
    """Keyword arguments for `Accelerator(...)` in trainers that build their own (PPO): the backend of
    `default_ddp_backend`, when one is needed."""
    backend = default_ddp_backend()
    if backend is None:
        return {}
    from accelerate.utils import InitProcessGroupKwargs

    return {"kwargs_handlers": [InitProcessGroupKwargs(backend=backend)]}


_exit_cleanup_registered = False
_uncaught_exception = False


def destroy_process_group_at_exit(accelerator: Accelerator) -> None:
    """When `accelerator` runs several processes: destroy the default process group when the program ends
    normally, if nobody did.

    Users' scripts (TRL's examples among them) never call `destroy_process_group`; with gloo, a process
    group still alive at interpreter shutdown can abort the process ("terminate called without an active
    exception", SIGABRT) after training succeeded, failing the whole `accelerate launch`. After an uncaught
    exception the group is left alone: tearing it down while other processes are inside a collective can
    hang them. Registered once per process; a no-op when the group is already gone."""
    global _exit_cleanup_registered
    if _exit_cleanup_registered or accelerator.num_processes < 2:
        return
    _exit_cleanup_registered = True
    previous_hook = sys.excepthook

    def note_uncaught(*exc_info: Any) -> None:
        global _uncaught_exception
        _uncaught_exception = True
        previous_hook(*exc_info)

    sys.excepthook = note_uncaught
    atexit.register(_destroy_process_group_if_clean)


def _destroy_process_group_if_clean() -> None:
    if _uncaught_exception or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    torch.distributed.destroy_process_group()


def zero_stage(accelerator: Accelerator) -> int | None:
    """The DeepSpeed ZeRO stage of `accelerator`, None when it does not run DeepSpeed."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


# ----- frozen models: references and reward models ----------------------------------------------------
def prepare_frozen_model(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """Place a model that is evaluated, never trained (reference, reward model), for `accelerator`'s
    engine; see the module docstring for what each engine gets. Returns the module to call."""
    model = freeze(model)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        import deepspeed

        engine, *_ = deepspeed.initialize(model=model, config=deepspeed_inference_config(accelerator, model))
        engine.eval()
        return engine
    # Placed (FSDP would leave it where it is) and, under mixed precision, its forward autocast like the
    # policy's; evaluation_mode: no DDP/FSDP wrapper.
    return accelerator.prepare_model(model, device_placement=True, evaluation_mode=True)


def prepare_reward_models(rewards: RewardFunctions, accelerator: Accelerator) -> None:
    """Place the reward models among `rewards` (their scorers' `model`) with `prepare_frozen_model`; reward
    functions that are plain callables are left alone. Under ZeRO-3 a reward model loaded by path is
    partitioned as it loads and cannot run until this has wrapped it."""
    for function in rewards.funcs:
        if isinstance(function, RewardModelScorer):
            function.model = prepare_frozen_model(accelerator, function.model)


def deepspeed_inference_config(accelerator: Accelerator, model: nn.Module) -> dict[str, Any]:
    """The DeepSpeed config of an inference engine beside the training one: same precision, ZeRO-3
    partitioning (and parameter offload) kept, everything about optimisation dropped, stages 1-2 reduced
    to stage 0 (they partition optimizer state and gradients, which a frozen model does not have)."""
    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler", "train_batch_size", "gradient_clipping"):
        config.pop(key, None)
    config["train_micro_batch_size_per_gpu"] = 1  # required by DeepSpeed; no batch is ever fed by it
    config["gradient_accumulation_steps"] = 1
    zero = config.get("zero_optimization", {})
    if zero.get("stage", 0) == 3:
        config["zero_optimization"] = {k: v for k, v in zero.items() if k != "offload_optimizer"}
    else:
        config["zero_optimization"] = {"stage": 0}
    for precision in ("fp16", "bf16"):
        if config.get(precision, {}).get("enabled") == "auto":
            config[precision]["enabled"] = accelerator.mixed_precision == precision
    return _without_auto(config)


def _without_auto(config: dict[str, Any]) -> dict[str, Any]:
    """`config` minus the "auto" values left for transformers' Trainer to fill (bucket sizes and the like);
    DeepSpeed's defaults apply to them instead."""
    return {k: _without_auto(v) if isinstance(v, dict) else v for k, v in config.items() if v != "auto"}


# ----- generation ---------------------------------------------------------------------------------------
def _zero3_hooks(engine: nn.Module) -> Any:
    """The object that holds a ZeRO-3 engine's per-module gather/release hooks: the offload helper of
    the ZeRO-3 optimizer, or the engine's optimizer itself for an inference engine."""
    optimizer = getattr(engine, "optimizer", None)
    holder = getattr(optimizer, "parameter_offload", optimizer)
    if holder is None or not hasattr(holder, "forward_hooks"):
        raise RuntimeError("This ZeRO-3 engine has no parameter-offload hooks to lift for generation (DeepSpeed "
                           "version mismatch?); call unwrap_model_for_generation(..., gather=False).")
    return holder


def _remove_zero3_hooks(holder: Any) -> None:
    for param in holder.module.parameters():
        param.ds_active_sub_modules.clear()
    for hook in holder.forward_hooks + holder.backward_hooks:
        hook.remove()
    holder.forward_hooks, holder.backward_hooks = [], []


@contextlib.contextmanager
def unwrap_model_for_generation(model: nn.Module, accelerator: Accelerator, gather: bool = True) -> Iterator[nn.Module]:
    """The trained model without its engine wrapper, ready for many forward passes without gradients.

        with unwrap_model_for_generation(self.model, self.accelerator) as policy:
            completions = policy.generate(...)          # one rollout

    Under ZeRO-3 the whole model is all-gathered once on entry and DeepSpeed's per-layer hooks are
    lifted until exit, so generating T tokens costs one gather instead of T (the peak memory is one
    full copy of the model per process; `gather=False` keeps the per-layer gathering for models too
    large for that, and then generate() needs `synced_gpus=True`: a process that stops early must keep
    joining the others' gathers). Inside the block generation makes no collective call at all, so the
    processes may stop at different lengths. Other engines: just `accelerator.unwrap_model(model)`.
    Do not train inside the block.
    """
    unwrapped = accelerator.unwrap_model(model)
    if zero_stage(accelerator) != 3 or not gather:
        yield unwrapped
        return
    import deepspeed

    holder = _zero3_hooks(model)
    with deepspeed.zero.GatheredParameters(list(model.parameters())):  # one all-gather of every weight
        _remove_zero3_hooks(holder)
        try:
            yield unwrapped
        finally:
            holder._register_deepspeed_module(holder.module)  # the hooks back, before re-partitioning


# ----- statistics over all processes --------------------------------------------------------------------
def token_normalizer_across_processes(mask: torch.Tensor, accelerator: Accelerator) -> torch.Tensor:
    """What to divide a process's per-token loss sum by so that, once DDP/ZeRO average gradients over
    the W processes, the update is the per-token mean over all of them: (global count of True in
    `mask`) / W, at least 1 / W. mask [b, t] (this process's rows) -> [] float32."""
    count = mask.sum().to(torch.float32)
    if accelerator.num_processes > 1:
        count = accelerator.reduce(count.to(accelerator.device), reduction="sum")
    return count.clamp(min=1) / accelerator.num_processes


def mean_across_processes(value: float, accelerator: Accelerator) -> float:
    """The mean of a per-process number over processes (e.g. an approximate KL that decides an early
    stop: every process must take the same decision, or the others wait forever in the next all-reduce)."""
    if accelerator.num_processes == 1:
        return value
    tensor = torch.tensor(float(value), device=accelerator.device)
    return float(accelerator.reduce(tensor, reduction="mean"))


# ----- manual gradient accumulation -----------------------------------------------------------------------
def backward_micro_batch(accelerator: Accelerator, model: nn.Module, loss: torch.Tensor, boundary: bool) -> None:
    """Backward of one micro-batch in a loop that accumulates gradients itself (PPO's mini-batches).

    A DeepSpeed engine is told whether this micro-batch ends the accumulation and, at the boundary,
    reduces the gradients and steps (clipping, optimizer, zero_grad) itself; the caller's
    `optimizer.step()`/`zero_grad()` are then no-ops under accelerate. Other engines: `accelerator.backward`
    (the caller skips the gradient all-reduce before the boundary with `accelerator.no_sync`).
    """
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        accelerator.backward(loss)
        return
    model.set_gradient_accumulation_boundary(boundary)
    model.backward(loss)
    if boundary:
        model.step()


def configure_deepspeed_for_own_loop(accelerator: Accelerator, micro_batch_size: int,
                                     max_grad_norm: float | None) -> None:
    """Before `accelerator.prepare` in a trainer with its own loop (PPO): fill what transformers' Trainer
    fills from its arguments in the DeepSpeed config, the micro-batch size and clipping (done by the
    engine at each step). Accumulation is left to `backward_micro_batch`, which marks the boundaries."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["gradient_accumulation_steps"] = 1
    config.pop("train_batch_size", None)  # DeepSpeed derives it
    config["gradient_clipping"] = max_grad_norm or 0.0


def empty_device_cache() -> None:
    """Return cached, unused accelerator memory to the device (and collect Python garbage first, so tensors
    only reachable through cycles are freed): PPOConfig.optimize_device_cache's trade of time for memory."""
    import gc

    gc.collect()
    for backend in ("cuda", "xpu", "npu", "mps"):
        module = getattr(torch, backend, None)
        if module is not None and getattr(module, "is_available", lambda: False)():
            module.empty_cache()
