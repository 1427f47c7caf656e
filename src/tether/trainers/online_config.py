"""`OnlineConfig`: the fields GRPOConfig and RLOOConfig share (sampling, rounds, clipping, vLLM, completion
logging) and their validation. The trainer that reads them is trainers/online.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..models.loading import parse_json_kwargs
from ..rollout.reward_limits import RewardCallFields, check_reward_call_fields
from ..rollout.sampling import sampling_settings
from .base import TetherConfig
from .episodes import EnvironmentFields
from .ref_sync import ReferenceSyncFields
from .vllm_fields import VLLMFields, check_vllm_fields


@dataclass
class OnlineConfig(TetherConfig, ReferenceSyncFields, RewardCallFields, VLLMFields):
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
    min_p: float | None = field(default=None, metadata={
        "help": "Drop tokens below min_p x the top probability (None or 0: off)."})
    repetition_penalty: float = field(default=1.0, metadata={
        "help": "Divide (logit > 0) or multiply (logit <= 0) the logits of tokens already in the prompt or the "
                "completion by this when sampling (> 1: fewer repeats; 1.0: off). Log-probs for the loss stay the "
                "policy's own, as in TRL."})
    generation_kwargs: dict[str, Any] | None = field(default=None, metadata={
        "help": "Sampling settings that override the fields above: temperature, top_k, top_p, min_p, "
                "repetition_penalty, max_new_tokens, min_new_tokens, suppress_tokens, eos_token_id, do_sample (vLLM "
                "names max_tokens, min_tokens, stop_token_ids too); with use_vllm, any vLLM SamplingParams."})
    chat_template_kwargs: dict[str, Any] | None = field(default=None, metadata={
        "help": "Extra keyword arguments for the tokenizer's apply_chat_template on conversational prompts "
                "(e.g. {'enable_thinking': False})."})
    cache_implementation: str | None = field(default=None, metadata={
        "help": "transformers' KV-cache implementation for generate(); tether samples with its own cache."})
    ds3_gather_for_generation: bool = field(default=True, metadata={
        "help": "DeepSpeed ZeRO-3: gather the whole policy once per round for generation."})
    num_generations_eval: int | None = field(default=None, metadata={
        "help": "Completions per prompt at evaluation (default: num_generations)."})
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
    use_transformers_continuous_batching: bool = field(default=False, metadata={
        "help": "Generate with transformers' continuous-batching engine (tether uses its own sampler)."})
    transformers_continuous_batching_config: dict[str, Any] | None = field(default=None, metadata={
        "help": "Settings of transformers' continuous-batching engine."})
    use_transformers_paged: bool = field(default=False, metadata={
        "help": "Deprecated name of use_transformers_continuous_batching."})
    num_completions_to_log: int = field(default=4, metadata={
        "help": "Completions written to output_dir/samples.jsonl at each logging step."})
    log_completions: bool = field(default=False, metadata={
        "help": "Print a table of prompts, completions, rewards and advantages at each logging step."})
    num_completions_to_print: int | None = field(default=None, metadata={
        "help": "Rows of that table, drawn at random from the last round (None: all)."})
    log_unique_prompts: bool = field(default=False, metadata={
        "help": "In that table, one row per distinct prompt."})
    log_multimodal: bool = field(default=True, metadata={
        "help": "Log images and other media with the completions (multimodal prompts)."})

    inapplicable_fields: ClassVar[dict[str, str]] = {
        **TetherConfig.inapplicable_fields,
        "cache_implementation": "tether samples with its own preallocated KV cache (rollout.sampling), not "
                                "generate()'s cache implementations.",
        "use_transformers_continuous_batching": "tether generates with its own batched sampler, which already "
                                                "drops finished rows; transformers' engine is not used.",
        "transformers_continuous_batching_config": "tether does not use transformers' continuous batching.",
        "use_transformers_paged": "tether does not use transformers' paged / continuous-batching generation.",
        "log_multimodal": "tether's online trainers take text prompts only: there is no media to log.",
        "ds3_gather_for_generation": "tether's sampler always gathers the ZeRO-3 model once per round (generation "
                                     "with per-layer gathering is not implemented).",
    }

    # Completions per unit of per_device_train_batch_size: 1 where it counts completions (GRPO, RLOO, as TRL);
    # Online DPO's counts prompts, each answered by a pair (as TRL's OnlineDPOConfig), so 2 there.
    completions_per_batch_row: ClassVar[int] = 1

    @property
    def completions_per_micro_batch(self) -> int:
        """Completions in one micro-batch of the update (one slice of a round) on one process."""
        return self.per_device_train_batch_size * self.completions_per_batch_row

    def __post_init__(self) -> None:
        if isinstance(self, EnvironmentFields):  # GRPO, RLOO: multi-turn fields
            self.check_environment_fields()
        super().__post_init__()
        check_sampling_and_clipping(self)
        if self.num_generations < 2:
            raise ValueError("num_generations must be at least 2: the group is the baseline.")
        if self.max_completion_length < 1:
            raise ValueError("max_completion_length must be at least 1.")
        if self.num_iterations < 1:
            raise ValueError("num_iterations must be at least 1.")
        check_reward_call_fields(self)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0: off), got {self.repetition_penalty}.")
        if self.num_generations_eval is not None and self.num_generations_eval < 1:
            raise ValueError(f"num_generations_eval must be at least 1, got {self.num_generations_eval}.")
        check_vllm_fields(self)
        parse_json_kwargs(self, ("generation_kwargs", "chat_template_kwargs"))  # JSON text from a CLI or YAML
        if not self.use_vllm:  # fail at construction on a key our sampler cannot honour, not mid-training
            sampling_settings(self.generation_kwargs)
        if self.generation_batch_size is not None:
            per_round = self.completions_per_micro_batch * self.world_size
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
        completions = self.completions_per_micro_batch * self.steps_per_generation
        if completions % self.num_generations:
            raise ValueError(
                f"A round holds per_device_train_batch_size x steps_per_generation = {completions} completions per "
                f"process, which is not a multiple of num_generations={self.num_generations}: each process samples "
                "whole groups. Fix: make per_device_train_batch_size (or steps_per_generation / "
                "gradient_accumulation_steps) a multiple of num_generations, or lower num_generations.")


def check_sampling_and_clipping(config: OnlineConfig) -> None:
    """Sampling and clipping fields of the online methods. temperature must be > 0: the loss divides the logits
    by it (0 would mean greedy sampling, whose log-probs are not the ones trained on)."""
    name = type(config).__name__
    if config.temperature <= 0:
        raise ValueError(f"{name}.temperature must be > 0 (the training log-probs divide by it), got "
                         f"{config.temperature}. Fix: sample with e.g. temperature=1.0 (for near-greedy, top_k=1).")
    if not 0.0 < config.top_p <= 1.0:
        raise ValueError(f"{name}.top_p must lie in (0, 1], got {config.top_p}.")
    if config.top_k < 0:
        raise ValueError(f"{name}.top_k must be >= 0 (0: off), got {config.top_k}.")
    if config.min_p is not None and not 0.0 <= config.min_p <= 1.0:
        raise ValueError(f"{name}.min_p must lie in [0, 1] (or None: off), got {config.min_p}.")
    if config.beta < 0:
        raise ValueError(f"{name}.beta (the KL coefficient) must be >= 0, got {config.beta}.")
    for field_name in ("epsilon", "epsilon_high"):
        value = getattr(config, field_name)
        if value is not None and value < 0:
            raise ValueError(f"{name}.{field_name} (a clip range) must be >= 0, got {value}.")
