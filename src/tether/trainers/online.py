"""The online-RL core shared by GRPOTrainer and RLOOTrainer: sample a group of completions per prompt,
score them, turn rewards into advantages, update the policy. A method is a subclass that chooses its
advantage estimator and its policy loss (both pure functions in losses/); everything else is here.

One optimizer step, per process:

    1. rollout    every `steps_per_generation` micro-steps (a "round"), the round's P unique prompts get
                  `num_generations` completions each from `rollout.sampling.sample_groups` (prompt
                  encoded once per group; behaviour log-probs kept)
    2. score      reward functions / reward models on the decoded completions, with the dataset's other
                  columns, weighted and summed
    3. advantages per group of completions of one prompt (the groups never span processes, so no
                  gather is needed); reference log-probs once per round when beta > 0
    4. update     the round is cut into `steps_per_generation` micro-batches of `completions_per_micro_batch`
                  completions (per_device_train_batch_size for GRPO/RLOO), replayed `num_iterations` times;
                  the loss of each is normalised by the whole optimizer step's count (tokens or sequences,
                  all-reduced over processes), so gradient accumulation and data parallelism do not change
                  the update

The config (OnlineConfig, re-exported here) is in online_config.py; the round's metrics in online_metrics.py.

Shapes: P = prompts per round, G = num_generations, n = P * G completions, c = completion tokens.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn
from transformers import set_seed

from ..data import collate_columns, prepare_prompts
from ..data.collate import LanguageModelingCollator
from ..data.formats import is_stream
from ..data.rounds import PromptRoundSampler, PromptRoundStream
from ..distributed import (
    prepare_frozen_model,
    prepare_reward_models,
    unwrap_model_for_generation,
)
from ..losses.group import GroupPolicyLossOutput, high_entropy_mask, sampler_importance_weights
from ..losses.kl import sequence_kl
from ..models.forward import cast_lm_head_to_fp32, causal_token_log_probs, supports_packed_rows
from ..models.loading import from_pretrained_kwargs, is_encoder_decoder, load_language_model
from ..models.reference import reference_context, select_reference
from ..ops.stats import masked_mean
from ..rollout.generation import eos_token_ids
from ..rollout.multiturn import SampledEpisodes
from ..rollout.rewards import RewardFunctions
from ..rollout.sampling import sample_groups, sampling_settings
from ..rollout.vllm_generation import require_vllm, vllm_sampler
from .base import TetherTrainer, as_config
from .completion_log import completions_table
from .episodes import (
    EnvironmentFields,
    EpisodeRollout,
    chat_template_with_tools,
    episode_metrics,
)
from .online_config import OnlineConfig
from .online_metrics import round_metrics, sampler_mismatch_metrics

ROUND_FILE = "rollout_round_{}.pt"  # in a checkpoint inside a round of generation: process {}'s round


@dataclass
class Round:
    """One round of generation on this process; rows [g * G, (g + 1) * G) answer prompt g.

    rewards [n] (weighted sum of the reward functions); prompt_ids: n lists; completion_ids, completion_mask
    (loss mask after mask_truncated_completions), old_logps, ref_logps: [n, c] (the log-prob grids may be
    None); advantages [n]; token_normalisers: per micro-batch slice, the global completion-token count of
    its optimizer step / processes; sequence_normaliser: the step's global completions / processes.
    """

    rewards: torch.Tensor
    prompt_ids: list[list[int]]
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    old_logps: torch.Tensor | None
    ref_logps: torch.Tensor | None
    advantages: torch.Tensor
    token_normalisers: list[float]
    sequence_normaliser: float
    sampler_weights: torch.Tensor | None = None  # [n, c] or [n, 1]: truncated IS weights pi_trainer / pi_sampler
    sampling_logps: torch.Tensor | None = None  # [n, c]: an external sampler's own log-probs (vLLM)


@dataclass
class PolicyLossExtras:
    """What `policy_loss` gets beyond the log-probs, for b completions of c tokens: entropy [b, c]
    (differentiable when the trainer's `needs_entropy_gradient`, else detached); entropy_mask [b, c] bool
    (top_entropy_quantile < 1) or None; sampler_weights [b, c] / [b, 1] and sampling_logps [b, c] when an
    external engine (vLLM) sampled."""

    entropy: torch.Tensor | None  # None on steps that neither log nor use it
    entropy_mask: torch.Tensor | None = None
    sampler_weights: torch.Tensor | None = None
    sampling_logps: torch.Tensor | None = None


class OnlineTrainer(TetherTrainer):
    """Base of GRPOTrainer and RLOOTrainer. Subclasses set `config_class` and implement
    `compute_advantages` and `policy_loss`; `kl_in_reward` says where beta's KL goes."""

    config_class = OnlineConfig
    dataset_description = "prompts (a 'prompt' column)"
    loss_is_scaled_for_ga = True  # each micro-batch's loss carries the whole step's normaliser
    kl_in_reward = False
    corrects_sampler_mismatch = False  # whether the vllm_importance_sampling_* fields exist and apply
    needs_entropy_gradient = False  # whether policy_loss differentiates the token entropy (an entropy bonus)
    keep_top_entropy = 1.0  # share of tokens, by entropy, the policy term trains on
    given_reference: Any = None  # a ref_model a subclass's constructor takes (Online DPO); None: the default rule

    def __init__(
        self,
        model: nn.Module | str,
        reward_funcs: Any = None,
        args: OnlineConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        reward_processing_classes: Any = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        peft_config: Any = None,
        quantization_config: Any = None,
        tools: list | None = None,
        environment_factory: Any = None,
        rollout_func: Any = None,
        **legacy_kwargs: Any,
    ) -> None:
        args = as_config(self.config_class, args, model, self.config_suffix)
        self.episodes = self._episode_rollout(args, tools, environment_factory, rollout_func)
        if self.episodes is not None:  # the environment's reward: one more reward function
            reward_funcs, args.reward_weights = self.episodes.with_environment_reward(reward_funcs, args.reward_weights)
        if args.use_vllm and args.vllm_mode == "colocate":
            require_vllm()
        # A reward model loaded here may get a fresh score head: drawn from the run's seed, not from whatever the
        # script drew before (the base constructor seeds again before the policy is loaded).
        set_seed(args.seed)
        self.rewards = RewardFunctions(reward_funcs, args.reward_weights, reward_processing_classes,
                                       load_kwargs=from_pretrained_kwargs(args, args.model_init_kwargs))
        eval_sets = eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]
        if is_stream(train_dataset) or any(is_stream(e) for e in eval_sets):
            # A streamed batch of prompts holds strings, which accelerate's dispatching (the main process reads
            # and splits each batch) cannot split; each process reads its own share of the stream instead.
            if args.accelerator_config.dispatch_batches:
                raise ValueError("A streaming (Iterable) dataset of prompts needs accelerator_config.dispatch_batches="
                                 "False (each process reads its share of the stream); leave it unset.")
            args.accelerator_config.dispatch_batches = False
        self._round: Round | None = None
        self._micro_step: int | None = None
        self._extra_columns: dict[str, list[Any]] = {}
        super().__init__(model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, callbacks=callbacks, optimizers=optimizers,
                         peft_config=peft_config, quantization_config=quantization_config, **legacy_kwargs)
        if is_encoder_decoder(self.model):
            raise ValueError(f"{type(self).__name__} trains decoder-only language models; got an encoder-decoder.")
        # Reward and reference models are evaluated, never trained: placed for the engine, not wrapped for it.
        prepare_reward_models(self.rewards, self.accelerator)
        # No reference when beta = 0; under PEFT the adapter-disabled policy; else a frozen copy.
        reference = select_reference(self.model, self.given_reference, source=model if isinstance(model, str) else None,
                                     load=lambda source: load_language_model(
                                         source, **self.model_loading_kwargs(args.model_init_kwargs)),
                                     copy_needed=args.beta != 0.0)
        self.ref_model = prepare_frozen_model(self.accelerator, reference) if reference is not None else None
        # The tokenizer's EOS and any the model's generation_config adds (chat models often have several).
        self._eos_ids = sorted({self.processing_class.eos_token_id, *eos_token_ids(self.model)} - {None})
        self._samples_logged_at = -1
        self._completion_log: collections.deque = collections.deque(
            maxlen=args.completions_per_micro_batch * args.steps_per_generation * args.world_size)
        if getattr(args, "cast_lm_head_to_fp32", False):
            cast_lm_head_to_fp32(self.model)
            if self.ref_model is not None:
                cast_lm_head_to_fp32(self.ref_model)
        self._vllm = self._vllm_sampler(model) if args.use_vllm else None
        if self.episodes is not None:
            if self._vllm is not None:
                raise ValueError("Multi-turn episodes (tools, environment_factory, rollout_func) are sampled by "
                                 "tether's own sampler; set use_vllm=False.")
            self.episodes.tokenizer = self.processing_class

    def _episode_rollout(self, args: OnlineConfig, tools: list | None, environment_factory: Any, rollout_func: Any
                         ) -> EpisodeRollout | None:
        """Multi-turn episodes when the trainer is given tools, an environment or a rollout function (GRPO, RLOO)."""
        if not tools and environment_factory is None and rollout_func is None:
            return None
        if not isinstance(args, EnvironmentFields):
            raise TypeError(f"{type(self).__name__} does not take tools, environment_factory or rollout_func "
                            "(GRPOTrainer and RLOOTrainer do).")
        return EpisodeRollout(args, None, tools, environment_factory, rollout_func)

    def _vllm_sampler(self, model: nn.Module | str) -> Any:
        """The vLLM sampler of args.vllm_mode: an engine in this process ('colocate', needs CUDA here) or a client
        of a vLLM server ('server': the server generates, so this process needs no GPU)."""
        args = self.args
        max_len = args.vllm_max_model_length
        if max_len is None and args.max_prompt_length is not None:
            max_len = args.max_prompt_length + args.max_completion_length
        return vllm_sampler(args, model if isinstance(model, str) else self.model.config._name_or_path, max_len)

    @property
    def logprob_temperature(self) -> float:
        """The temperature of the log-probs the loss uses: the sampling temperature (GRPO, RLOO, as TRL); Online
        DPO takes the policy's own distribution (1.0), as DPO does."""
        return self.args.temperature

    def _group_size(self, training: bool) -> int:
        """Completions per prompt: num_generations in training, num_generations_eval (if set) at evaluation."""
        if training or self.args.num_generations_eval is None:
            return self.args.num_generations
        return self.args.num_generations_eval

    # ----- data ---------------------------------------------------------------------------------------
    def _prepare(self, dataset: Any, what: str) -> Any:
        return prepare_prompts(dataset, self.processing_class, max_prompt_length=self.args.max_prompt_length,
                               num_proc=self.args.dataset_num_proc, what=what,
                               chat_template_kwargs=self._chat_template_kwargs)

    @property
    def _chat_template_kwargs(self) -> dict[str, Any]:
        """The config's chat_template_kwargs, with the tools' schemas when the model is given tools."""
        tools = self.episodes.template_tools if self.episodes is not None else []
        return chat_template_with_tools(self.args.chat_template_kwargs, tools)

    def _default_collator(self) -> Any:
        return collate_columns

    @property
    def _prompts_per_round(self) -> int:
        args = self.args
        return args.completions_per_micro_batch * args.steps_per_generation // args.num_generations

    def _get_train_sampler(self, train_dataset: Any = None) -> PromptRoundSampler | None:
        args = self.args
        if is_stream(self.train_dataset):
            return None  # a stream cannot be indexed: get_train_dataloader reads its rounds in order
        return PromptRoundSampler(len(self.train_dataset), self._prompts_per_round, args.world_size,
                                  args.steps_per_generation * args.num_iterations, args.seed, args.shuffle_dataset)

    def get_train_dataloader(self) -> Any:
        args = self.args
        if is_stream(self.train_dataset):
            # Each process reads the whole stream (seeded buffer shuffle with shuffle_dataset, as TRL) and keeps
            # its own block of every round, so the loader is not handed to accelerate to shard again.
            rows = self.train_dataset.shuffle(seed=args.seed) if args.shuffle_dataset else self.train_dataset
            rounds = PromptRoundStream(rows, self._prompts_per_round, args.world_size, args.process_index,
                                       args.steps_per_generation * args.num_iterations)
            return torch.utils.data.DataLoader(rounds, batch_size=None, collate_fn=self.data_collator)
        return self._get_dataloader(dataset=self.train_dataset, description="Training",
                                    batch_size=self._prompts_per_round, sampler_fn=self._get_train_sampler,
                                    is_training=True)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> None:
        return None  # the round carries its own normalisers

    # ----- the method: subclasses -----------------------------------------------------------------------
    def compute_advantages(self, rewards: torch.Tensor, sequence_kl: torch.Tensor | None,
                           group_size: int | None = None, per_function: torch.Tensor | None = None
                           ) -> torch.Tensor:
        """rewards [n] -> advantages [n]; sequence_kl [n] is log pi(o) - log pi_ref(o) when the method
        puts its KL in the reward (kl_in_reward and beta > 0), else None; group_size: completions per prompt
        (default num_generations); per_function [n, f]: each reward function's values (NaN: unscored)."""
        raise NotImplementedError

    def policy_loss(self, logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, ref_logps: torch.Tensor | None, num_tokens: float, num_sequences: float,
                    extras: PolicyLossExtras | None = None) -> GroupPolicyLossOutput:
        """One micro-batch's loss: logps [b, c] (differentiable), old_logps (the sampling policy's; the current
        ones detached when on-policy), mask, ref_logps (None when beta = 0): [b, c]; advantages [b];
        num_tokens / num_sequences: the optimizer step's global counts / processes (see Round)."""
        raise NotImplementedError

    # ----- 1-3: rollout, score, advantages ----------------------------------------------------------------
    @contextlib.contextmanager
    def _generation_model(self) -> Iterator[nn.Module]:
        """The policy as generation should see it: unwrapped, and under ZeRO-3 gathered once per round."""
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator) as policy:
            yield policy

    def _generate_round(self, batch: dict[str, list[Any]], training: bool = True) -> Round:
        """Stages 1-3 for this process's prompts in `batch`: sample, score, advantages (see the module doc)."""
        args, k = self.args, self._group_size(training)
        started = time.perf_counter()
        prompt_ids = [ids for ids in batch["prompt_input_ids"] for _ in range(k)]
        with self._generation_model() as policy:  # 1. rollout
            if self.episodes is None:
                sampled = self._sample(policy, batch["prompt_input_ids"], k)
            else:  # multi-turn: an environment may add to each episode's prompt
                prompt_ids, sampled = self._sample_episodes(policy, batch, k)
        generation_s, started = time.perf_counter() - started, time.perf_counter()
        prompts, completions, rewards, per_function = self._score(batch, sampled, k)  # 2. score
        scoring_s = time.perf_counter() - started

        # 3. advantages
        mask = sampled.completion_mask
        ref_logps = self._frozen_logps(prompt_ids, sampled, reference=True) if args.beta != 0.0 else None
        # Off-policy micro-batches (replayed, or after an optimizer step within the round) need the sampling
        # policy's log-probs; on-policy ones use the current ones, detached (ratio exactly 1). An external
        # sampler's tokens need the trainer's own log-probs for the importance-sampling correction.
        stored_old = args.num_iterations > 1 or args.steps_per_generation > args.gradient_accumulation_steps
        correct = (training and self.corrects_sampler_mismatch and sampled.sampler_logps is not None
                   and args.vllm_importance_sampling_correction)
        if sampled.logps is None and (stored_old or correct or (self.kl_in_reward and ref_logps is not None)):
            sampled.logps = self._frozen_logps(prompt_ids, sampled, reference=False)
        sampler_weights = None
        if correct:
            sampler_weights = sampler_importance_weights(
                sampled.logps.cpu(), sampled.sampler_logps, mask, args.vllm_importance_sampling_mode,
                args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max)
            self.record_metrics(**sampler_mismatch_metrics(sampled, sampler_weights))
        kl_per_sequence = None
        if self.kl_in_reward and ref_logps is not None:
            device = self.accelerator.device
            kl_per_sequence = sequence_kl(sampled.logps.to(device), ref_logps, mask.to(device)).cpu()  # [n]
        per_function_matrix = torch.stack(list(per_function.values()), dim=1)  # [n, f]
        advantages = self.compute_advantages(rewards, kl_per_sequence, k, per_function_matrix)  # [n]
        loss_mask = mask & ~sampled.truncated[:, None] if args.mask_truncated_completions else mask
        self.record_metrics(**round_metrics(rewards, per_function, sampled, advantages, kl_per_sequence, k,
                                            args.world_size), **{"time/generation": generation_s,
                                                                 "time/scoring": scoring_s})
        self._keep_for_completion_log(prompts, completions, per_function, advantages)
        if not training:
            return Round(rewards, prompt_ids, sampled.completion_ids, loss_mask, None, ref_logps, advantages, [], 0.0)
        self._log_samples(prompts, completions, rewards)
        return Round(rewards, prompt_ids, sampled.completion_ids, loss_mask,
                     sampled.logps if stored_old or correct else None, ref_logps, advantages,
                     *self._normalisers(loss_mask), sampler_weights=sampler_weights,
                     sampling_logps=sampled.sampler_logps if correct else None)

    def _sample(self, policy: nn.Module, prompt_ids: list[list[int]], k: int) -> Any:
        """k completions per prompt from the policy: tether's sampler, or vLLM when use_vllm. The settings are
        the config's sampling fields with generation_kwargs over them (see rollout.sampling.sampling_settings)."""
        args = self.args
        if self._vllm is not None:  # vLLM takes generation_kwargs as SamplingParams, as TRL passes them
            self._vllm.sync(policy, self.state.global_step)
            return self._vllm(prompt_ids, k, args.max_completion_length, self.processing_class.pad_token_id,
                              self._eos_ids, **self._sampling_fields, generation_kwargs=args.generation_kwargs)
        return sample_groups(policy, prompt_ids, k, **self._sampler_settings())

    @property
    def _sampling_fields(self) -> dict[str, Any]:
        args = self.args
        return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p or 0.0,
                    repetition_penalty=args.repetition_penalty)

    def _sampler_settings(self) -> dict[str, Any]:
        """tether's sampler's settings: the config's sampling fields with generation_kwargs over them, and the
        log-prob temperature the loss uses (whatever temperature samples)."""
        args = self.args
        settings = sampling_settings(args.generation_kwargs, **self._sampling_fields,
                                     max_new_tokens=args.max_completion_length, eos_token_ids=self._eos_ids)
        return {**settings, "pad_token_id": self.processing_class.pad_token_id,
                "logprob_temperature": self.logprob_temperature}

    def _sample_episodes(self, policy: nn.Module, batch: dict[str, list[Any]], k: int
                         ) -> tuple[list[list[int]], SampledEpisodes]:
        """k multi-turn episodes per prompt (trainers/episodes.py); their loss mask covers the model's tokens only.
        The sampler's log-probs are dropped: when the round needs the sampling policy's log-probs they are
        recomputed by the same pass (and micro-batching) as training's, so the first ratio is exactly 1."""
        prompt_ids, episodes = self.episodes.sample(policy, batch, k, self._sampler_settings(),
                                                    self._chat_template_kwargs, self)
        episodes.logps = None
        self.record_metrics(**episode_metrics(episodes))
        return prompt_ids, episodes

    def _score(self, batch: dict[str, list[Any]], sampled: Any, k: int
               ) -> tuple[list[Any], list[Any], torch.Tensor, dict]:
        """Reward functions on the decoded completions, each group's prompt and dataset columns repeated for
        its k completions. Returns (prompts, completions, weighted rewards [n], {function: rewards [n]})."""
        columns = {key: [v for v in values for _ in range(k)] for key, values in batch.items()
                   if key not in ("prompt", "prompt_input_ids")}
        prompts = [p for p in batch["prompt"] for _ in range(k)]
        if isinstance(sampled, SampledEpisodes):  # all of it after the prompt: model turns and observations
            completion_ids = [ids[m].tolist() for ids, m in zip(sampled.completion_ids, sampled.episode_mask)]
            texts = sampled.texts(self.processing_class, self._eos_ids)
            columns.update(sampled.reward_columns())
        else:
            completion_ids = [ids[m].tolist() for ids, m in zip(sampled.completion_ids, sampled.completion_mask)]
            texts = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
        # Conversational prompts get conversational completions, as TRL passes them to reward functions.
        completions = [[{"role": "assistant", "content": t}] for t in texts] if isinstance(prompts[0], list) else texts
        self._extra_columns = collections.defaultdict(list)  # this round's log_extra columns
        rewards, per_function = self.rewards.score(prompts, completions, trainer_state=self.state,
                                                   log_extra=self._log_extra, log_metric=self._log_reward_metric,
                                                   reward_timeout=self.args.reward_timeout,
                                                   reward_warn_after=self.args.reward_warn_after,
                                                   completion_ids=completion_ids, **columns)
        return prompts, completions, rewards, per_function

    def _log_extra(self, column: str, values: list[Any]) -> None:
        """TRL's `log_extra` hook for reward functions: a column of this round's logged completions (one value
        per completion, in order; several calls for one column append)."""
        self._extra_columns[column].extend(values)

    def _log_reward_metric(self, name: str, value: float) -> None:
        """TRL's `log_metric` hook for reward functions: a scalar averaged into the next logged metrics."""
        self.record_metrics(**{name: value})

    def _extras_of(self, i: int) -> dict[str, Any]:
        return {column: values[i] for column, values in self._extra_columns.items() if i < len(values)}

    def _normalisers(self, loss_mask: torch.Tensor) -> tuple[list[float], float]:
        """Per micro-batch slice of this round: the global completion-token count of the optimizer step it
        belongs to, and the step's global completion count, each divided by the number of processes (DDP
        averages gradients over them). bnpo-style local normalisation is the subclass's business."""
        args = self.args
        b, ga = args.completions_per_micro_batch, args.gradient_accumulation_steps
        tokens = loss_mask.sum(-1).float().view(args.steps_per_generation, b).sum(-1)  # [slices]
        per_step = tokens.view(-1, ga).sum(-1)  # [steps in round]
        if args.world_size > 1:
            per_step = self.accelerator.reduce(per_step.to(self.accelerator.device), "sum").cpu()
        token_normalisers = [float(per_step[s // ga].clamp(min=1)) / args.world_size
                             for s in range(args.steps_per_generation)]
        return token_normalisers, float(b * ga)

    @torch.no_grad()
    def _frozen_logps(self, prompt_ids: list[list[int]], sampled: Any, reference: bool) -> torch.Tensor:
        """Log-probs of the sampled tokens without gradients, [n, c], in micro-batch-sized chunks: under the
        reference model (a frozen copy, or the policy with its adapter disabled), or under the policy as
        it sampled (for samplers that do not report them)."""
        ids, mask, size = sampled.completion_ids, sampled.completion_mask, self.args.completions_per_micro_batch
        chunks = []
        for start in range(0, len(prompt_ids), size):
            rows = slice(start, start + size)
            model, context = (reference_context(self.model, self.ref_model) if reference
                              else (self.model, contextlib.nullcontext()))
            with context:
                chunks.append(self._token_logps(model, prompt_ids[rows], ids[rows], mask[rows],
                                                with_stats=False).logps_grid)
        return torch.cat(chunks)

    # ----- 4: the update ------------------------------------------------------------------------------------
    def _token_logps(self, model: nn.Module, prompt_ids: list[list[int]], completion_ids: torch.Tensor,
                     mask: torch.Tensor, entropy_gradient: bool = False, with_stats: bool = True) -> _GridLogProbs:
        """Log-probs of completion tokens under `model`, in a [b, c] grid like completion_ids (0 outside mask),
        from one forward pass over prompt + completion (packed rows where the model supports them; batch widths
        rounded up to pad_to_multiple_of when it is an int). entropy_gradient: the entropy grid is
        differentiable (an entropy bonus), else detached; without `with_stats` (a pass that needs only the
        log-probs) there is no entropy grid unless entropy_gradient asks for it."""
        device = self.accelerator.device
        # Up to each row's last masked token; a multi-turn episode's mask has holes (observations), which stay in
        # the sequence as context but get no log-prob.
        lengths = (mask.shape[-1] - mask.flip(-1).int().argmax(-1)).masked_fill(~mask.any(-1), 0).tolist()
        rows = [{"input_ids": p + ids[:m].tolist(), "loss_mask": [False] * len(p) + row_mask[:m].tolist()}
                for p, ids, m, row_mask in zip(prompt_ids, completion_ids, lengths, mask.bool().cpu())]
        pack = self.args.padding_free if self.args.padding_free is not None else supports_packed_rows(model)
        longest = max(len(r["input_ids"]) for r in rows)
        if pack and isinstance(self.args.pad_to_multiple_of, int):  # room for the rounded-up width
            longest = -(-longest // self.args.pad_to_multiple_of) * self.args.pad_to_multiple_of
        batch = LanguageModelingCollator(self.processing_class.pad_token_id,
                                         pad_to_multiple_of=self.args.pad_to_multiple_of,
                                         pack_to=longest if pack else None)(rows)
        batch = {key: value.to(device) for key, value in batch.items()}
        token_logps = causal_token_log_probs(model, batch, self.logprob_temperature, self.args.logprob_chunk_size,
                                             entropy_gradient=entropy_gradient, with_stats=with_stats)
        token_entropy = token_logps.entropy if entropy_gradient else (token_logps.stats.entropy if with_stats else None)
        r, p, owner = token_logps.rows, token_logps.positions, token_logps.sequences  # [tokens] each
        in_sequence = batch["position_ids"][r, p] if "position_ids" in batch else p  # position within its sequence
        prompt_lengths = torch.tensor([len(x) for x in prompt_ids], device=device)
        column = in_sequence - prompt_lengths[owner]  # [tokens]: index of the token in its completion
        shape = tuple(completion_ids.shape)
        grid = token_logps.logps.new_zeros(shape).index_put((owner, column), token_logps.logps)
        entropy = None if token_entropy is None else token_entropy.new_zeros(shape).index_put((owner, column),
                                                                                             token_entropy)
        return _GridLogProbs(grid, entropy)

    def training_step(self, model: nn.Module, inputs: dict[str, list[Any]], num_items_in_batch: Any = None
                      ) -> torch.Tensor:
        args = self.args
        if self._micro_step is None:  # first call of this train(): count from the (possibly resumed) step
            self._micro_step = self.state.global_step * args.gradient_accumulation_steps
        position = self._micro_step % (args.steps_per_generation * args.num_iterations)
        self._micro_step += 1
        if position == 0 or self._round is None:
            if position:  # resumed inside a round from a checkpoint that does not hold it (see _save_rng_state)
                warnings.warn(f"Resuming at optimizer step {self.state.global_step}, inside a round of generation, "
                              f"from a checkpoint without that round's completions ({ROUND_FILE.format('<rank>')}): "
                              "the rest of the round is sampled anew by the current policy, so the resumed run "
                              "does not repeat the interrupted one exactly.", UserWarning, stacklevel=2)
            model.train()  # Trainer does so next anyway; the round's metrics must be filed as training ones
            self._round = self._generate_round(inputs)
        started = time.perf_counter()
        loss = super().training_step(model, {"slice": position % args.steps_per_generation}, num_items_in_batch)
        self.record_metrics(**{"time/update": time.perf_counter() - started})
        return loss

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self._micro_step, self._round = None, None
        return super().train(*args, **kwargs)

    # ----- checkpoints inside a round --------------------------------------------------------------------------
    def _round_position(self) -> int:
        """Micro-steps of the current round trained so far at the current optimizer step (0: at a round's start).
        Rounds span several optimizer steps with num_iterations > 1 or steps_per_generation >
        gradient_accumulation_steps."""
        args = self.args
        return self.state.global_step * args.gradient_accumulation_steps % (
            args.steps_per_generation * args.num_iterations)

    def _save_rng_state(self, output_dir: str) -> None:
        """Trainer's random state and, for a checkpoint inside a round, this process's round (its completions,
        rewards, advantages and log-probs): a resumed run trains the rest of the round on them, as the
        uninterrupted run does, instead of sampling a new round from the updated policy."""
        super()._save_rng_state(output_dir)
        if self._round is not None and self._round_position():
            state = {f.name: getattr(self._round, f.name) for f in fields(Round)}
            torch.save(state, os.path.join(output_dir, ROUND_FILE.format(self.args.process_index)))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)  # called once, when training resumes from `checkpoint`
        path = os.path.join(checkpoint, ROUND_FILE.format(self.args.process_index)) if checkpoint else ""
        if self._round_position() and os.path.isfile(path):
            self._round = Round(**torch.load(path, map_location="cpu", weights_only=True))

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return inputs  # a slice index into the current round; tensors are built in compute_loss

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor:
        round_, s = self._round, inputs["slice"]
        b = self.args.completions_per_micro_batch
        rows = slice(s * b, (s + 1) * b)
        device = self.accelerator.device
        mask = round_.completion_mask[rows].to(device)
        # The detached entropy (a pass over the vocabulary per token) only where it is used: the high-entropy
        # mask, and the metric on the steps that log it.
        with_stats = self.keep_top_entropy < 1.0 or self.logs_this_step()
        current = self._token_logps(model, round_.prompt_ids[rows], round_.completion_ids[rows], mask,
                                    entropy_gradient=self.needs_entropy_gradient, with_stats=with_stats)
        old = round_.old_logps[rows].to(device) if round_.old_logps is not None else current.logps_grid.detach()
        ref = round_.ref_logps[rows].to(device) if round_.ref_logps is not None else None

        def rows_of(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[rows].to(device)

        extras = PolicyLossExtras(current.entropy, self._entropy_mask(current.entropy, mask),
                                  rows_of(round_.sampler_weights), rows_of(round_.sampling_logps))
        out = self.policy_loss(current.logps_grid, old, round_.advantages[rows].to(device), mask, ref,
                               round_.token_normalisers[s], round_.sequence_normaliser, extras)
        entropy = current.entropy
        self.record_metrics(**{
            **({"entropy": masked_mean(entropy.detach(), mask) if mask.any() else float("nan")}
               if entropy is not None else {}),
            "clip_ratio/low_mean": out.clip_ratio_low, "clip_ratio/high_mean": out.clip_ratio_high,
            "clip_ratio/region_mean": out.clip_ratio_region,
            **({"kl": out.kl} if not self.kl_in_reward and self.args.beta != 0.0 else {}),
            **({"policy_loss": out.policy_loss} if self.needs_entropy_gradient else {}),
            **out.extra,
        })
        return (out.loss, None) if return_outputs else out.loss

    def _entropy_mask(self, entropy: torch.Tensor, mask: torch.Tensor, keep_top: float | None = None
                      ) -> torch.Tensor | None:
        """The tokens in the top `keep_top` share (default: keep_top_entropy) by entropy, the threshold taken over
        this micro-batch's tokens on every process (as TRL gathers them); None when every token counts."""
        keep_top = self.keep_top_entropy if keep_top is None else keep_top
        if keep_top >= 1.0:
            return None
        values = entropy.detach()[mask.bool()].float()
        if self.args.world_size > 1:  # pad to a common length with a value no entropy takes, gather, drop it
            values = self.accelerator.pad_across_processes(values, dim=0, pad_index=-1.0)
            values = self.accelerator.gather(values)
            values = values[values >= 0]
        return high_entropy_mask(entropy.detach(), mask, keep_top, population=values)

    def prediction_step(self, model: nn.Module, inputs: dict[str, list[Any]], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[torch.Tensor, None, None]:
        """Evaluation: sample groups for the eval prompts and log their rewards (eval_reward, ...); the
        returned loss (eval_loss) is the negative mean reward."""
        with torch.no_grad():
            evaluated = self._generate_round(inputs, training=False)
        return -evaluated.rewards.mean().to(self.accelerator.device), None, None

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        # Whole groups (of the eval group size) per eval batch, with at least one prompt.
        saved = self.args.per_device_eval_batch_size
        self.args.per_device_eval_batch_size = max(1, saved // self._group_size(training=False))
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.args.per_device_eval_batch_size = saved

    # ----- metrics and samples ----------------------------------------------------------------------------
    def _keep_for_completion_log(self, prompts: list[Any], completions: list[Any],
                                 per_function: dict[str, torch.Tensor], advantages: torch.Tensor) -> None:
        """Rows of the log_completions table: the latest round's completions (all processes'), each with its
        prompt, each reward function's value and its advantage."""
        if not self.args.log_completions:
            return
        rows = [{"prompt": p, "completion": c, **{name: float(v[i]) for name, v in per_function.items()},
                 "advantage": float(advantages[i]), **self._extras_of(i)}
                for i, (p, c) in enumerate(zip(prompts, completions))]
        if self.args.world_size > 1:
            from accelerate.utils import gather_object

            rows = gather_object(rows)
        self._completion_log.extend(rows)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        super().log(logs, start_time)
        if self.args.log_completions and self.accelerator.is_main_process and self._completion_log:
            print(completions_table(list(self._completion_log), self.state.global_step,
                                    self.args.num_completions_to_print, self.args.log_unique_prompts))

    def _log_samples(self, prompts: list[Any], completions: list[Any], rewards: torch.Tensor) -> None:
        """A few completions per logging step to output_dir/samples.jsonl (read by the run report)."""
        step, every = self.state.global_step, max(1, int(self.args.logging_steps))
        if (not self.accelerator.is_main_process or self.args.num_completions_to_log <= 0
                or step % every or step == self._samples_logged_at or not self.model.training):
            return
        self._samples_logged_at = step
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(os.path.join(self.args.output_dir, "samples.jsonl"), "a", encoding="utf-8") as f:
            for i in range(0, len(prompts), self._group_size(training=True))[: self.args.num_completions_to_log]:
                prompt, completion, reward = prompts[i], completions[i], float(rewards[i])
                text = prompt if isinstance(prompt, str) else json.dumps(prompt)
                completion = completion if isinstance(completion, str) else completion[0]["content"]
                f.write(json.dumps({"step": step, "prompt": text, "completion": completion,
                                    "reward": reward if math.isfinite(reward) else None, **self._extras_of(i)},
                                   default=str) + "\n")


@dataclass
class _GridLogProbs:
    logps_grid: torch.Tensor  # [b, c], differentiable
    entropy: torch.Tensor | None  # [b, c], detached (differentiable with entropy_gradient); None: not asked for
