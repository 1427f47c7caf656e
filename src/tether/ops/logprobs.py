"""Per-token log-probabilities without materialising [batch, seq, vocab] logits.

Shapes: n = tokens (flattened), h = hidden size, v = vocabulary size, b = batch, t = sequence length.

The naive computation these functions must equal is

    logits = hidden @ weight.T + bias                       # [n, v]
    logp   = log_softmax(logits / temperature)[arange(n), targets]

Here the vocabulary projection runs `chunk_size` tokens at a time, so the largest temporary is
[chunk_size, v] in float32. Two autograd strategies, by what the caller knows at forward time:

- `linear_log_probs` (any downstream loss): the backward pass recomputes each chunk's logits.
- `linear_cross_entropy` (a loss that is a weighted sum of token NLLs, e.g. SFT): the gradient is known
  during the forward pass, so it is computed there and backward only rescales it; no recompute.

An entropy that carries a gradient (an entropy bonus in the loss): `linear_entropy`, chunked the same way
under activation checkpointing, so its backward pass also holds one chunk's logits at a time.

When only full logits exist: `log_probs_from_logits` (log-probs plus detached TokenStats), and TRL's
classic `logprobs_from_logits` / `entropy_from_logits` (one tensor each, both differentiable).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_SIZE = 1024


@dataclass
class TokenStats:
    """Detached per-token statistics of each next-token distribution p from the same pass, [n] each."""

    entropy: torch.Tensor  # -sum_v p_v log p_v
    correct: torch.Tensor  # bool: argmax prediction equals the target
    log_sum_sq: torch.Tensor  # log sum_v p_v^2 = logsumexp(2 log p): WPO's normaliser (Zhou et al., 2024)


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 for half-precision inputs (and float32), float64 for float64 (so gradcheck works)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  temperature: float) -> torch.Tensor:
    logits = hidden @ weight.T  # [c, v]
    if bias is not None:
        logits = logits + bias
    logits = logits.to(_compute_dtype(logits))
    if temperature != 1.0:
        logits = logits / temperature
    return logits


def _chunk_stats(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(probs [c, v], entropy [c], correct [c], log_sum_sq [c]). The entropy is -sum p * log p with log p
    formed first: the algebraically equal lse - sum p * logits loses ~1e-5 to cancellation when logits are
    large. log sum p^2 from the probs themselves: the sum is at least max p^2 >= 1 / v^2, far above
    float32's underflow, and the terms that do underflow are negligible beside it."""
    correct = logits.argmax(-1) == targets
    logp = logits - lse[:, None]  # [c, v]
    probs = logp.exp()
    entropy = -(probs * logp).sum(-1)
    log_sum_sq = 2.0 * torch.linalg.vector_norm(probs, dim=-1).log()  # one fused reduction, no [c, v] temporary
    return probs, entropy, correct, log_sum_sq


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, with_stats):
        n, dtype = hidden.shape[0], _compute_dtype(hidden)
        logps = hidden.new_empty(n, dtype=dtype)
        lse_all = hidden.new_empty(n, dtype=dtype)
        # Without stats they stay empty: each is another pass over [chunk, v], together costing about what the
        # projection does (measured on a 32k vocabulary), and a reference pass only needs the log-probs.
        stats_n = n if with_stats else 0
        entropy, log_sum_sq = hidden.new_empty(stats_n, dtype=dtype), hidden.new_empty(stats_n, dtype=dtype)
        correct = torch.empty(stats_n, dtype=torch.bool, device=hidden.device)
        with torch.no_grad():
            for start in range(0, n, chunk_size):
                sl = slice(start, start + chunk_size)
                logits = _chunk_logits(hidden[sl], weight, bias, temperature)
                lse = torch.logsumexp(logits, dim=-1)
                logps[sl] = logits.gather(-1, targets[sl, None]).squeeze(-1) - lse
                lse_all[sl] = lse
                if with_stats:
                    _, entropy[sl], correct[sl], log_sum_sq[sl] = _chunk_stats(logits, lse, targets[sl])
        ctx.save_for_backward(hidden, weight, bias, targets, lse_all)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.mark_non_differentiable(entropy, correct, log_sum_sq)
        return logps, entropy, correct, log_sum_sq

    @staticmethod
    def backward(ctx, grad_logps, _grad_entropy, _grad_correct, _grad_log_sum_sq):
        hidden, weight, bias, targets, lse_all = ctx.saved_tensors
        grads = _backward_chunks(
            hidden, weight, bias, targets, grad_logps.to(lse_all.dtype), ctx.temperature, ctx.chunk_size,
            ctx.needs_input_grad, lse_all=lse_all,
        )
        return (*grads, None, None, None, None)


def _backward_chunks(hidden, weight, bias, targets, token_grads, temperature, chunk_size, needs_grad,
                     lse_all=None):
    """d(sum_i token_grads_i * logp_i) with respect to hidden, weight and bias.

    d logp_i / d logits_i = onehot(target_i) - softmax(logits_i), divided by the temperature.
    """
    acc = _compute_dtype(weight)
    grad_hidden = torch.empty_like(hidden) if needs_grad[0] else None
    grad_weight = torch.zeros_like(weight, dtype=acc) if needs_grad[1] else None
    grad_bias = torch.zeros_like(bias, dtype=acc) if bias is not None and needs_grad[2] else None
    for start in range(0, hidden.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        logits = _chunk_logits(hidden[sl], weight, bias, temperature)
        lse = lse_all[sl] if lse_all is not None else torch.logsumexp(logits, dim=-1)
        grad_logits = torch.exp(logits - lse[:, None]).mul_(-token_grads[sl, None])  # [c, v]
        grad_logits.scatter_add_(-1, targets[sl, None], token_grads[sl, None])
        if temperature != 1.0:
            grad_logits /= temperature
        if grad_hidden is not None:
            grad_hidden[sl] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
        if grad_weight is not None:
            grad_weight += grad_logits.T.to(acc) @ hidden[sl].to(acc)
        if grad_bias is not None:
            grad_bias += grad_logits.sum(0).to(acc)
    return (
        grad_hidden,
        grad_weight.to(weight.dtype) if grad_weight is not None else None,
        grad_bias.to(bias.dtype) if grad_bias is not None else None,
    )


class _LinearCrossEntropy(torch.autograd.Function):
    """loss = -sum_i token_weights_i * logp_i, with gradients computed in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, token_weights, chunk_size, with_stats):
        n, dtype, acc = hidden.shape[0], _compute_dtype(hidden), _compute_dtype(weight)
        needs = ctx.needs_input_grad
        grad_hidden = torch.empty_like(hidden) if needs[0] else None
        grad_weight = torch.zeros_like(weight, dtype=acc) if needs[1] else None
        grad_bias = torch.zeros_like(bias, dtype=acc) if bias is not None and needs[2] else None
        loss = hidden.new_zeros((), dtype=dtype)
        stats_n = n if with_stats else 0  # see _LinearLogProbs: without stats they stay empty
        entropy, log_sum_sq = hidden.new_empty(stats_n, dtype=dtype), hidden.new_empty(stats_n, dtype=dtype)
        correct = torch.empty(stats_n, dtype=torch.bool, device=hidden.device)
        with torch.no_grad():
            for start in range(0, n, chunk_size):
                sl = slice(start, start + chunk_size)
                w = token_weights[sl].to(dtype)
                logits = _chunk_logits(hidden[sl], weight, bias, 1.0)
                lse = torch.logsumexp(logits, dim=-1)
                logp = logits.gather(-1, targets[sl, None]).squeeze(-1) - lse
                loss -= (w * logp).sum()
                if with_stats:
                    probs, entropy[sl], correct[sl], log_sum_sq[sl] = _chunk_stats(logits, lse, targets[sl])
                else:
                    probs = logits.sub_(lse[:, None]).exp_()  # the logits are not needed after this
                # d loss / d logits = w * (softmax - onehot); reuse the probs buffer.
                grad_logits = probs.mul_(w[:, None])
                grad_logits.scatter_add_(-1, targets[sl, None], -w[:, None])
                if grad_hidden is not None:
                    grad_hidden[sl] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight += grad_logits.T.to(acc) @ hidden[sl].to(acc)
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(0).to(acc)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(entropy, correct, log_sum_sq)
        return loss, entropy, correct, log_sum_sq

    @staticmethod
    def backward(ctx, grad_loss, _grad_entropy, _grad_correct, _grad_log_sum_sq):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_loss  # [] in the loss's dtype (float32, or float64 for float64 inputs)
        out_hidden = grad_hidden * scale.to(grad_hidden.dtype) if grad_hidden is not None else None
        out_weight = (grad_weight * scale).to(ctx.weight_dtype) if grad_weight is not None else None
        out_bias = (grad_bias * scale).to(ctx.weight_dtype) if grad_bias is not None else None
        return out_hidden, out_weight, out_bias, None, None, None, None


def linear_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_stats: bool = True,
) -> tuple[torch.Tensor, TokenStats | None]:
    """log softmax(hidden @ weight.T + bias)[targets], chunked over tokens.

    hidden [n, h], weight [v, h], targets [n] -> (logps [n] float32 (float64 for float64 inputs),
    detached TokenStats, or None without `with_stats`: a pass that only needs log-probs skips them).
    Differentiable with respect to hidden, weight and bias.
    """
    with torch.autocast(hidden.device.type, enabled=False):
        logps, *stats = _LinearLogProbs.apply(hidden, weight, bias, targets, temperature, chunk_size, with_stats)
    return logps, TokenStats(*stats) if with_stats else None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_stats: bool = True,
) -> tuple[torch.Tensor, TokenStats | None]:
    """-sum_i token_weights_i * log softmax(hidden_i @ weight.T + bias)[targets_i], chunked.

    hidden [n, h], weight [v, h], targets [n], token_weights [n] (e.g. loss_mask / num_tokens)
    -> (scalar loss float32, detached TokenStats, or None without `with_stats`: their passes over the chunk's
    logits cost about a third of the whole head). The weights are constants (no gradient).
    Under torch.no_grad() (evaluation) no gradient is formed: only the projection and the loss run.
    """
    if not torch.is_grad_enabled():
        # Inside a Function's forward, needs_input_grad still reports requires_grad under no_grad, so
        # the gradient work would be done and thrown away; detached inputs switch it off.
        hidden, weight = hidden.detach(), weight.detach()
        bias = bias.detach() if bias is not None else None
    with torch.autocast(hidden.device.type, enabled=False):
        loss, *stats = _LinearCrossEntropy.apply(hidden, weight, bias, targets, token_weights.detach(), chunk_size,
                                                 with_stats)
    return loss, TokenStats(*stats) if with_stats else None


def _chunk_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   temperature: float) -> torch.Tensor:
    return entropy_from_logits(_chunk_logits(hidden, weight, bias, temperature))  # [c]


def linear_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Entropy of softmax((hidden @ weight.T + bias) / temperature) per token, differentiable, chunked.

    hidden [n, h], weight [v, h] -> [n] float32 (float64 for float64 inputs). Naive equivalent:
    entropy_from_logits((hidden @ weight.T + bias) / temperature). Each chunk runs under activation
    checkpointing, so autograd keeps only the chunk's inputs and the backward pass recomputes its [c, v]
    logits: the whole [n, v] never exists, forward or backward.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=_compute_dtype(hidden))
    with torch.autocast(hidden.device.type, enabled=False):
        return torch.cat([
            checkpoint(_chunk_entropy, hidden[i:i + chunk_size], weight, bias, temperature, use_reentrant=False)
            for i in range(0, hidden.shape[0], chunk_size)])


def log_probs_from_logits(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                          with_stats: bool = True) -> tuple[torch.Tensor, TokenStats | None]:
    """The full-logits path, for models whose head cannot be split off: logits [..., v], targets [...]."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logps = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not with_stats:
        return logps, None
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        correct = logits.argmax(-1) == targets
        log_sum_sq = torch.logsumexp(2.0 * logp_all, dim=-1)
    return logps, TokenStats(entropy=entropy, correct=correct, log_sum_sq=log_sum_sq)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, gather: bool = True) -> torch.Tensor:
    """TRL's classic helper: log softmax of full logits, at the labels or for the whole vocabulary.

    logits [..., v], labels [...] -> [...] (gather=True: log p(label)), or [..., v] (gather=False: every
    token's log-prob; `labels` is then unused, as in TRL). Float32 (float64 for float64 logits), like
    every log-prob in ops/; differentiable. Naive equivalent:
    log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]. When the logits come from a linear
    head, `linear_log_probs` gives the same without materialising them.
    """
    logp_all = F.log_softmax(logits.to(_compute_dtype(logits)), dim=-1)  # [..., v]
    if not gather:
        return logp_all
    return logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax distribution, -sum_v p_v log p_v: logits [..., v] -> [...].

    Float32 (float64 for float64 logits), differentiable. Tokens a distribution gives probability 0
    (logit -inf) contribute 0, not nan (the limit of p log p).
    """
    logp = F.log_softmax(logits.to(_compute_dtype(logits)), dim=-1)  # [..., v]
    p = logp.exp()
    # Zero log p where p is 0 before multiplying, so neither the value nor the gradient sees 0 * -inf.
    safe_logp = torch.where(p > 0, logp, torch.zeros((), dtype=p.dtype, device=p.device))
    return -(p * safe_logp).sum(-1)
