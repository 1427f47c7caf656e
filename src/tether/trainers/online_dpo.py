"""OnlineDPOTrainer: DPO on pairs the policy samples as it trains (Guo et al., 2024, "Direct Language Model
Alignment from Online AI Feedback", arXiv 2402.04792, Algorithm 1).

The loop is the shared online core (trainers/online.py) with groups of two: it samples two completions per
prompt, scores them (reward functions, reward models, or a pairwise judge made a reward function by
rollout.judges.PairwiseJudgeReward), computes the reference log-probs once per round and checkpoints rounds.
This file is the method:

    score       missing_eos_penalty subtracted from the reward of a completion without EOS
    preference  per pair, the completion with the higher reward is chosen (a tie: the first one, as TRL); with a
                judge, its pick. Carried in the round's `advantages`: +1 chosen, -1 rejected
    loss        losses.preference.dpo_loss (loss_type "sigmoid": DPO, eq. 7 of Rafailov et al.; "ipo": IPO,
                Azar et al., eq. 17, on summed log-probs as TRL's Online DPO) on each pair's summed log-probs
                under the policy and the reference; the step's loss is the mean over its pairs

TRL's units: per_device_train_batch_size counts prompts (each micro-batch trains on that many pairs), beta may
be a list (one value per epoch, the last one after the list ends), the loss's log-probs are the policy's own
distribution (not divided by the sampling temperature), and max_length cuts the prompt from the left in the
log-prob passes so that prompt + completion fit.

Shapes: b = completions in a micro-batch (2 x per_device_train_batch_size), b / 2 pairs (rows 2i, 2i + 1).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import TrainingArguments

from ..losses.preference import dpo_loss
from ..rollout.judges import PairwiseJudgeReward
from .base import as_config
from .online import OnlineTrainer
from .online_config import OnlineConfig

LOSS_TYPES = ("sigmoid", "ipo")


@dataclass
class OnlineDPOConfig(OnlineConfig):
    """Configuration of `OnlineDPOTrainer`: TRL 1.16's OnlineDPOConfig fields and defaults, plus the online core's
    (steps_per_generation, num_iterations, reward_timeout, ...). per_device_train_batch_size counts prompts."""

    learning_rate: float = field(default=5e-7, metadata={"help": "AdamW learning rate."})
    reward_model_path: str | None = field(default=None, metadata={
        "help": "A reward model (folder or hub id) that scores the completions when the trainer gets no "
                "reward_funcs and no judge."})
    max_new_tokens: int = field(default=64, metadata={"help": "Most tokens sampled per completion."})
    max_length: int | None = field(default=512, metadata={
        "help": "Most tokens of prompt + completion in the log-prob passes: a longer prompt loses its first tokens "
                "there (generation sees all of it; None: no limit)."})
    max_prompt_length: int | None = field(default=None, metadata={
        "help": "Longest prompt in tokens; a longer one is an error before training (None: no limit)."})
    temperature: float = field(default=0.9, metadata={"help": "Sampling temperature."})
    missing_eos_penalty: float | None = field(default=None, metadata={
        "help": "Subtracted from the reward of a completion that ends without EOS (>= 0; None: off). Not with a "
                "judge."})
    beta: list[float] = field(default_factory=lambda: [0.1], metadata={
        "help": "Strength of the pull toward the reference (> 0; IPO's tau). A list: one value per epoch, the last "
                "one for the epochs after it."})
    loss_type: str = field(default="sigmoid", metadata={
        "help": "'sigmoid' (DPO) or 'ipo'.", "choices": list(LOSS_TYPES)})
    disable_dropout: bool = field(default=True, metadata={"help": "Turn dropout off in the policy."})
    vllm_gpu_memory_utilization: float = field(default=0.55, metadata={
        "help": "Share of GPU memory the colocated vLLM engine may take for its weights and KV cache."})
    # Fixed by the method: a pair per prompt, of max_new_tokens tokens at most (TRL has neither field).
    num_generations: int = field(default=2, init=False)
    max_completion_length: int = field(default=64, init=False)

    completions_per_batch_row: ClassVar[int] = 2
    inapplicable_fields: ClassVar[dict[str, str]] = {
        **OnlineConfig.inapplicable_fields,
        "epsilon": "Online DPO's loss has no probability-ratio clipping.",
        "epsilon_high": "Online DPO's loss has no probability-ratio clipping.",
        "vllm_group_port": "tether sends weights to its vLLM server over HTTP; there is no NCCL group to open.",
    }

    def __post_init__(self) -> None:
        schedule = [self.beta] if isinstance(self.beta, (int, float)) else list(self.beta)
        if not schedule or any(not isinstance(b, (int, float)) or b <= 0 for b in schedule):
            raise ValueError(f"OnlineDPOConfig.beta must be a number > 0 or a non-empty list of them, got {self.beta!r} "
                             "(beta = 0 leaves DPO's loss constant and IPO's undefined).")
        self.beta = float(schedule[0]) if len(schedule) == 1 else [float(b) for b in schedule]
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"OnlineDPOConfig.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}.")
        if self.max_new_tokens < 1:
            raise ValueError(f"OnlineDPOConfig.max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ValueError(f"OnlineDPOConfig.missing_eos_penalty must be >= 0 (it is subtracted), got "
                             f"{self.missing_eos_penalty}.")
        if self.mask_truncated_completions:
            raise ValueError("mask_truncated_completions would leave one completion of a pair without tokens; with "
                             "Online DPO use missing_eos_penalty to make completions without EOS lose instead.")
        self.max_completion_length = self.max_new_tokens
        beta, self.beta = self.beta, min(schedule)  # the online core's checks read one number
        try:
            super().__post_init__()
        finally:
            self.beta = beta
        if self.max_length is not None and self.max_new_tokens >= self.max_length:
            warnings.warn(f"max_new_tokens ({self.max_new_tokens}) >= max_length ({self.max_length}): long "
                          "completions leave only the prompt's last token in the log-prob passes. Raise max_length.",
                          UserWarning, stacklevel=3)


def pair_preferences(rewards: torch.Tensor) -> torch.Tensor:
    """rewards [n] of n / 2 pairs (rows 2i, 2i + 1) -> [n]: +1 for the chosen completion, -1 for the rejected;
    the higher reward is chosen, the first completion on a tie."""
    first_wins = rewards[0::2] >= rewards[1::2]  # [n / 2]
    signs = torch.stack([first_wins, ~first_wins], dim=1).view(-1)  # [n]
    return signs.to(rewards.dtype) * 2 - 1


class OnlineDPOTrainer(OnlineTrainer):
    """`OnlineDPOTrainer(model, ref_model=None, reward_funcs=..., args=OnlineDPOConfig(...), train_dataset=prompts,
    processing_class=tokenizer)`, as in TRL 1.16; `judge=` a pairwise judge (TRL 1.0) instead of reward_funcs;
    TRL 0.x's `reward_model=` and `reward_processing_class=` are taken with a deprecation warning."""

    config_class = OnlineDPOConfig
    config_suffix = "OnlineDPO"

    def __init__(
        self,
        model: nn.Module | str,
        ref_model: nn.Module | str | None = None,
        reward_funcs: Any = None,
        args: OnlineDPOConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        reward_processing_classes: Any = None,
        peft_config: Any = None,
        compute_metrics: Any = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        preprocess_logits_for_metrics: Any = None,
        *,
        judge: Any = None,
        reward_model: Any = None,
        reward_processing_class: Any = None,
        **kwargs: Any,
    ) -> None:
        # TRL 1.0 took judge, and TRL 0.x reward_model and judge, before args: positional calls in those orders
        # would put a judge or the config in the wrong slot.
        if (args is not None and not isinstance(args, TrainingArguments)) or isinstance(data_collator, TrainingArguments):
            raise TypeError("OnlineDPOTrainer takes (model, ref_model, reward_funcs, args, ...) positionally, TRL 1.16's "
                            "order; pass judge=... and args=... by keyword.")
        args = as_config(self.config_class, args, model, self.config_suffix)
        if reward_processing_class is not None:
            warnings.warn("reward_processing_class is TRL 0.x's name; pass reward_processing_classes.", FutureWarning,
                          stacklevel=2)
            reward_processing_classes = reward_processing_class
        for name, value, why in (("data_collator", data_collator, "the online core batches the prompts itself"),
                                 ("compute_metrics", compute_metrics, "evaluation logs rewards, not predictions"),
                                 ("preprocess_logits_for_metrics", preprocess_logits_for_metrics,
                                  "evaluation logs rewards, not predictions")):
            if value is not None:
                warnings.warn(f"OnlineDPOTrainer does not use {name}: {why}.", UserWarning, stacklevel=2)
        self.judge = judge
        self.given_reference = ref_model
        super().__init__(model, reward_funcs=reward_source(reward_funcs, judge, reward_model, args), args=args,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         reward_processing_classes=reward_processing_classes, callbacks=callbacks,
                         optimizers=optimizers, peft_config=peft_config, **kwargs)
        self._eos_tensor = torch.tensor(self._eos_ids, dtype=torch.long)

    @property
    def reward_funcs(self) -> list[Any] | None:
        """The reward functions scoring the pairs (reward models as their scorers); None when a judge ranks them."""
        return None if self.judge is not None else list(self.rewards.funcs)

    @property
    def reward_weights(self) -> torch.Tensor | None:
        """[reward functions]: their weights in the summed reward; None with a judge."""
        return None if self.judge is not None else self.rewards.weights

    @property
    def beta(self) -> float:
        """args.beta, or with a list, its entry for the epoch in progress (0-based; the last after the list)."""
        beta = self.args.beta
        if not isinstance(beta, list):
            return float(beta)
        return beta[min(int(self.state.epoch or 0), len(beta) - 1)]

    @property
    def logprob_temperature(self) -> float:
        return 1.0  # DPO compares the policy's own distributions, whatever temperature sampled the pair

    def _contains_eos(self, completion_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[n] bool: the completion has an EOS token among its real tokens ([n, c] each)."""
        return (torch.isin(completion_ids, self._eos_tensor.to(completion_ids.device)) & mask.bool()).any(-1)

    # ----- score and preference -----------------------------------------------------------------------------
    def _score(self, batch: dict[str, list[Any]], sampled: Any, k: int) -> tuple[list[Any], list[Any], torch.Tensor,
                                                                                dict]:
        prompts, completions, rewards, per_function = super()._score(batch, sampled, k)
        if self.args.missing_eos_penalty is not None:
            ended = self._contains_eos(sampled.completion_ids, sampled.completion_mask)
            rewards = rewards - self.args.missing_eos_penalty * (~ended).to(rewards.dtype)
        return prompts, completions, rewards, per_function

    def compute_advantages(self, rewards: torch.Tensor, sequence_kl: torch.Tensor | None,
                           group_size: int | None = None, per_function: torch.Tensor | None = None
                           ) -> torch.Tensor:
        """rewards [n] -> [n]: +1 chosen, -1 rejected in each pair (see pair_preferences); 0 for groups of
        another size (evaluation with num_generations_eval != 2), which are never trained on."""
        if (group_size or 2) != 2:
            return torch.zeros_like(rewards)
        return pair_preferences(rewards)

    # ----- the update ---------------------------------------------------------------------------------------
    def _token_logps(self, model: nn.Module, prompt_ids: list[list[int]], completion_ids: torch.Tensor,
                     mask: torch.Tensor, entropy_gradient: bool = False, with_stats: bool = True) -> Any:
        """The core's log-prob pass, each prompt cut from the left to max_length - its completion's length
        (at least one token), so that no sequence passes max_length unless its completion alone does."""
        if self.args.max_length is not None:
            lengths = mask.sum(-1).tolist()
            prompt_ids = [p[-max(self.args.max_length - m, 1):] for p, m in zip(prompt_ids, lengths)]
        return super()._token_logps(model, prompt_ids, completion_ids, mask, entropy_gradient, with_stats)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor:
        round_, s, b = self._round, inputs["slice"], self.args.completions_per_micro_batch
        rows, device, beta = slice(s * b, (s + 1) * b), self.accelerator.device, self.beta
        mask = round_.completion_mask[rows].to(device)
        logps = self._token_logps(model, round_.prompt_ids[rows], round_.completion_ids[rows], mask,
                                  with_stats=False).logps_grid
        logps = logps.sum(-1)  # [b]: summed over each completion (the grid is 0 outside its tokens)
        ref = round_.ref_logps[rows].to(device).sum(-1)  # [b]
        first_chosen = round_.advantages[rows][0::2].to(device) > 0  # [b / 2]
        starts = torch.arange(0, b, 2, device=device)
        chosen, rejected = starts + (~first_chosen).long(), starts + first_chosen.long()  # [b / 2] row indices
        out = dpo_loss(self.args.loss_type, logps[chosen], logps[rejected], ref[chosen], ref[rejected], beta)
        # Mean over the optimizer step's pairs on every process (the round's sequence normaliser counts completions).
        loss = out.losses.sum() / (round_.sequence_normaliser / 2)
        self._record_pair_metrics(logps.detach(), ref, chosen, rejected, out, round_.rewards[rows].to(device),
                                  self._contains_eos(round_.completion_ids[rows].to(device), mask), beta)
        return (loss, None) if return_outputs else loss

    def _record_pair_metrics(self, logps: torch.Tensor, ref: torch.Tensor, chosen: torch.Tensor,
                             rejected: torch.Tensor, out: Any, rewards: torch.Tensor, ended: torch.Tensor,
                             beta: float) -> None:
        """TRL's Online DPO metrics of one micro-batch: logps, ref, rewards [b], ended [b] bool; chosen, rejected
        [b / 2] row indices; out: the dpo_loss output. KL and entropy are sample estimates per completion
        (log pi - log pi_ref and -log pi of the sampled sequence, over its tokens)."""
        kl = logps - ref  # [b]
        margins = out.chosen_rewards - out.rejected_rewards  # [b / 2]
        metrics = {
            "objective/kl": kl.mean(), "objective/entropy": -logps.mean(),
            "objective/non_score_reward": (-beta * kl).mean(),
            "rewards/chosen": out.chosen_rewards.mean(), "rewards/rejected": out.rejected_rewards.mean(),
            "rewards/margins": margins.mean(), "rewards/accuracies": (margins > 0).float().mean(),
            "logps/chosen": logps[chosen].mean(), "logps/rejected": logps[rejected].mean(),
            "val/contain_eos_token": ended.float().mean(), "beta": beta,
        }
        if self.judge is None:  # a judge's picks are not scores
            metrics.update({"objective/scores": rewards.mean(),
                            "objective/scores_margin": (rewards[chosen] - rewards[rejected]).mean(),
                            "objective/rlhf_reward": (rewards - beta * kl).mean()})
        self.record_metrics(**metrics)


def reward_source(reward_funcs: Any, judge: Any, reward_model: Any, args: OnlineDPOConfig) -> Any:
    """What scores the pairs, by TRL's rules: reward_funcs (TRL 0.x's reward_model is the same thing); a judge,
    which wins over reward_funcs (with a warning, as TRL 1.0); else args.reward_model_path. None of them: a
    ValueError."""
    if reward_model is not None:
        warnings.warn("reward_model is TRL 0.x's name; pass reward_funcs (a reward model is one).", FutureWarning,
                      stacklevel=3)
        if reward_funcs is not None:
            raise ValueError("Both reward_model and reward_funcs were given; pass the reward model in reward_funcs.")
        reward_funcs = reward_model
    if judge is not None:
        if reward_funcs is not None:
            warnings.warn("Both judge and reward_funcs were given: the judge ranks the pairs and reward_funcs are not "
                          "used (as TRL does).", UserWarning, stacklevel=3)
        if args.missing_eos_penalty is not None:
            raise ValueError("missing_eos_penalty lowers rewards, and a judge gives none: it applies with reward_funcs "
                             "only. Fix: drop missing_eos_penalty, or score with reward_funcs.")
        if args.reward_weights is not None:
            raise ValueError("reward_weights weigh reward functions; with a judge there are none. Drop reward_weights.")
        return PairwiseJudgeReward(judge)
    if reward_funcs is not None:
        if args.reward_model_path is not None:
            warnings.warn(f"reward_model_path ({args.reward_model_path}) is not used: reward_funcs were given.",
                          UserWarning, stacklevel=3)
        return reward_funcs
    if args.reward_model_path is not None:
        return args.reward_model_path
    raise ValueError("OnlineDPOTrainer needs something to rank each pair of completions: reward_funcs (reward "
                     "functions or reward models), judge (a pairwise judge), or OnlineDPOConfig.reward_model_path.")
