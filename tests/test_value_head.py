"""Value-head models and reference models: forward contract, the LM untouched, save/load round trips
(full model and PEFT adapter), generate, value-head dropout; create_reference_model's frozen copy and its
shared layers.

Shapes: b = batch, t = tokens, v = vocabulary.
"""

from __future__ import annotations

import os

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from tether import (
    AutoModelForCausalLMWithValueHead,
    AutoModelForSeq2SeqLMWithValueHead,
    create_reference_model,
)
from tether.models.loading import is_peft_model


def lora(**overrides) -> LoraConfig:
    values = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                  init_lora_weights=False)  # random A and B: the adapter changes outputs from the start
    values.update(overrides)
    return LoraConfig(**values)


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows, the second right-padded: input_ids [2, 6], attention_mask [2, 6]."""
    input_ids = torch.tensor([[5, 17, 42, 99, 7, 300], [8, 9, 10, 11, 0, 0]])
    return input_ids, (input_ids != 0).long()


# ----- forward ---------------------------------------------------------------------------------------------
def test_forward_returns_logits_loss_and_one_value_per_token(tiny_decoder_dir, tiny_decoder):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir)
    input_ids, attention_mask = inputs()
    lm_logits, loss, value = model(input_ids=input_ids, attention_mask=attention_mask)
    assert lm_logits.shape == (2, 6, tiny_decoder.config.vocab_size)
    assert loss is None
    assert value.shape == (2, 6)
    plain = tiny_decoder(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(lm_logits, plain, rtol=0, atol=0)  # the head adds nothing to the LM
    # value = head(final hidden state), token by token
    hidden = tiny_decoder(input_ids=input_ids, attention_mask=attention_mask,
                          output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(value, model.v_head.summary(hidden).squeeze(-1), rtol=0, atol=0)
    # labels give the LM's own loss
    _, loss, _ = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
    expected = tiny_decoder(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)


def test_seq2seq_forward_gives_values_over_decoder_positions(tiny_seq2seq_dir):
    model = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(tiny_seq2seq_dir)
    plain = AutoModelForSeq2SeqLM.from_pretrained(tiny_seq2seq_dir)
    input_ids, attention_mask = inputs()
    decoder_input_ids = torch.tensor([[0, 5, 6], [0, 7, 8]])
    lm_logits, loss, value = model(input_ids=input_ids, attention_mask=attention_mask,
                                   decoder_input_ids=decoder_input_ids)
    assert lm_logits.shape == (2, 3, plain.config.vocab_size) and loss is None and value.shape == (2, 3)
    expected = plain(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)
    torch.testing.assert_close(lm_logits, expected.logits, rtol=0, atol=0)


def test_generate_passes_through(tiny_decoder_dir, tiny_decoder):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir)
    input_ids = torch.tensor([[5, 17, 42]])
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    out = model.generate(input_ids=input_ids, **kwargs)
    assert out.shape == (1, 9)
    assert torch.equal(out, tiny_decoder.generate(input_ids=input_ids, **kwargs))


def test_value_head_dropout(tiny_decoder_dir):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir, v_head_dropout=0.5)
    assert isinstance(model.v_head.dropout, torch.nn.Dropout) and model.v_head.dropout.p == 0.5
    input_ids, attention_mask = inputs()
    model.train()
    torch.manual_seed(0)
    logits_a, _, values_a = model(input_ids=input_ids, attention_mask=attention_mask)
    logits_b, _, values_b = model(input_ids=input_ids, attention_mask=attention_mask)
    assert not torch.allclose(values_a, values_b)  # dropout noise in the head
    torch.testing.assert_close(logits_a, logits_b, rtol=0, atol=0)  # but not in the LM (no dropout there)
    model.eval()
    _, _, values_c = model(input_ids=input_ids, attention_mask=attention_mask)
    _, _, values_d = model(input_ids=input_ids, attention_mask=attention_mask)
    torch.testing.assert_close(values_c, values_d, rtol=0, atol=0)
    no_dropout = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir)
    assert isinstance(no_dropout.v_head.dropout, torch.nn.Identity)


# ----- save / load -----------------------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path, tiny_decoder_dir):
    torch.manual_seed(3)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir)
    with torch.no_grad():
        model.pretrained_model.lm_head.weight.add_(0.1)  # the LM changed too, as after training
    model.save_pretrained(tmp_path)
    assert {"model.safetensors", "value_head.safetensors"} <= set(os.listdir(tmp_path))
    assert not any(name.endswith((".bin", ".pt")) for name in os.listdir(tmp_path))

    reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path))
    input_ids, attention_mask = inputs()
    with torch.no_grad():
        logits, _, values = model(input_ids=input_ids, attention_mask=attention_mask)
        logits_2, _, values_2 = reloaded(input_ids=input_ids, attention_mask=attention_mask)
        torch.manual_seed(4)  # a fresh head on the original weights gives other values: the file was read
        _, _, fresh_values = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir)(
            input_ids=input_ids, attention_mask=attention_mask)
    torch.testing.assert_close(values_2, values, rtol=0, atol=0)
    torch.testing.assert_close(logits_2, logits, rtol=0, atol=0)
    assert not torch.allclose(fresh_values, values)


def test_peft_save_writes_adapter_and_head_and_reloads(tmp_path, tiny_decoder_dir):
    torch.manual_seed(3)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir, peft_config=lora())
    assert is_peft_model(model.pretrained_model) and model.is_peft_model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("v_head.") for n in trainable)
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"adapter_model.safetensors", "adapter_config.json", "value_head.safetensors"} <= files
    assert "model.safetensors" not in files  # the adapter only, not the base weights

    reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path))
    assert is_peft_model(reloaded.pretrained_model)  # still an adapter on the base, ...
    reloaded_trainable = {n for n, p in reloaded.named_parameters() if p.requires_grad}
    assert reloaded_trainable == trainable  # ... that trains again, base still frozen
    input_ids, attention_mask = inputs()
    with torch.no_grad():
        logits, _, values = model(input_ids=input_ids, attention_mask=attention_mask)
        logits_2, _, values_2 = reloaded(input_ids=input_ids, attention_mask=attention_mask)
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)(
            input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(logits_2, logits, rtol=0, atol=0)
    torch.testing.assert_close(values_2, values, rtol=0, atol=0)
    assert not torch.allclose(logits, base_logits, atol=1e-4)  # the adapter was part of what was reloaded

    with pytest.raises(ValueError, match="already holds a PEFT adapter"):
        AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path), peft_config=lora())


# ----- reference models ------------------------------------------------------------------------------------
def test_reference_is_a_frozen_equal_copy(tiny_decoder_dir):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir)
    model.train()
    reference = create_reference_model(model)
    assert not reference.training and all(not m.training for m in reference.modules())
    assert all(not p.requires_grad for p in reference.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the policy stays trainable
    policy_ptrs = {p.data_ptr() for p in model.parameters()}
    assert not policy_ptrs & {p.data_ptr() for p in reference.parameters()}  # copied, nothing shared
    input_ids, attention_mask = inputs()
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask)
        got = reference(input_ids=input_ids, attention_mask=attention_mask)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(got[2], expected[2], rtol=0, atol=0)


@pytest.mark.parametrize("pattern", [None, "model.layers.{layer}."])
def test_shared_layers_are_the_same_tensors_and_frozen(tiny_decoder_dir, pattern):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir)
    reference = create_reference_model(model, num_shared_layers=1, pattern=pattern)
    policy = dict(model.named_parameters())
    ref = dict(reference.named_parameters())
    assert policy.keys() == ref.keys()
    shared = {n for n in policy if "embed_tokens" in n or ".layers.0." in n}
    assert len(shared) == 10  # embeddings + layer 0 (4 attention, 3 MLP, 2 norms)
    for name in policy:
        if name in shared:
            assert ref[name] is policy[name], name
            assert not policy[name].requires_grad, name
        else:
            assert ref[name] is not policy[name] and ref[name].data_ptr() != policy[name].data_ptr(), name
            assert policy[name].requires_grad and not ref[name].requires_grad, name
            torch.testing.assert_close(ref[name], policy[name], rtol=0, atol=0)


def test_shared_layer_errors(tiny_decoder_dir):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir)
    with pytest.raises(ValueError, match="fewer layers"):
        create_reference_model(model, num_shared_layers=5)
    with pytest.raises(ValueError, match="pattern"):
        create_reference_model(model, num_shared_layers=1, pattern="no.such.{layer}.")


def test_peft_model_gets_no_reference_copy(tiny_decoder_dir):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir, peft_config=lora())
    with pytest.raises(ValueError, match="adapter disabled"):
        create_reference_model(model)
    with pytest.raises(ValueError, match="adapter disabled"):
        create_reference_model(model.pretrained_model)
