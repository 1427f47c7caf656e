"""GRPOTrainer: Group Relative Policy Optimization (Shao et al., 2024, "DeepSeekMath", sec. 4), with the
variants TRL 1.16 offers as options: Dr. GRPO, DAPO, BNPO, GSPO (sequence-level importance weights), CISPO,
SAPO, LUSPO, VESPO, INTELLECT-2's two-sided clipping, DeepSeek-V3.2's off-policy sequence masking and
unbiased KL, the high-entropy token mask, an (adaptive) entropy bonus and GDPO's per-reward normalisation.
The loop is the shared online core (trainers/online.py); this file is the method: group-normalised
advantages and the loss of `losses.group.group_policy_loss`, with `loss_type` picking its objective.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..losses.advantages import group_relative_advantages, normalize_then_sum_advantages
from ..losses.group import (
    IMPORTANCE_SAMPLING_LEVELS,
    LOSS_AGGREGATION,
    SAMPLER_IS_MODES,
    AdaptiveEntropyCoefficient,
    GroupPolicyLossOutput,
    group_policy_loss,
    off_policy_sequence_mask,
)
from .episodes import EnvironmentFields
from .online import OnlineTrainer, PolicyLossExtras
from .online_config import OnlineConfig

LOSS_TYPES = tuple(LOSS_AGGREGATION)
SCALE_REWARDS = {"group": "group", "batch": "batch", "none": None, "True": "group", "False": None}
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


@dataclass
class GRPOConfig(OnlineConfig, EnvironmentFields):
    """Configuration of `GRPOTrainer` (TRL's names and defaults, except max_completion_length=256)."""

    loss_type: str = field(default="dapo", metadata={"help": f"One of: {', '.join(LOSS_TYPES)}."})
    scale_rewards: str = field(default="group", metadata={
        "help": "Divide advantages by the reward std of the 'group' (GRPO), of the 'batch', or 'none' (Dr. GRPO)."})
    multi_objective_aggregation: str = field(default="sum_then_normalize", metadata={
        "help": "Several reward functions: 'sum_then_normalize' (weighted sum, then group advantages) or "
                "'normalize_then_sum' (GDPO: each function normalised in its group, weighted sum, then "
                "normalised over the batch)."})
    importance_sampling_level: str = field(default="token", metadata={
        "help": "'token' (GRPO) or 'sequence' (GSPO: one length-normalised ratio per completion)."})
    delta: float | None = field(default=None, metadata={
        "help": "Two-sided clipping (INTELLECT-2): cap the unclipped ratio at delta (> 1 + epsilon_high)."})
    sapo_temperature_pos: float = field(default=1.0, metadata={"help": "loss_type='sapo': gate temperature, A > 0."})
    sapo_temperature_neg: float = field(default=1.05, metadata={"help": "loss_type='sapo': gate temperature, A <= 0."})
    vespo_k_pos: float = field(default=2.0, metadata={"help": "loss_type='vespo': power k for A >= 0."})
    vespo_lambda_pos: float = field(default=3.0, metadata={"help": "loss_type='vespo': decay lambda for A >= 0."})
    vespo_k_neg: float = field(default=3.0, metadata={"help": "loss_type='vespo': power k for A < 0."})
    vespo_lambda_neg: float = field(default=2.0, metadata={"help": "loss_type='vespo': decay lambda for A < 0."})
    off_policy_mask_threshold: float | None = field(default=None, metadata={
        "help": "Drop negative-advantage completions whose mean log pi_sampler - log pi exceeds this (DeepSeek-V3.2)."})
    use_bias_correction_kl: bool = field(default=True, metadata={
        "help": "Weight the KL term by the importance ratio (unbiased KL gradient, DeepSeek-V3.2); with beta != 0."})
    top_entropy_quantile: float = field(default=1.0, metadata={
        "help": "Train only on the top share of tokens by entropy (0.2 in 'Beyond the 80/20 rule'; 1.0: all)."})
    entropy_coef: float = field(default=0.0, metadata={
        "help": "Entropy bonus: loss - entropy_coef x mean token entropy (initial value when adaptive)."})
    use_adaptive_entropy: bool = field(default=False, metadata={
        "help": "Skywork-OR1's adaptive entropy coefficient, applied while entropy <= entropy_target."})
    entropy_coef_min: float = field(default=0.0, metadata={"help": "Adaptive entropy: lowest coefficient."})
    entropy_coef_max: float = field(default=1.0, metadata={"help": "Adaptive entropy: highest coefficient."})
    entropy_coef_delta: float = field(default=0.005, metadata={"help": "Adaptive entropy: step per optimizer step."})
    entropy_target: float = field(default=0.2, metadata={"help": "Adaptive entropy: target mean entropy (nats)."})
    cast_lm_head_to_fp32: bool = field(default=False, metadata={
        "help": "Keep the LM head (policy and reference) in float32 and compute logits in float32 (ScaleRL)."})
    vllm_importance_sampling_correction: bool = field(default=True, metadata={
        "help": "With use_vllm: correct the loss by the truncated importance weights pi_trainer / pi_vllm."})
    vllm_importance_sampling_mode: str = field(default="sequence_mask", metadata={
        "help": f"One of {', '.join(SAMPLER_IS_MODES)}."})
    vllm_importance_sampling_clip_min: float | None = field(default=None, metadata={
        "help": "Lower bound of those weights (truncate: clip; mask: drop below)."})
    vllm_importance_sampling_clip_max: float | None = field(default=3.0, metadata={
        "help": "Upper bound of those weights (truncate: clip; mask: drop above)."})
    vllm_importance_sampling_cap: float | None = field(default=None, metadata={
        "help": "Deprecated name of vllm_importance_sampling_clip_max."})
    max_tool_calling_iterations: int | None = field(default=None, metadata={
        "help": "Most tool-calling turns per completion when training an agent with tools."})
    log_completions_hub_repo: str | None = field(default=None, metadata={
        "help": "Hub dataset repository to upload the logged completions to (needs log_completions)."})

    inapplicable_fields: ClassVar[dict[str, str]] = {
        **OnlineConfig.inapplicable_fields,
        "max_tool_calling_iterations": "GRPOTrainer has no tool calling yet (tools arrive with issue 16).",
        "log_completions_hub_repo": "tether does not upload completions to the Hub; they are in "
                                    "output_dir/samples.jsonl (push output_dir with push_to_hub).",
    }

    def __post_init__(self) -> None:
        self.scale_rewards = str(self.scale_rewards)
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {self.scale_rewards!r}.")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"Unknown loss_type {self.loss_type!r}; choose from {', '.join(LOSS_TYPES)}.")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got "
                             f"{self.importance_sampling_level!r}.")
        if self.multi_objective_aggregation not in MULTI_OBJECTIVE_AGGREGATIONS:
            raise ValueError(f"multi_objective_aggregation must be one of {MULTI_OBJECTIVE_AGGREGATIONS}, got "
                             f"{self.multi_objective_aggregation!r}.")
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile must be in [0, 1], got {self.top_entropy_quantile}.")
        if self.entropy_coef_min > self.entropy_coef_max:
            raise ValueError(f"entropy_coef_min ({self.entropy_coef_min}) must not exceed entropy_coef_max "
                             f"({self.entropy_coef_max}).")
        if self.vllm_importance_sampling_mode not in SAMPLER_IS_MODES:
            raise ValueError(f"vllm_importance_sampling_mode must be one of {SAMPLER_IS_MODES}, got "
                             f"{self.vllm_importance_sampling_mode!r}.")
        if self.vllm_importance_sampling_cap is not None:
            warnings.warn("vllm_importance_sampling_cap is deprecated; use vllm_importance_sampling_clip_max.",
                          FutureWarning, stacklevel=3)
            self.vllm_importance_sampling_clip_max = self.vllm_importance_sampling_cap
        low, high = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if low is not None and high is not None and low >= high:
            raise ValueError(f"vllm_importance_sampling_clip_min ({low}) must be below "
                             f"vllm_importance_sampling_clip_max ({high}).")
        if (self.vllm_importance_sampling_correction and self.vllm_importance_sampling_mode.endswith("truncate")
                and low is None and high is None):
            raise ValueError("A *_truncate vllm_importance_sampling_mode needs vllm_importance_sampling_clip_min or "
                             "vllm_importance_sampling_clip_max.")
        if self.off_policy_mask_threshold is not None and self.off_policy_mask_threshold < 0:
            raise ValueError(f"off_policy_mask_threshold must be >= 0, got {self.off_policy_mask_threshold}.")
        if self.log_completions_hub_repo is not None and not self.log_completions:
            raise ValueError("log_completions_hub_repo is set but log_completions is False; enable log_completions "
                             "or unset log_completions_hub_repo.")
        super().__post_init__()


class GRPOTrainer(OnlineTrainer):
    """`GRPOTrainer(model, reward_funcs, args=GRPOConfig(...), train_dataset=prompts, ...)`, as in TRL."""

    config_class = GRPOConfig
    config_suffix = "GRPO"
    # Only the GRPO config has the IS-correction fields; RLOO corrects nothing (as TRL's RLOOTrainer).
    corrects_sampler_mismatch = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        a = self.args
        self.entropy_control = (AdaptiveEntropyCoefficient(a.entropy_coef, a.entropy_target, a.entropy_coef_delta,
                                                           a.entropy_coef_min, a.entropy_coef_max)
                                if a.use_adaptive_entropy else None)
        self._entropy_window = torch.zeros(2, dtype=torch.float64)  # [entropy sum, tokens] of this step so far

    def checkpoint_state(self) -> dict[str, AdaptiveEntropyCoefficient]:
        # TRL's file name and keys, so either library resumes the other's coefficient.
        return {"entropy_ctrl_state.json": self.entropy_control} if self.entropy_control is not None else {}

    @property
    def needs_entropy_gradient(self) -> bool:
        return self.args.entropy_coef != 0.0 or self.args.use_adaptive_entropy

    @property
    def keep_top_entropy(self) -> float:
        return self.args.top_entropy_quantile

    def compute_advantages(self, rewards: torch.Tensor, sequence_kl: torch.Tensor | None,
                           group_size: int | None = None, per_function: torch.Tensor | None = None
                           ) -> torch.Tensor:
        """rewards [n] -> advantages [n]; per_function [n, f] (each reward function's values, NaN where
        unscored) for multi_objective_aggregation='normalize_then_sum'."""
        k = group_size or self.args.num_generations
        if k < 2:  # evaluation with num_generations_eval=1: no group, nothing to compare with
            return torch.zeros_like(rewards)
        if self.args.multi_objective_aggregation == "normalize_then_sum" and per_function is not None:
            return normalize_then_sum_advantages(per_function, self.rewards.weights, k)
        scale = SCALE_REWARDS[self.args.scale_rewards]
        return group_relative_advantages(rewards, k, scale_by_std=scale is not None, std_over=scale or "group")

    # ----- TRL's names for two steps of the loss (its tests and subclasses call them) -------------------------
    def get_high_entropy_mask(self, entropies: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
        """[b, t] bool: the real tokens whose entropy is at least the `threshold` quantile of all processes'
        real tokens' entropies (top_entropy_quantile q gives threshold 1 - q)."""
        kept = self._entropy_mask(entropies, mask, keep_top=1.0 - threshold)
        return mask.bool() if kept is None else kept

    @staticmethod
    def get_off_policy_mask(advantages: torch.Tensor, per_token_logps: torch.Tensor,
                            sampling_per_token_logps: torch.Tensor, mask: torch.Tensor,
                            off_policy_threshold: float) -> torch.Tensor:
        """[b, 1], 1 = keep: losses.group.off_policy_sequence_mask (DeepSeek-V3.2's off-policy masking)."""
        return off_policy_sequence_mask(advantages, per_token_logps, sampling_per_token_logps, mask,
                                        off_policy_threshold).to(mask.dtype)

    def policy_loss(self, logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, ref_logps: torch.Tensor | None, num_tokens: float, num_sequences: float,
                    extras: PolicyLossExtras | None = None) -> GroupPolicyLossOutput:
        args = self.args
        x = extras or PolicyLossExtras(entropy=torch.zeros_like(logps).detach())
        if args.loss_type == "bnpo":  # the micro-batch's own tokens; Trainer-style mean over accumulation
            num_tokens = float(mask.sum().clamp(min=1)) * args.gradient_accumulation_steps
        entropy_coef = args.entropy_coef
        if self.entropy_control is not None:
            entropy_coef = self.entropy_control.applied
        out = group_policy_loss(
            logps, old_logps, advantages, mask, args.loss_type, args.epsilon, args.epsilon_high, args.beta,
            ref_logps, num_tokens=num_tokens, num_sequences=num_sequences, max_length=args.max_completion_length,
            importance_sampling_level=args.importance_sampling_level, delta=args.delta,
            use_bias_correction_kl=args.use_bias_correction_kl, sampler_weights=x.sampler_weights,
            off_policy_threshold=args.off_policy_mask_threshold,
            sampling_logps=x.sampling_logps if x.sampling_logps is not None else old_logps,
            entropy_mask=x.entropy_mask, entropy=x.entropy if self.needs_entropy_gradient else None,
            entropy_coef=entropy_coef, entropy_normaliser=float(args.gradient_accumulation_steps),
            sapo_temperature_pos=args.sapo_temperature_pos, sapo_temperature_neg=args.sapo_temperature_neg,
            vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos, vespo_k_neg=args.vespo_k_neg,
            vespo_lambda_neg=args.vespo_lambda_neg)
        if self.needs_entropy_gradient and self.model.training:
            self._track_entropy(x.entropy, mask if x.entropy_mask is None else mask & x.entropy_mask)
        return out

    def _track_entropy(self, entropy: torch.Tensor, acting: torch.Tensor) -> None:
        """Adaptive control: add this micro-batch's entropy over the tokens the loss acts on (acting [b, c]) to
        the step's window; at the step's last micro-batch move the coefficient by the step's mean entropy over
        all processes."""
        entropy = entropy.detach().double()
        self._entropy_window += torch.stack([(entropy * acting).sum().cpu(), acting.sum().double().cpu()])
        self.record_metrics(entropy_coef=self.entropy_control.coef if self.entropy_control else self.args.entropy_coef)
        if self.entropy_control is None or not self.accelerator.sync_gradients:
            return
        window = self._entropy_window.to(self.accelerator.device)
        if self.args.world_size > 1:
            window = self.accelerator.reduce(window, reduction="sum")
        self.entropy_control.update(float(window[0] / window[1].clamp(min=1)))
        self._entropy_window.zero_()
