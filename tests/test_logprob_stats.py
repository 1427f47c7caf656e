"""What the one log-prob path (ops/logprobs.py for the math, models/forward.py for running a model) gives beyond
log-probs, against full logits computed here:

- `TokenStats.log_sum_sq` = log sum_v p_v^2 (WPO's normaliser), from the chunked kernels and the full-logits path;
- `linear_entropy`, the differentiable chunked entropy: value and gradient against autograd through full logits;
- `causal_token_log_probs(..., entropy_gradient=True)` on both paths, and under a float32 head on a bf16 model;
- each token's sequence (`TokenLogProbs.sequences`) in packed rows;
- DPO's use_weighting runs ONE forward pass of the policy per batch (no second pass for log sum p^2).
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from tether import DPOConfig, DPOTrainer
from tether.data.collate import LanguageModelingCollator
from tether.demo.corpus import preference_pairs
from tether.models.forward import cast_lm_head_to_fp32, causal_token_log_probs, splittable_head
from tether.ops.logprobs import linear_cross_entropy, linear_entropy, linear_log_probs, log_probs_from_logits

N, H, V = 30, 12, 41


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).requires_grad_()
    weight = torch.randn(V, H, generator=g).requires_grad_()
    bias = torch.randn(V, generator=g).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, bias, targets


def _naive_log_sum_sq(logits: torch.Tensor) -> torch.Tensor:
    p = logits.double().softmax(-1)  # [n, v]
    return (p * p).sum(-1).log()


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_log_sum_sq_from_every_path_equals_the_full_distribution(temperature):
    hidden, weight, bias, targets = _inputs()
    logits = (hidden @ weight.T + bias).detach()  # [n, v]
    expected = _naive_log_sum_sq(logits / temperature).float()
    _, chunked = linear_log_probs(hidden, weight, targets, bias, temperature, chunk_size=7)
    _, full = log_probs_from_logits(logits, targets, temperature)
    torch.testing.assert_close(chunked.log_sum_sq, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(full.log_sum_sq, expected, atol=1e-5, rtol=0)
    if temperature == 1.0:  # the fused cross-entropy has no temperature
        _, fused = linear_cross_entropy(hidden, weight, targets, torch.ones(N), bias, chunk_size=7)
        torch.testing.assert_close(fused.log_sum_sq, expected, atol=1e-5, rtol=0)
    assert not chunked.log_sum_sq.requires_grad and not full.log_sum_sq.requires_grad


def test_log_sum_sq_by_hand():
    """Uniform over v: sum p^2 = v * (1/v)^2 = 1/v. One certain token: sum p^2 = 1, log 1 = 0."""
    logits = torch.stack([torch.zeros(V), torch.full((V,), -1e4).index_fill(0, torch.tensor([3]), 0.0)])
    _, stats = log_probs_from_logits(logits, torch.tensor([0, 3]))
    torch.testing.assert_close(stats.log_sum_sq, torch.tensor([-math.log(V), 0.0]), atol=1e-6, rtol=0)
    weight = torch.eye(V)  # hidden = logits rows, so the linear path sees the same logits
    _, chunked = linear_log_probs(logits, weight, torch.tensor([0, 3]), chunk_size=1)
    torch.testing.assert_close(chunked.log_sum_sq, torch.tensor([-math.log(V), 0.0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk_size", [4, 30, 64])
def test_linear_entropy_value_and_gradient_equal_full_logits(chunk_size):
    hidden, weight, bias, _ = _inputs(1)
    ours = linear_entropy(hidden, weight, bias, temperature=0.8, chunk_size=chunk_size)
    logits = (hidden @ weight.T + bias) / 0.8
    reference = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)  # [n]
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    g = torch.randn(N, generator=torch.Generator().manual_seed(2))  # a different weight per token
    for a, b in zip(torch.autograd.grad((ours * g).sum(), (hidden, weight, bias)),
                    torch.autograd.grad((reference * g).sum(), (hidden, weight, bias))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert linear_entropy(hidden[:0], weight, bias).shape == (0,)


def _batch(tokenizer):
    rows = [{"input_ids": [5, 6, 7, 8, 9], "loss_mask": [False, False, True, True, True]},
            {"input_ids": [10, 11, 12], "loss_mask": [False, True, True]}]
    return LanguageModelingCollator(tokenizer.pad_token_id)(rows)


@pytest.mark.parametrize("full_logits", [False, True])
def test_entropy_gradient_on_both_paths(tiny_decoder_dir, tokenizer, full_logits):
    model = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)
    if full_logits:
        model.config.logit_scale = 1.5  # a logit-transform field Llama ignores: forward.py takes full logits
    assert (splittable_head(model) is None) == full_logits
    batch = _batch(tokenizer)
    out = causal_token_log_probs(model, batch, temperature=0.7, chunk_size=2, entropy_gradient=True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[out.rows, out.positions - 1] / 0.7  # [n, v]
    reference = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(out.entropy, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.stats.entropy, reference.detach(), atol=1e-5, rtol=1e-5)
    assert out.entropy.requires_grad and not out.stats.entropy.requires_grad
    assert causal_token_log_probs(model, batch).entropy is None  # only when asked


def test_float32_head_on_a_bf16_model_gives_float32_logits(tiny_decoder_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir, dtype=torch.bfloat16)
    model.config.tie_word_embeddings = False
    cast_lm_head_to_fp32(model)
    batch = _batch(tokenizer)
    out = causal_token_log_probs(model, batch, entropy_gradient=True)
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    logits = hidden[out.rows, out.positions - 1].float() @ model.lm_head.weight.T  # [n, v] float32
    targets = batch["input_ids"][out.rows, out.positions]  # [n]
    torch.testing.assert_close(out.logps, logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.entropy, -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1),
                               atol=1e-5, rtol=1e-5)


def test_sequences_of_a_packed_batch(tiny_decoder_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)
    rows = [{"input_ids": [5, 6, 7, 8, 9], "loss_mask": [False, False, True, True, True]},
            {"input_ids": [10, 11, 12], "loss_mask": [False, True, True]},
            {"input_ids": [20, 21, 22, 23], "loss_mask": [False, True, True, True]}]
    packed = LanguageModelingCollator(tokenizer.pad_token_id, pack_to=12)(rows)
    padded = LanguageModelingCollator(tokenizer.pad_token_id)(rows)
    assert "sequence_ids" in packed and packed["input_ids"].shape[0] < 3
    out_packed, out_padded = causal_token_log_probs(model, packed), causal_token_log_probs(model, padded)
    assert out_packed.num_sequences == out_padded.num_sequences == 3
    assert out_padded.sequences.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]  # padded: the row
    targets = packed["input_ids"][out_packed.rows, out_packed.positions]  # [n]
    for k, row in enumerate(rows):  # packed: the tokens tagged k are sequence k's completion tokens, in order
        counted = [t for t, m in zip(row["input_ids"], row["loss_mask"]) if m]
        assert targets[out_packed.sequences == k].tolist() == counted
    assert out_packed.count_per_sequence().tolist() == [3, 2, 3]
    torch.testing.assert_close(out_packed.sum_per_sequence(), out_padded.sum_per_row(3), atol=1e-5, rtol=0)


def test_dpo_use_weighting_runs_one_policy_forward_per_batch(tiny_decoder_dir, tmp_path):
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to="none",
                     save_strategy="no", disable_tqdm=True, use_weighting=True, padding_free=False)
    trainer = DPOTrainer(model=tiny_decoder_dir, ref_model=tiny_decoder_dir, args=args,
                         train_dataset=Dataset.from_list(preference_pairs(8, seed=0)))
    calls = []
    trainer.model.register_forward_hook(lambda *_: calls.append(1))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    logps = trainer.pair_log_probs(trainer.model, batch, aligned=True)
    assert len(calls) == 1 and logps["chosen_aligned"].shape == logps["chosen"].shape == (4,)
