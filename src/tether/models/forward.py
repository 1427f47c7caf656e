"""Run a language model and return per-token log-probs of the tokens that count, nothing more.

The LM head is applied by `ops.logprobs` to the final hidden states of the positions selected by the
loss mask only (no prompt, no padding), in chunks. Models whose head cannot be split off safely (a
wrapped or quantized head, soft-capped or scaled logits, seq2seq heads) take the full-logits path,
which gives the same numbers.

`cast_lm_head_to_fp32` keeps a model's LM head in float32 (ScaleRL); every path here then computes float32
logits from the hidden states cast up to the head's dtype.

Shapes: b = batch, t = tokens, h = hidden, n = selected target tokens, s = sequences.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from ..ops.logprobs import (
    DEFAULT_CHUNK_SIZE,
    TokenStats,
    entropy_from_logits,
    linear_cross_entropy,
    linear_entropy,
    linear_log_probs,
    log_probs_from_logits,
)

# Config fields that change logits after the head; where set, the head cannot be applied on its own.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP/compile/value-head/PEFT wrappers (PEFT layers stay injected)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "pretrained_model", model)  # AutoModelFor...WithValueHead
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


@lru_cache(maxsize=64)
def _forward_parameters(model_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)


def accepts_argument(model: nn.Module, name: str) -> bool:
    """Whether the transformers model inside any wrappers takes `name` in its forward."""
    return name in _forward_parameters(type(unwrap_model(model)))


def splittable_head(model: nn.Module) -> nn.Linear | None:
    """The plain linear LM head when logits == head(final hidden state) exactly, else None."""
    inner = unwrap_model(model)
    if getattr(inner.config, "is_encoder_decoder", False):
        return None
    if not accepts_argument(inner, "logits_to_keep"):
        return None
    if any(getattr(inner.config, name, None) not in (None, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    head = inner.get_output_embeddings()
    return head if type(head) is nn.Linear and _holds_full_weight(head) else None


def _holds_full_weight(head: nn.Linear) -> bool:
    """False when the head's weight is sharded: DeepSpeed ZeRO-3 leaves an empty placeholder (with a
    `ds_id`) and FSDP2 a DTensor, gathered only while the head's own forward runs; reading `head.weight`
    from outside would see a shard, so such models take the full-logits path."""
    weight = head.weight
    return (not hasattr(weight, "ds_id") and type(weight).__name__ != "DTensor"
            and tuple(weight.shape) == (head.out_features, head.in_features))


def cast_lm_head_to_fp32(model: nn.Module) -> None:
    """Keep the LM head's parameters in float32 and compute its logits in float32 (ScaleRL, Khatri et al.,
    2025, "The Art of Scaling RL Compute", sec. 4: float32 logits reduce the training/inference mismatch).
    The head takes its input cast to float32; when the head shares its weight with the input embeddings
    (tied), the embeddings' output is cast back to the model's dtype so the layers see what they expect.
    A PEFT adapter on the head is an error (its base weight would be cast under the adapter's feet)."""
    inner = unwrap_model(model)
    head = inner.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"cast_lm_head_to_fp32=True: {type(inner).__name__} has no LM head with a weight to cast.")
    if type(head) is not nn.Linear:
        raise ValueError("cast_lm_head_to_fp32=True is not supported when the LM head is wrapped (e.g. a PEFT "
                         "adapter targets lm_head). Fix: remove 'lm_head' from the adapter's target_modules, or "
                         "set cast_lm_head_to_fp32=False.")
    original = head.weight.dtype
    embeddings = inner.get_input_embeddings()
    tied = embeddings is not None and embeddings.weight is head.weight
    head.float()
    head.register_forward_pre_hook(lambda _module, args: (args[0].float(), *args[1:]))
    if tied and original != torch.float32:
        embeddings.register_forward_hook(lambda _module, _args, output: output.to(original))


@dataclass
class TokenLogProbs:
    """Log-probs of the selected target tokens, flattened, with where they came from.

    logps [n] float32 (differentiable), stats (detached; None when not asked for), rows [n] batch row of each
    token, positions [n]
    position of each target token in its row, sequences [n] the sequence each token belongs to (its row, or
    in a packed batch its `sequence_ids` value) out of num_sequences.
    """

    logps: torch.Tensor
    stats: TokenStats | None
    rows: torch.Tensor
    positions: torch.Tensor
    sequences: torch.Tensor
    num_sequences: int
    values: torch.Tensor | None = None  # [n] value-head estimate at the state before each token
    entropy: torch.Tensor | None = None  # [n] differentiable entropy of each token's distribution, when asked

    def scatter(self, values: torch.Tensor, shape: tuple[int, int], fill: float = 0.0) -> torch.Tensor:
        """Put per-token values [n] back in a [b, t] grid at the target positions, `fill` elsewhere."""
        return values.new_full(shape, fill).index_put((self.rows, self.positions), values)

    def to_padded(self, shape: tuple[int, int], fill: float = 0.0) -> torch.Tensor:
        """The log-probs in a [b, t] grid at their target positions, `fill` elsewhere."""
        return self.scatter(self.logps, shape, fill)

    def sum_per_row(self, num_rows: int) -> torch.Tensor:
        """Sum of log-probs per batch row, [b]."""
        return self.logps.new_zeros(num_rows).index_add(0, self.rows, self.logps)

    def sum_per_sequence(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token values [n] (default: the log-probs) summed per sequence, [num_sequences]."""
        values = self.logps if values is None else values
        return values.new_zeros(self.num_sequences).index_add(0, self.sequences, values)

    def count_per_sequence(self) -> torch.Tensor:
        """Selected tokens per sequence, [num_sequences] long."""
        return torch.zeros(self.num_sequences, dtype=torch.long, device=self.sequences.device).index_add_(
            0, self.sequences, torch.ones_like(self.sequences))


def _sequences(batch: dict[str, torch.Tensor], rows: torch.Tensor, positions: torch.Tensor
               ) -> tuple[torch.Tensor, int]:
    """(sequence of each selected token [n], number of sequences): rows, or `sequence_ids` in packed rows."""
    if "sequence_ids" in batch:
        return batch["sequence_ids"][rows, positions], int(batch["sequence_ids"].max()) + 1
    return rows, batch["input_ids"].shape[0]


def _final_hidden_states(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
    """(final hidden states [b, t, h], the model's outputs), running the model through its outermost
    wrapper (DDP hooks fire) but with `logits_to_keep` selecting no position, so the head computes nothing."""
    inner = unwrap_model(model)
    backbone = inner.get_decoder()
    captured: list[torch.Tensor] = []

    def keep_output(_module, _args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = backbone.register_forward_hook(keep_output)
    try:
        no_position = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
        outputs = model(**inputs, logits_to_keep=no_position, use_cache=False)
    finally:
        handle.remove()
    return captured[-1], outputs


def _logits(outputs: Any) -> torch.Tensor:
    return outputs.logits if hasattr(outputs, "logits") else outputs[0]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left-padded sequence gets the positions it would
    have unpadded: [b, t] -> [b, t] (padding positions set to 1; they are masked anyway)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if batch.get(k) is not None}
    if "position_ids" not in inputs and "attention_mask" in inputs:
        inputs["position_ids"] = position_ids_from_mask(inputs["attention_mask"])
    return inputs


def _targets(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, positions, target ids) of the tokens whose loss_mask is True; the first token of a
    sequence never counts because nothing precedes it."""
    loss_mask = batch["loss_mask"].bool().clone()
    loss_mask[:, 0] = False
    if batch.get("position_ids") is not None:  # a packed sequence's first token has nothing before it
        loss_mask &= batch["position_ids"] != 0
    rows, positions = loss_mask.nonzero(as_tuple=True)
    return rows, positions, batch["input_ids"][rows, positions]


def _head_inputs(model: nn.Module, batch: dict[str, torch.Tensor], head: nn.Linear, rows: torch.Tensor,
                 positions: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """(final hidden states of the positions that predict the selected tokens [n, h], the model's outputs).
    The states are cast to the head's dtype, as the head's own forward would take them: a float32 head
    (`cast_lm_head_to_fp32`) under a half-precision model computes float32 logits."""
    hidden, outputs = _final_hidden_states(model, _model_inputs(batch))  # [b, t, h]
    return hidden[rows, positions - 1].to(head.weight.dtype), outputs


def causal_token_log_probs(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_values: bool = False,
    entropy_gradient: bool = False,
    with_stats: bool = True,
) -> TokenLogProbs:
    """log p(token_j | tokens_<j) for every j with batch["loss_mask"][row, j] True, from one forward pass.

    batch: input_ids [b, t], loss_mask [b, t], and attention_mask [b, t] or position_ids [b, t]
    (packed rows, one sequence per run of increasing positions; `sequence_ids` [b, t] numbers them). With
    `with_values`, `model` is a value-head model and the values of the same states come along. With
    `entropy_gradient`, `.entropy` [n] is each token's entropy H = -sum_v p_v log p_v of p = softmax(logits /
    temperature), carrying its gradient (an entropy bonus), computed chunk-wise from the same hidden states
    (`ops.logprobs.linear_entropy`); `.stats.entropy` is always the detached value. Without `with_stats`,
    `.stats` is None: a pass that only needs log-probs (a reference, old log-probs) skips their cost.
    """
    rows, positions, targets = _targets(batch)
    head = splittable_head(model)
    entropy = None
    if head is None:  # the model's own head (whose pre-hook casts to float32 when the head is float32)
        outputs = model(**_model_inputs(batch), use_cache=False)
        logits = _logits(outputs)[rows, positions - 1]  # [n, v]
        logps, stats = log_probs_from_logits(logits, targets, temperature, with_stats)
        if entropy_gradient:
            entropy = entropy_from_logits(logits.float() / temperature)
    else:
        hidden, outputs = _head_inputs(model, batch, head, rows, positions)  # [n, h]
        logps, stats = linear_log_probs(hidden, head.weight, targets, head.bias, temperature, chunk_size, with_stats)
        if entropy_gradient:
            entropy = linear_entropy(hidden, head.weight, head.bias, temperature, chunk_size)
    values = outputs[2][rows, positions - 1] if with_values else None  # (lm_logits, loss, value [b, t])
    return TokenLogProbs(logps, stats, rows, positions, *_sequences(batch, rows, positions), values, entropy)


def causal_lm_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    normalizer: torch.Tensor | float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_stats: bool = True,
) -> tuple[torch.Tensor, TokenStats | None]:
    """sum of -log p over the loss-masked tokens, divided by `normalizer` (a token count), and the tokens'
    TokenStats (None without `with_stats`).

    Same value as `-causal_token_log_probs(...).logps.sum() / normalizer`, but on the fused path whose
    gradient is formed during the forward pass (no recompute of the vocabulary projection).
    """
    head = splittable_head(model)
    if head is None:
        token_logps = causal_token_log_probs(model, batch, chunk_size=chunk_size, with_stats=with_stats)
        return -token_logps.logps.sum() / normalizer, token_logps.stats
    rows, positions, targets = _targets(batch)
    hidden, _ = _head_inputs(model, batch, head, rows, positions)  # [n, h]
    weights = torch.full(targets.shape, 1.0, device=hidden.device) / normalizer
    return linear_cross_entropy(hidden, head.weight, targets, weights, head.bias, chunk_size, with_stats)


def seq2seq_token_log_probs(model: nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0,
                            with_values: bool = False) -> TokenLogProbs:
    """log p(label_j | labels_<j, encoder input) for every label with decoder_loss_mask True.

    batch: input_ids/attention_mask [b, s] (encoder), labels [b, t] (padded with the pad id),
    decoder_attention_mask and decoder_loss_mask [b, t]. The decoder reads the labels shifted right
    behind the start token. With `with_values`, `model` is a value-head model and values come along.
    """
    labels = batch["labels"]
    decoder_input_ids = unwrap_model(model).prepare_decoder_input_ids_from_labels(labels=labels)
    outputs = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
        decoder_input_ids=decoder_input_ids, decoder_attention_mask=batch["decoder_attention_mask"],
        use_cache=False,
    )
    rows, positions = batch["decoder_loss_mask"].bool().nonzero(as_tuple=True)
    logps, stats = log_probs_from_logits(_logits(outputs)[rows, positions], labels[rows, positions], temperature)
    values = outputs[2][rows, positions] if with_values else None  # (lm_logits, loss, value [b, t])
    return TokenLogProbs(logps, stats, rows, positions, rows, labels.shape[0], values)


def completion_log_probs(model: nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0,
                         chunk_size: int = DEFAULT_CHUNK_SIZE, with_stats: bool = True
                         ) -> tuple[torch.Tensor, torch.Tensor, TokenStats | None]:
    """Summed log-probs of each sequence's loss-masked tokens and their counts: ([s] float32, [s] long,
    stats, None without `with_stats`). A sequence is a row, or, in packed batches, a `sequence_ids` value."""
    tokens = causal_token_log_probs(model, batch, temperature, chunk_size, with_stats=with_stats)
    return tokens.sum_per_sequence(), tokens.count_per_sequence(), tokens.stats


# Attention implementations whose masks transformers builds from position_ids for packed rows.
_PACKING_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def next_token_log_distributions(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Full next-token log-distributions [b, t, v] (float32), aligned with the tokens they predicted:
    position j holds log pi(. | tokens before j) for causal models (input_ids [b, t]; row 0 is
    meaningless), and the distribution at label j for encoder-decoders (batch with `labels`,
    `decoder_attention_mask`: the decoder reads the labels shifted right). For estimators that need the
    whole distribution (PPO's kl_penalty="full"); everything else should use the token log-prob paths,
    which never hold [b, t, v]."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    encoder_decoder = "labels" in batch and "decoder_attention_mask" in batch
    if encoder_decoder:
        inputs["decoder_input_ids"] = unwrap_model(model).prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        inputs["decoder_attention_mask"] = batch["decoder_attention_mask"]
    logits = _logits(model(**inputs, use_cache=False))  # [b, t, v]
    if not encoder_decoder:
        logits = logits.roll(1, dims=1)  # position j: the distribution that predicted token j
    return logits.float().log_softmax(-1)


def supports_packed_rows(model: nn.Module) -> bool:
    """Whether several sequences may share a row (position_ids restarting at 0, no attention mask):
    decoder models of transformers itself, whose mask code keeps packed sequences apart."""
    inner = unwrap_model(model)
    return (type(inner).__module__.startswith("transformers.models.")
            and not getattr(inner.config, "is_encoder_decoder", False)
            and str(getattr(inner.config, "_attn_implementation", "")) in _PACKING_ATTENTION)


# ----- Mixture-of-Experts: the router's load-balancing loss ------------------------------------------------
def configure_router_aux_loss(model: nn.Module, coef: float | None) -> float:
    """The weight of the router load-balancing loss for `model` (TRL's `router_aux_loss_coef`), with the
    model's config set so that its forwards return that loss (`output_router_logits`) exactly when the
    weight is not 0.

    coef None: the model config's own `router_aux_loss_coef` (0 when it has none); 0: off. A MoE model is one
    whose config has `output_router_logits` (Mixtral, Qwen2-MoE, Qwen3-MoE, ...); a non-zero coef for
    any other model is a ValueError naming the field.
    """
    config = unwrap_model(model).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    has_router = hasattr(config, "output_router_logits")
    if coef and not has_router:
        raise ValueError(f"router_aux_loss_coef={coef}, but {type(unwrap_model(model)).__name__} has no router "
                         "(it is not a Mixture-of-Experts model), so there is no load-balancing loss to weight. "
                         "Fix: leave router_aux_loss_coef=None (or 0).")
    if not has_router:
        return 0.0
    coef = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0) if coef is None else float(coef)
    config.output_router_logits = coef != 0.0
    config.router_aux_loss_coef = coef  # what the model itself would add when given labels
    return coef


def router_aux_loss(outputs: Any) -> torch.Tensor | None:
    """The load-balancing loss a MoE model's forward returned (`aux_loss`, a scalar, computed from its
    router logits over the non-padding tokens), or None when the outputs carry none."""
    aux = getattr(outputs, "aux_loss", None)
    return aux if isinstance(aux, torch.Tensor) else None


@contextlib.contextmanager
def capture_router_aux_loss(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, collects the `router_aux_loss` of every forward of `model` (inside its wrappers)
    that builds an autograd graph, i.e. the trained policy's forwards; forwards without grad (a reference
    pass through the adapter-disabled policy, generation, evaluation) are not collected.

    This is how tether's forward paths, which return only hidden states or log-probs, surface the loss
    without each of them passing the model outputs back.
    """
    found: list[torch.Tensor] = []

    def keep(_module: nn.Module, _args: Any, output: Any) -> None:
        aux = router_aux_loss(output)
        if aux is not None and torch.is_grad_enabled():
            found.append(aux)

    handle = unwrap_model(model).register_forward_hook(keep)
    try:
        yield found
    finally:
        handle.remove()
