"""DDPOConfig: the settings of `DDPOTrainer` (every field of TRL 0.7.11's DDPOConfig, plus `train_loss_type`,
`max_nonfinite_steps` and `output_dir`).

Sizes per epoch, per process: `sample_num_batches_per_epoch` batches of `sample_batch_size` images are sampled
with `sample_num_steps` denoising steps each; training then walks them in batches of `train_batch_size`,
over `int(sample_num_steps * train_timestep_fraction)` of each trajectory's steps, and the optimizer steps once
every `train_gradient_accumulation_steps` such batches (each step's gradient summed over all trained timesteps).
Importing this module does not need diffusers (the trainer does).
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from ..import_utils import is_bitsandbytes_available
from ..losses.ddpo import DDPO_LOSSES
from ..models.loading import parse_json_kwargs
from ..ops.dicts import flatten_dict

TRACKERS = ("wandb", "tensorboard")
MIXED_PRECISION = ("no", "fp16", "bf16")
JSON_FIELDS = ("tracker_kwargs", "accelerator_kwargs", "project_kwargs")  # dicts; JSON text on a command line


def _script_name() -> str:
    return os.path.splitext(os.path.basename(sys.argv[0]))[0] if sys.argv and sys.argv[0] else "ddpo"


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class DDPOConfig:
    """Configuration of `DDPOTrainer`. Each field has a help string; validation runs in __post_init__."""

    # ----- experiment, tracking and files -----------------------------------------------------------------
    exp_name: str = field(default_factory=_script_name, metadata=_help(
        "Name of the experiment (default: the running script's file name without extension)."))
    run_name: str | None = field(default="", metadata=_help("Run name for the tracker and checkpoints."))
    seed: int = field(default=0, metadata=_help(
        "Seed of the sampling noise and prompts (python, numpy, torch; offset by the process index)."))
    log_with: Literal["wandb", "tensorboard"] | None = field(default=None, metadata=_help(
        "Tracker of accelerate to log to: 'wandb' or 'tensorboard' (None: none; image_samples_hook then gets None "
        "as its logger)."))
    tracker_kwargs: dict | str | None = field(default_factory=dict, metadata=_help(
        "Keyword arguments per tracker for init_trackers, e.g. '{\"wandb\": {\"entity\": \"me\"}}' (JSON)."))
    accelerator_kwargs: dict | str | None = field(default_factory=dict, metadata=_help(
        "Keyword arguments for accelerate.Accelerator (JSON)."))
    project_kwargs: dict | str | None = field(default_factory=dict, metadata=_help(
        "Keyword arguments for accelerate's ProjectConfiguration, e.g. '{\"project_dir\": \"save\", "
        "\"total_limit\": 5}' (JSON). project_dir, if set, is the run's folder (see logdir); total_limit caps the "
        "checkpoints kept."))
    tracker_project_name: str = field(default="trl", metadata=_help("Project name of the tracker run."))
    logdir: str = field(default="logs", metadata=_help(
        "The run's folder when output_dir and project_kwargs['project_dir'] are unset: checkpoints "
        "(checkpoints/checkpoint_<epoch>), metrics.jsonl, sample images and report.html."))
    output_dir: str | None = field(default=None, metadata=_help(
        "The run's folder (overrides project_kwargs['project_dir'] and logdir)."))
    # ----- the schedule ---------------------------------------------------------------------------------
    num_epochs: int = field(default=100, metadata=_help("Epochs to train (one sampling round and its updates each)."))
    save_freq: int = field(default=1, metadata=_help(
        "Save a checkpoint every this many epochs (after epochs save_freq, 2 * save_freq, ...)."))
    num_checkpoint_limit: int = field(default=5, metadata=_help(
        "Checkpoints kept (the oldest are deleted); project_kwargs['total_limit'] wins if set."))
    mixed_precision: str | None = field(default="fp16", metadata=_help(
        "'no', 'fp16' or 'bf16': the frozen parts (VAE, text encoder, base UNet) are cast to it for sampling; "
        "training autocasts (full UNet) or keeps the LoRA weights in fp32."))
    allow_tf32: bool = field(default=True, metadata=_help("Allow TF32 matmuls on Ampere GPUs."))
    resume_from: str | None = field(default="", metadata=_help(
        "Resume from this checkpoint_<epoch> folder, or from the latest one in this folder (or its checkpoints/)."))
    # ----- sampling ---------------------------------------------------------------------------------------
    sample_num_steps: int = field(default=50, metadata=_help("Denoising steps of the DDIM sampler (T)."))
    sample_eta: float = field(default=1.0, metadata=_help(
        "DDIM eta, > 0: the sampler's noise scale (0 is deterministic DDIM, whose steps have no log-probability)."))
    sample_guidance_scale: float = field(default=5.0, metadata=_help(
        "Classifier-free guidance weight (<= 1: none)."))
    sample_batch_size: int = field(default=1, metadata=_help("Images per sampling batch (per process)."))
    sample_num_batches_per_epoch: int = field(default=2, metadata=_help("Sampling batches per epoch."))
    # ----- training ---------------------------------------------------------------------------------------
    train_batch_size: int = field(default=1, metadata=_help(
        "Samples per training batch (per process); must divide sample_batch_size."))
    train_use_8bit_adam: bool = field(default=False, metadata=_help("Use bitsandbytes' 8-bit AdamW."))
    train_learning_rate: float = field(default=3e-4, metadata=_help("AdamW learning rate."))
    train_adam_beta1: float = field(default=0.9, metadata=_help("AdamW beta1."))
    train_adam_beta2: float = field(default=0.999, metadata=_help("AdamW beta2."))
    train_adam_weight_decay: float = field(default=1e-4, metadata=_help("AdamW weight decay."))
    train_adam_epsilon: float = field(default=1e-8, metadata=_help("AdamW epsilon."))
    train_gradient_accumulation_steps: int = field(default=1, metadata=_help(
        "Training batches per optimizer step (each batch's gradient is summed over its trained timesteps)."))
    train_max_grad_norm: float = field(default=1.0, metadata=_help("Clip the gradient norm to this."))
    train_num_inner_epochs: int = field(default=1, metadata=_help("Passes over each epoch's samples."))
    train_cfg: bool = field(default=True, metadata=_help(
        "Re-score the steps with classifier-free guidance, as they were sampled (needs sample_guidance_scale > 1 "
        "to match sampling)."))
    train_adv_clip_max: float = field(default=5.0, metadata=_help("Clip advantages to [-this, this]."))
    train_clip_range: float = field(default=1e-4, metadata=_help(
        "Clip range of the probability ratio (DDPO_IS). Log-probabilities are per-element means, hence tiny."))
    train_timestep_fraction: float = field(default=1.0, metadata=_help(
        "Fraction (0, 1] of each trajectory's denoising steps to train on, drawn at random per sample."))
    train_loss_type: Literal["ddpo_is", "ddpo_sf"] = field(default="ddpo_is", metadata=_help(
        "'ddpo_is': importance sampling with the ratio clipped (the paper's DDPO_IS, TRL's loss); 'ddpo_sf': "
        "the score function (REINFORCE), exact only for the first update after sampling."))
    max_nonfinite_steps: int = field(default=3, metadata=_help(
        "Optimizer steps in a row whose gradients are not finite that are skipped (weights unchanged, a warning "
        "each) before training stops with NonFiniteTrainingError; 0: stop at the first."))
    # ----- advantages and rewards ---------------------------------------------------------------------------
    per_prompt_stat_tracking: bool = field(default=False, metadata=_help(
        "Normalise each reward by its prompt's recent rewards instead of the batch's."))
    per_prompt_stat_tracking_buffer_size: int = field(default=16, metadata=_help(
        "Rewards kept per prompt for its statistics."))
    per_prompt_stat_tracking_min_count: int = field(default=16, metadata=_help(
        "Rewards a prompt needs before its own statistics are used (the batch's until then)."))
    async_reward_computation: bool = field(default=False, metadata=_help(
        "Compute each batch's rewards in a thread pool while the next batch samples."))
    max_workers: int = field(default=2, metadata=_help("Threads for async_reward_computation."))
    negative_prompts: str | None = field(default="", metadata=_help(
        "The negative prompt of classifier-free guidance (one text; '' is the unconditional prompt)."))

    def __post_init__(self) -> None:
        parse_json_kwargs(self, JSON_FIELDS)
        for name in JSON_FIELDS:
            if getattr(self, name) is None:
                setattr(self, name, {})
        if self.log_with in ("", "none"):  # a command line's way to say None
            self.log_with = None
        if self.log_with is not None and self.log_with not in TRACKERS:
            raise ValueError(f"DDPOConfig.log_with must be 'wandb', 'tensorboard' or None, got {self.log_with!r}.")
        if self.mixed_precision is None:
            self.mixed_precision = "no"
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"DDPOConfig.mixed_precision must be one of {MIXED_PRECISION}, got "
                             f"{self.mixed_precision!r}.")
        for name in ("num_epochs", "save_freq", "num_checkpoint_limit", "sample_num_steps", "sample_batch_size",
                     "sample_num_batches_per_epoch", "train_batch_size", "train_gradient_accumulation_steps",
                     "train_num_inner_epochs", "per_prompt_stat_tracking_buffer_size",
                     "per_prompt_stat_tracking_min_count", "max_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"DDPOConfig.{name} must be at least 1, got {getattr(self, name)}.")
        if self.sample_eta <= 0:
            raise ValueError(f"DDPOConfig.sample_eta must be > 0, got {self.sample_eta}: DDPO trains on the "
                             "log-probabilities of stochastic DDIM steps, and eta=0 makes them deterministic. "
                             "Use e.g. 1.0.")
        if self.sample_batch_size % self.train_batch_size:
            raise ValueError(
                f"DDPOConfig.sample_batch_size ({self.sample_batch_size}) must be a multiple of train_batch_size "
                f"({self.train_batch_size}) (and at least as large): set train_batch_size to a divisor of it.")
        if not 0 < self.train_timestep_fraction <= 1:
            raise ValueError(f"DDPOConfig.train_timestep_fraction must lie in (0, 1], got "
                             f"{self.train_timestep_fraction}.")
        if self.num_train_timesteps < 1:
            raise ValueError(
                f"DDPOConfig.train_timestep_fraction ({self.train_timestep_fraction}) times sample_num_steps "
                f"({self.sample_num_steps}) rounds down to 0 timesteps to train on: raise either.")
        for name in ("train_learning_rate", "train_clip_range", "train_adv_clip_max", "train_max_grad_norm"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DDPOConfig.{name} must be > 0, got {getattr(self, name)}.")
        if self.max_nonfinite_steps < 0:
            raise ValueError(f"DDPOConfig.max_nonfinite_steps must be >= 0, got {self.max_nonfinite_steps}.")
        if self.train_loss_type not in DDPO_LOSSES:
            raise ValueError(f"DDPOConfig.train_loss_type must be one of {sorted(DDPO_LOSSES)}, got "
                             f"{self.train_loss_type!r}.")
        if self.per_prompt_stat_tracking and (
                self.per_prompt_stat_tracking_min_count > self.per_prompt_stat_tracking_buffer_size):
            raise ValueError(
                f"DDPOConfig.per_prompt_stat_tracking_min_count ({self.per_prompt_stat_tracking_min_count}) exceeds "
                f"per_prompt_stat_tracking_buffer_size ({self.per_prompt_stat_tracking_buffer_size}): a prompt's "
                "buffer would never hold enough rewards to be used. Lower the min count or raise the buffer size.")
        if self.train_use_8bit_adam and not is_bitsandbytes_available():
            raise ImportError("DDPOConfig(train_use_8bit_adam=True) needs bitsandbytes: `pip install bitsandbytes`.")
        if self.train_loss_type == "ddpo_sf" and self.train_num_inner_epochs > 1:
            warnings.warn("DDPOConfig: train_loss_type='ddpo_sf' with train_num_inner_epochs > 1 reuses samples "
                          "off-policy, which the score-function estimator does not correct for; 'ddpo_is' does.",
                          UserWarning, stacklevel=3)

    @property
    def num_train_timesteps(self) -> int:
        """Denoising steps trained on per trajectory: int(sample_num_steps * train_timestep_fraction)."""
        return int(self.sample_num_steps * self.train_timestep_fraction)

    def to_dict(self) -> dict[str, Any]:
        """Every field, nested dicts flattened to 'a/b' keys (as trackers show a config)."""
        return flatten_dict({f.name: getattr(self, f.name) for f in fields(self)})
