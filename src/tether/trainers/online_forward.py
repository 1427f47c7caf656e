"""The online trainers' forward pass where it needs more than `models.forward.causal_token_log_probs`:
an entropy that carries a gradient (GRPO's entropy bonus) and an LM head kept in float32
(`cast_lm_head_to_fp32`, the ScaleRL recipe).

`causal_token_log_probs` returns the entropy detached (a diagnostic); here it is computed from the same
hidden states, chunk by chunk under activation checkpointing, so the [tokens, vocabulary] logits exist
for one chunk at a time in the forward and backward passes. Naive equivalent of one token's entropy:
    p = softmax((h @ W.T + b) / T);  H = -sum_v p_v log p_v

Shapes: b = batch, t = tokens, n = selected target tokens, h = hidden, v = vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..models.forward import (
    TokenLogProbs,
    _final_hidden_states,
    _logits,
    _model_inputs,
    _targets,
    splittable_head,
    unwrap_model,
)
from ..ops.logprobs import TokenStats, entropy_from_logits, linear_log_probs


def _chunk_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   temperature: float) -> torch.Tensor:
    logits = hidden.to(weight.dtype) @ weight.T  # [c, v]
    if bias is not None:
        logits = logits + bias
    return entropy_from_logits(logits.float() / temperature)  # [c]


def token_log_probs_with_entropy(model: nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0,
                                 chunk_size: int = 1024, entropy_gradient: bool = True
                                 ) -> tuple[TokenLogProbs, torch.Tensor]:
    """(log-probs of the loss-masked tokens as `causal_token_log_probs` returns them, their entropies [n]),
    from one forward pass. The entropy is differentiable when entropy_gradient. The hidden states are cast
    to the head's dtype first, so a float32 head (`cast_lm_head_to_fp32`) computes float32 logits."""
    rows, positions, targets = _targets(batch)
    head = splittable_head(model)
    if head is None:  # the model's own head (its pre-hook casts to float32 when the head is)
        outputs = model(**_model_inputs(batch), use_cache=False)
        logits = _logits(outputs)[rows, positions - 1].float() / temperature  # [n, v]
        log_probs = logits.log_softmax(-1)
        logps = log_probs.gather(-1, targets[:, None]).squeeze(-1)
        entropy = entropy_from_logits(logits)
        correct = logits.detach().argmax(-1) == targets
    else:
        hidden, _ = _final_hidden_states(model, _model_inputs(batch))  # [b, t, h]
        selected = hidden[rows, positions - 1].to(head.weight.dtype)  # [n, h]
        logps, head_stats = linear_log_probs(selected, head.weight, targets, head.bias, temperature, chunk_size)
        correct = head_stats.correct
        if entropy_gradient:
            entropy = torch.cat([
                checkpoint(_chunk_entropy, selected[i:i + chunk_size], head.weight, head.bias, temperature,
                           use_reentrant=False)
                for i in range(0, selected.shape[0], chunk_size)]) if selected.shape[0] else selected.new_zeros(0)
        else:
            with torch.no_grad():
                entropy = torch.cat([_chunk_entropy(selected[i:i + chunk_size], head.weight, head.bias, temperature)
                                     for i in range(0, selected.shape[0], chunk_size)] or [selected.new_zeros(0)])
    if not entropy_gradient:
        entropy = entropy.detach()
    stats = TokenStats(entropy=entropy.detach(), correct=correct)
    return TokenLogProbs(logps, stats, rows, positions), entropy


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
