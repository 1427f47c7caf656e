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
    4. update     the round is cut into `steps_per_generation` micro-batches of per_device_train_batch_size
                  completions, replayed `num_iterations` times; the loss of each is normalised by the
                  whole optimizer step's count (tokens or sequences, all-reduced over processes), so
                  gradient accumulation and data parallelism do not change the update

Shapes: P = prompts per round, G = num_generations, n = P * G completions, c = completion tokens.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..data import collate_columns, prepare_prompts
from ..data.collate import LanguageModelingCollator
from ..data.rounds import PromptRoundSampler
from ..distributed import (
    prepare_frozen_model,
    prepare_reward_models,
    unwrap_model_for_generation,
)
from ..losses.group import GroupPolicyLossOutput
from ..losses.kl import sequence_kl
from ..models.forward import causal_token_log_probs, supports_packed_rows
from ..models.loading import is_encoder_decoder, load_language_model
from ..models.reference import reference_context, select_reference
from ..ops.stats import masked_mean
from ..rollout.generation import eos_token_ids
from ..rollout.rewards import RewardFunctions
from ..rollout.sampling import sample_groups
from ..rollout.vllm_generation import VLLMGroupSampler, require_vllm
from .base import TetherConfig, TetherTrainer, as_config
from .ref_sync import ReferenceSyncFields


@dataclass
class OnlineConfig(TetherConfig, ReferenceSyncFields):
    """Fields shared by the online methods (GRPOConfig, RLOOConfig); every TrainingArguments field applies.

    per_device_train_batch_size counts completions, as in TRL: a round of steps_per_generation micro-batches
    holds per_device_train_batch_size * steps_per_generation completions, num_generations per prompt.
    """

    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW learning rate."})
    num_generations: int = field(default=8, metadata={"help": "Completions sampled per prompt (the group)."})
    max_prompt_length: int | None = field(default=512, metadata={
        "help": "Longest prompt in tokens; a longer one is an error before training (None: no limit)."})
    max_completion_length: int = field(default=256, metadata={"help": "Most tokens sampled per completion."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (log-probs use it too)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1.0: off)."})
    top_k: int = field(default=0, metadata={"help": "Sample among the k most likely tokens (0: off)."})
    min_p: float = field(default=0.0, metadata={"help": "Drop tokens below min_p x the top probability (0: off)."})
    steps_per_generation: int | None = field(default=None, metadata={
        "help": "Micro-batches per round of generation (default: gradient_accumulation_steps); a multiple of it."})
    generation_batch_size: int | None = field(default=None, metadata={
        "help": "Completions per round over all processes; alternative to steps_per_generation."})
    num_iterations: int = field(default=1, metadata={
        "help": "Updates per round (mu in the GRPO paper); > 1 uses the stored log-probs of the sampling policy."})
    beta: float = field(default=0.0, metadata={"help": "KL coefficient to the reference model (0: no reference)."})
    epsilon: float = field(default=0.2, metadata={"help": "Lower clip range of the probability ratio."})
    epsilon_high: float | None = field(default=None, metadata={
        "help": "Upper clip range (default: epsilon; DAPO's clip-higher uses e.g. 0.28)."})
    reward_weights: list[float] | None = field(default=None, metadata={
        "help": "Weight of each reward function in the summed reward (default: all 1)."})
    mask_truncated_completions: bool = field(default=False, metadata={
        "help": "Leave completions that hit max_completion_length without EOS out of the loss (DAPO)."})
    disable_dropout: bool = field(default=False, metadata={"help": "Turn dropout off in the policy."})
    shuffle_dataset: bool = field(default=True, metadata={"help": "Shuffle the prompts each epoch."})
    padding_free: bool | None = field(default=None, metadata={
        "help": "Pack the completions of a micro-batch into rows without padding (default: when supported)."})
    logprob_chunk_size: int = field(default=1024, metadata={"help": "Tokens per chunk of the log-prob kernel."})
    use_vllm: bool = field(default=False, metadata={
        "help": "Generate with a vLLM engine in the training process (CUDA GPU; needs `pip install vllm`)."})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={
        "help": "Share of GPU memory vLLM may take for its weights and KV cache, with use_vllm."})
    num_completions_to_log: int = field(default=4, metadata={
        "help": "Completions written to output_dir/samples.jsonl at each logging step."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_generations < 2:
            raise ValueError("num_generations must be at least 2: the group is the baseline.")
        if self.max_completion_length < 1:
            raise ValueError("max_completion_length must be at least 1.")
        if self.num_iterations < 1:
            raise ValueError("num_iterations must be at least 1.")
        if self.generation_batch_size is not None:
            per_round = self.per_device_train_batch_size * self.world_size
            if self.generation_batch_size % per_round:
                raise ValueError(f"generation_batch_size ({self.generation_batch_size}) must be a multiple of "
                                 f"per_device_train_batch_size x processes ({per_round}).")
            derived = self.generation_batch_size // per_round
            # Both may be given when a config is rebuilt from its own fields; they must then agree.
            if self.steps_per_generation not in (None, derived):
                raise ValueError(f"steps_per_generation={self.steps_per_generation} and generation_batch_size="
                                 f"{self.generation_batch_size} disagree (that batch is {derived} micro-batches); "
                                 "set one of them.")
            self.steps_per_generation = derived
        if self.steps_per_generation is None:
            self.steps_per_generation = self.gradient_accumulation_steps
        if self.steps_per_generation % self.gradient_accumulation_steps:
            raise ValueError(f"steps_per_generation ({self.steps_per_generation}) must be a multiple of "
                             f"gradient_accumulation_steps ({self.gradient_accumulation_steps}).")
        completions = self.per_device_train_batch_size * self.steps_per_generation
        if completions % self.num_generations:
            raise ValueError(
                f"A round holds per_device_train_batch_size x steps_per_generation = {completions} completions per "
                f"process, which is not a multiple of num_generations={self.num_generations}: each process samples "
                "whole groups. Fix: make per_device_train_batch_size (or steps_per_generation / "
                "gradient_accumulation_steps) a multiple of num_generations, or lower num_generations.")


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


class OnlineTrainer(TetherTrainer):
    """Base of GRPOTrainer and RLOOTrainer. Subclasses set `config_class` and implement
    `compute_advantages` and `policy_loss`; `kl_in_reward` says where beta's KL goes."""

    config_class = OnlineConfig
    dataset_description = "a train_dataset of prompts (a 'prompt' column)"
    loss_is_scaled_for_ga = True  # each micro-batch's loss carries the whole step's normaliser
    kl_in_reward = False

    def __init__(
        self,
        model: nn.Module | str,
        reward_funcs: Any,
        args: OnlineConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        reward_processing_classes: Any = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        peft_config: Any = None,
        **legacy_kwargs: Any,
    ) -> None:
        args = as_config(self.config_class, args, model, self.config_suffix)
        if args.use_vllm:
            require_vllm()
        self.rewards = RewardFunctions(reward_funcs, args.reward_weights, reward_processing_classes)
        self._round: Round | None = None
        self._micro_step: int | None = None
        super().__init__(model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, callbacks=callbacks, optimizers=optimizers,
                         peft_config=peft_config, **legacy_kwargs)
        if is_encoder_decoder(self.model):
            raise ValueError(f"{type(self).__name__} trains decoder-only language models; got an encoder-decoder.")
        # Reward and reference models are evaluated, never trained: placed for the engine, not wrapped for it.
        prepare_reward_models(self.rewards, self.accelerator)
        # No reference when beta = 0; under PEFT the adapter-disabled policy; else a frozen copy.
        reference = select_reference(self.model, None, source=model if isinstance(model, str) else None,
                                     load=lambda source: load_language_model(source, **(args.model_init_kwargs or {})),
                                     copy_needed=args.beta != 0.0)
        self.ref_model = prepare_frozen_model(self.accelerator, reference) if reference is not None else None
        # The tokenizer's EOS and any the model's generation_config adds (chat models often have several).
        self._eos_ids = sorted({self.processing_class.eos_token_id, *eos_token_ids(self.model)} - {None})
        self._samples_logged_at = -1
        self._vllm = None
        if args.use_vllm:
            if not torch.cuda.is_available():
                raise ValueError("use_vllm=True needs a CUDA GPU; on this machine leave use_vllm=False.")
            source = model if isinstance(model, str) else self.model.config._name_or_path
            self._vllm = VLLMGroupSampler(source, (args.max_prompt_length or 2048) + args.max_completion_length,
                                          args.vllm_gpu_memory_utilization, args.seed)

    # ----- data ---------------------------------------------------------------------------------------
    def _prepare(self, dataset: Any, what: str) -> Any:
        return prepare_prompts(dataset, self.processing_class, max_prompt_length=self.args.max_prompt_length,
                               num_proc=self.args.dataset_num_proc, what=what)

    def _default_collator(self) -> Any:
        return collate_columns

    @property
    def _prompts_per_round(self) -> int:
        args = self.args
        return args.per_device_train_batch_size * args.steps_per_generation // args.num_generations

    def _get_train_sampler(self, train_dataset: Any = None) -> PromptRoundSampler:
        args = self.args
        return PromptRoundSampler(len(self.train_dataset), self._prompts_per_round, args.world_size,
                                  args.steps_per_generation * args.num_iterations, args.seed, args.shuffle_dataset)

    def get_train_dataloader(self) -> Any:
        return self._get_dataloader(dataset=self.train_dataset, description="Training",
                                    batch_size=self._prompts_per_round, sampler_fn=self._get_train_sampler,
                                    is_training=True)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> None:
        return None  # the round carries its own normalisers

    # ----- the method: subclasses -----------------------------------------------------------------------
    def compute_advantages(self, rewards: torch.Tensor, sequence_kl: torch.Tensor | None) -> torch.Tensor:
        """rewards [n] -> advantages [n]; sequence_kl [n] is log pi(o) - log pi_ref(o) when the method
        puts its KL in the reward (kl_in_reward and beta > 0), else None."""
        raise NotImplementedError

    def policy_loss(self, logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, ref_logps: torch.Tensor | None, num_tokens: float,
                    num_sequences: float) -> GroupPolicyLossOutput:
        raise NotImplementedError

    # ----- 1-3: rollout, score, advantages ----------------------------------------------------------------
    @contextlib.contextmanager
    def _generation_model(self) -> Iterator[nn.Module]:
        """The policy as generation should see it: unwrapped, and under ZeRO-3 gathered once per round."""
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator) as policy:
            yield policy

    def _generate_round(self, batch: dict[str, list[Any]], training: bool = True) -> Round:
        """Stages 1-3 for this process's prompts in `batch`: sample, score, advantages (see the module doc)."""
        args, k = self.args, self.args.num_generations
        started = time.perf_counter()
        with self._generation_model() as policy:  # 1. rollout
            sampler = functools.partial(sample_groups, policy)
            if self._vllm is not None:
                self._vllm.sync(policy, self.state.global_step)
                sampler = self._vllm
            sampled = sampler(batch["prompt_input_ids"], k, args.max_completion_length,
                              self.processing_class.pad_token_id, self._eos_ids, args.temperature, args.top_k,
                              args.top_p, args.min_p)
        generation_s, started = time.perf_counter() - started, time.perf_counter()
        prompts, completions, rewards, per_function = self._score(batch, sampled)  # 2. score
        scoring_s = time.perf_counter() - started

        prompt_ids = [ids for ids in batch["prompt_input_ids"] for _ in range(k)]  # 3. advantages
        mask = sampled.completion_mask
        ref_logps = self._frozen_logps(prompt_ids, sampled, reference=True) if args.beta != 0.0 else None
        # Off-policy micro-batches (replayed, or after an optimizer step within the round) need the sampling
        # policy's log-probs; on-policy ones use the current ones, detached (ratio exactly 1).
        stored_old = args.num_iterations > 1 or args.steps_per_generation > args.gradient_accumulation_steps
        if sampled.logps is None and (stored_old or (self.kl_in_reward and ref_logps is not None)):
            sampled.logps = self._frozen_logps(prompt_ids, sampled, reference=False)
        kl_per_sequence = None
        if self.kl_in_reward and ref_logps is not None:
            device = self.accelerator.device
            kl_per_sequence = sequence_kl(sampled.logps.to(device), ref_logps, mask.to(device)).cpu()  # [n]
        advantages = self.compute_advantages(rewards, kl_per_sequence)  # [n]
        loss_mask = mask & ~sampled.truncated[:, None] if args.mask_truncated_completions else mask
        self._record_round(rewards, per_function, sampled, advantages, kl_per_sequence, generation_s, scoring_s)
        if not training:
            return Round(rewards, prompt_ids, sampled.completion_ids, loss_mask, None, ref_logps, advantages, [], 0.0)
        self._log_samples(prompts, completions, rewards)
        return Round(rewards, prompt_ids, sampled.completion_ids, loss_mask, sampled.logps if stored_old else None,
                     ref_logps, advantages, *self._normalisers(loss_mask))

    def _score(self, batch: dict[str, list[Any]], sampled: Any) -> tuple[list[Any], list[Any], torch.Tensor, dict]:
        """Reward functions on the decoded completions, each group's prompt and dataset columns repeated for
        its completions. Returns (prompts, completions, weighted rewards [n], {function: rewards [n]})."""
        k = self.args.num_generations
        columns = {key: [v for v in values for _ in range(k)] for key, values in batch.items()
                   if key not in ("prompt", "prompt_input_ids")}
        prompts = [p for p in batch["prompt"] for _ in range(k)]
        completion_ids = [ids[m].tolist() for ids, m in zip(sampled.completion_ids, sampled.completion_mask)]
        texts = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
        # Conversational prompts get conversational completions, as TRL passes them to reward functions.
        completions = [[{"role": "assistant", "content": t}] for t in texts] if isinstance(prompts[0], list) else texts
        rewards, per_function = self.rewards.score(prompts, completions, trainer_state=self.state,
                                                   completion_ids=completion_ids, **columns)
        return prompts, completions, rewards, per_function

    def _normalisers(self, loss_mask: torch.Tensor) -> tuple[list[float], float]:
        """Per micro-batch slice of this round: the global completion-token count of the optimizer step it
        belongs to, and the step's global completion count, each divided by the number of processes (DDP
        averages gradients over them). bnpo-style local normalisation is the subclass's business."""
        args = self.args
        b, ga = args.per_device_train_batch_size, args.gradient_accumulation_steps
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
        ids, mask, size = sampled.completion_ids, sampled.completion_mask, self.args.per_device_train_batch_size
        chunks = []
        for start in range(0, len(prompt_ids), size):
            rows = slice(start, start + size)
            model, context = (reference_context(self.model, self.ref_model) if reference
                              else (self.model, contextlib.nullcontext()))
            with context:
                chunks.append(self._token_logps(model, prompt_ids[rows], ids[rows], mask[rows]).logps_grid)
        return torch.cat(chunks)

    # ----- 4: the update ------------------------------------------------------------------------------------
    def _token_logps(self, model: nn.Module, prompt_ids: list[list[int]], completion_ids: torch.Tensor,
                     mask: torch.Tensor) -> _GridLogProbs:
        """Log-probs of completion tokens under `model`, in a [b, c] grid like completion_ids (0 outside mask),
        from one forward pass over prompt + completion (packed rows where the model supports them)."""
        device = self.accelerator.device
        lengths = mask.sum(-1).tolist()
        rows = [{"input_ids": p + ids[:m].tolist(), "loss_mask": [False] * len(p) + [True] * m}
                for p, ids, m in zip(prompt_ids, completion_ids, lengths)]
        pack = self.args.padding_free if self.args.padding_free is not None else supports_packed_rows(model)
        longest = max(len(r["input_ids"]) for r in rows)
        batch = LanguageModelingCollator(self.processing_class.pad_token_id, pack_to=longest if pack else None)(rows)
        batch = {key: value.to(device) for key, value in batch.items()}
        token_logps = causal_token_log_probs(model, batch, self.args.temperature, self.args.logprob_chunk_size)
        r, p = token_logps.rows, token_logps.positions
        owner = batch["sequence_ids"][r, p] if "sequence_ids" in batch else r  # [tokens]
        in_sequence = batch["position_ids"][r, p] if "position_ids" in batch else p  # position within its sequence
        prompt_lengths = torch.tensor([len(x) for x in prompt_ids], device=device)
        column = in_sequence - prompt_lengths[owner]  # [tokens]: index of the token in its completion
        shape = tuple(completion_ids.shape)
        grid = token_logps.logps.new_zeros(shape).index_put((owner, column), token_logps.logps)
        entropy = token_logps.logps.new_zeros(shape).index_put((owner, column), token_logps.stats.entropy)
        return _GridLogProbs(grid, entropy)

    def training_step(self, model: nn.Module, inputs: dict[str, list[Any]], num_items_in_batch: Any = None
                      ) -> torch.Tensor:
        args = self.args
        if self._micro_step is None:  # first call of this train(): count from the (possibly resumed) step
            self._micro_step = self.state.global_step * args.gradient_accumulation_steps
        position = self._micro_step % (args.steps_per_generation * args.num_iterations)
        self._micro_step += 1
        if position == 0 or self._round is None:
            model.train()  # Trainer does so next anyway; the round's metrics must be filed as training ones
            self._round = self._generate_round(inputs)
        started = time.perf_counter()
        loss = super().training_step(model, {"slice": position % args.steps_per_generation}, num_items_in_batch)
        self.record_metrics(**{"time/update": time.perf_counter() - started})
        return loss

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self._micro_step, self._round = None, None
        return super().train(*args, **kwargs)

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return inputs  # a slice index into the current round; tensors are built in compute_loss

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor:
        round_, s = self._round, inputs["slice"]
        b = self.args.per_device_train_batch_size
        rows = slice(s * b, (s + 1) * b)
        device = self.accelerator.device
        mask = round_.completion_mask[rows].to(device)
        current = self._token_logps(model, round_.prompt_ids[rows], round_.completion_ids[rows], mask)
        old = round_.old_logps[rows].to(device) if round_.old_logps is not None else current.logps_grid.detach()
        ref = round_.ref_logps[rows].to(device) if round_.ref_logps is not None else None
        out = self.policy_loss(current.logps_grid, old, round_.advantages[rows].to(device), mask, ref,
                               round_.token_normalisers[s], round_.sequence_normaliser)
        self.record_metrics(**{
            "entropy": masked_mean(current.entropy, mask) if mask.any() else float("nan"),
            "clip_ratio/low_mean": out.clip_ratio_low, "clip_ratio/high_mean": out.clip_ratio_high,
            "clip_ratio/region_mean": out.clip_ratio_region,
            **({"kl": out.kl} if not self.kl_in_reward and self.args.beta != 0.0 else {}),
        })
        return (out.loss, None) if return_outputs else out.loss

    def prediction_step(self, model: nn.Module, inputs: dict[str, list[Any]], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[torch.Tensor, None, None]:
        """Evaluation: sample groups for the eval prompts and log their rewards (eval_reward, ...); the
        returned loss (eval_loss) is the negative mean reward."""
        with torch.no_grad():
            evaluated = self._generate_round(inputs, training=False)
        return -evaluated.rewards.mean().to(self.accelerator.device), None, None

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        # Whole groups per eval batch, with at least one prompt.
        saved = self.args.per_device_eval_batch_size
        self.args.per_device_eval_batch_size = max(1, saved // self.args.num_generations)
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.args.per_device_eval_batch_size = saved

    # ----- metrics and samples ----------------------------------------------------------------------------
    def _record_round(self, rewards: torch.Tensor, per_function: dict[str, torch.Tensor], sampled: Any,
                      advantages: torch.Tensor, sequence_kl: torch.Tensor | None, generation_s: float,
                      scoring_s: float) -> None:
        k = self.args.num_generations
        lengths = sampled.completion_mask.sum(-1).float()  # [n]
        ended = ~sampled.truncated
        metrics = {
            "reward": rewards.mean(), "reward_std": rewards.view(-1, k).std(-1).mean(),
            "frac_reward_zero_std": (rewards.view(-1, k).std(-1) < 1e-6).float().mean(),
            "completions/mean_length": lengths.mean(), "completions/min_length": lengths.min(),
            "completions/max_length": lengths.max(), "completions/clipped_ratio": sampled.truncated.float().mean(),
            "completions/mean_terminated_length": lengths[ended].mean() if ended.any() else float("nan"),
            "advantages/abs_mean": advantages.abs().mean(),
            "time/generation": generation_s, "time/scoring": scoring_s,
            "num_tokens": float(sampled.completion_mask.sum()) * self.args.world_size,
        }
        for name, values in per_function.items():  # over the completions the function scored (not None)
            scored = values[~torch.isnan(values)]
            metrics[f"rewards/{name}/mean"] = scored.mean() if len(scored) else torch.tensor(float("nan"))
            metrics[f"rewards/{name}/std"] = scored.std() if len(scored) > 1 else torch.tensor(0.0)
        if sequence_kl is not None:
            metrics["kl"] = sequence_kl.mean()
        self.record_metrics(**metrics)

    def _log_samples(self, prompts: list[Any], completions: list[Any], rewards: torch.Tensor) -> None:
        """A few completions per logging step to output_dir/samples.jsonl (read by the run report)."""
        step, every = self.state.global_step, max(1, int(self.args.logging_steps))
        if (not self.accelerator.is_main_process or self.args.num_completions_to_log <= 0
                or step % every or step == self._samples_logged_at or not self.model.training):
            return
        self._samples_logged_at = step
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(os.path.join(self.args.output_dir, "samples.jsonl"), "a", encoding="utf-8") as f:
            for prompt, completion, reward in list(zip(prompts, completions, rewards.tolist()))[
                    :: self.args.num_generations][: self.args.num_completions_to_log]:
                text = prompt if isinstance(prompt, str) else json.dumps(prompt)
                completion = completion if isinstance(completion, str) else completion[0]["content"]
                f.write(json.dumps({"step": step, "prompt": text, "completion": completion,
                                    "reward": reward if math.isfinite(reward) else None}) + "\n")


@dataclass
class _GridLogProbs:
    logps_grid: torch.Tensor  # [b, c], differentiable
    entropy: torch.Tensor  # [b, c], detached
