"""PPOConfig: the classic RLHF PPO settings (every field of TRL 0.7.11's PPOConfig, and 0.11's additions),
plus those of tether's `train()` loop.

Batch sizes mean what they meant in TRL: `step()` takes `batch_size` samples; each PPO epoch shuffles them
into mini-batches of `mini_batch_size` samples (one forward/backward each), and the optimizer steps once
every `gradient_accumulation_steps` mini-batches, i.e. once per `mini_batch_size * gradient_accumulation_steps`
samples (`backward_batch_size`). Fields marked "filled at run time" are set by `PPOTrainer`.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from ..models.loading import parse_json_kwargs
from ..ops.dicts import flatten_dict
from ..rollout.reward_limits import RewardCallFields, check_reward_call_fields
from .episodes import EnvironmentFields

# The per-token estimates of losses/kl.py that TRL's classic PPO offered.
KL_PENALTIES = ("kl", "abs", "mse", "full")
TRACKERS = ("wandb", "tensorboard")

# Old field -> its current name; the value moves over with one deprecation warning (TRL 0.x renamed these).
LEGACY_FIELDS = {"forward_batch_size": "mini_batch_size", "optimize_cuda_cache": "optimize_device_cache"}
# Fields holding keyword dictionaries; on a command line they are JSON strings.
JSON_FIELDS = ("tracker_kwargs", "accelerator_kwargs", "project_kwargs", "push_to_hub_if_best_kwargs")


def _script_name() -> str:
    return os.path.splitext(os.path.basename(sys.argv[0]))[0] if sys.argv and sys.argv[0] else "ppo"


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class PPOConfig(RewardCallFields, EnvironmentFields):
    """Configuration of `PPOTrainer`. Each field has a help string; validation runs in __post_init__."""

    # ----- experiment and tracking -----------------------------------------------------------------------
    exp_name: str = field(default_factory=_script_name, metadata=_help(
        "Name of the experiment (default: the running script's file name without extension)."))
    seed: int = field(default=0, metadata=_help("Seed for python, numpy and torch (set when PPOTrainer starts)."))
    log_with: Literal["wandb", "tensorboard"] | None = field(default=None, metadata=_help(
        "Tracker that `log_stats` writes to through accelerate: 'wandb' or 'tensorboard' (None: no tracker)."))
    task_name: str | None = field(default=None, metadata=_help("Task name, recorded for tracking only."))
    model_name: str | None = field(default="gpt2", metadata=_help("Model name, recorded for tracking (scripts "
                                                                    "load the model from it)."))
    query_dataset: str | None = field(default="imdb", metadata=_help("Query dataset name, for tracking only."))
    reward_model: str | None = field(default="sentiment-analysis:lvwerra/distilbert-imdb", metadata=_help(
        "Reward model ('task:model id'), for tracking only."))
    remove_unused_columns: bool = field(default=True, metadata=_help(
        "Drop dataset columns that are neither model inputs nor 'label'/'query'/'response' (datasets.Dataset)."))
    tracker_kwargs: dict | str | None = field(default_factory=dict, metadata=_help(
        "Keyword arguments per tracker for init_trackers, e.g. '{\"wandb\": {\"entity\": \"me\"}}' (JSON)."))
    accelerator_kwargs: dict | str | None = field(default_factory=dict, metadata=_help(
        "Keyword arguments for accelerate.Accelerator (JSON)."))
    project_kwargs: dict | str | None = field(default_factory=dict, metadata=_help(
        "Keyword arguments for accelerate's ProjectConfiguration, e.g. '{\"logging_dir\": \"logs\"}' (JSON)."))
    tracker_project_name: str = field(default="trl", metadata=_help("Project name of the tracker run."))
    push_to_hub_if_best_kwargs: dict | str | None = field(default_factory=dict, metadata=_help(
        "If set (needs 'repo_id'), push the model to the hub whenever a step's mean score is the best so far, "
        "checked every `compare_steps` steps (JSON)."))
    # ----- the PPO step ----------------------------------------------------------------------------------
    steps: int = field(default=20000, metadata=_help(
        "Training samples in all; `train()` runs total_ppo_epochs = ceil(steps / batch_size) PPO steps "
        "unless total_steps is set."))
    learning_rate: float = field(default=1.41e-5, metadata=_help("Adam learning rate."))
    adap_kl_ctrl: bool = field(default=True, metadata=_help("Adapt the KL coefficient toward `target`."))
    init_kl_coef: float = field(default=0.2, metadata=_help("Initial KL penalty coefficient."))
    kl_penalty: Literal["kl", "abs", "mse", "full"] = field(default="kl", metadata=_help(
        "Per-token KL estimate: 'kl' (log p - log q), 'abs', 'mse' (half squared), or 'full' "
        "(exact, from both full distributions)."))
    target: float = field(default=6.0, metadata=_help("Target KL of the adaptive controller (nats)."))
    horizon: float = field(default=10000.0, metadata=_help("Horizon of the adaptive controller (samples)."))
    gamma: float = field(default=1.0, metadata=_help("Discount factor of GAE."))
    lam: float = field(default=0.95, metadata=_help("Lambda of GAE."))
    cliprange: float = field(default=0.2, metadata=_help("PPO ratio clip range."))
    cliprange_value: float = field(default=0.2, metadata=_help("Value clip range."))
    vf_coef: float = field(default=0.1, metadata=_help("Weight of the value loss."))
    batch_size: int = field(default=128, metadata=_help("Samples per `step()` (per process)."))
    forward_batch_size: int | None = field(default=None, metadata=_help("Deprecated name of mini_batch_size."))
    mini_batch_size: int | None = field(default=None, metadata=_help(
        "Samples per forward/backward pass within a PPO epoch (default: 128 as in TRL, or batch_size if smaller)."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help(
        "Mini-batches whose gradients are summed into one optimizer step."))
    world_size: int | None = field(default=None, metadata=_help("Processes (filled at run time)."))
    ppo_epochs: int = field(default=4, metadata=_help("Passes over each batch of rollouts."))
    max_grad_norm: float | None = field(default=None, metadata=_help(
        "Clip the gradient norm (policy and value parameters together) to this."))
    optimize_cuda_cache: bool | None = field(default=None, metadata=_help(
        "Deprecated name of optimize_device_cache."))
    optimize_device_cache: bool = field(default=False, metadata=_help(
        "Empty the accelerator's memory cache around each step (slower, less fragmentation)."))
    early_stopping: bool = field(default=False, metadata=_help(
        "Stop a step's remaining PPO epochs once an epoch ends with the policy KL above 1.5 * target_kl."))
    target_kl: float = field(default=1.0, metadata=_help("KL bound for early stopping."))
    compare_steps: int = field(default=1, metadata=_help(
        "Steps between comparisons of the mean score with the best so far (push_to_hub_if_best_kwargs)."))
    ratio_threshold: float = field(default=10.0, metadata=_help(
        "Skip (zero the loss of) a mini-batch whose mean probability ratio exceeds this: it would spike."))
    max_nonfinite_steps: int = field(default=3, metadata=_help(
        "Optimizer steps in a row whose gradients are not finite that are skipped (weights and optimizer state "
        "unchanged, a warning each) before training stops with NonFiniteTrainingError; 0: stop at the first. Each "
        "step() takes ppo_epochs * batch_size / backward_batch_size optimizer steps."))
    use_score_scaling: bool = field(default=False, metadata=_help(
        "Divide scores by the running standard deviation of all scores seen."))
    use_score_norm: bool = field(default=False, metadata=_help(
        "With use_score_scaling, also subtract the running mean."))
    score_clip: float | None = field(default=None, metadata=_help(
        "Clip scores to [-score_clip, score_clip] (after scaling)."))
    whiten_rewards: bool = field(default=False, metadata=_help("Whiten per-token rewards before GAE."))
    gradient_checkpointing: bool = field(default=False, metadata=_help(
        "Recompute activations in the backward pass (TRL 0.11): less memory, more time."))
    dataset_num_proc: int | None = field(default=None, metadata=_help(
        "Processes for preparing the prompt dataset in train() (TRL 0.11)."))
    # filled at run time (as in TRL): the model kind and the effective batch sizes
    is_encoder_decoder: bool | None = field(default=None, metadata=_help("Filled at run time."))
    is_peft_model: bool | None = field(default=None, metadata=_help("Filled at run time."))
    backward_batch_size: int | None = field(default=None, metadata=_help(
        "Samples per optimizer step: mini_batch_size * gradient_accumulation_steps (computed)."))
    global_backward_batch_size: int | None = field(default=None, metadata=_help("Filled at run time."))
    global_batch_size: int | None = field(default=None, metadata=_help("Filled at run time."))
    # ----- the `train()` loop ----------------------------------------------------------------------------
    output_dir: str = field(default="ppo-output", metadata=_help("Checkpoints, metrics and the final model."))
    total_steps: int | None = field(default=None, metadata=_help(
        "PPO steps `train()` runs (default: total_ppo_epochs, from `steps`)."))
    max_new_tokens: int = field(default=24, metadata=_help("Response length limit in `train()`."))
    temperature: float = field(default=1.0, metadata=_help("Sampling temperature in `train()`."))
    top_k: int = field(default=0, metadata=_help("Top-k filtering in `train()` (0: off)."))
    top_p: float = field(default=1.0, metadata=_help("Nucleus filtering in `train()` (1.0: off)."))
    missing_eos_penalty: float | None = field(default=None, metadata=_help(
        "Subtract this from the score of responses that hit max_new_tokens without EOS."))
    ptx_coef: float = field(default=0.0, metadata=_help(
        "PPO-ptx (InstructGPT): weight of a language-model loss on pretraining data mixed into "
        "each update (needs ptx_dataset)."))
    logging_steps: int = field(default=1, metadata=_help("Print and sample every this many steps in `train()`."))
    save_steps: int = field(default=0, metadata=_help("Checkpoint every this many steps (0: only at the end)."))
    overwrite_output_dir: bool = field(default=False, metadata=_help(
        "A fresh `train()` into an output_dir holding checkpoints of an earlier run deletes them first (otherwise "
        "it stops before training: resuming would pick the latest checkpoint, maybe the old run's)."))
    report_to: str = field(default="none", metadata=_help(
        "'none', 'tensorboard' or 'wandb': the tracker of `train()` (same as log_with)."))

    def __post_init__(self) -> None:
        self.check_environment_fields()
        for old, new in LEGACY_FIELDS.items():
            value = getattr(self, old)
            if value is not None:
                warnings.warn(f"PPOConfig({old}=...) is deprecated; use {new}= (set to {value!r}).",
                              FutureWarning, stacklevel=3)
                setattr(self, new, value)
        parse_json_kwargs(self, JSON_FIELDS)  # JSON text from a command line
        for name in JSON_FIELDS:
            if getattr(self, name) is None:
                setattr(self, name, {})
        if self.mini_batch_size is None:
            self.mini_batch_size = min(128, self.batch_size)
        for name in ("batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs", "steps",
                     "compare_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"PPOConfig.{name} must be at least 1, got {getattr(self, name)}.")
        self.backward_batch_size = self.mini_batch_size * self.gradient_accumulation_steps
        if self.batch_size % self.backward_batch_size:
            raise ValueError(
                f"PPOConfig.batch_size ({self.batch_size}) must be a multiple of mini_batch_size * "
                f"gradient_accumulation_steps ({self.mini_batch_size} * {self.gradient_accumulation_steps} = "
                f"{self.backward_batch_size}), the samples of one optimizer step.")
        if self.kl_penalty not in KL_PENALTIES:
            raise ValueError(f"PPOConfig.kl_penalty must be one of {KL_PENALTIES}, got {self.kl_penalty!r}.")
        if not 0.0 <= self.lam <= 1.0 or not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"PPOConfig.gamma and lam must lie in [0, 1], got gamma={self.gamma}, lam={self.lam}.")
        for name in ("cliprange", "cliprange_value", "vf_coef", "learning_rate", "init_kl_coef", "target_kl"):
            if getattr(self, name) < 0:
                raise ValueError(f"PPOConfig.{name} must be >= 0, got {getattr(self, name)}.")
        if self.ratio_threshold <= 0:
            raise ValueError(f"PPOConfig.ratio_threshold must be > 0, got {self.ratio_threshold}.")
        if self.max_nonfinite_steps < 0:
            raise ValueError(f"PPOConfig.max_nonfinite_steps must be >= 0, got {self.max_nonfinite_steps}.")
        check_reward_call_fields(self)
        if self.use_score_norm and not self.use_score_scaling:
            warnings.warn("PPOConfig.use_score_norm only applies with use_score_scaling=True; it is ignored.",
                          UserWarning, stacklevel=3)
        if self.report_to not in ("none", *TRACKERS):
            raise ValueError(f"PPOConfig.report_to must be 'none', 'tensorboard' or 'wandb', got {self.report_to!r}.")
        if self.log_with is None and self.report_to != "none":
            self.log_with = self.report_to
        if self.log_with is not None and self.log_with not in TRACKERS:
            raise ValueError(f"PPOConfig.log_with must be 'wandb', 'tensorboard' or None, got {self.log_with!r}.")
        if self.log_with == "wandb":
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                raise ImportError("PPOConfig(log_with='wandb') needs wandb: `pip install wandb` (or "
                                  "log_with='tensorboard').")
        if self.push_to_hub_if_best_kwargs and "repo_id" not in self.push_to_hub_if_best_kwargs:
            raise ValueError("PPOConfig.push_to_hub_if_best_kwargs needs a 'repo_id' (the hub repository to push to).")
        if self.total_steps is not None and self.total_steps < 1:
            raise ValueError(f"PPOConfig.total_steps must be at least 1 (None: from `steps`), got {self.total_steps}.")

    @property
    def total_ppo_epochs(self) -> int:
        """PPO steps that `steps` training samples make: ceil(steps / batch_size), as in TRL."""
        return math.ceil(self.steps / self.batch_size)

    @property
    def train_steps(self) -> int:
        """PPO steps `train()` runs: total_steps if set, else total_ppo_epochs."""
        return self.total_steps if self.total_steps is not None else self.total_ppo_epochs

    def to_dict(self) -> dict[str, Any]:
        """Every field, nested dicts flattened to 'a/b' keys (as TRL's tracker configs show them)."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, dict):
                out.update({f"{name}/{key}": inner for key, inner in flatten_dict(value).items()})
            else:
                out[name] = value
        out["total_ppo_epochs"] = self.total_ppo_epochs
        return out

