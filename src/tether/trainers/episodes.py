"""Environments and tools for GRPO and RLOO: what turns a round of single completions into multi-turn episodes.

The trainer takes them as TRL 1.x does (`tools=[...]`, `environment_factory=...`, `rollout_func=...`) and as the
issue-16 form (an environment with `reset(prompt)` and `step(text) -> (observation, reward, done)`); this
module builds one environment per completion, adds what `reset` returns to the prompt, runs
`rollout.multiturn.sample_episodes`, and hands the trainer episodes whose loss mask covers the model's tokens
only. The environment's reward enters as one more reward function (weight 1, named after the environment), so
the reward path, its weighting and its metrics stay in one place (rollout.rewards).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data.tokenize import tokenize_prompt
from ..rollout.multiturn import ENVIRONMENT_REWARD_COLUMN, SampledEpisodes, ToolEnvironment, sample_episodes


@dataclass
class EnvironmentFields:
    """Config fields of multi-turn rollouts (GRPOConfig, RLOOConfig); they apply when the trainer is given tools,
    an environment_factory or a rollout_func."""

    max_tool_calling_iterations: int | None = field(default=None, metadata={
        "help": "Most tool-calling turns per episode (TRL's name): an episode has at most this + 1 model turns "
                "(None: max_turns, or until max_completion_length)."})
    max_turns: int | None = field(default=None, metadata={
        "help": "Most model turns per episode (None: no limit but max_completion_length, which bounds the model's "
                "and the observations' tokens together)."})
    max_turn_length: int | None = field(default=None, metadata={
        "help": "Most tokens in one model turn (None: max_completion_length)."})
    max_tool_response_length: int | None = field(default=256, metadata={
        "help": "Most tokens of one observation (a tool's answer, an environment's reply); longer ones are cut."})
    tool_timeout: float | None = field(default=10.0, metadata={
        "help": "Seconds a tool call may take before it is abandoned and 'timeout' goes back to the model."})
    tool_call_format: str = field(default="auto", metadata={
        "help": "How the model calls tools: 'classic' (<request><Tool>args<call>, TRL 0.7), 'chat' (the chat "
                "template's tool calls), or 'auto' (chat for conversational prompts with a chat template)."})
    reuse_kv_cache_across_turns: bool = field(default=True, metadata={
        "help": "Keep the KV cache across turns (earlier turns are never re-encoded); False re-encodes each "
                "episode after every turn (same numbers, slower; for comparison)."})

    def check_environment_fields(self) -> None:
        for name in ("max_tool_calling_iterations", "max_turns", "max_turn_length", "max_tool_response_length"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "max_tool_calling_iterations" else 1):
                raise ValueError(f"{name} must be >= {0 if name == 'max_tool_calling_iterations' else 1} or None, "
                                 f"got {value}.")
        if self.tool_call_format not in ("auto", "classic", "chat"):
            raise ValueError(f"tool_call_format must be 'auto', 'classic' or 'chat', got {self.tool_call_format!r}.")
        if self.tool_timeout is not None and self.tool_timeout <= 0:
            raise ValueError(f"tool_timeout must be > 0 or None, got {self.tool_timeout}.")

    @property
    def turn_limit(self) -> int:
        limits = [self.max_turns or 0, (self.max_tool_calling_iterations + 1)
                  if self.max_tool_calling_iterations is not None else 0]
        return min(x for x in limits if x) if any(limits) else 10**9


def _call_accepting(function: Callable[..., Any], row: dict[str, Any]) -> Any:
    """function(**the keys of row it accepts); all of them if it takes **kwargs."""
    parameters = inspect.signature(function).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return function(**row)
    return function(**{p.name: row[p.name] for p in parameters if p.name in row})


def _tool_methods(environment: Any) -> list[Callable[..., Any]]:
    """A TRL 1.x environment's tools: its public methods other than reset / get_reward."""
    return [getattr(environment, name) for name, _ in inspect.getmembers(type(environment), inspect.isfunction)
            if not name.startswith("_") and name not in ("reset", "get_reward", "step")]


class EpisodeRollout:
    """Builds and runs the episodes of a round (see the module docstring). tools: callables (user code) offered to
    every episode; environment_factory: a callable returning a fresh environment (step-based, or TRL-style with
    tool methods and optional get_reward); rollout_func: TRL's `rollout_func(prompts, trainer) -> dict`."""

    def __init__(self, config: EnvironmentFields, tokenizer: Any, tools: list[Callable[..., Any]] | None = None,
                 environment_factory: Callable[[], Any] | None = None,
                 rollout_func: Callable[..., dict[str, Any]] | None = None) -> None:
        if rollout_func is not None and (tools or environment_factory is not None):
            raise ValueError("rollout_func generates the whole round itself: pass it alone, without tools or "
                             "environment_factory.")
        for tool in tools or []:
            if not callable(tool):
                raise TypeError(f"tools must be callables; got {tool!r} ({type(tool).__name__}).")
        if environment_factory is not None and not callable(environment_factory):
            raise TypeError("environment_factory must be a callable returning a new environment (e.g. the class); "
                            f"got {type(environment_factory).__name__}.")
        config.check_environment_fields()
        self.config, self.tokenizer = config, tokenizer
        self.tools, self.factory, self.rollout_func = list(tools or []), environment_factory, rollout_func
        probe = environment_factory() if environment_factory is not None else None
        self.step_based = probe is not None and callable(getattr(probe, "step", None))
        if probe is not None and not callable(getattr(probe, "reset", None)):
            raise TypeError(f"The environment {type(probe).__name__} needs a reset method (reset(prompt) -> str | "
                            "None).")
        self.template_tools = self.tools + ([] if probe is None or self.step_based else _tool_methods(probe))
        self.reward_name = type(probe).__name__ if probe is not None else "tools"
        # Whether episodes carry a reward of their own: a step-based environment's, or a TRL-style get_reward.
        self.has_reward = self.step_based or callable(getattr(probe, "get_reward", None))

    def with_environment_reward(self, reward_funcs: Any, reward_weights: list[float] | None
                                ) -> tuple[list[Any] | Any, list[float] | None]:
        """The trainer's reward functions and weights, plus the environment's reward (weight 1) when it has one."""
        if not self.has_reward:
            return reward_funcs, reward_weights
        funcs = (list(reward_funcs) if isinstance(reward_funcs, (list, tuple))
                 else [reward_funcs] if reward_funcs is not None else [])
        return [*funcs, self.reward_function()], None if reward_weights is None else [*reward_weights, 1.0]

    def reward_function(self) -> Callable[..., list[float]]:
        """The environment's reward as a reward function reading this module's column (summed turn rewards)."""
        def environment_reward(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
            return list(columns[ENVIRONMENT_REWARD_COLUMN])

        environment_reward.__name__ = self.reward_name
        return environment_reward

    def syntax(self, conversational: bool) -> str:
        if self.config.tool_call_format != "auto":
            return self.config.tool_call_format
        return "chat" if conversational and getattr(self.tokenizer, "chat_template", None) else "classic"

    def _environment(self, conversational: bool) -> Any:
        # Observations are cut in tokens by the sampler; the character cap only keeps a flooding tool's text from
        # being tokenized whole first.
        tokens = self.config.max_tool_response_length
        timeout, chars = self.config.tool_timeout, None if tokens is None else 32 * tokens
        if self.factory is None:
            return ToolEnvironment(self.tools, self.tokenizer, self.syntax(conversational), timeout=timeout,
                                   max_chars=chars)
        env = self.factory()
        if self.step_based:
            return env
        return ToolEnvironment(self.tools + _tool_methods(env), self.tokenizer, self.syntax(conversational),
                               reset=env.reset, final_reward=getattr(env, "get_reward", None), timeout=timeout,
                               max_chars=chars)

    def episode_prompts(self, batch: dict[str, list[Any]], k: int, chat_template_kwargs: dict[str, Any]
                        ) -> tuple[list[list[int]], list[Any]]:
        """One environment per completion (n = prompts x k), reset with its row; what reset returns is added to the
        prompt (to the last user message of a conversation, as TRL does) and the prompt re-tokenized."""
        prompt_ids, environments = [], []
        for i, prompt in enumerate(batch["prompt"]):
            row = {key: values[i] for key, values in batch.items() if key != "prompt_input_ids"}
            tokenized = {None: list(batch["prompt_input_ids"][i])}  # by what reset added: a group's often agree
            for _ in range(k):
                env = self._environment(isinstance(prompt, list))
                observation = _call_accepting(env.reset, row) or None
                if observation not in tokenized:
                    if isinstance(prompt, list):
                        extended = prompt[:-1] + [{**prompt[-1], "content": prompt[-1]["content"] + observation}]
                    else:
                        extended = prompt + observation
                    tokenized[observation] = tokenize_prompt(self.tokenizer, extended, **chat_template_kwargs)
                prompt_ids.append(list(tokenized[observation]))
                environments.append(env)
        return prompt_ids, environments

    def sample(self, policy: torch.nn.Module, batch: dict[str, list[Any]], k: int, settings: dict[str, Any],
               chat_template_kwargs: dict[str, Any], trainer: Any = None) -> tuple[list[list[int]], SampledEpisodes]:
        """The round's episodes: (prompt ids of each of the n episodes, the episodes)."""
        if self.rollout_func is not None:
            return self._from_rollout_func(batch, k, trainer)
        unsupported = {key: settings[key] for key in ("repetition_penalty", "suppress_tokens", "min_new_tokens")
                       if settings.get(key) not in (None, 1.0, 0, [], ())}
        if unsupported:
            raise ValueError(f"Multi-turn episodes sample with temperature, top_k, top_p and min_p only; got "
                             f"{unsupported}. Fix: leave them at their defaults when training with tools or an "
                             "environment.")
        prompt_ids, environments = self.episode_prompts(batch, k, chat_template_kwargs)
        cfg = self.config
        stop_strings = sorted({s for env in environments for s in getattr(env, "stop_strings", [])})
        episodes = sample_episodes(
            policy, self.tokenizer, prompt_ids, environments, max_completion_length=settings["max_new_tokens"],
            max_turns=cfg.turn_limit, eos_token_ids=settings["eos_token_ids"], pad_token_id=settings["pad_token_id"],
            max_turn_tokens=cfg.max_turn_length, max_observation_tokens=cfg.max_tool_response_length,
            stop_strings=stop_strings, temperature=settings["temperature"], top_k=settings["top_k"],
            top_p=settings["top_p"], min_p=settings["min_p"], logprob_temperature=settings["logprob_temperature"],
            reuse_cache=cfg.reuse_kv_cache_across_turns)
        return prompt_ids, episodes

    def _from_rollout_func(self, batch: dict[str, list[Any]], k: int, trainer: Any
                           ) -> tuple[list[list[int]], SampledEpisodes]:
        """TRL's rollout_func(prompts, trainer) -> {"prompt_ids", "completion_ids", "logprobs", optional "env_mask"
        (1 at model tokens), extra per-completion fields for the reward functions}; k completions per prompt."""
        out = dict(self.rollout_func(list(batch["prompt"]), trainer))
        missing = {"prompt_ids", "completion_ids"} - set(out)
        if missing:
            raise ValueError(f"rollout_func returned no {sorted(missing)}; it must return a dict with 'prompt_ids', "
                             "'completion_ids' (one list of token ids per completion) and optionally 'logprobs' and "
                             "'env_mask'.")
        completions, n = out.pop("completion_ids"), len(batch["prompt"]) * k
        if len(completions) != n:
            raise ValueError(f"rollout_func returned {len(completions)} completions for {len(batch['prompt'])} prompts "
                             f"x num_generations {k} = {n}.")
        width = max(1, max(len(c) for c in completions))
        ids = torch.full((n, width), self.tokenizer.pad_token_id, dtype=torch.long)
        model_mask = torch.zeros((n, width), dtype=torch.bool)
        episode_mask = torch.zeros((n, width), dtype=torch.bool)
        env_mask, logprobs = out.pop("env_mask", None), out.pop("logprobs", None)
        for i, c in enumerate(completions):
            ids[i, :len(c)] = torch.tensor(c, dtype=torch.long)
            episode_mask[i, :len(c)] = True
            model_mask[i, :len(c)] = torch.tensor([bool(m) for m in env_mask[i]]) if env_mask is not None else True
        prompt_ids = [list(p) for p in out.pop("prompt_ids")]
        if len(prompt_ids) == len(batch["prompt"]) and k > 1:
            prompt_ids = [p for p in prompt_ids for _ in range(k)]
        del logprobs  # the trainer recomputes the sampling policy's log-probs with its own pass
        episodes = SampledEpisodes(ids, model_mask, None, torch.zeros(n, dtype=torch.bool), episode_mask=episode_mask,
                                   rewards=None, extra_columns={key: list(v) for key, v in out.items()})
        return prompt_ids, episodes


def episode_metrics(episodes: SampledEpisodes) -> dict[str, float]:
    """Per turn t (1-based): the mean reward of the turn and the share of episodes still running at it that called
    a tool; per episode: turns and tool calls (means)."""
    if not episodes.turn_rewards:
        return {}
    metrics = {"episodes/turns_mean": sum(map(len, episodes.turn_rewards)) / len(episodes.turn_rewards),
               "episodes/tool_calls_mean": sum(map(sum, episodes.tool_calls)) / len(episodes.tool_calls)}
    for t in range(max(map(len, episodes.turn_rewards))):
        rewards = [r[t] for r in episodes.turn_rewards if len(r) > t]
        calls = [c[t] > 0 for c in episodes.tool_calls if len(c) > t]
        metrics[f"episodes/turn_{t + 1}/reward_mean"] = sum(rewards) / len(rewards)
        metrics[f"episodes/turn_{t + 1}/tool_call_rate"] = sum(calls) / len(calls)
    return metrics


def chat_template_with_tools(chat_template_kwargs: dict[str, Any] | None, tools: list[Callable[..., Any]]
                             ) -> dict[str, Any]:
    """The chat-template keyword arguments with the tools' JSON schemas (transformers' `tools=`), so conversational
    prompts show them to the model."""
    kwargs = dict(chat_template_kwargs or {})
    if tools and "tools" not in kwargs:
        kwargs["tools"] = list(tools)
    return kwargs


