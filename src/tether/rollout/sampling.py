"""Group sampling for online RL: `num_generations` completions per prompt, each prompt encoded once.

`model.generate(num_return_sequences=k)` copies every prompt k times before the first forward pass, so
the prompt is encoded k times, and it keeps computing rows that already ended until the longest is done.
Here the loop is written out:

    1. prefill: the p unique prompts, left-padded, in one forward pass -> KV cache [p, q] and the
       next-token distribution of each prompt
    2. the cache is gathered to [p * k, q] rows (row g repeated k times), so the group shares one
       encoding of its prompt
    3. decode one token per step for the rows still running; a row stops at its first EOS; once a
       quarter of the rows have stopped, they are dropped from the cache (a gather of the running rows),
       so finished rows cost nothing; the loop ends when every row has stopped or at max_new_tokens

Gathering a cache by rows must move every piece of per-row state: keys / values, sliding-window buffers,
convolution and recurrent states of linear-attention / state-space layers, state a cache keeps outside its
layers. transformers has two gathers, `reorder_cache` (beam search's) and `batch_select_indices`; the first
that leaves every batch-shaped tensor of the cache with the new row count is used (checked on the prompt
cache, before decoding). A cache that neither gathers correctly goes the slower path with the same numbers:
each completion's prompt is encoded (n rows prefilled) and finished rows are never dropped (they decode
into a sink row). A model that returns no cache re-reads the whole sequence at every step. MoE models are
called with output_router_logits=False: sampling needs no load-balancing loss, which transformers cannot
compute on a one-token step with the full attention mask.

The log-probability of each sampled token under the policy's own distribution, softmax(logits / T), is
kept, so callers have the behaviour policy's log-probs without another forward pass. It is taken before
the sampling-time processors (top-k / top-p / min-p filtering, repetition penalty, suppressed tokens,
min_new_tokens), exactly as training computes log-probs (TRL's trainers score completions with the plain
softmax at the training temperature too), so an on-policy importance ratio is exactly 1. `logprob_temperature`
sets T when it differs from the sampling temperature (e.g. generation_kwargs overriding it).

Repetition penalty (Keskar et al., 2019, "CTRL", sec. 4.1; as transformers' and vLLM's): every token id
that occurs in the row's prompt or its completion so far has its logit z divided by the penalty when
z > 0 and multiplied by it when z <= 0 (penalty > 1 discourages repeats, < 1 encourages them).

Shapes: p = prompts, k = generations per prompt, n = p * k completions, q = prompt tokens,
c = completion tokens, v = vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

from ..data.collate import pad_with_mask
from ..models.forward import position_ids_from_mask, unwrap_model

# Drop finished rows from the cache once this share of the running batch has finished: compacting costs
# a copy of the cache, so it is done in a few large steps rather than after every finished row.
_COMPACT_WHEN_FINISHED = 0.25


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer whose keys and values live in a buffer with room for the whole completion.

    DynamicLayer appends a token with torch.cat, which copies the layer's whole cache at every step
    (quadratic in the completion length; on CPU it was a third of decoding time). Here a step writes one
    column into the buffer and `keys`/`values` are views of its filled part. [b, heads, length, head_dim].
    """

    @classmethod
    def wrap(cls, layer: DynamicLayer, extra_tokens: int) -> PreallocatedLayer:
        new = cls.__new__(cls)
        new.__dict__.update(layer.__dict__)
        b, h, t, d = layer.keys.shape
        new.key_buffer = layer.keys.new_empty((b, h, t + extra_tokens, d))
        new.value_buffer = layer.values.new_empty((b, h, t + extra_tokens, layer.values.shape[-1]))
        new.key_buffer[:, :, :t] = layer.keys
        new.value_buffer[:, :, :t] = layer.values
        new.length = t
        new._refresh_views()
        return new

    def _refresh_views(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        new_tokens = key_states.shape[-2]
        if self.length + new_tokens > self.key_buffer.shape[2]:  # out of room (multi-turn feeds): grow by half
            room = max(new_tokens, self.key_buffer.shape[2] // 2)
            self.key_buffer = torch.cat([self.key_buffer, self.key_buffer.new_empty(
                (*self.key_buffer.shape[:2], room, self.key_buffer.shape[-1]))], dim=2)
            self.value_buffer = torch.cat([self.value_buffer, self.value_buffer.new_empty(
                (*self.value_buffer.shape[:2], room, self.value_buffer.shape[-1]))], dim=2)
        self.key_buffer[:, :, self.length: self.length + new_tokens] = key_states
        self.value_buffer[:, :, self.length: self.length + new_tokens] = value_states
        self.length += new_tokens
        self._refresh_views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def _gather(self, indices: torch.Tensor) -> None:
        """Keep the batch rows `indices` [r'] (repeats allowed), in that order."""
        indices = indices.to(self.key_buffer.device)
        self.key_buffer = self.key_buffer.index_select(0, indices)
        self.value_buffer = self.value_buffer.index_select(0, indices)
        self._refresh_views()

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self._gather(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._gather(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._gather(torch.arange(self.key_buffer.shape[0], device=self.key_buffer.device).repeat_interleave(repeats))


def preallocate_cache(cache: object, extra_tokens: int) -> None:
    """Give the cache's plain dynamic layers room for `extra_tokens` more (other layer kinds, e.g.
    sliding-window, linear-attention or hybrid ones, keep their own behaviour)."""
    layers = getattr(cache, "layers", None) or []
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.dim() == 4:
            layers[i] = PreallocatedLayer.wrap(layer, extra_tokens)


# ----- cache row gathering ---------------------------------------------------------------------------------------
# The fast path needs one operation on the prompt cache: keep the batch rows `index` (repeats allowed), used to
# repeat each prompt's encoding for its group and to drop finished rows. transformers offers it twice, and neither
# is right for every cache: `reorder_cache` (beam search's contract, kept by every layer kind of cache_utils,
# linear-attention and hybrid layers included) and `batch_select_indices` (missing on linear-attention layers,
# silently partial on hybrid ones, overridden by caches holding state outside their layers). So each candidate is
# checked after use: every batch-shaped tensor the cache holds must have the new batch size. A cache that passes
# neither check is not gathered at all: its prompts are encoded once per completion and no row is dropped.
_GATHERERS = (
    ("reorder_cache", lambda cache, index: cache.reorder_cache(index)),
    ("batch_select_indices", lambda cache, index: cache.batch_select_indices(index)),
)


def _state_tensors(obj: object, depth: int = 0, seen: set[int] | None = None) -> list[torch.Tensor]:
    """The tensors of >= 2 dims a cache holds: in its attributes, its layers' attributes, and lists / dicts of
    those (per-row state always has a batch dimension and a feature one; scalars and counters are skipped)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 4:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.dim() >= 2 else []
    if isinstance(obj, (list, tuple)):
        items = list(obj)
    elif isinstance(obj, dict):
        items = list(obj.values())
    elif hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
        items = list(vars(obj).values())
    else:
        return []
    return [t for item in items for t in _state_tensors(item, depth + 1, seen)]


def _batch_sizes_match(cache: object, old_rows: int, new_rows: int) -> bool:
    """After gathering `old_rows` -> `new_rows` (different) rows: no state tensor still has `old_rows` rows.
    Conservative: a non-batch tensor that happens to be `old_rows` long fails it, which only costs speed."""
    return all(t.shape[0] != old_rows for t in _state_tensors(cache)) and any(
        t.shape[0] == new_rows for t in _state_tensors(cache))


def _try_gather(cache: object, index: torch.Tensor, old_rows: int, name: str, gather: Any) -> bool:
    """Apply one gatherer; True if it exists, ran, and left every state tensor with len(index) rows. On
    False the cache may be half-gathered: the caller must not use it."""
    if not callable(getattr(cache, name, None)):
        return False
    try:
        gather(cache, index)
    except (AttributeError, NotImplementedError, RuntimeError, IndexError, TypeError):
        return False
    return _batch_sizes_match(cache, old_rows, len(index))


@dataclass
class SampledGroups:
    """n = prompts x num_generations completions, grouped: rows [g * k, (g + 1) * k) answer prompt g.

    completion_ids [n, c] right-padded with pad_token_id; completion_mask [n, c] True at real tokens (an
    EOS that ended a row is real and last); logps [n, c] float32 log-probs of the sampled tokens exactly as
    the trainer computes them, softmax(logits / temperature) of the same model, 0 at padding (None from
    samplers that cannot provide those, e.g. vLLM); truncated [n] True where the row hit max_new_tokens
    without an EOS; sampler_logps [n, c]: the log-probs another engine (vLLM) reported for the tokens it
    sampled, which may differ from the trainer's (other kernels, precision, processed logits): the input of
    the truncated importance-sampling correction (`losses.group.sampler_importance_weights`); NaN where the
    engine gave none, 0 at padding.
    """

    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logps: torch.Tensor | None
    truncated: torch.Tensor
    sampler_logps: torch.Tensor | None = None


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """logits [b, v] with the tokens outside the top-k, outside the top-p nucleus (Holtzman et al.,
    2020), or below min_p times the most likely token's probability set to -inf. 0 / 1.0 / 0.0 disable
    each filter. The most likely token always survives."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [b, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [b, v]
        probs = sorted_logits.softmax(-1)
        # Keep a token if the mass strictly before it is below top_p: the nucleus plus the token crossing it.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def penalize_repetitions(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [b, v] with each seen token's (seen [b, v] bool) logit z replaced by z / penalty if z > 0
    else z * penalty (CTRL's repetition penalty, as transformers' RepetitionPenaltyLogitsProcessor)."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def sample_next_tokens(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float,
                       generator: torch.Generator | None, logprob_temperature: float | None = None,
                       seen: torch.Tensor | None = None, repetition_penalty: float = 1.0,
                       banned: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [b, v] -> (tokens [b], their log-probs [b] under softmax(logits / T_logprob)).

    T_logprob = logprob_temperature, default the sampling temperature (1 when greedy). The token is drawn
    from the processed distribution: repetition penalty on `seen` [b, v], `banned` ([v] or [b, v] bool)
    tokens removed, / temperature, top-k / top-p / min-p. temperature 0 is greedy decoding."""
    raw = logits.float()
    logprob_t = logprob_temperature if logprob_temperature is not None else (temperature if temperature > 0 else 1.0)
    log_probs = (raw / logprob_t).log_softmax(-1)  # [b, v]
    processed = raw if seen is None else penalize_repetitions(raw, seen, repetition_penalty)
    if banned is not None:
        processed = processed.masked_fill(banned, float("-inf"))
    if temperature <= 0:
        tokens = processed.argmax(-1)
    else:
        probs = filter_logits(processed / temperature, top_k, top_p, min_p).softmax(-1)  # [b, v]
        # Inverse-CDF sampling: one uniform number per row instead of torch.multinomial's per-token work
        # (several times faster on CPU). The clamp guards against u landing past a rounded-down total.
        cdf = probs.cumsum(-1)  # [b, v]
        u = torch.rand((probs.shape[0], 1), generator=generator, device=probs.device) * cdf[:, -1:]
        tokens = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)
    return tokens, log_probs.gather(-1, tokens[:, None]).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int] | torch.Tensor], pad_token_id: int, device: torch.device | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists (or 1-D tensors) -> (input_ids, attention_mask) [b, q], padded on the left so every
    row's next token is at the same column."""
    input_ids, mask = pad_with_mask(prompts, pad_token_id, left=True)
    return input_ids.to(device), mask.long().to(device)


def supports_group_sampling(model: nn.Module) -> bool:
    """Decoder-only transformers models with a KV cache; others go through `model.generate`."""
    inner = unwrap_model(model)
    config = getattr(inner, "config", None)
    return (config is not None and not getattr(config, "is_encoder_decoder", False)
            and hasattr(inner, "get_decoder") and getattr(inner, "_supports_cache_class", True) is not False)


@torch.no_grad()
def sample_groups(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    num_generations: int,
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_ids: Sequence[int],
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float | None = 0.0,
    generator: torch.Generator | None = None,
    repetition_penalty: float = 1.0,
    logprob_temperature: float | None = None,
    suppress_tokens: Sequence[int] | None = None,
    min_new_tokens: int = 0,
    stop_check: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> SampledGroups:
    """Sample `num_generations` completions for each prompt (lists of token ids), see the module docstring.

    `model` is a decoder-only causal LM (or a PEFT / value-head wrapper of one); it runs in eval mode and
    is put back in its previous mode. repetition_penalty: see the module docstring (1.0: off);
    suppress_tokens: ids never sampled; min_new_tokens: no EOS before that many tokens; min_p None: off.
    stop_check(ids [r, s]) -> bool [r]: called after each step with the running rows' completions so far; a
    row it marks ends there, like at an EOS (and is not `truncated`), e.g. at a stop string
    (`rollout.generation.StopStrings`).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("sample_groups needs at least one prompt, and every prompt needs at least one token.")
    if max_new_tokens < 1 or num_generations < 1:
        raise ValueError(f"max_new_tokens and num_generations must be >= 1, got {max_new_tokens}, {num_generations}.")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1.0: off), got {repetition_penalty}.")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    settings = _Processors(temperature, top_k, top_p, min_p or 0.0, repetition_penalty, logprob_temperature,
                           list(suppress_tokens or []), int(min_new_tokens or 0), stop_check)
    try:
        # The transformers model itself (adapters stay injected): a value-head wrapper returns a tuple.
        return _sample_loop(unwrap_model(model), prompts, num_generations, max_new_tokens, pad_token_id,
                            list(eos_token_ids), settings, generator, device)
    finally:
        model.train(was_training)


@dataclass
class _Processors:
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    logprob_temperature: float | None
    suppress_tokens: list[int]
    min_new_tokens: int
    stop_check: Callable[[torch.Tensor], torch.Tensor] | None = None


class CachedForward:
    """Calls of the transformers model with the argument names its forward takes: the cache is `cache` in
    transformers 5.x (`past_key_values` before); MoE models get output_router_logits=False, because their
    load-balancing loss cannot be computed on a one-token decoding step with the full attention mask (and
    sampling needs only logits)."""

    def __init__(self, model: nn.Module) -> None:
        import inspect

        self.model = model
        params = inspect.signature(model.forward).parameters
        self.cache_name = "cache" if "cache" in params else "past_key_values"
        self.extra: dict[str, Any] = {"output_router_logits": False} if "output_router_logits" in params else {}
        self.last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, use_cache: bool = True
                ) -> tuple[torch.Tensor, Any]:
        """[b, t] left-padded -> (next-token logits [b, v], the cache or None if the model keeps none)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids_from_mask(attention_mask), use_cache=use_cache,
                         **self.last_only, **self.extra)
        cache = getattr(out, "cache", None) if use_cache else None
        if cache is None and use_cache:
            cache = getattr(out, "past_key_values", None)
        return out.logits[:, -1], cache

    def step(self, tokens: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor, cache: Any
             ) -> tuple[torch.Tensor, Any]:
        """One token per row, tokens [r], attention_mask [r, t], positions [r] -> (logits [r, v], cache)."""
        out = self.model(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=positions[:, None],
                         use_cache=True, **{self.cache_name: cache}, **self.extra)
        returned = getattr(out, "cache", None)
        if returned is None:
            returned = getattr(out, "past_key_values", None)
        return out.logits[:, -1], cache if returned is None else returned


def shared_prompt_cache(fwd: CachedForward, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int
                        ) -> tuple[torch.Tensor, Any, Any]:
    """Encode the p unique prompts [p, q] once and gather the cache to [p * k] rows.

    Returns (logits [p, v], cache with p * k rows, gatherer) or (logits, None, None) when the cache cannot
    be gathered (or the model keeps none). For k = 1 the gatherer is still checked, by a probe that adds and
    removes a row, because decoding uses it to drop finished rows."""
    p = input_ids.shape[0]
    logits, cache = fwd.prefill(input_ids, attention_mask)
    if cache is None:
        return logits, None, None
    rows = torch.arange(p, device=input_ids.device)
    index = rows.repeat_interleave(k) if k > 1 else torch.cat([rows, rows[:1]])
    for attempt, (name, gather) in enumerate(_GATHERERS):
        if attempt:  # the previous candidate may have left the cache half-gathered
            logits, cache = fwd.prefill(input_ids, attention_mask)
        if _try_gather(cache, index, p, name, gather):
            if k == 1:
                gather(cache, rows)
            return logits, cache, gather
    return logits, None, None


def _sample_loop(model: nn.Module, prompts: Sequence[Sequence[int]], k: int, max_new_tokens: int,
                 pad_token_id: int, eos_token_ids: list[int], settings: _Processors,
                 generator: torch.Generator | None, device: torch.device) -> SampledGroups:
    fwd = CachedForward(model)
    input_ids, attention_mask = left_pad(prompts, pad_token_id, device)  # [p, q]
    logits, cache, gather = shared_prompt_cache(fwd, input_ids, attention_mask, k)
    input_ids = input_ids.repeat_interleave(k, dim=0)  # [n, q]
    attention_mask = attention_mask.repeat_interleave(k, dim=0)  # [n, q]
    if gather is not None:  # fast path: each group shares its prompt's encoding
        logits = logits.repeat_interleave(k, dim=0)  # [n, v]
    else:
        # The cache cannot be gathered by rows: encode each completion's prompt (same numbers, k times the
        # prefill work) and never drop finished rows from it. A model that keeps no cache at all re-reads
        # the whole sequence at every step (sequence below).
        logits, cache = fwd.prefill(input_ids, attention_mask)  # [n, v]; cache None if the model keeps none
    sequence = input_ids if cache is None else None  # [r, q + step]: only without a cache
    if cache is not None:
        preallocate_cache(cache, max_new_tokens)
    can_compact = gather is not None or cache is None
    next_position = attention_mask.sum(-1)  # [n]: position of the first completion token

    n, vocab = len(prompts) * k, logits.shape[-1]
    # One extra row, n, is a sink: rows that ended but are still in the cache (until the next compaction)
    # keep decoding, and their tokens are written there and dropped.
    completion_ids = torch.full((n + 1, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logps = torch.zeros((n + 1, max_new_tokens), dtype=torch.float32, device=device)
    lengths = torch.full((n + 1,), max_new_tokens, dtype=torch.long, device=device)  # rows without an EOS
    eos = torch.tensor(eos_token_ids, dtype=torch.long, device=device)
    running = torch.arange(n, device=device)  # output row of each cache row; n once it has ended
    stopped = torch.zeros(n + 1, dtype=torch.bool, device=device)  # ended by stop_check
    seen = None  # [n + 1, v] bool: token ids in each row's prompt and completion so far (repetition penalty)
    if settings.repetition_penalty != 1.0:
        seen = torch.zeros((n + 1, vocab), dtype=torch.bool, device=device)
        for g, prompt in enumerate(prompts):  # real prompt tokens only, never the left padding
            seen[g * k:(g + 1) * k, torch.as_tensor(list(prompt), dtype=torch.long, device=device)] = True
    banned = torch.zeros(vocab, dtype=torch.bool, device=device)  # [v]
    banned[[t for t in settings.suppress_tokens if 0 <= t < vocab]] = True
    banned_before_min = banned.clone()
    banned_before_min[eos[eos < vocab]] = True

    for step in range(max_new_tokens):
        tokens, token_logps = sample_next_tokens(
            logits, settings.temperature, settings.top_k, settings.top_p, settings.min_p, generator,
            settings.logprob_temperature, None if seen is None else seen[running], settings.repetition_penalty,
            banned_before_min if step < settings.min_new_tokens else (banned if settings.suppress_tokens else None),
        )  # [r], [r]
        completion_ids[running, step] = tokens
        logps[running, step] = token_logps
        if seen is not None:
            seen[running, tokens] = True
        ended = torch.isin(tokens, eos) & (running < n)  # [r]
        if settings.stop_check is not None:
            live = (running < n).nonzero().squeeze(-1)  # [r']
            hits = settings.stop_check(completion_ids[running[live], : step + 1]).to(device)  # [r']
            ended[live[hits]] = True
            stopped[running[live[hits]]] = True
        lengths[running[ended]] = step + 1
        running = torch.where(ended, n, running)
        alive = running < n  # [r]
        if step + 1 == max_new_tokens or not bool(alive.any()):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(running), 1))], dim=1)
        if sequence is not None:
            sequence = torch.cat([sequence, tokens[:, None]], dim=1)
        if can_compact and 1.0 - float(alive.float().mean()) >= _COMPACT_WHEN_FINISHED:
            keep = alive.nonzero().squeeze(-1)  # [r']
            if cache is not None:
                gather(cache, keep)
            else:
                sequence = sequence[keep]
            running, tokens, attention_mask, next_position = (
                running[keep], tokens[keep], attention_mask[keep], next_position[keep])
        if cache is None:
            logits, _ = fwd.prefill(sequence, attention_mask, use_cache=False)
        else:
            logits, cache = fwd.step(tokens, attention_mask, next_position, cache)  # [r, v]
        next_position = next_position + 1

    completion_ids, logps, lengths = completion_ids[:n], logps[:n], lengths[:n]
    width = int(lengths.max())
    completion_mask = torch.arange(width, device=device)[None, :] < lengths[:, None]  # [n, c]
    completion_ids = completion_ids[:, :width].masked_fill(~completion_mask, pad_token_id)
    logps = logps[:, :width].masked_fill(~completion_mask, 0.0)
    last_token = completion_ids.gather(1, (lengths - 1)[:, None]).squeeze(1)  # [n]
    return SampledGroups(completion_ids, completion_mask, logps,
                         truncated=~torch.isin(last_token, eos) & ~stopped[:n])


# generation_kwargs keys tether's sampler honours: transformers GenerationConfig names, with vLLM SamplingParams
# spellings of the same settings as aliases (TRL passes the dict to whichever engine generates).
_GENERATION_KWARG_ALIASES = {
    "temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
    "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_new_tokens", "max_tokens": "max_new_tokens",
    "min_new_tokens": "min_new_tokens", "min_tokens": "min_new_tokens", "suppress_tokens": "suppress_tokens",
    "eos_token_id": "eos_token_ids", "stop_token_ids": "eos_token_ids", "do_sample": "do_sample",
}


def sampling_settings(generation_kwargs: dict[str, Any] | None, **defaults: Any) -> dict[str, Any]:
    """The sampler's settings: `defaults` (temperature, top_k, top_p, min_p, repetition_penalty,
    max_new_tokens, eos_token_ids, ...) overridden by `generation_kwargs` (TRL's config field, whose keys win
    over the dedicated fields). do_sample=False means greedy (temperature 0); top_k None means 0 (off), min_p
    None 0 (off). A key the sampler cannot honour is a ValueError naming it."""
    kwargs = dict(generation_kwargs or {})
    unknown = sorted(set(kwargs) - set(_GENERATION_KWARG_ALIASES))
    if unknown:
        raise ValueError(
            f"generation_kwargs has keys tether's sampler does not implement: {unknown}. Supported: "
            f"{sorted(_GENERATION_KWARG_ALIASES)}. Fix: remove them, or use use_vllm=True, where generation_kwargs "
            "go to vLLM's SamplingParams.")
    settings = dict(defaults)
    for key, value in kwargs.items():
        settings[_GENERATION_KWARG_ALIASES[key]] = value
    if settings.pop("do_sample", True) is False:
        settings["temperature"] = 0.0
    if "eos_token_ids" in settings and not isinstance(settings["eos_token_ids"], (list, tuple)):
        settings["eos_token_ids"] = [settings["eos_token_ids"]]
    if "top_k" in settings:
        settings["top_k"] = int(settings["top_k"] or 0)
    if "min_p" in settings:
        settings["min_p"] = float(settings["min_p"] or 0.0)
    return settings
