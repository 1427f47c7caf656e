"""PPOConfig: the classic RLHF PPO settings (TRL's pre-1.0 names), plus those of the `train()` loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The per-token estimates of losses/kl.py that TRL's classic PPO offered.
KL_PENALTIES = ("kl", "abs", "mse", "full")


@dataclass
class PPOConfig:
    """Configuration of `PPOTrainer`. Each field has a help string; validation runs in __post_init__."""

    # ----- the PPO step ----------------------------------------------------------------------------------
    batch_size: int = field(default=128, metadata={"help": "Samples per `step()` (per process)."})
    mini_batch_size: int | None = field(default=None, metadata={
        "help": "Samples per optimizer step within a PPO epoch (default: batch_size)."})
    gradient_accumulation_steps: int = field(default=1, metadata={
        "help": "Micro-batches each mini-batch is split into (memory), summed into one optimizer step."})
    ppo_epochs: int = field(default=4, metadata={"help": "Passes over each batch of rollouts."})
    learning_rate: float = field(default=1.41e-5, metadata={"help": "Adam learning rate."})
    init_kl_coef: float = field(default=0.2, metadata={"help": "Initial KL penalty coefficient."})
    adap_kl_ctrl: bool = field(default=True, metadata={"help": "Adapt the KL coefficient toward `target`."})
    target: float = field(default=6.0, metadata={"help": "Target KL of the adaptive controller (nats)."})
    horizon: float = field(default=10000, metadata={"help": "Horizon of the adaptive controller (samples)."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor of GAE."})
    lam: float = field(default=0.95, metadata={"help": "Lambda of GAE."})
    cliprange: float = field(default=0.2, metadata={"help": "PPO ratio clip range."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip range."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten per-token rewards before GAE."})
    kl_penalty: str = field(default="kl", metadata={
        "help": "Per-token KL estimate: 'kl' (log p - log q), 'abs', 'mse' (half squared), or 'full' "
                "(exact, from both full distributions)."})
    max_grad_norm: float | None = field(default=None, metadata={"help": "Clip gradients to this norm."})
    early_stopping: bool = field(default=False, metadata={
        "help": "Stop a step's PPO epochs once the approximate KL exceeds 1.5 * target_kl."})
    target_kl: float = field(default=1.0, metadata={"help": "KL bound for early stopping."})
    score_clip: float | None = field(default=None, metadata={"help": "Clip scores to [-score_clip, score_clip]."})
    seed: int = field(default=0, metadata={"help": "Seed for torch, numpy and python."})
    optimize_device_cache: bool = field(default=False, metadata={"help": "Accepted for compatibility; "
                                                                          "tether keeps no device cache."})
    # ----- the `train()` loop ----------------------------------------------------------------------------
    output_dir: str = field(default="ppo-output", metadata={"help": "Checkpoints, metrics and the final model."})
    total_steps: int = field(default=100, metadata={"help": "PPO steps `train()` runs."})
    max_new_tokens: int = field(default=24, metadata={"help": "Response length limit in `train()`."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature in `train()`."})
    top_k: int = field(default=0, metadata={"help": "Top-k filtering in `train()` (0: off)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus filtering in `train()` (1.0: off)."})
    missing_eos_penalty: float | None = field(default=None, metadata={
        "help": "Subtract this from the score of responses that hit max_new_tokens without EOS."})
    ptx_coef: float = field(default=0.0, metadata={
        "help": "PPO-ptx (InstructGPT): weight of a language-model loss on pretraining data mixed into "
                "each update (needs ptx_dataset)."})
    logging_steps: int = field(default=1, metadata={"help": "Log every this many steps."})
    save_steps: int = field(default=0, metadata={"help": "Checkpoint every this many steps (0: only at the end)."})
    report_to: str = field(default="none", metadata={"help": "'none', 'tensorboard' or 'wandb'."})

    def __post_init__(self) -> None:
        if self.mini_batch_size is None:
            self.mini_batch_size = self.batch_size
        for name in ("batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size "
                             f"({self.mini_batch_size}).")
        if self.mini_batch_size % self.gradient_accumulation_steps:
            raise ValueError(f"mini_batch_size ({self.mini_batch_size}) must be a multiple of "
                             f"gradient_accumulation_steps ({self.gradient_accumulation_steps}).")
        if self.kl_penalty not in KL_PENALTIES:
            raise ValueError(f"kl_penalty must be one of {KL_PENALTIES}, got {self.kl_penalty!r}.")
        if not 0.0 <= self.lam <= 1.0 or not 0.0 <= self.gamma <= 1.0:
            raise ValueError("gamma and lam must lie in [0, 1].")

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}
