"""Distillation divergences between a student's and a teacher's next-token distributions (GKD).

Shapes: n = tokens (flattened), v = vocabulary size, h = hidden size.

Generalized Jensen-Shannon divergence (Agarwal et al., 2024, "On-Policy Distillation of Language Models:
Learning from Self-Generated Mistakes", eq. 2), with P the teacher, Q the student and M = beta P + (1 - beta) Q:

    JSD_beta(P || Q) = beta KL(P || M) + (1 - beta) KL(Q || M)

It vanishes at both ends of beta; the GKD convention (and TRL's) is to use the plain KLs there:
beta = 0 is the forward KL(P || Q) (mode covering, as in supervised KD), beta = 1 the reverse KL(Q || P)
(mode seeking). Distributions are softmax(logits / temperature), computed in float32.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from ..ops.logprobs import DEFAULT_CHUNK_SIZE


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities [n, v] -> [n] (0 log 0 = 0)."""
    return torch.where(log_p > -math.inf, log_p.exp() * (log_p - log_q), 0.0).sum(-1)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5,
                    temperature: float = 1.0) -> torch.Tensor:
    """JSD_beta(teacher || student) per token: logits [n, v] each -> [n] (float32; float64 for float64 inputs).
    Gradients flow into whichever logits require them (the student's, normally)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}.")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # student
    log_p = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)  # teacher
    if beta == 0.0:
        return _kl(log_p, log_q)
    if beta == 1.0:
        return _kl(log_q, log_p)
    # log M = log(beta P + (1 - beta) Q), stably
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def _chunk_jsd(student_hidden: torch.Tensor, student_weight: torch.Tensor, student_bias: torch.Tensor | None,
               teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, teacher_bias: torch.Tensor | None,
               beta: float, temperature: float) -> torch.Tensor:
    student_logits = student_hidden @ student_weight.T  # [c, v]
    if student_bias is not None:
        student_logits = student_logits + student_bias
    with torch.no_grad():
        teacher_logits = teacher_hidden @ teacher_weight[: student_weight.shape[0]].T  # [c, v]
        if teacher_bias is not None:
            teacher_logits = teacher_logits + teacher_bias[: student_weight.shape[0]]
    return generalized_jsd(student_logits, teacher_logits, beta, temperature)


def linear_generalized_jsd(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                           teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
                           student_bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None,
                           beta: float = 0.5, temperature: float = 1.0,
                           chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """`generalized_jsd` from the models' final hidden states and LM heads, `chunk_size` tokens at a time.

    student_hidden [n, h_s], student_weight [v, h_s]; teacher_hidden [n, h_t], teacher_weight [v_t >= v, h_t]
    (a teacher head padded past the student's vocabulary is cut to it) -> [n]. Naive equivalent:
    generalized_jsd(student_hidden @ student_weight.T + b_s, teacher_hidden @ teacher_weight[:v].T + b_t).
    Each chunk runs under activation checkpointing: forward and backward hold one chunk's [c, v] logits of
    each model, never the [n, v] of both. The teacher gets no gradient.
    """
    if teacher_weight.shape[0] < student_weight.shape[0]:
        raise ValueError(f"The teacher's vocabulary ({teacher_weight.shape[0]}) is smaller than the student's "
                         f"({student_weight.shape[0]}): distillation needs the same tokenizer.")
    if student_hidden.shape[0] == 0:
        return student_hidden.new_zeros(0, dtype=torch.promote_types(student_hidden.dtype, torch.float32))
    with torch.autocast(student_hidden.device.type, enabled=False):
        return torch.cat([
            checkpoint(_chunk_jsd, student_hidden[i:i + chunk_size], student_weight, student_bias,
                       teacher_hidden[i:i + chunk_size].detach(), teacher_weight.detach(),
                       None if teacher_bias is None else teacher_bias.detach(), beta, temperature,
                       use_reentrant=False)
            for i in range(0, student_hidden.shape[0], chunk_size)])
