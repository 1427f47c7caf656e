"""ops/logprobs.py (chunked log-probs from hidden states and the LM head) against the naive
full-logits computation, in value and gradient; and models/forward.py against the model's own logits.

The naive reference, written out here independently of the code under test:

    logits = hidden @ weight.T + bias                  # [n, v]
    logp   = log_softmax(logits / T)[arange(n), targets]
    H      = -sum_v p_v log p_v,  p = softmax(logits / T)
    correct = argmax(logits) == targets

and for the fused cross-entropy: loss = -sum_i w_i * logp_i (T = 1).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tether.models.forward import causal_lm_loss, causal_token_log_probs, splittable_head
from tether.ops.logprobs import linear_cross_entropy, linear_log_probs, log_probs_from_logits

N, H, V = 40, 16, 53  # 40 tokens: chunk size 8 divides it, 7 does not, 40 and 64 give one chunk


def _naive(hidden, weight, bias, targets, temperature=1.0):
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logps = logp_all[torch.arange(len(targets)), targets]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    correct = logits.argmax(-1) == targets
    return logps, entropy.detach(), correct


def _inputs(dtype=torch.float32, with_bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = torch.randn(V, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    bias = torch.randn(V, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if with_bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    # Make some targets the argmax so that `correct` has both values.
    with torch.no_grad():
        best = (hidden.double() @ weight.double().T + (bias.double() if with_bias else 0)).argmax(-1)
    targets[::3] = best[::3]
    # Downstream weighting of the log-probs: grad_output differs per token (signs included).
    downstream = torch.randn(N, generator=g, dtype=torch.float64).to(torch.float32)
    return hidden, weight, bias, targets, downstream


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("chunk_size", [7, 8, 40, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_log_probs_matches_naive_in_value_and_gradient(chunk_size, temperature, with_bias):
    hidden, weight, bias, targets, downstream = _inputs(with_bias=with_bias)
    logps, stats = linear_log_probs(hidden, weight, targets, bias, temperature, chunk_size)
    ref_logps, ref_entropy, ref_correct = _naive(hidden, weight, bias, targets, temperature)

    assert logps.dtype == torch.float32 and logps.shape == (N,)
    torch.testing.assert_close(logps, ref_logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.entropy, ref_entropy, atol=1e-5, rtol=0)
    assert torch.equal(stats.correct, ref_correct)
    assert 0 < int(ref_correct.sum()) < N  # both outcomes occur, so the comparison can fail
    assert not stats.entropy.requires_grad and not stats.correct.requires_grad

    got = _grads((logps * downstream).sum(), (hidden, weight, bias))
    want = _grads((ref_logps * downstream).sum(), (hidden, weight, bias))
    assert len(got) == (3 if with_bias else 2)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        assert g.abs().max() > 1e-2  # gradients are not trivially zero


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_linear_log_probs_without_stats_same_values_and_gradients(temperature):
    """A pass that needs only log-probs (a reference, old log-probs) skips the statistics: same log-probs and
    gradients as the naive computation, no stats; log_probs_from_logits the same on full logits."""
    hidden, weight, bias, targets, downstream = _inputs(with_bias=True)
    logps, stats = linear_log_probs(hidden, weight, targets, bias, temperature, 8, with_stats=False)
    ref_logps, _, _ = _naive(hidden, weight, bias, targets, temperature)
    assert stats is None
    torch.testing.assert_close(logps, ref_logps, atol=1e-5, rtol=0)
    got = _grads((logps * downstream).sum(), (hidden, weight, bias))
    want = _grads((ref_logps * downstream).sum(), (hidden, weight, bias))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    logits = hidden.detach() @ weight.detach().T + bias.detach()
    full, full_stats = log_probs_from_logits(logits, targets, temperature, with_stats=False)
    assert full_stats is None
    torch.testing.assert_close(full, ref_logps.detach(), atol=1e-5, rtol=0)


def test_linear_cross_entropy_without_stats_same_loss_and_gradients():
    hidden, weight, bias, targets, _ = _inputs(with_bias=True)
    token_weights = torch.rand(N, generator=torch.Generator().manual_seed(5))
    results = []
    for with_stats in (True, False):
        loss, stats = linear_cross_entropy(hidden, weight, targets, token_weights, bias, chunk_size=8,
                                           with_stats=with_stats)
        results.append((loss.detach(), _grads(loss, (hidden, weight, bias)), stats))
    (loss_a, grads_a, stats_a), (loss_b, grads_b, stats_b) = results
    assert stats_a is not None and stats_b is None
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-6)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)


def test_linear_log_probs_only_requested_gradients():
    hidden, weight, bias, targets, downstream = _inputs()
    weight.requires_grad_(False)
    logps, _ = linear_log_probs(hidden, weight, targets, bias, chunk_size=8)
    g_hidden, g_bias = torch.autograd.grad((logps * downstream).sum(), [hidden, bias])
    ref, _, _ = _naive(hidden, weight, bias, targets)
    r_hidden, r_bias = torch.autograd.grad((ref * downstream).sum(), [hidden, bias])
    torch.testing.assert_close(g_hidden, r_hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_bias, r_bias, atol=1e-5, rtol=1e-5)


def test_linear_log_probs_hand_example():
    # One token, hidden = [1, 0], weight rows e0, e1, -e0 and bias 0: logits = [1, 0, -1].
    # log p(target=0) = 1 - log(e + 1 + 1/e); d logp / d logits = onehot - softmax.
    hidden = torch.tensor([[1.0, 0.0]], requires_grad=True)
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], requires_grad=True)
    logps, stats = linear_log_probs(hidden, weight, torch.tensor([0]))
    z = torch.e + 1 + 1 / torch.e
    assert logps.item() == pytest.approx(1 - torch.log(torch.tensor(z)).item(), abs=1e-6)
    assert stats.correct.tolist() == [True]
    logps.sum().backward()
    p = torch.tensor([torch.e, 1.0, 1 / torch.e]) / z
    grad_logits = torch.tensor([1.0, 0.0, 0.0]) - p
    # d/d hidden = grad_logits @ weight; d/d weight = outer(grad_logits, hidden)
    torch.testing.assert_close(hidden.grad, (grad_logits @ weight.detach())[None], atol=1e-6, rtol=0)
    expected_weight_grad = torch.outer(grad_logits, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(weight.grad, expected_weight_grad, atol=1e-6, rtol=0)


def test_linear_log_probs_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (5,), generator=g)

    def f(h, w, b):
        return linear_log_probs(h, w, targets, b, temperature=0.8, chunk_size=2)[0]

    assert f(hidden, weight, bias).dtype == torch.float64
    assert torch.autograd.gradcheck(f, (hidden, weight, bias), eps=1e-6, atol=1e-8)


def test_linear_log_probs_bf16_close_to_float32():
    hidden, weight, bias, targets, _ = _inputs()
    hidden, weight, bias = (t.detach() for t in (hidden, weight, bias))
    logps, _ = linear_log_probs(hidden.bfloat16(), weight.bfloat16(), targets, bias.bfloat16(), chunk_size=8)
    ref, _, _ = _naive(hidden, weight, bias, targets)
    assert logps.dtype == torch.float32
    # bf16 inputs carry ~3 significant digits; logits are O(5), so ~0.05 absolute.
    torch.testing.assert_close(logps, ref, atol=0.1, rtol=0.02)
    # ... and equal the float32 computation on the bf16-rounded inputs more tightly.
    rounded, _, _ = _naive(*(t.bfloat16().float() for t in (hidden, weight, bias)), targets)
    torch.testing.assert_close(logps, rounded, atol=0.05, rtol=0)


def test_linear_log_probs_empty():
    hidden, weight, bias, _, _ = _inputs()
    logps, stats = linear_log_probs(hidden[:0], weight, torch.zeros(0, dtype=torch.long), bias)
    assert logps.shape == (0,) and stats.entropy.shape == (0,)
    logps.sum().backward()  # no error; nothing to accumulate
    assert torch.count_nonzero(weight.grad) == 0


@pytest.mark.parametrize("chunk_size", [7, 8, 64])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_cross_entropy_matches_naive(chunk_size, with_bias):
    hidden, weight, bias, targets, _ = _inputs(with_bias=with_bias, seed=2)
    token_weights = torch.rand(N, generator=torch.Generator().manual_seed(3))
    token_weights[::4] = 0.0  # masked tokens
    loss, stats = linear_cross_entropy(hidden, weight, targets, token_weights, bias, chunk_size)
    ref_logps, ref_entropy, ref_correct = _naive(hidden, weight, bias, targets)
    ref_loss = -(token_weights * ref_logps).sum()

    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(stats.entropy, ref_entropy, atol=1e-5, rtol=0)
    assert torch.equal(stats.correct, ref_correct)
    # A non-unit upstream gradient (e.g. a loss scale of 3) must rescale every gradient.
    got = _grads(3.0 * loss, (hidden, weight, bias))
    want = _grads(3.0 * ref_loss, (hidden, weight, bias))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert got[0][::4].abs().max() == 0  # zero-weight tokens get no gradient


def test_linear_cross_entropy_token_weights_get_no_gradient():
    hidden, weight, bias, targets, _ = _inputs()
    token_weights = torch.rand(N, requires_grad=True)
    loss, _ = linear_cross_entropy(hidden, weight, targets, token_weights, bias)
    loss.backward()
    assert token_weights.grad is None


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_linear_cross_entropy_without_grad_does_no_gradient_work():
    # Under no_grad (evaluation) only the vocabulary projection should run: one matmul per chunk,
    # instead of three (logits, d hidden, d weight) when gradients are needed.
    hidden, weight, bias, targets, _ = _inputs()
    weights = torch.ones(N)
    with _CountMatmuls() as counter:
        linear_cross_entropy(hidden, weight, targets, weights, bias, chunk_size=10)
    assert counter.count == 3 * 4
    with torch.no_grad(), _CountMatmuls() as counter:
        loss, _ = linear_cross_entropy(hidden, weight, targets, weights, bias, chunk_size=10)
    assert counter.count == 4
    ref, _, _ = _naive(hidden, weight, bias, targets)
    torch.testing.assert_close(loss, -ref.sum(), atol=1e-4, rtol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_log_probs_from_logits(temperature):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 5, V, generator=g)
    targets = torch.randint(0, V, (2, 5), generator=g)
    logps, stats = log_probs_from_logits(logits, targets, temperature)
    flat_logps, flat_entropy, flat_correct = _naive(
        logits.reshape(-1, V), torch.eye(V), None, targets.reshape(-1), temperature
    )
    torch.testing.assert_close(logps, flat_logps.reshape(2, 5), atol=1e-6, rtol=0)
    torch.testing.assert_close(stats.entropy, flat_entropy.reshape(2, 5), atol=1e-6, rtol=0)
    assert torch.equal(stats.correct, flat_correct.reshape(2, 5))


# ---------------------------------------------------------------- model level (models/forward.py)


def _batch(sequences, loss_masks, pad_id, left):
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id)
    mask = torch.zeros(len(sequences), width, dtype=torch.bool)
    attn = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, (seq, lm) in enumerate(zip(sequences, loss_masks, strict=True)):
        cols = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[i, cols] = torch.tensor(seq)
        mask[i, cols] = torch.tensor(lm)
        attn[i, cols] = 1
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": mask}


SEQUENCES = [[5, 17, 33, 41, 9, 1], [7, 8, 9], [12, 40, 80, 120, 160, 200, 240, 1]]
LOSS_MASKS = [[False, False, True, True, True, True], [False, True, True], [False] * 3 + [True] * 5]


def _use_full_logits_path(model, full: bool):
    """Set a logit-transform config field that Llama ignores: forward.py then takes its full-logits
    path, whose numbers must be the same."""
    if full:
        model.config.logit_scale = 1.5
    assert (splittable_head(model) is None) == full


@pytest.mark.parametrize("full_logits", [False, True])
@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_causal_token_log_probs_equal_full_logits(tiny_decoder, left, temperature, full_logits):
    _use_full_logits_path(tiny_decoder, full_logits)
    batch = _batch(SEQUENCES, LOSS_MASKS, pad_id=0, left=left)
    out = causal_token_log_probs(tiny_decoder, batch, temperature=temperature, chunk_size=4)
    logits = tiny_decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # Token j is predicted from position j - 1.
    ref = torch.log_softmax(logits[:, :-1].float() / temperature, -1).gather(
        -1, batch["input_ids"][:, 1:, None]
    )[..., 0]
    ref = torch.where(batch["loss_mask"][:, 1:], ref, torch.zeros(()))
    padded = out.to_padded(tuple(batch["input_ids"].shape))
    assert torch.count_nonzero(padded[:, 0]) == 0
    torch.testing.assert_close(padded[:, 1:], ref, atol=1e-5, rtol=0)
    assert len(out.logps) == sum(sum(m[1:]) for m in LOSS_MASKS)
    torch.testing.assert_close(out.sum_per_row(3), ref.sum(-1), atol=1e-5, rtol=0)
    # And each row equals the sequence run alone, unpadded (padding changes nothing).
    for i, seq in enumerate(SEQUENCES):
        alone = tiny_decoder(input_ids=torch.tensor([seq])).logits[0]
        lp = torch.log_softmax(alone[:-1].float() / temperature, -1)
        lp = lp.gather(-1, torch.tensor(seq)[1:, None])[:, 0]
        expected = lp[torch.tensor(LOSS_MASKS[i][1:])].sum()
        torch.testing.assert_close(out.sum_per_row(3)[i], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("full_logits", [False, True])
def test_causal_token_log_probs_without_stats(tiny_decoder, full_logits):
    _use_full_logits_path(tiny_decoder, full_logits)
    batch = _batch(SEQUENCES, LOSS_MASKS, pad_id=0, left=False)
    with_stats = causal_token_log_probs(tiny_decoder, batch, chunk_size=4)
    without = causal_token_log_probs(tiny_decoder, batch, chunk_size=4, with_stats=False)
    assert with_stats.stats is not None and without.stats is None
    torch.testing.assert_close(without.logps, with_stats.logps, atol=0, rtol=0)


@pytest.mark.parametrize("full_logits", [False, True])
def test_causal_lm_loss_value_and_gradients_equal_naive(tiny_decoder, full_logits):
    _use_full_logits_path(tiny_decoder, full_logits)
    batch = _batch(SEQUENCES, LOSS_MASKS, pad_id=0, left=False)
    num_tokens = int(batch["loss_mask"][:, 1:].sum())
    loss, stats = causal_lm_loss(tiny_decoder, batch, normalizer=num_tokens, chunk_size=4)
    got = torch.autograd.grad(loss, list(tiny_decoder.parameters()))

    logits = tiny_decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch["input_ids"][:, 1:].reshape(-1),
        reduction="none",
    )
    ref = (nll * batch["loss_mask"][:, 1:].reshape(-1)).sum() / num_tokens
    want = torch.autograd.grad(ref, list(tiny_decoder.parameters()))
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-6)
    assert len(stats.entropy) == num_tokens
    for (name, _), g, w in zip(tiny_decoder.named_parameters(), got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4, msg=name)
    assert sum(int(g.abs().max() > 0) for g in got) == len(got)  # every parameter is reached


def test_causal_token_log_probs_gradients_and_stats_equal_naive(tiny_decoder):
    batch = _batch(SEQUENCES, LOSS_MASKS, pad_id=0, left=True)
    downstream = torch.linspace(-1.0, 2.0, sum(sum(m[1:]) for m in LOSS_MASKS))  # non-uniform weights
    out = causal_token_log_probs(tiny_decoder, batch, temperature=0.7, chunk_size=3)
    got = torch.autograd.grad((out.logps * downstream).sum(), list(tiny_decoder.parameters()))

    logits = tiny_decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp_all = torch.log_softmax(logits[:, :-1].float() / 0.7, -1)  # predicts tokens 1..t-1
    rows, cols = batch["loss_mask"][:, 1:].nonzero(as_tuple=True)  # row-major, as the flattened output
    ref = logp_all[rows, cols].gather(-1, batch["input_ids"][rows, cols + 1, None])[:, 0]
    want = torch.autograd.grad((ref * downstream).sum(), list(tiny_decoder.parameters()))
    torch.testing.assert_close(out.logps, ref, atol=1e-5, rtol=0)
    assert torch.equal(out.rows, rows) and torch.equal(out.positions, cols + 1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)[rows, cols]
    torch.testing.assert_close(out.stats.entropy, entropy.detach(), atol=1e-5, rtol=0)
    correct = logp_all[rows, cols].argmax(-1) == batch["input_ids"][rows, cols + 1]
    assert torch.equal(out.stats.correct, correct)
    for (name, _), g, w in zip(tiny_decoder.named_parameters(), got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4, msg=name)
