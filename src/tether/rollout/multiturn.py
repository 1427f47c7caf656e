"""Multi-turn episodes for online RL: the model acts, an environment answers, the model acts again.

An episode starts from a prompt. Each model turn is sampled by tether's own sampler, batched over every live
episode; a turn ends at EOS, at one of the environment's stop strings (e.g. the classic `<call>`), or after
`max_turn_tokens`. The environment then reads the turn's text and answers (an observation, a reward, done); the
observation's tokens are appended to the episode and the model goes on from there. Only the model's own tokens
are trained: the episode's `completion_mask` is True at sampled tokens and False at observation tokens.

The KV cache is kept across turns, so earlier turns are never re-encoded: at each decoding step every running
row is fed what came after its last fed token (its sampled token, plus the observation when its turn just
ended), right-padded to the longest feed with masked slots. Rows at different turns thus leave masked "holes"
in the cache; rotary models store each key already rotated at its true position (position ids are passed
explicitly), so keys can be moved, and once holes are a third of the cache it is repacked (each row's real slots
moved to the right). Finished episodes leave the cache at once (a row gather), so episodes that end at
different turns cost nothing afterwards. Caches whose layers are not plain full-attention ones (sliding windows,
linear attention) cannot be holed or repacked: those models re-encode the running episodes after each turn
boundary (`reuse_cache=False` forces this path; it gives the same numbers).

The sampling policy's log-prob of every model token is kept, softmax(logits / T) before sampling-time filters,
as `rollout.sampling` does, so an on-policy importance ratio is 1 up to float rounding (the trainer recomputes
the old log-probs with its own pass when it must store them, which makes it exactly 1).

Environments (user code: they run in the training process; tools go through `rollout.tools.call_tool`):
- step-based: `reset(prompt) -> str | None` (text appended to the prompt before the first turn) and
  `step(turn_text) -> (observation: str | None, reward: float, done: bool)`;
- tool-based (TRL 1.x's `environment_factory` and `tools=`): `ToolEnvironment` turns tool calls found in a
  turn into observations (see its docstring); an episode ends at the first turn without a tool call.
An episode's reward is the sum of its turns' rewards.

Shapes: n = episodes (prompts x k), r = running rows, c = episode tokens after the prompt, v = vocabulary.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ..models.forward import unwrap_model
from .generation import StopStrings
from .sampling import (
    CachedForward,
    PreallocatedLayer,
    SampledGroups,
    left_pad,
    preallocate_cache,
    sample_next_tokens,
    shared_prompt_cache,
)
from .tools import CALL, REQUEST, RESPONSE, call_tool, parse_classic_call, tool_name

REPACK_WHEN_HOLES = 1 / 3  # repack the cache once this share of its slots are masked holes
ENVIRONMENT_REWARD_COLUMN = "environment_reward"  # the column an episode's summed turn rewards reach reward functions in


class Environment(Protocol):
    def reset(self, prompt: Any) -> str | None: ...

    def step(self, text: str) -> tuple[str | None, float, bool]: ...


@dataclass
class SampledEpisodes(SampledGroups):
    """`SampledGroups` for multi-turn episodes. completion_ids [n, c]: everything after the prompt (model turns and
    observations); completion_mask [n, c]: True at the model's own tokens only (the loss mask); episode_mask
    [n, c]: True at every real token; logps [n, c]: the sampler's log-probs at model tokens; truncated [n]: the
    episode hit max_completion_length; turn_rewards / tool_calls: per episode, one value per turn; rewards [n]:
    the sum of each episode's turn rewards."""

    episode_mask: torch.Tensor = None
    rewards: torch.Tensor = None
    turn_rewards: list[list[float]] = field(default_factory=list)
    tool_calls: list[list[int]] = field(default_factory=list)
    extra_columns: dict[str, list[Any]] = field(default_factory=dict)  # a rollout_func's fields for reward functions

    def texts(self, tokenizer: Any, eos_token_ids: Sequence[int]) -> list[str]:
        """Each episode's text after the prompt (model turns and observations), see `episode_text`."""
        return [episode_text(tokenizer, ids[mask].tolist(), eos_token_ids)
                for ids, mask in zip(self.completion_ids, self.episode_mask)]

    def reward_columns(self) -> dict[str, list[Any]]:
        """What reward functions get besides the texts: a rollout_func's fields and the environment's reward (the
        column the environment's reward function reads)."""
        rewards = {} if self.rewards is None else {ENVIRONMENT_REWARD_COLUMN: self.rewards.tolist()}
        return {**self.extra_columns, **rewards}


def episode_text(tokenizer: Any, ids: Sequence[int], eos_token_ids: Sequence[int]) -> str:
    """Text of episode tokens as the model and the environment see it: special tokens (tool-call markers) kept,
    EOS dropped."""
    eos = set(eos_token_ids)
    return tokenizer.decode([t for t in ids if t not in eos])


# ----- tool calls ------------------------------------------------------------------------------------------------
_JSON_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)


class ToolEnvironment:
    """Tools (user code) offered to the model, one instance per episode.

    Two call syntaxes:
    - "classic" (TRL 0.7's TextEnvironment): the turn ends with `<request><ToolName>argument text<call>`; the
      observation is `result<response>`, and the model's next turn continues right after it;
    - "chat": the chat template's tool calls. With a tokenizer that has a `response_schema`,
      `tokenizer.parse_response` finds them; otherwise the Hermes/Qwen form `<tool_call>{"name": ...,
      "arguments": {...}}</tool_call>`. The observation is the chat template's rendering of the tool messages
      up to the next assistant header.
    A turn without a call ends the episode, with `episode_reward(text)` as its reward (`final_reward()`, e.g. a
    TRL environment's get_reward; 0 when none is given). Each call
    has `timeout` seconds; its output (or error text) is cut to `max_chars`. `tool_calls` / `tool_failures`
    count this episode's calls.
    """

    def __init__(self, tools: Sequence[Callable[..., Any]], tokenizer: Any = None, syntax: str = "classic",
                 reset: Callable[..., str | None] | None = None, final_reward: Callable[[], float] | None = None,
                 timeout: float | None = 10.0, max_chars: int | None = 1000) -> None:
        if syntax not in ("classic", "chat"):
            raise ValueError(f"syntax must be 'classic' or 'chat', got {syntax!r}.")
        self.tools = {tool_name(t): t for t in tools}
        self.tokenizer, self.syntax, self._reset, self.final_reward = tokenizer, syntax, reset, final_reward
        self.timeout, self.max_chars = timeout, max_chars
        self.tool_calls = self.tool_failures = 0

    @property
    def stop_strings(self) -> list[str]:
        return [CALL] if self.syntax == "classic" else []

    def reset(self, prompt: Any = None, **row: Any) -> str | None:
        self.tool_calls = self.tool_failures = 0
        return None if self._reset is None else self._reset(**row)

    def step(self, text: str) -> tuple[str | None, float, bool]:
        calls = self._parse(text)
        if not calls:
            return None, float(self.episode_reward(text)), True
        results = []
        for name, arguments in calls:
            self.tool_calls += 1
            tool = self.tools.get(name)
            if tool is None:
                self.tool_failures += 1
                results.append((name, f"Unknown tool {name!r}; available: {sorted(self.tools)}."))
                continue
            result = call_tool(tool, arguments, timeout=self.timeout, max_chars=self.max_chars)
            self.tool_failures += result.error is not None
            results.append((name, result.text))
        return self._observation(results), 0.0, False

    def episode_reward(self, final_text: str) -> float:
        """The reward of an episode whose last model turn is `final_text` (no tool call): `final_reward()` if given,
        else 0. Subclasses that grade the answer override this."""
        return self.final_reward() if self.final_reward is not None else 0.0

    def _parse(self, text: str) -> list[tuple[str, str | dict[str, Any]]]:
        if self.syntax == "classic":
            name, query = parse_classic_call(text)
            if name is None:  # a malformed call is reported back as an unknown tool; no call ends the episode
                return [("<unparsable>", "")] if REQUEST in text and CALL in text else []
            return [(name, query)]
        if getattr(self.tokenizer, "response_schema", None):
            parsed = self.tokenizer.parse_response(text) or {}
            return [(c["function"]["name"], c["function"].get("arguments") or {})
                    for c in parsed.get("tool_calls") or []]
        calls = []
        for block in _JSON_CALL.findall(text):
            try:
                call = json.loads(block)
                calls.append((str(call["name"]), dict(call.get("arguments") or {})))
            except (ValueError, KeyError, TypeError):
                calls.append(("<unparsable>", {}))  # reported back as an unknown tool
        return calls

    def _observation(self, results: list[tuple[str, str]]) -> str:
        if self.syntax == "classic":
            return results[-1][1] + RESPONSE
        return chat_tool_observation(self.tokenizer, results)


def chat_tool_observation(tokenizer: Any, results: list[tuple[str, str]]) -> str:
    """The text the chat template puts after an assistant turn that called tools: the tool messages and the next
    assistant header. Rendered from a stand-in conversation, with and without the tool messages; the part after
    the assistant turn's end (its last EOS) is the observation. Templates without tool messages (or no template)
    get `<tool_response>...</tool_response>` blocks."""
    messages = [{"role": "user", "content": "x"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": name, "arguments": {}}} for name, _ in results]}]
    tool_messages = [{"role": "tool", "name": name, "content": text} for name, text in results]
    try:
        before = tokenizer.apply_chat_template(messages, tokenize=False)
        after = tokenizer.apply_chat_template(messages + tool_messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # no template, or one without tool messages
        before = after = None
    eos = getattr(tokenizer, "eos_token", None)
    if before and after and eos and eos in before:
        before = before[: before.rindex(eos) + len(eos)]
        if after.startswith(before):
            return after[len(before):]
    return "".join(f"<tool_response>\n{text}\n</tool_response>\n" for _, text in results)


# ----- the sampler -------------------------------------------------------------------------------------------------
@dataclass
class _Episode:
    ids: list[int] = field(default_factory=list)  # tokens after the prompt
    model: list[bool] = field(default_factory=list)  # True where the model sampled the token
    logps: list[float] = field(default_factory=list)
    turn_start: int = 0
    rewards: list[float] = field(default_factory=list)
    tool_calls: list[int] = field(default_factory=list)
    truncated: bool = False


def _group_size(sequences: list[list[int]]) -> int:
    """g when the sequences are consecutive runs of g identical ones (the k episodes of each prompt), else 1."""
    g = 1
    while g < len(sequences) and sequences[g] == sequences[0]:
        g += 1
    if len(sequences) % g or any(sequences[i] != sequences[i - i % g] for i in range(len(sequences))):
        return 1
    return g


def _plain_cache(cache: Any) -> bool:
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(isinstance(layer, PreallocatedLayer) for layer in layers)


def _repack(cache: Any, attention_mask: torch.Tensor) -> torch.Tensor:
    """Move each row's real cache slots to the right end (order kept), dropping columns that are holes in every
    row; returns the new attention mask [r, w']. Keys were rotated at their true positions when cached, so a key
    attends the same wherever its slot is."""
    real = attention_mask.bool()  # [r, w]
    width = int(real.sum(-1).max())
    order = torch.sort(real.int(), dim=-1, stable=True).indices[:, -width:]  # [r, w']: holes first, then real slots
    for layer in cache.layers:
        index = order[:, None, :, None].expand(-1, layer.key_buffer.shape[1], -1, layer.key_buffer.shape[-1])
        layer.key_buffer[:, :, :width] = layer.keys.gather(2, index)
        layer.value_buffer[:, :, :width] = layer.values.gather(2, index)
        layer.length = width
        layer._refresh_views()
    return real.gather(1, order).long()


def sample_episodes(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    environments: Sequence[Environment],
    *,
    max_completion_length: int,
    max_turns: int,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    max_turn_tokens: int | None = None,
    max_observation_tokens: int | None = None,
    stop_strings: Sequence[str] = (),
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    logprob_temperature: float | None = None,
    generator: torch.Generator | None = None,
    reuse_cache: bool = True,
) -> SampledEpisodes:
    """One episode per environment: episode i starts from prompts[i] (lists of token ids, already including what
    the environment's reset added) and is driven by environments[i] (see the module docstring). An episode ends
    when its environment says done, after `max_turns` model turns, or when its tokens after the prompt reach
    `max_completion_length` (truncated). Observations are cut to `max_observation_tokens`."""
    if len(prompts) != len(environments) or not prompts:
        raise ValueError(f"sample_episodes needs one environment per prompt, got {len(prompts)} prompts and "
                         f"{len(environments)} environments.")
    if max_turns < 1 or max_completion_length < 1:
        raise ValueError(f"max_turns and max_completion_length must be >= 1, got {max_turns}, {max_completion_length}.")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            loop = _EpisodeLoop(unwrap_model(model), tokenizer, prompts, environments, max_completion_length,
                                max_turns, list(eos_token_ids), pad_token_id, max_turn_tokens or max_completion_length,
                                max_observation_tokens, stop_strings,
                                dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p or 0.0,
                                     generator=generator, logprob_temperature=logprob_temperature), device)
            return loop.run(reuse_cache)
    finally:
        model.train(was_training)


class _EpisodeLoop:
    def __init__(self, model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]],
                 environments: Sequence[Environment], budget: int, max_turns: int, eos_ids: list[int],
                 pad_id: int, max_turn_tokens: int, max_observation_tokens: int | None, stop_strings: Sequence[str],
                 sampling: dict[str, Any], device: torch.device) -> None:
        self.fwd, self.tokenizer, self.device = CachedForward(model), tokenizer, device
        self.prompts, self.envs = [list(p) for p in prompts], list(environments)
        self.budget, self.max_turns, self.pad_id = budget, max_turns, pad_id
        self.max_turn_tokens, self.max_observation_tokens = max_turn_tokens, max_observation_tokens
        self.eos = set(eos_ids)
        self.stop = StopStrings(tokenizer, stop_strings) if stop_strings else None
        self.sampling = sampling
        self.episodes = [_Episode() for _ in prompts]

    def run(self, reuse_cache: bool) -> SampledEpisodes:
        """Decode all running episodes a token at a time; each step feeds every row what came after its last fed
        token (its sampled token, plus the observation when its turn just ended)."""
        running = list(range(len(self.prompts)))
        logits, cache, attention_mask = self._prefill(running)
        kv = reuse_cache and self.gather is not None and _plain_cache(cache)
        next_position = attention_mask.sum(-1)  # [r]
        with ThreadPoolExecutor(max_workers=min(8, len(self.envs))) as pool:
            while running:
                tokens, logps = sample_next_tokens(logits, self.sampling["temperature"], self.sampling["top_k"],
                                        self.sampling["top_p"], self.sampling["min_p"], self.sampling["generator"],
                                        self.sampling["logprob_temperature"])  # [r], [r]
                feeds, ending = [], []
                for row, (e, token, logp) in enumerate(zip(running, tokens.tolist(), logps.tolist())):
                    episode = self.episodes[e]
                    episode.ids.append(token)
                    episode.model.append(True)
                    episode.logps.append(logp)
                    feeds.append([token])
                    if (token in self.eos or self._stopped(episode)
                            or len(episode.ids) >= self.budget
                            or len(episode.ids) - episode.turn_start >= self.max_turn_tokens):
                        ending.append(row)
                finished = self._end_turns([running[row] for row in ending], [feeds[row] for row in ending], pool)
                keep = [row for row, e in enumerate(running) if e not in finished]
                if not keep:
                    break
                running = [running[row] for row in keep]
                feeds = [feeds[row] for row in keep]
                if not kv:  # re-encode the running episodes whenever a turn ended (every step without a cache)
                    if ending or cache is None:
                        logits, cache, attention_mask = self._prefill(running)
                        next_position = attention_mask.sum(-1)
                        continue
                    keep = list(range(len(keep)))
                if len(keep) < len(attention_mask):
                    index = torch.tensor(keep, device=self.device)
                    self.gather(cache, index)
                    attention_mask, next_position = attention_mask[index], next_position[index]
                logits, cache, attention_mask = self._feed(feeds, cache, attention_mask, next_position)
                next_position = next_position + torch.tensor([len(f) for f in feeds], device=self.device)
                if kv and 1.0 - float(attention_mask.float().mean()) > REPACK_WHEN_HOLES:
                    attention_mask = _repack(cache, attention_mask)
        return self._result()

    def _stopped(self, episode: _Episode) -> bool:
        """Whether the current turn ends with a stop string (its own tokens only: an earlier turn's `<call>` is not
        this one's)."""
        return self.stop is not None and bool(self.stop(torch.tensor([episode.ids[episode.turn_start:]]))[0])

    def _prefill(self, running: list[int]) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """Encode the running episodes whole (prompt and everything after it), left-padded; the cache gets room
        for the rest of the budget."""
        sequences = [self.prompts[e] + self.episodes[e].ids for e in running]
        group = _group_size(sequences)  # a group's episodes start alike (GRPO's k per prompt): encoded once
        input_ids, attention_mask = left_pad(sequences[::group], self.pad_id, self.device)
        logits, cache, self.gather = shared_prompt_cache(self.fwd, input_ids, attention_mask, group)
        if cache is None:  # no cache, or one that cannot be gathered by rows: every sequence prefilled
            input_ids, attention_mask = left_pad(sequences, self.pad_id, self.device)
            logits, cache = self.fwd.prefill(input_ids, attention_mask)
            return logits, cache, attention_mask
        # room for the longest remaining budget (holes beyond it make the cache grow)
        preallocate_cache(cache, self.budget - min(len(self.episodes[e].ids) for e in running) + 16)
        return logits.repeat_interleave(group, 0), cache, attention_mask.repeat_interleave(group, 0)

    def _feed(self, feeds: list[list[int]], cache: Any, attention_mask: torch.Tensor, next_position: torch.Tensor
              ) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """Run each row's feed through the model on top of the cache; returns (logits after each row's last fed
        token [r, v], cache, attention mask [r, w + width])."""
        if all(len(f) == 1 for f in feeds):
            tokens = torch.tensor([f[0] for f in feeds], device=self.device)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(feeds), 1))], dim=1)
            logits, cache = self.fwd.step(tokens, attention_mask, next_position, cache)
            return logits, cache, attention_mask
        width = max(len(f) for f in feeds)
        tokens = torch.full((len(feeds), width), self.pad_id, dtype=torch.long, device=self.device)
        real = torch.zeros((len(feeds), width), dtype=torch.long, device=self.device)
        for row, feed in enumerate(feeds):
            tokens[row, :len(feed)] = torch.tensor(feed, device=self.device)
            real[row, :len(feed)] = 1
        positions = next_position[:, None] + torch.arange(width, device=self.device)  # [r, width]
        attention_mask = torch.cat([attention_mask, real], dim=1)
        out = self.fwd.model(input_ids=tokens, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                             **{self.fwd.cache_name: cache}, **self.fwd.extra)
        returned = getattr(out, "cache", None) or getattr(out, "past_key_values", None) or cache
        last = real.sum(-1) - 1  # [r]
        return out.logits[torch.arange(len(feeds), device=self.device), last], returned, attention_mask

    def _end_turns(self, ended: list[int], feeds: list[list[int]], pool: ThreadPoolExecutor) -> set[int]:
        """Give each ended turn to its environment (concurrently: tools may wait on I/O); append observations to
        the episodes and to their rows' feeds. Returns the episodes that are over."""
        if not ended:
            return set()
        texts = [episode_text(self.tokenizer, self.episodes[e].ids[self.episodes[e].turn_start:], self.eos)
                 for e in ended]
        calls_before = [getattr(self.envs[e], "tool_calls", 0) for e in ended]
        answers = list(pool.map(lambda pair: self.envs[pair[0]].step(pair[1]), zip(ended, texts)))
        finished = set()
        for e, feed, before, (observation, reward, done) in zip(ended, feeds, calls_before, answers):
            episode = self.episodes[e]
            episode.rewards.append(float(reward))
            episode.tool_calls.append(getattr(self.envs[e], "tool_calls", 0) - before)
            observed = self._encode(observation)
            if not done and len(episode.ids) + len(observed) >= self.budget:
                episode.truncated = True  # no room for the observation and another model token
            if done or episode.truncated or len(episode.rewards) >= self.max_turns:
                finished.add(e)
                continue
            episode.ids += observed
            episode.model += [False] * len(observed)
            episode.logps += [0.0] * len(observed)
            episode.turn_start = len(episode.ids)
            feed += observed
        return finished

    def _encode(self, observation: str | None) -> list[int]:
        ids = self.tokenizer.encode(observation, add_special_tokens=False) if observation else []
        return ids[:self.max_observation_tokens] if self.max_observation_tokens is not None else ids

    def _result(self) -> SampledEpisodes:
        n, width = len(self.episodes), max(len(e.ids) for e in self.episodes)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        model_mask = torch.zeros((n, width), dtype=torch.bool)
        episode_mask = torch.zeros((n, width), dtype=torch.bool)
        logps = torch.zeros((n, width), dtype=torch.float32)
        for i, episode in enumerate(self.episodes):
            length = len(episode.ids)
            ids[i, :length] = torch.tensor(episode.ids)
            model_mask[i, :length] = torch.tensor(episode.model)
            episode_mask[i, :length] = True
            logps[i, :length] = torch.tensor(episode.logps)
            if length >= self.budget and not episode.truncated:
                episode.truncated = episode.ids[-1] not in self.eos
        truncated = torch.tensor([e.truncated for e in self.episodes])
        rewards = torch.tensor([sum(e.rewards) for e in self.episodes], dtype=torch.float32)
        return SampledEpisodes(ids, model_mask, logps, truncated, episode_mask=episode_mask, rewards=rewards,
                               turn_rewards=[e.rewards for e in self.episodes],
                               tool_calls=[e.tool_calls for e in self.episodes])
