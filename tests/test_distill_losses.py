"""The generalized JSD of GKD against its definition (Agarwal et al., 2024, eq. 2), written out slowly."""

from __future__ import annotations

import math

import pytest
import torch

from tether.losses.distill import generalized_jsd, linear_generalized_jsd


def slow_jsd(student_logits, teacher_logits, beta, temperature=1.0):
    """Per token: softmax, the mixture M = beta P + (1 - beta) Q, and the KLs as sums over the vocabulary."""
    out = []
    for s_row, t_row in zip(student_logits.double().tolist(), teacher_logits.double().tolist()):
        def softmax(row):
            top = max(row)
            e = [math.exp((x - top) / temperature) for x in row]
            return [x / sum(e) for x in e]

        q, p = softmax(s_row), softmax(t_row)

        def kl(a, b):
            return sum(ai * math.log(ai / bi) for ai, bi in zip(a, b) if ai > 0)

        if beta == 0:
            out.append(kl(p, q))
        elif beta == 1:
            out.append(kl(q, p))
        else:
            m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
            out.append(beta * kl(p, m) + (1 - beta) * kl(q, m))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generalized_jsd_matches_its_definition(beta, temperature):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 11, generator=g) * 3, torch.randn(6, 11, generator=g) * 3
    got = generalized_jsd(student, teacher, beta, temperature)
    torch.testing.assert_close(got.double(), slow_jsd(student, teacher, beta, temperature), rtol=1e-5, atol=1e-6)


def test_generalized_jsd_properties():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 9, generator=g), torch.randn(5, 9, generator=g)
    assert torch.allclose(generalized_jsd(a, a, 0.5), torch.zeros(5), atol=1e-7)  # zero at equality
    # beta = 0.5 is the symmetric JSD, bounded by log 2; JSD_beta(P||Q) = JSD_{1-beta}(Q||P)
    torch.testing.assert_close(generalized_jsd(a, b, 0.5), generalized_jsd(b, a, 0.5))
    torch.testing.assert_close(generalized_jsd(a, b, 0.3), generalized_jsd(b, a, 0.7))
    assert (generalized_jsd(a * 50, b * 50, 0.5) <= math.log(2) + 1e-6).all()
    # a teacher token the student gives no mass: forward KL is infinite, the JSD stays finite
    student = torch.tensor([[0.0, -math.inf]])
    teacher = torch.tensor([[0.0, 0.0]])
    assert torch.isinf(generalized_jsd(student, teacher, 0.0)).all()
    assert torch.isfinite(generalized_jsd(student, teacher, 0.5)).all()
    with pytest.raises(ValueError, match="beta must be in"):
        generalized_jsd(a, b, 1.5)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_from_hidden_states_equals_full_logits_with_gradients(beta):
    g = torch.Generator().manual_seed(2)
    n, h_s, h_t, v = 13, 5, 7, 17
    s_hidden = torch.randn(n, h_s, generator=g, dtype=torch.float64, requires_grad=True)
    s_weight = torch.randn(v, h_s, generator=g, dtype=torch.float64, requires_grad=True)
    s_bias = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True)
    t_hidden = torch.randn(n, h_t, generator=g, dtype=torch.float64)
    t_weight = torch.randn(v + 3, h_t, generator=g, dtype=torch.float64)  # a head padded past the vocabulary

    chunked = linear_generalized_jsd(s_hidden, s_weight, t_hidden, t_weight, student_bias=s_bias, beta=beta,
                                     chunk_size=4)
    full = generalized_jsd(s_hidden @ s_weight.T + s_bias, t_hidden @ t_weight[:v].T, beta)
    torch.testing.assert_close(chunked, full)
    weights = torch.randn(n, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((chunked * weights).sum(), (s_hidden, s_weight, s_bias))
    expected = torch.autograd.grad((full * weights).sum(), (s_hidden, s_weight, s_bias))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(
        lambda x: linear_generalized_jsd(x, s_weight.detach(), t_hidden, t_weight, beta=beta, chunk_size=4).sum(),
        (s_hidden.detach().clone().requires_grad_(),))


def test_a_smaller_teacher_vocabulary_is_an_error():
    with pytest.raises(ValueError, match="same tokenizer"):
        linear_generalized_jsd(torch.randn(2, 3), torch.randn(8, 3), torch.randn(2, 3), torch.randn(6, 3))
