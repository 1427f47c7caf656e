"""PPO for RLHF with TRL's classic API: `generate()` rollouts, `step(queries, responses, scores)`.

One `step` reads as the algorithm (Ziegler et al., 2019; Stiennon et al., 2020; Ouyang et al., 2022):
  1. forward:    log-probs and values of the responses under the policy, log-probs under the reference
  2. rewards:    score at the last response token, minus kl_coef * KL(policy || reference) per token
  3. advantages: GAE over response tokens, whitened
  4. update:     ppo_epochs passes of shuffled mini-batches: clipped policy loss + vf_coef * clipped
                 value loss; optional early stop on approximate KL
  5. KL control: adapt kl_coef toward the target KL
Shapes: b = batch, t = tokens (query + response, right-padded).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, gather_object
from torch import nn

from ..data import collate_columns
from ..data.collate import pad_rows, pad_with_mask
from ..data.prepare import keep_columns
from ..distributed import (
    accelerator_kwargs,
    backward_micro_batch,
    configure_deepspeed_for_own_loop,
    destroy_process_group_at_exit,
    empty_device_cache,
    mean_across_processes,
    prepare_frozen_model,
    prepare_reward_models,
    token_normalizer_across_processes,
    unwrap_model_for_generation,
    zero_stage,
)
from ..losses.advantages import gae
from ..losses.kl import AdaptiveKLController, FixedKLController, kl_penalized_rewards
from ..losses.ppo import ppo_policy_loss, ppo_value_loss
from ..models.dropout import disable_dropout
from ..models.forward import (
    TokenLogProbs,
    causal_lm_loss,
    causal_token_log_probs,
    next_token_log_distributions,
    seq2seq_token_log_probs,
    unwrap_model,
)
from ..models.loading import (
    ensure_pad_token,
    is_encoder_decoder,
    is_peft_model,
    load_critic,
    load_language_model,
    model_name,
)
from ..models.reference import reference_context, select_reference
from ..models.scoring import token_values
from ..ops.rng import set_seed
from ..ops.stats import RunningMoments, masked_mean, masked_whiten
from ..reports.trackers import log_to_trackers
from ..rollout.generation import generate_responses
from ..rollout.rewards import RewardFunctions
from .checkpoints import reporting_write_failures
from .episodes import EpisodeRollout
from .finite_guard import NonFiniteGuard, check_finite_weights
from .hub_tags import tag_model, trainer_tags
from .ppo_config import PPOConfig
from .ppo_loop import PPOTrainLoop
from .ppo_stats import reduce_stats, step_stats


def _adam(parameters: list[nn.Parameter], learning_rate: float) -> torch.optim.Adam:
    """TRL's default optimizer, Adam, in torch's fused form where it exists (CPU and CUDA, float weights): the
    same update in one kernel per step instead of several per tensor, which PPO's many small optimizer
    steps feel (about 4x less optimizer time on CPU)."""
    fused = bool(parameters) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in parameters)
    return torch.optim.Adam(parameters, lr=learning_rate, fused=fused or None)


def _tracker_config(config: PPOConfig) -> dict[str, Any]:
    """The config as trackers take it: scalars and strings only (None and lists as text)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()}


class PPOTrainer(PPOTrainLoop):
    """`PPOTrainer(config, model, ref_model, tokenizer, dataset=None, optimizer=None, data_collator=None,
    num_shared_layers=None, lr_scheduler=None)`, as in TRL before 1.0.

    `model` is an `AutoModelForCausalLMWithValueHead` (or the seq2seq variant). `ref_model` None: the
    adapter-disabled model for a PEFT policy, else a frozen copy (sharing `num_shared_layers`).
    """

    def __init__(
        self,
        config: PPOConfig | None = None,
        model: nn.Module | None = None,
        ref_model: nn.Module | None = None,
        tokenizer: Any = None,
        dataset: Any = None,
        optimizer: torch.optim.Optimizer | None = None,
        data_collator: Callable | None = None,
        num_shared_layers: int | None = None,
        lr_scheduler: Any = None,
        *,
        reward_funcs: Any = None,
        reward_weights: Sequence[float] | None = None,
        ptx_dataset: Any = None,
        critic: nn.Module | str | None = None,
        tools: list[Callable[..., Any]] | None = None,
        environment_factory: Callable[[], Any] | None = None,
    ) -> None:
        config = PPOConfig() if config is None else config
        if not isinstance(config, PPOConfig):
            raise ValueError(f"config must be a PPOConfig, got {type(config).__name__}.")
        if model is None or not hasattr(model, "v_head"):
            raise ValueError("PPOTrainer needs a model with a value head: "
                             "AutoModelForCausalLMWithValueHead.from_pretrained(path).")
        if tokenizer is None:
            raise ValueError("PPOTrainer needs the tokenizer (to pad batches and decode).")
        if lr_scheduler is not None and not isinstance(lr_scheduler, torch.optim.lr_scheduler.LRScheduler):
            raise ValueError("lr_scheduler must be a torch.optim.lr_scheduler.LRScheduler (it steps once per step()).")
        self.config = config
        # Accumulation is done here, per mini-batch (see _optimize), so accelerate is not told about it.
        self.accelerator = Accelerator(log_with=config.log_with,
                                       project_config=ProjectConfiguration(**config.project_kwargs),
                                       **{**accelerator_kwargs(), **config.accelerator_kwargs})
        destroy_process_group_at_exit(self.accelerator)
        set_seed(config.seed)  # python, numpy and torch, as PPOConfig.seed promises
        self.tokenizer = tokenizer
        ensure_pad_token(tokenizer, model.pretrained_model)
        self.is_encoder_decoder = is_encoder_decoder(model.pretrained_model)
        self.is_peft_model = is_peft_model(model.pretrained_model)
        config.world_size = self.accelerator.num_processes
        config.global_batch_size = config.batch_size * config.world_size
        config.global_backward_batch_size = config.backward_batch_size * config.world_size
        config.is_encoder_decoder, config.is_peft_model = self.is_encoder_decoder, self.is_peft_model
        if config.log_with is not None:
            self.accelerator.init_trackers(config.tracker_project_name, config=_tracker_config(config),
                                           init_kwargs=config.tracker_kwargs)
        # The update's ratio pi/pi_old must start at exactly 1: no dropout in the policy's passes.
        disable_dropout(model.pretrained_model)
        if hasattr(model, "has_untouched_value_head") and model.has_untouched_value_head():
            # An untrained default head is drawn from PPOConfig.seed: each seed its own start, as in TRL, and
            # still nothing depends on what the script drew before.
            model._init_weights(seed=config.seed)
        if config.gradient_checkpointing:
            unwrap_model(model.pretrained_model).gradient_checkpointing_enable()
        if ref_model is not None and num_shared_layers is not None:
            warnings.warn("num_shared_layers only applies when PPOTrainer makes the reference copy itself.",
                          UserWarning, stacklevel=2)
        ref_model = select_reference(model, ref_model, source=model_name(model.pretrained_model),
                                     load=load_language_model, num_shared_layers=num_shared_layers)
        if critic is not None:
            # A separate value model, initialised from a reward model (InstructGPT); the policy's own value
            # head is then unused, so it is frozen (an unused trainable parameter would stall DDP).
            if self.is_encoder_decoder:
                raise ValueError("A separate critic is supported for causal LMs only.")
            critic = load_critic(critic) if isinstance(critic, str) else critic
            ensure_pad_token(tokenizer, critic)
            disable_dropout(critic)
            model.v_head.requires_grad_(False)
        trainable = [p for m in (model, critic) if m is not None for p in m.parameters() if p.requires_grad]
        self.optimizer = optimizer or _adam(trainable, config.learning_rate)
        tag_model(model, trainer_tags(type(self)))  # ["tether", "ppo"], as the other trainers tag theirs
        self.lr_scheduler = lr_scheduler
        self.dataset = dataset
        self.data_collator = data_collator or collate_columns
        self.dataloader = None
        if dataset is not None:
            if config.remove_unused_columns:  # as TRL: the model's inputs, and the columns its scripts log
                inputs = set(inspect.signature(unwrap_model(model.pretrained_model).forward).parameters)
                dataset = keep_columns(dataset, inputs | {"label", "query", "response", "prompt"})
            self.dataloader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=True,
                                                          drop_last=True, collate_fn=self.data_collator)
        if zero_stage(self.accelerator) is not None:
            self._configure_deepspeed(critic)
        self.model, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        # An optimizer step whose gradients are not finite is skipped (weights and optimizer state unchanged) and
        # counted; max_nonfinite_steps in a row stop training. One optimizer trains the policy and the critic.
        self._optimizer_steps = 0  # taken in this run (resumed from a checkpoint), skipped ones included
        self.nonfinite_guard = NonFiniteGuard(config.max_nonfinite_steps, lambda: self._optimizer_steps)
        self.nonfinite_guard.attach(self.optimizer)
        self.critic = self.accelerator.prepare_model(critic) if critic is not None else None
        if self.dataloader is not None:
            self.dataloader = self.accelerator.prepare_data_loader(self.dataloader)
        # Frozen and placed for the engine: not wrapped for training, partitioned under ZeRO-3.
        self.ref_model = prepare_frozen_model(self.accelerator, ref_model) if ref_model is not None else None
        self.kl_ctl = (AdaptiveKLController(config.init_kl_coef, config.target, config.horizon)
                       if config.adap_kl_ctrl else FixedKLController(config.init_kl_coef))
        self.running = RunningMoments(self.accelerator)  # score statistics for use_score_scaling
        self.highest_reward = -math.inf  # for push_to_hub_if_best_kwargs
        self.current_step = 0
        # Multi-turn episodes in train(): the environment's reward is one more reward function (see episodes.py).
        self.episodes = (EpisodeRollout(config, tokenizer, tools, environment_factory)
                         if tools or environment_factory is not None else None)
        if self.episodes is not None:
            reward_funcs, reward_weights = self.episodes.with_environment_reward(reward_funcs, reward_weights)
        self.rewards = RewardFunctions(reward_funcs, reward_weights) if reward_funcs is not None else None
        if self.rewards is not None:
            prepare_reward_models(self.rewards, self.accelerator)
        self._ptx_batches = self._ptx_iterator(ptx_dataset) if config.ptx_coef > 0 else None
        if config.ptx_coef > 0 and ptx_dataset is None:
            raise ValueError("ptx_coef > 0 needs ptx_dataset= (language-modeling data for the PPO-ptx term).")

    def _configure_deepspeed(self, critic: nn.Module | None) -> None:
        if critic is not None:
            raise ValueError("A separate critic is not supported under DeepSpeed (one engine per Accelerator); use "
                             "the policy's value head, or a DDP/FSDP accelerate config.")
        if self.config.save_steps:
            raise ValueError("PPO checkpoints (save_steps > 0) are not supported under DeepSpeed: its optimizer state "
                             "is partitioned over the processes. Use save_steps=0 (the final model is saved), or DDP.")
        configure_deepspeed_for_own_loop(self.accelerator, self.config.mini_batch_size, self.config.max_grad_norm)

    # ----- rollout -----------------------------------------------------------------------------------
    def generate(self, query_tensor: torch.Tensor | list[torch.Tensor], length_sampler: Callable[[], int] | None = None,
                 batch_size: int | None = None, return_prompt: bool = True, generate_ref_response: bool = False,
                 remove_padding: bool = True, **generation_kwargs: Any) -> Any:
        """Responses to a list of 1-D queries (a list of 1-D tensors), or to one 1-D query (a [1, r] tensor,
        as `model.generate` gives). Every `generate()` keyword passes through (pad_token_id, min_length,
        top_k, do_sample, max_new_tokens, ...); `length_sampler()` draws max_new_tokens per batch of
        `batch_size` queries (default: all queries in one batch; TRL's default was 4, a memory knob: tether's
        sampler drops finished rows and preallocates the cache, so one batch is faster at the same memory
        order). Responses end at their first EOS (kept); `remove_padding=False` keeps each
        list batch's responses padded to its longest with the pad id instead. `return_prompt=False` drops the
        query (decoder-only models). `generate_ref_response=True` also samples from the reference model
        (the adapter-disabled policy for PEFT) and returns (responses, reference responses).
        """
        if isinstance(query_tensor, torch.Tensor) and query_tensor.dim() != 1:
            raise ValueError(f"query_tensor must be a 1-D tensor of token ids or a list of them, got shape "
                             f"{tuple(query_tensor.shape)}; pass list(batch) for a batch.")
        single = isinstance(query_tensor, torch.Tensor)
        queries = [query_tensor] if single else list(query_tensor)
        batch_size = batch_size or len(queries)
        pad_token_id = generation_kwargs.pop("pad_token_id", None)
        pad_token_id = self.tokenizer.pad_token_id if pad_token_id is None else pad_token_id
        generation_kwargs.setdefault("eos_token_id", self.tokenizer.eos_token_id)

        def sample(model: nn.Module, context: Any) -> list[torch.Tensor]:
            # Under ZeRO-3 the weights are gathered once for the whole rollout, not once per generated token.
            with unwrap_model_for_generation(model, self.accelerator) as unwrapped, context:
                out = generate_responses(unwrap_model(unwrapped), queries, pad_token_id, batch_size,
                                         return_prompt and not self.is_encoder_decoder, length_sampler,
                                         **generation_kwargs)
            if not remove_padding:  # each batch right-padded to its longest, as model.generate returns it
                out = [row for start in range(0, len(out), batch_size)
                       for row in pad_rows(out[start:start + batch_size], pad_token_id)]
            return out[0].unsqueeze(0) if single else out

        responses = sample(self.model, contextlib.nullcontext())
        return (responses, sample(*reference_context(self.model, self.ref_model))) if generate_ref_response \
            else responses

    # ----- the PPO step ------------------------------------------------------------------------------
    def _check_step_inputs(self, queries: list, responses: list, scores: list, masks: list | None) -> torch.Tensor:
        n = self.config.batch_size
        for name, values in (("queries", queries), ("responses", responses), ("scores", scores)):
            if not isinstance(values, (list, tuple)):
                raise ValueError(f"{name} must be a list of tensors, got {type(values).__name__}.")
            if len(values) != n:
                raise ValueError(f"{name} has {len(values)} elements but config.batch_size is {n}; pass exactly "
                                 "batch_size queries, responses and scores per step.")
        for i, (query, response) in enumerate(zip(queries, responses)):
            if not isinstance(query, torch.Tensor) or query.dim() != 1 or len(query) == 0:
                raise ValueError(f"queries[{i}] must be a non-empty 1-D tensor of token ids.")
            if not isinstance(response, torch.Tensor) or response.dim() != 1 or len(response) == 0:
                raise ValueError(f"responses[{i}] must be a non-empty 1-D tensor of token ids (got "
                                 f"{getattr(response, 'shape', type(response).__name__)}).")
        if masks is not None and any(len(m) != len(r) for m, r in zip(masks, responses)):
            raise ValueError("Each response_masks[i] must have the length of responses[i].")
        values = []
        for i, score in enumerate(scores):
            score = torch.as_tensor(score, dtype=torch.float32)
            if score.numel() != 1:
                raise ValueError(f"scores[{i}] has shape {tuple(score.shape)}; each score must be a scalar tensor.")
            if not torch.isfinite(score):
                raise ValueError(f"scores[{i}] is {score.item()}; scores must be finite.")
            values.append(score.reshape(()))
        return torch.stack(values).to(self.accelerator.device)

    def _scale_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """use_score_scaling: divide by the running std of every score seen so far (all processes), and
        with use_score_norm subtract the running mean first; then score_clip. scores [b] -> [b]."""
        config = self.config
        if config.use_score_scaling:
            self.running.update(scores)
            scale = float(self.running.std) + torch.finfo(scores.dtype).eps
            scores = (scores - float(self.running.mean)) / scale if config.use_score_norm else scores / scale
        if config.score_clip is not None:
            scores = scores.clamp(-config.score_clip, config.score_clip)
        return scores

    def _push_if_best(self, scores: torch.Tensor) -> None:
        """push_to_hub_if_best_kwargs: push when this step's mean score (all processes) is the best so far,
        checked every compare_steps steps."""
        if not self.config.push_to_hub_if_best_kwargs or self.current_step % self.config.compare_steps:
            return
        mean = float(self.accelerator.reduce(scores.mean(), reduction="mean"))
        if mean > self.highest_reward:
            self.highest_reward = mean
            self.push_to_hub(**self.config.push_to_hub_if_best_kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> None:
        """Push the policy (adapter for PEFT, with its value head) and the tokenizer to the hub repository."""
        if self.accelerator.is_main_process:
            model = self.accelerator.unwrap_model(self.model)
            model.push_to_hub(repo_id, **kwargs)
            self.tokenizer.push_to_hub(repo_id, **kwargs)

    def _batch(self, queries: list[torch.Tensor], responses: list[torch.Tensor],
               response_masks: list[torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """Model inputs, and `loss_mask` True at the response tokens that are trained on."""
        pad, device = self.tokenizer.pad_token_id, self.accelerator.device
        if self.is_encoder_decoder:
            # The response starts with the decoder start token, which predicts the rest.
            input_ids, attention_mask = pad_with_mask(queries, pad)
            labels, label_mask = pad_with_mask([r[1:] for r in responses], pad)
            if response_masks is not None:
                label_mask &= pad_with_mask([m[1:].bool() for m in response_masks], 0)[0].bool()
            batch = {"input_ids": input_ids, "attention_mask": attention_mask.long(), "labels": labels,
                     "decoder_attention_mask": pad_with_mask([r[1:] for r in responses], pad)[1].long(),
                     "decoder_loss_mask": label_mask}
        else:
            sequences = [torch.cat([q.cpu(), r.cpu()]) for q, r in zip(queries, responses)]
            input_ids, attention_mask = pad_with_mask(sequences, pad)
            loss_mask = torch.zeros_like(attention_mask)
            for i, (query, response) in enumerate(zip(queries, responses)):
                counts = response_masks[i].bool().cpu() if response_masks is not None else True
                loss_mask[i, len(query): len(query) + len(response)] = counts
            batch = {"input_ids": input_ids, "attention_mask": attention_mask.long(), "loss_mask": loss_mask}
        return {k: v.to(device) for k, v in batch.items()}

    def _token_log_probs(self, model: nn.Module, batch: dict[str, torch.Tensor], with_values: bool,
                         with_stats: bool = True) -> TokenLogProbs:
        """Log-probs (and values) of the response tokens; `with_stats`: their entropy etc. too (the update logs
        the entropy; the rollout's reference and old log-probs need none)."""
        if self.is_encoder_decoder:
            return seq2seq_token_log_probs(model, batch, with_values=with_values)
        return causal_token_log_probs(model, batch, with_values=with_values, with_stats=with_stats)

    def _values(self, batch: dict[str, torch.Tensor], tokens: TokenLogProbs) -> torch.Tensor:
        """Value estimates [n] at the state before each response token: the policy's value head, or the
        separate critic's score head at the same positions."""
        if self.critic is None:
            return tokens.values.float()
        return token_values(self.critic, batch)[tokens.rows, tokens.positions - 1]

    def _grid(self, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
        return tuple((batch["labels"] if self.is_encoder_decoder else batch["input_ids"]).shape)

    def _mask(self, batch: dict[str, torch.Tensor], tokens: TokenLogProbs) -> torch.Tensor:
        return tokens.scatter(torch.ones_like(tokens.logps, dtype=torch.bool), self._grid(batch), False)

    @torch.no_grad()
    def _reference_log_probs(self, batch: dict[str, torch.Tensor]) -> TokenLogProbs:
        reference, context = reference_context(self.model, self.ref_model)
        with context:
            return self._token_log_probs(reference, batch, with_values=False, with_stats=False)

    def step(self, queries: list[torch.Tensor], responses: list[torch.Tensor], scores: list[torch.Tensor],
             response_masks: list[torch.Tensor] | None = None) -> dict[str, Any]:
        """One PPO optimisation step on a batch of (query, response, score); returns the classic stats."""
        config, timing = self.config, {}
        start = time.perf_counter()
        scores_t = self._scale_scores(self._check_step_inputs(queries, responses, scores, response_masks))
        self._push_if_best(scores_t)
        batch = self._batch(queries, responses, response_masks)
        grid = self._grid(batch)

        # 1. forward: old log-probs and values (policy), reference log-probs
        t = time.perf_counter()
        for module in (self.model, self.critic):
            if module is not None:
                module.eval()
        with torch.no_grad():
            old = self._token_log_probs(self.model, batch, with_values=self.critic is None, with_stats=False)
            old_values = old.scatter(self._values(batch, old), grid)
            ref = self._reference_log_probs(batch)
        mask = self._mask(batch, old)
        old_logprobs, ref_logprobs = old.to_padded(grid), ref.to_padded(grid)
        timing["time/ppo/forward_pass"] = time.perf_counter() - t

        # 2. rewards: score at the last response token, KL penalty at every one
        t = time.perf_counter()
        rewards, non_score_reward, kl = kl_penalized_rewards(
            scores_t, old_logprobs, ref_logprobs, mask, self.kl_ctl.value, config.kl_penalty
        ) if config.kl_penalty != "full" else self._full_kl_rewards(batch, scores_t, mask)
        timing["time/ppo/compute_rewards"] = time.perf_counter() - t

        # 3. advantages
        t = time.perf_counter()
        # Whitened with the statistics of every process's batch: W processes then train like one with
        # the whole batch. Whitening needs a variance: at least two response tokens in all.
        can_whiten = int(self.accelerator.reduce(mask.sum(), reduction="sum")) > 1
        if config.whiten_rewards and can_whiten:
            rewards = masked_whiten(rewards, mask, shift_mean=False, accelerator=self.accelerator)
        advantages, returns = gae(rewards, old_values, mask, config.gamma, config.lam)
        if can_whiten:
            advantages = masked_whiten(advantages, mask, accelerator=self.accelerator)
        timing["time/ppo/compute_advantages"] = time.perf_counter() - t

        # 4. update: ppo_epochs passes over shuffled mini-batches
        t = time.perf_counter()
        for module in (self.model, self.critic):
            if module is not None:
                module.train()
        rollout = {"old_logprobs": old_logprobs, "old_values": old_values, "advantages": advantages,
                   "returns": returns, "mask": mask}
        epoch_stats = self._optimize(batch, rollout)
        timing["time/ppo/optimize_step"] = time.perf_counter() - t

        # 5. KL control, on the mean per-sequence KL of this batch; the LR schedule advances once per step
        mean_kl = self.accelerator.reduce(kl.sum(1).mean(), reduction="mean")
        kl_coef = self.kl_ctl.value
        self.kl_ctl.update(mean_kl.item(), config.batch_size * self.accelerator.num_processes)
        learning_rate = self.optimizer.param_groups[0]["lr"]
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.current_step += 1

        t = time.perf_counter()
        epochs_run = len(epoch_stats["approxkl"]) / (config.batch_size // config.mini_batch_size)
        stats = reduce_stats(step_stats(
            queries=queries, responses=responses, scores=scores_t, mask=mask, old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs, non_score_reward=non_score_reward, kl=kl, advantages=advantages,
            returns=returns, old_values=old_values, epoch_stats=epoch_stats, kl_coef=kl_coef,
            learning_rate=learning_rate, vf_coef=config.vf_coef, epochs_run=epochs_run), self.accelerator)
        timing["time/ppo/calc_stats"] = time.perf_counter() - t
        timing["time/ppo/total"] = time.perf_counter() - start
        stats.update(timing)
        stats["nonfinite/skipped_steps"] = self.nonfinite_guard.skipped  # optimizer steps skipped so far
        if config.optimize_device_cache:
            empty_device_cache()
        return stats

    def _full_kl_rewards(self, batch: dict[str, torch.Tensor], scores: torch.Tensor,
                         mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """kl_penalty='full': the exact KL between the two next-token distributions at each response
        token, which needs both full [b, t, v] distributions (memory heavy, by the user's choice)."""
        def distributions(model: nn.Module, context: Any) -> torch.Tensor:
            with torch.no_grad(), context:
                return next_token_log_distributions(model, batch)

        policy = distributions(self.model, contextlib.nullcontext())
        reference = distributions(*reference_context(self.model, self.ref_model))
        return kl_penalized_rewards(scores, policy, reference, mask, self.kl_ctl.value, "full")

    def _optimize(self, batch: dict[str, torch.Tensor], rollout: dict[str, torch.Tensor]) -> dict[str, list[float]]:
        """ppo_epochs passes over the shuffled batch. Each pass runs mini-batches of `mini_batch_size`
        samples (one forward/backward each) and steps the optimizer once per `gradient_accumulation_steps` of
        them (a backward batch). Each mini-batch's loss is normalised by its backward batch's token count, so
        the summed gradient is that of the backward batch's per-token mean loss. With early_stopping, the
        remaining epochs are skipped once an epoch ends with the policy KL above 1.5 * target_kl (TRL)."""
        config = self.config
        collected: dict[str, list[Any]] = {k: [] for k in (
            "policy_loss", "value_loss", "clipfrac", "approxkl", "policykl", "vf_clipfrac", "value_error",
            "entropy", "vpred", "ratio")}
        modules = [m for m in (self.model, self.critic) if m is not None]
        parameters = [p for m in modules for p in m.parameters() if p.requires_grad]
        for _epoch in range(config.ppo_epochs):
            order = torch.randperm(config.batch_size)
            for start in range(0, config.batch_size, config.backward_batch_size):
                rows = order[start:start + config.backward_batch_size]
                # Normaliser over the whole backward batch of every process (divided by the process count,
                # which gradient averaging multiplies back): a per-token mean over all of them.
                num_tokens = token_normalizer_across_processes(rollout["mask"][rows], self.accelerator)
                starts = range(0, len(rows), config.mini_batch_size)
                for mini_start in starts:
                    mini = rows[mini_start:mini_start + config.mini_batch_size].to(self.accelerator.device)
                    last = mini_start == starts[-1]
                    # Gradients (policy and critic alike) are all-reduced across processes once, at the boundary.
                    with contextlib.ExitStack() as stack:
                        if not last:
                            for module in modules:
                                stack.enter_context(self.accelerator.no_sync(module))
                        policykl = self._train_mini_batch(batch, rollout, mini, num_tokens, collected, last)
                if config.max_grad_norm is not None:
                    self.accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
                self.optimizer.step()  # skipped by the non-finite guard when a gradient is NaN or inf
                self.optimizer.zero_grad()
                self._optimizer_steps += 1
            # Decided on the mean over processes of the epoch's last mini-batch: all of them stop together.
            if config.early_stopping and mean_across_processes(policykl, self.accelerator) > 1.5 * config.target_kl:
                break
        return collected

    def _train_mini_batch(self, batch: dict[str, torch.Tensor], rollout: dict[str, torch.Tensor], rows: torch.Tensor,
                          num_tokens: torch.Tensor, collected: dict[str, list[Any]], last: bool = True) -> float:
        """Forward and backward of one mini-batch; returns its policy KL."""
        sub = {k: v[rows] for k, v in batch.items()}
        width = self._grid(sub)[1]
        # Rows keep the full batch's padded width so positions line up with the rollout tensors.
        new = self._token_log_probs(self.model, sub, with_values=self.critic is None)
        logprobs = new.to_padded((len(rows), width))
        values = new.scatter(self._values(sub, new), (len(rows), width))
        mask = rollout["mask"][rows]
        policy = ppo_policy_loss(logprobs, rollout["old_logprobs"][rows], rollout["advantages"][rows], mask,
                                 self.config.cliprange, num_tokens=num_tokens)
        value = ppo_value_loss(values, rollout["old_values"][rows], rollout["returns"][rows], mask,
                               self.config.cliprange_value, num_tokens=num_tokens)
        loss = policy.loss + self.config.vf_coef * value.loss
        if policy.ratio_mean > self.config.ratio_threshold:
            # A stale or broken batch: its huge ratios would spike the update. Skipped, as TRL did (loss x 0
            # keeps the backward, so every process still joins the gradient all-reduce).
            warnings.warn(f"Step {self.current_step}: a mini-batch's mean probability ratio is "
                          f"{float(policy.ratio_mean):.2f} > ratio_threshold ({self.config.ratio_threshold}); "
                          "its update is skipped.", UserWarning, stacklevel=2)
            loss = loss * 0.0
        if self._ptx_batches is not None:  # PPO-ptx (Ouyang et al., 2022, eq. 2): keep the pretraining LM
            ptx = next(self._ptx_batches)
            ptx_loss, _ = causal_lm_loss(self.model, ptx, ptx["loss_mask"][:, 1:].sum().clamp(min=1))
            loss = loss + self.config.ptx_coef * ptx_loss / self.config.gradient_accumulation_steps
        backward_micro_batch(self.accelerator, self.model, loss, last)
        gas = self.config.gradient_accumulation_steps  # a mini-batch's loss is about 1/gas of its backward batch's
        for name, stat in (("policy_loss", policy.loss * gas), ("value_loss", value.loss * gas),
                           ("clipfrac", policy.clipfrac),
                           ("approxkl", policy.approxkl), ("policykl", policy.policykl),
                           ("vf_clipfrac", value.clipfrac), ("value_error", value.value_error),
                           ("entropy", new.stats.entropy.mean()), ("vpred", masked_mean(values.detach(), mask))):
            collected[name].append(float(stat.detach()) if torch.is_tensor(stat) else float(stat))
        collected["ratio"].append((logprobs.detach() - rollout["old_logprobs"][rows])[mask.bool()].exp().cpu())
        return float(policy.policykl)

    # ----- logging and saving ------------------------------------------------------------------------
    def log_stats(self, stats: dict[str, Any], batch: dict[str, Any], rewards: Sequence[Any],
                  columns_to_log: Sequence[str] = ("query", "response")) -> dict[str, Any]:
        """Send a step's stats to the tracker of `log_with` (nothing is printed): scalars as scalars,
        distributions as histograms, and a game log (`columns_to_log` of `batch` and each reward) as a table.
        Rewards are gathered from every process. Returns what was logged (on the main process)."""
        rewards_t = torch.stack([torch.as_tensor(r, dtype=torch.float32).reshape(()) for r in rewards])
        rewards_t = self.accelerator.gather(rewards_t.to(self.accelerator.device)).cpu()
        missing = [c for c in columns_to_log if c not in batch]
        if self.config.log_with is not None and missing:
            raise ValueError(f"columns_to_log {list(columns_to_log)}: {missing} not in the batch (its keys: "
                             f"{sorted(batch)}); set batch['query'] / batch['response'] or pass columns_to_log=.")
        table = None
        if not missing:
            columns = [gather_object(list(batch[c])) if self.accelerator.num_processes > 1 else list(batch[c])
                       for c in columns_to_log]
            table = ([*columns_to_log, "reward"], [[*row, r] for row, r in zip(zip(*columns), rewards_t.tolist())])
        logs = dict(stats)
        logs.update({"env/reward_mean": float(rewards_t.mean()),
                     "env/reward_std": float(rewards_t.std()) if len(rewards_t) > 1 else 0.0,
                     "env/reward_dist": rewards_t.numpy()})
        if self.accelerator.is_main_process and self.config.log_with is not None:
            log_to_trackers(self.accelerator, logs, table, self.current_step)
        return logs

    def _check_finite_weights(self, where: str, policy: nn.Module | None = None) -> None:
        """NonFiniteTrainingError, naming the parameter, if a weight of the policy (or critic) is NaN or inf:
        such weights are never saved. `policy`: the unwrapped policy, gathered by the caller under ZeRO-3
        (whose partitioned parameters are otherwise empty placeholders, which the check skips)."""
        check_finite_weights(policy if policy is not None else self.accelerator.unwrap_model(self.model), where)
        if self.critic is not None:
            check_finite_weights(self.accelerator.unwrap_model(self.critic), f"{where} (the critic)")

    def save_pretrained(self, save_directory: str) -> None:
        """Model (adapter for PEFT) + value head + tokenizer, as safetensors, from the main process. Under
        ZeRO-3 every process must call it: they gather the partitioned weights together. Non-finite weights
        are refused (NonFiniteTrainingError) before anything is written."""
        writing = reporting_write_failures(save_directory, self.config.output_dir)  # a full disk, said as such
        with unwrap_model_for_generation(self.model, self.accelerator) as model, writing:
            self._check_finite_weights(save_directory, model)  # on every process: all raise alike
            if self.accelerator.is_main_process:
                os.makedirs(save_directory, exist_ok=True)
                model.save_pretrained(save_directory)
                self.tokenizer.save_pretrained(save_directory)
                if self.critic is not None:
                    self.accelerator.unwrap_model(self.critic).save_pretrained(os.path.join(save_directory, "critic"))
