"""Sampling responses: batched, KV-cached, each sequence stopping at EOS and the batch when all have.

Decoder-only models with plain sampling or greedy settings go through tether's sampler
(`rollout.sampling.sample_groups`: preallocated KV cache, finished rows dropped from the batch); any
other generate() argument (beam search, repetition penalty, ...) and encoder-decoder models go through
the model's own `generate`, with queries left-padded into one batch. Returned responses drop the padding
and everything after the first EOS (the EOS itself is kept), or after the first stop string (`stop_strings`,
kept too: TRL 0.7's TextEnvironment stops at `<call>`). An encoder-decoder model's `generate`
returns decoder tokens only: its responses are those, starting with the decoder start token, and never
carry the prompt.

Shapes: b = batch, q = query tokens, r = response tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..models.forward import unwrap_model
from .sampling import left_pad, sample_groups, supports_group_sampling


def truncate_after_eos(response: torch.Tensor, eos_token_ids: Sequence[int]) -> torch.Tensor:
    """response [r] cut after its first EOS (kept), if any."""
    if not eos_token_ids:
        return response
    is_eos = torch.isin(response, torch.tensor(list(eos_token_ids), device=response.device))
    hits = is_eos.nonzero()
    return response[: int(hits[0]) + 1] if len(hits) else response


def eos_token_ids(model: nn.Module, generation_kwargs: dict[str, Any] | None = None) -> list[int]:
    """The ids that end a response: generate()'s `eos_token_id` argument if given, else the model's
    generation_config's (one id or several)."""
    eos = (generation_kwargs or {}).get("eos_token_id")
    if eos is None:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]


class StopStrings:
    """Ends a response once its text contains one of `strings` (a stop string may span several tokens, so the
    text is decoded). Called with the sampled ids of running rows [r, s], it returns which end at their last
    token (bool [r]): only the last few tokens are decoded, enough to hold the longest string, since a
    string that completed earlier would have ended the row then. A string that is one of the tokenizer's added
    tokens (e.g. a special `<call>`) is split out of any text before tokenizing, so it is always that one token:
    it is matched by id, with no decoding. `cut` trims a finished response instead."""

    def __init__(self, tokenizer: Any, strings: Sequence[str]) -> None:
        if tokenizer is None or not strings or not all(strings):
            raise ValueError("stop strings need the tokenizer and non-empty strings.")
        self.tokenizer, self.strings = tokenizer, list(strings)
        added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
        self.token_ids = torch.tensor(sorted({added[s] for s in self.strings if s in added}), dtype=torch.long)
        self.decoded = [s for s in self.strings if s not in added]
        # Every token decodes to at least one character; one more for a string that starts inside a token.
        self.window = max((len(text) for text in self.decoded), default=0) + 1

    def _contains(self, text: str) -> bool:
        return any(stop in text for stop in self.strings)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        hits = torch.isin(ids[:, -1].cpu(), self.token_ids)  # [r]
        if self.decoded:
            tails = self.tokenizer.batch_decode(ids[:, -self.window:].tolist())
            hits |= torch.tensor([any(stop in tail for stop in self.decoded) for tail in tails], dtype=torch.bool)
        return hits

    def cut(self, response: torch.Tensor) -> torch.Tensor:
        """response [r] cut after the token that completes the first stop string (kept), if any."""
        if not self._contains(self.tokenizer.decode(response.tolist())):
            return response
        low, high = 1, len(response)  # the shortest prefix whose text holds a stop string, by bisection
        while low < high:
            middle = (low + high) // 2
            if self._contains(self.tokenizer.decode(response[:middle].tolist())):
                high = middle
            else:
                low = middle + 1
        return response[:low]


@torch.no_grad()
def generate_responses(
    model: nn.Module,
    queries: Sequence[torch.Tensor],
    pad_token_id: int,
    batch_size: int = 16,
    return_prompt: bool = False,
    length_sampler: Callable[[], int] | None = None,
    stop_strings: Sequence[str] | None = None,
    tokenizer: Any = None,
    **generation_kwargs: Any,
) -> list[torch.Tensor]:
    """One response per query (a list of 1-D tensors on the queries' device), `batch_size` at a time.

    `length_sampler()` (e.g. a LengthSampler) draws max_new_tokens per batch; generation_kwargs go to
    `model.generate` (do_sample, top_k, top_p, temperature, max_new_tokens, eos_token_id, ...).
    `stop_strings` (with the `tokenizer` to decode) end a response like an EOS does.
    """
    if not queries:
        raise ValueError("No queries to generate from.")
    for i, query in enumerate(queries):
        if query.dim() != 1 or len(query) == 0:
            raise ValueError(f"Query {i} must be a non-empty 1-D tensor of token ids, got shape {tuple(query.shape)}.")
    device = next(model.parameters()).device
    eos_ids = eos_token_ids(model, generation_kwargs)
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    if encoder_decoder and return_prompt:
        raise ValueError("return_prompt=True needs a decoder-only model: an encoder-decoder's response "
                         "does not continue its prompt.")
    if generation_kwargs.get("min_length") is not None and generation_kwargs["min_length"] <= 0:
        generation_kwargs = {k: v for k, v in generation_kwargs.items() if k != "min_length"}  # TRL's -1: no minimum
    stop = StopStrings(tokenizer, stop_strings) if stop_strings else None
    was_training = model.training
    model.eval()
    outputs: list[torch.Tensor] = []
    for start in range(0, len(queries), batch_size):
        chunk = queries[start:start + batch_size]
        kwargs = dict(generation_kwargs)
        if length_sampler is not None:
            kwargs["max_new_tokens"] = length_sampler()
        sampler_settings = None if encoder_decoder else _sampler_settings(model, kwargs)
        if sampler_settings is not None:  # tether's sampler: same distribution, less work (see rollout.sampling)
            sampled = sample_groups(model, [q.tolist() for q in chunk], 1, kwargs["max_new_tokens"], pad_token_id,
                                    eos_ids, stop_check=stop, **sampler_settings)
            for query, ids, mask in zip(chunk, sampled.completion_ids, sampled.completion_mask):
                response = ids[mask].to(query.device)
                outputs.append(torch.cat([query, response]) if return_prompt else response)
            continue
        input_ids, attention_mask = left_pad(chunk, pad_token_id)
        kwargs.setdefault("pad_token_id", pad_token_id)
        if stop is not None:  # generate() stops each row at a stop string; the rest of its row is padding
            kwargs.update(stop_strings=stop.strings, tokenizer=tokenizer)
        generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                   **kwargs)  # [b, width + r]; [b, r] for an encoder-decoder
        new_tokens = generated if encoder_decoder else generated[:, input_ids.shape[1]:]  # [b, r]
        for query, row in zip(chunk, new_tokens):
            # A row that ended early is padded after its EOS; one that did not end has no padding.
            response = truncate_after_eos(row, eos_ids)
            response = response if stop is None else stop.cut(response)
            outputs.append(torch.cat([query.to(device), response]) if return_prompt else response)
    model.train(was_training)
    return outputs


# generate() arguments tether's sampler implements with the same meaning; any other one (beam search,
# repetition penalty, min_new_tokens, ...) goes to `model.generate`.
_SAMPLER_ARGUMENTS = {"do_sample", "temperature", "top_k", "top_p", "min_p", "max_new_tokens", "eos_token_id",
                      "pad_token_id"}


def _sampler_settings(model: nn.Module, generation_kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """sample_groups settings equivalent to these generate() arguments, or None when only `model.generate`
    can honour them. Unset sampling knobs take the model's generation_config values, as generate() does."""
    if set(generation_kwargs) - _SAMPLER_ARGUMENTS or "max_new_tokens" not in generation_kwargs:
        return None
    if not supports_group_sampling(model):
        return None
    defaults = getattr(model, "generation_config", None) or getattr(unwrap_model(model), "generation_config", None)
    do_sample = generation_kwargs.get("do_sample", getattr(defaults, "do_sample", False))
    if not do_sample:
        return {"temperature": 0.0}

    def knob(name: str, off: float) -> Any:
        value = generation_kwargs.get(name, getattr(defaults, name, None))
        return off if value is None else value

    return {"temperature": knob("temperature", 1.0), "top_k": int(knob("top_k", 0)), "top_p": knob("top_p", 1.0),
            "min_p": knob("min_p", 0.0)}


def respond_to_batch(model: nn.Module, queries: torch.Tensor, txt_len: int = 20, top_k: int = 0,
                     top_p: float = 1.0) -> torch.Tensor:
    """Sample exactly `txt_len` tokens after each query (TRL's classic helper): [b, q] -> [b, txt_len].

    Sampling ignores EOS so every row has the same length; top_k=0 and top_p=1.0 mean no filtering.
    """
    device = next(model.parameters()).device
    queries = queries.to(device)
    with torch.no_grad():
        out = model.generate(input_ids=queries, attention_mask=torch.ones_like(queries), do_sample=True,
                             top_k=top_k, top_p=top_p, max_new_tokens=txt_len, min_new_tokens=txt_len,
                             pad_token_id=getattr(model.config, "pad_token_id", None) or 0)
    return out[:, queries.shape[1]:]
