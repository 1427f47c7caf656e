"""Best-of-n sampling (TRL's `BestOfNSampler`): sample n responses per query, score them, keep the best.

An alternative to RL fine-tuning for getting better outputs from a fixed model: for each query,
`sample_size` responses are sampled in one batch through `generate_responses` (tether's KV-cached sampler
for plain sampling settings, the model's `generate` otherwise), decoded, scored by `queries_to_scores`,
and the `n_candidates` highest-scoring texts are returned.

Shapes: q = query tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, set_seed

from ..models.loading import is_peft_model
from ..models.value_head import PreTrainedModelWrapper
from .generation import generate_responses

Query = torch.Tensor | Sequence[int]


class BestOfNSampler:
    """`BestOfNSampler(model, tokenizer, queries_to_scores, length_sampler, sample_size=4, seed=None,
    n_candidates=1, generation_config=None)`, as in TRL 0.7.

    model: a value-head model (`PreTrainedModelWrapper`), a transformers LM or a PEFT model.
    queries_to_scores: texts -> one score per text (e.g. a sentiment pipeline's score); it is called once per
        query with that query's `sample_size` texts, each the decoded query and response (for an
        encoder-decoder model, the decoded response alone), as TRL's sampler passed them.
    length_sampler: draws `max_new_tokens` (e.g. `LengthSampler(4, 16)`), once per query; None when
        `max_new_tokens` is given in `generation_config` or to `generate`.
    seed: if given, seeds python, numpy and torch now (`set_seed`), so a run's samples repeat.
    generation_config: defaults for sampling (do_sample, top_k, temperature, ...); keyword arguments of
        `generate` override it.
    """

    def __init__(
        self,
        model: PreTrainedModelWrapper | PreTrainedModel | nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        queries_to_scores: Callable[[list[str]], Sequence[float]],
        length_sampler: Callable[[], int] | None,
        sample_size: int = 4,
        seed: int | None = None,
        n_candidates: int = 1,
        generation_config: GenerationConfig | None = None,
    ) -> None:
        if not isinstance(model, (PreTrainedModelWrapper, PreTrainedModel)) and not is_peft_model(model):
            raise ValueError(f"model must be a value-head model (PreTrainedModelWrapper), a transformers PreTrainedModel "
                             f"or a PEFT model, got {type(model).__name__}.")
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise ValueError(f"tokenizer must be a transformers tokenizer (PreTrainedTokenizer or "
                             f"PreTrainedTokenizerFast), got {type(tokenizer).__name__}.")
        if not callable(queries_to_scores):
            raise ValueError("queries_to_scores must be callable: a list of texts -> one score per text.")
        if length_sampler is not None and not callable(length_sampler):
            raise ValueError("length_sampler must be callable (e.g. LengthSampler(4, 16)) or None.")
        if not isinstance(sample_size, int) or sample_size < 1:
            raise ValueError(f"sample_size must be a positive integer, got {sample_size!r}.")
        if not isinstance(n_candidates, int) or not 1 <= n_candidates <= sample_size:
            raise ValueError(f"n_candidates must be between 1 and sample_size={sample_size}, got {n_candidates!r}.")
        if generation_config is not None and not isinstance(generation_config, GenerationConfig):
            raise ValueError(f"generation_config must be a transformers GenerationConfig, got "
                             f"{type(generation_config).__name__}.")
        if seed is not None:
            set_seed(seed)
        self.model = model
        self.tokenizer = tokenizer
        self.queries_to_scores = queries_to_scores
        self.length_sampler = length_sampler
        self.sample_size = sample_size
        self.n_candidates = n_candidates
        self.gen_config = generation_config

    def generate(self, tokenized_query: Query | Sequence[Query], skip_special_tokens: bool = True,
                 device: str | torch.device | None = None, **generation_kwargs: Any) -> list[list[str]]:
        """The `n_candidates` best texts for each query, best first (ties keep sampling order).

        tokenized_query: one query (a 1-D tensor or a list of ids) or several (a list of those, or a 2-D
        tensor of unpadded rows). generation_kwargs: `generate` arguments (do_sample, top_k, top_p,
        temperature, pad_token_id, eos_token_id, max_new_tokens, ...), over `generation_config`.
        """
        queries = _as_queries(tokenized_query)
        if device is not None:
            queries = [query.to(device) for query in queries]
        settings = _config_settings(self.gen_config)
        settings.update(generation_kwargs)
        if self.length_sampler is None and "max_new_tokens" not in settings:
            raise ValueError("Give length_sampler= to BestOfNSampler, or max_new_tokens in generation_config or to "
                             "generate(): the responses need a length.")
        pad_token_id = settings.pop("pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
                else self.tokenizer.eos_token_id
        if pad_token_id is None:
            raise ValueError("The tokenizer has neither a pad nor an EOS token; pass pad_token_id= to generate().")
        encoder_decoder = bool(getattr(self.model.config, "is_encoder_decoder", False))
        # Each query's sample_size copies form one batch: one max_new_tokens draw per query, as TRL drew it.
        repeated = [query for query in queries for _ in range(self.sample_size)]
        outputs = generate_responses(self.model, repeated, pad_token_id, batch_size=self.sample_size,
                                     return_prompt=not encoder_decoder, length_sampler=self.length_sampler,
                                     **settings)
        texts = self.tokenizer.batch_decode([output.tolist() for output in outputs],
                                            skip_special_tokens=skip_special_tokens)
        best = []
        for start in range(0, len(texts), self.sample_size):
            group = texts[start:start + self.sample_size]
            scores = _scores(self.queries_to_scores(group), len(group))
            order = torch.sort(scores, descending=True, stable=True).indices[: self.n_candidates]
            best.append([group[i] for i in order.tolist()])
        return best


def _as_queries(tokenized_query: Query | Sequence[Query]) -> list[torch.Tensor]:
    """One query or several, as a list of 1-D long tensors [q]."""
    if isinstance(tokenized_query, torch.Tensor):
        if tokenized_query.dim() not in (1, 2):
            raise ValueError(f"A tensor of queries must be 1-D (one query) or 2-D (one per row), got shape "
                             f"{tuple(tokenized_query.shape)}.")
        rows = [tokenized_query] if tokenized_query.dim() == 1 else list(tokenized_query)
    elif isinstance(tokenized_query, Sequence) and tokenized_query and isinstance(tokenized_query[0], int):
        rows = [torch.tensor(tokenized_query)]
    elif isinstance(tokenized_query, Sequence) and tokenized_query:
        rows = [torch.as_tensor(query) for query in tokenized_query]
    else:
        raise ValueError("tokenized_query must be a non-empty list of token ids, a tensor, or a list of those.")
    for i, row in enumerate(rows):
        if row.dim() != 1 or row.numel() == 0 or row.is_floating_point():
            raise ValueError(f"Query {i} must be a non-empty 1-D sequence of token ids, got shape {tuple(row.shape)} "
                             f"({row.dtype}).")
    return [row.long() for row in rows]


def _config_settings(config: GenerationConfig | None) -> dict[str, Any]:
    """The settings a GenerationConfig changes from the defaults, as generate() keyword arguments."""
    if config is None:
        return {}
    return {k: v for k, v in config.to_diff_dict().items() if k != "transformers_version" and not k.startswith("_")}


def _scores(values: Sequence[Any], expected: int) -> torch.Tensor:
    """queries_to_scores' output as a float tensor [expected]."""
    try:
        scores = [torch.as_tensor(value, dtype=torch.float32) for value in values]
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"queries_to_scores must return one number per text ({error}).") from error
    if len(scores) != expected or any(score.numel() != 1 for score in scores):
        raise ValueError(f"queries_to_scores must return one number per text: got {len(scores)} values "
                         f"for {expected} texts.")
    return torch.stack([score.reshape(()) for score in scores])
