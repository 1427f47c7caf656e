"""Value-head models and reference models: forward contract, the LM untouched, save/load round trips
(full model and PEFT adapter, tether's files and TRL's), generate, value-head dropout, the head's
initialisation (independent of the global RNG by default, TRL's "normal" strategy exact), TRL 0.7's
from_pretrained keywords (quantization, device_map, is_trainable, ...), push_to_hub; create_reference_model's
frozen copy and its shared layers. Multi-adapter RLHF (reward_adapter) is in test_multi_adapter.py.

Shapes: b = batch, t = tokens, v = vocabulary.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, OPTConfig, OPTForCausalLM

from tether import (
    AutoModelForCausalLMWithValueHead,
    AutoModelForSeq2SeqLMWithValueHead,
    create_reference_model,
)
from tether.models.loading import is_peft_model
from tether.models.value_head import VALUE_HEAD_INIT_SEED, PreTrainedModelWrapper
from tether.rollout.generation import eos_token_ids


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
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir, summary_dropout_prob=0.5)
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
        model.v_head.summary.weight.mul_(-2.0)  # and the head moved away from its initialisation
    model.save_pretrained(tmp_path)
    assert {"model.safetensors", "value_head.safetensors"} <= set(os.listdir(tmp_path))
    assert not any(name.endswith((".bin", ".pt")) for name in os.listdir(tmp_path))

    reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path))
    input_ids, attention_mask = inputs()
    with torch.no_grad():
        logits, _, values = model(input_ids=input_ids, attention_mask=attention_mask)
        logits_2, _, values_2 = reloaded(input_ids=input_ids, attention_mask=attention_mask)
        # a fresh head on the original weights gives other values: the file was read
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


# ----- the wrapper class and its initialisation ------------------------------------------------------------
def test_both_value_head_classes_are_pretrained_model_wrappers(tiny_decoder_dir):
    assert issubclass(AutoModelForCausalLMWithValueHead, PreTrainedModelWrapper)
    assert issubclass(AutoModelForSeq2SeqLMWithValueHead, PreTrainedModelWrapper)
    assert AutoModelForCausalLMWithValueHead.transformers_parent_class is AutoModelForCausalLM
    assert AutoModelForSeq2SeqLMWithValueHead.transformers_parent_class is AutoModelForSeq2SeqLM
    assert set(PreTrainedModelWrapper.supported_args) == {"summary_dropout_prob", "v_head_initializer_range",
                                                          "v_head_init_strategy"}
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir)
    assert isinstance(model.pretrained_model, AutoModelForCausalLM._model_mapping[type(model.config)])
    assert model.is_peft_model is False and model.supports_rm_adapter is False
    # the LM's generation settings are the wrapper's: EOS is found through it
    assert eos_token_ids(model) == eos_token_ids(model.pretrained_model) != []
    with pytest.raises(ValueError, match="no language-model head"):
        AutoModelForCausalLMWithValueHead(AutoModel.from_pretrained(tiny_decoder_dir))


def test_default_head_does_not_depend_on_the_global_rng(tiny_decoder_dir):
    torch.manual_seed(1)
    first = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir)
    torch.manual_seed(2)
    torch.rand(100)
    second = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir)
    torch.testing.assert_close(first.v_head.state_dict(), second.v_head.state_dict(), rtol=0, atol=0)
    # TRL's default: nn.Linear's own initialisation, here drawn as if the global RNG had the fixed seed
    torch.manual_seed(VALUE_HEAD_INIT_SEED)
    reference = torch.nn.Linear(64, 1)
    torch.testing.assert_close(first.v_head.summary.state_dict(), reference.state_dict(), rtol=0, atol=0)
    # a new LoRA adapter too starts the same whatever was drawn before
    torch.manual_seed(1)
    with_adapter = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir, peft_config=lora())
    torch.manual_seed(2)
    again = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir, peft_config=lora())
    adapters = [{n: p for n, p in m.named_parameters() if "lora_" in n} for m in (with_adapter, again)]
    assert adapters[0] and adapters[0].keys() == adapters[1].keys()
    torch.testing.assert_close(adapters[0], adapters[1], rtol=0, atol=0)
    assert not torch.equal(adapters[0][next(iter(adapters[0]))], torch.zeros(()))


def test_normal_init_strategy_is_trls(tiny_decoder_dir, tiny_decoder):
    torch.manual_seed(5)
    model = AutoModelForCausalLMWithValueHead(tiny_decoder, v_head_init_strategy="normal",
                                              v_head_initializer_range=0.3)
    # TRL's sequence: nn.Linear(h, 1) is built (drawing its default init), then weight ~ N(0, 0.3), bias 0
    torch.manual_seed(5)
    torch.nn.Linear(64, 1)
    expected = torch.empty(1, 64).normal_(mean=0.0, std=0.3)
    torch.testing.assert_close(model.v_head.summary.weight, expected, rtol=0, atol=0)
    assert torch.equal(model.v_head.summary.bias, torch.zeros(1))
    loaded = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir, v_head_init_strategy="normal",
                                                               v_head_initializer_range=1e-4)
    assert 0 < loaded.v_head.summary.weight.abs().max() < 1e-3 and torch.equal(loaded.v_head.summary.bias,
                                                                                torch.zeros(1))
    with pytest.raises(ValueError, match="v_head_init_strategy='uniform'"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir, v_head_init_strategy="uniform")


def test_summary_dropout_prob_from_the_config(tiny_decoder):
    tiny_decoder.config.summary_dropout_prob = 0.25
    assert AutoModelForCausalLMWithValueHead(tiny_decoder).v_head.dropout.p == 0.25
    assert AutoModelForCausalLMWithValueHead(tiny_decoder, summary_dropout_prob=0.5).v_head.dropout.p == 0.5


def test_head_reads_the_width_the_lm_head_reads(tmp_path):
    """OPT projects its final hidden state below hidden_size before the LM head; the value head follows."""
    config = OPTConfig(vocab_size=100, hidden_size=64, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=1,
                       num_attention_heads=4, max_position_embeddings=64)
    OPTForCausalLM(config).save_pretrained(tmp_path)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path))
    assert model.v_head.summary.in_features == 32
    _, _, value = model(input_ids=torch.tensor([[5, 6, 7]]))
    assert value.shape == (1, 3)


# ----- from_pretrained's keywords --------------------------------------------------------------------------
def test_unknown_keywords_reach_the_transformers_model(tiny_decoder_dir):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir, attention_dropout=0.125,
                                                              torch_dtype="bfloat16", use_safetensors=True)
    assert model.config.attention_dropout == 0.125
    assert model.pretrained_model.dtype == torch.bfloat16 and model.v_head.summary.weight.dtype == torch.float32
    _, _, value = model(input_ids=torch.tensor([[5, 6, 7]]))
    assert value.dtype == torch.float32
    with pytest.raises(OSError):  # honoured: the folder holds safetensors only
        AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir, use_safetensors=False)


def test_device_map_and_offloading(tiny_decoder_dir, tiny_decoder):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir, device_map={"": "cpu"})
    assert model.pretrained_model.device == torch.device("cpu") and not model.is_sequential_parallel
    assert model.current_device == torch.device("cpu")
    tiny_decoder.hf_device_map = {"model": "cpu", "lm_head": "disk"}
    with pytest.raises(ValueError, match="offloaded"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder)


def test_adapter_folder_is_trainable_unless_asked_otherwise(tmp_path, tiny_decoder_dir):
    AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir, peft_config=lora()).save_pretrained(tmp_path)
    frozen = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path), is_trainable=False)
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable == {"v_head.summary.weight", "v_head.summary.bias"}  # the adapter is frozen, the head not
    assert any("lora_" in n for n, _ in frozen.named_parameters())


def test_model_object_and_bad_arguments(tiny_decoder_dir, tiny_decoder):
    wrapped = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder, peft_config=lora())
    assert wrapped.is_peft_model and wrapped.pretrained_model.get_base_model() is tiny_decoder
    with pytest.raises(ValueError, match="already is a PEFT model"):
        AutoModelForCausalLMWithValueHead.from_pretrained(wrapped.pretrained_model, peft_config=lora())
    with pytest.warns(UserWarning, match="not used"):
        AutoModelForCausalLMWithValueHead.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_decoder_dir),
                                                          torch_dtype="bfloat16")
    with pytest.raises(ValueError, match="peft_config must be a peft.PeftConfig"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir, peft_config={"r": 4})
    with pytest.raises(ValueError, match="prompt learning"):
        AutoModelForCausalLMWithValueHead.from_pretrained(
            tiny_decoder_dir, peft_config=PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(ValueError, match="reward_adapter must be"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir, reward_adapter=3)


def test_4bit_lora_policy_with_value_head(tmp_path, tiny_decoder_dir):
    import bitsandbytes as bnb

    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir, load_in_4bit=True,
                                                              peft_config=lora(task_type="CAUSAL_LM"))
    assert model.is_loaded_in_4bit and not model.is_loaded_in_8bit
    q_proj = model.pretrained_model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("v_head.") for n in trainable)
    input_ids, attention_mask = inputs()
    _, _, values = model(input_ids=input_ids, attention_mask=attention_mask)
    values.sum().backward()  # gradients reach the adapter through the 4-bit layers, and the head
    assert q_proj.lora_A["default"].weight.grad.abs().sum() > 0 and model.v_head.summary.weight.grad is not None
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path), load_in_4bit=True)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids, attention_mask=attention_mask)[2],
                                   model(input_ids=input_ids, attention_mask=attention_mask)[2], rtol=0, atol=0)


def test_8bit_loading_builds_an_8bit_model(tiny_decoder_dir):
    import bitsandbytes as bnb

    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir, load_in_8bit=True,
                                                              peft_config=lora(task_type="CAUSAL_LM"))
    assert model.is_loaded_in_8bit
    q_proj = model.pretrained_model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear8bitLt)


# ----- TRL's saved files, state dicts and the hub ----------------------------------------------------------
def trl_head() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"v_head.summary.weight": torch.randn(1, 64, generator=g), "v_head.summary.bias": torch.randn(1, generator=g)}


def assert_head_is(model, head: dict[str, torch.Tensor]) -> None:
    torch.testing.assert_close(model.v_head.summary.weight, head["v_head.summary.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.v_head.summary.bias, head["v_head.summary.bias"], rtol=0, atol=0)


def test_reads_a_head_trl_saved_inside_the_model_weights(tmp_path, tiny_decoder_dir, tiny_decoder):
    """TRL wrote the LM's weights and the head's `v_head.*` entries into one model.safetensors."""
    shutil.copytree(tiny_decoder_dir, tmp_path / "trl", dirs_exist_ok=True)
    path = tmp_path / "trl" / "model.safetensors"
    head = trl_head()
    save_file({**load_file(path), **head}, path, metadata={"format": "pt"})
    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path / "trl"))
    assert_head_is(model, head)
    input_ids, attention_mask = inputs()
    expected = tiny_decoder(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(model(input_ids=input_ids, attention_mask=attention_mask)[0], expected, rtol=0, atol=0)


def test_reads_a_head_trl_saved_in_sharded_weights(tmp_path, tiny_decoder_dir):
    folder = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_decoder_dir).save_pretrained(folder, max_shard_size="100KB")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    assert len(set(index["weight_map"].values())) > 1
    head = trl_head()
    save_file(head, folder / "model-v-head.safetensors", metadata={"format": "pt"})
    index["weight_map"].update({key: "model-v-head.safetensors" for key in head})
    index_path.write_text(json.dumps(index))
    assert_head_is(AutoModelForCausalLMWithValueHead.from_pretrained(str(folder)), head)


def test_reads_a_peft_head_trl_saved_as_pytorch_model_bin(tmp_path, tiny_decoder_dir):
    """TRL saved a PEFT policy's head alone in pytorch_model.bin beside the adapter (read weights_only)."""
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir, peft_config=lora())
    model.pretrained_model.save_pretrained(tmp_path)
    head = trl_head()
    torch.save(head, tmp_path / "pytorch_model.bin")
    reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path))
    assert reloaded.is_peft_model
    assert_head_is(reloaded, head)


def test_post_init_loads_v_head_entries(tiny_decoder):
    model = AutoModelForCausalLMWithValueHead(tiny_decoder)
    head = trl_head()
    model.post_init({**head, "model.norm.weight": torch.zeros(64)})  # LM entries are not the head's business
    assert_head_is(model, head)
    assert not torch.equal(tiny_decoder.model.norm.weight, torch.zeros(64))


@pytest.mark.parametrize("layout", ["wrapper", "trl"])
def test_save_pretrained_with_an_explicit_state_dict(tmp_path, tiny_decoder_dir, layout):
    """The ZeRO-3 way: save_pretrained(dir, state_dict=accelerator.get_state_dict(model))."""
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["v_head.summary.bias"] += 1.0
    state["pretrained_model.lm_head.weight"] += 0.5
    if layout == "trl":  # the LM's keys unprefixed, as TRL's state_dict() gave them
        state = {k.removeprefix("pretrained_model."): v for k, v in state.items()}
    model.save_pretrained(tmp_path, state_dict=state)
    reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path))
    torch.testing.assert_close(reloaded.v_head.summary.bias, model.v_head.summary.bias + 1.0, rtol=0, atol=0)
    torch.testing.assert_close(reloaded.pretrained_model.lm_head.weight,
                               model.pretrained_model.lm_head.weight + 0.5, rtol=0, atol=0)


def test_push_to_hub_uploads_what_save_pretrained_writes(tmp_path, tiny_decoder_dir, monkeypatch):
    from huggingface_hub import HfApi

    calls = {}

    class Repo:
        repo_id = "someone/policy"

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        calls["create"] = (repo_id, private, exist_ok)
        return Repo()

    def upload_folder(self, repo_id, folder_path, **kwargs):
        calls["upload"] = (repo_id, kwargs)
        shutil.copytree(folder_path, tmp_path / "hub")  # what the hub would hold
        return "commit"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir, peft_config=lora())
    with torch.no_grad():
        model.v_head.summary.bias.fill_(3.0)
    assert model.push_to_hub("policy", private=True, commit_message="ppo") == "commit"
    assert calls["create"] == ("policy", True, True)
    assert calls["upload"][0] == "someone/policy" and calls["upload"][1]["commit_message"] == "ppo"
    assert {"adapter_config.json", "adapter_model.safetensors", "value_head.safetensors"} <= set(
        os.listdir(tmp_path / "hub"))
    reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path / "hub"))
    torch.testing.assert_close(reloaded.v_head.state_dict(), model.v_head.state_dict(), rtol=0, atol=0)


def test_two_ppo_runs_with_one_seed_are_identical_whatever_came_before(tiny_decoder_dir, tokenizer):
    """PPOConfig.seed reproduces a run: the value head no longer depends on draws made before PPOTrainer."""
    from tether import PPOConfig, PPOTrainer

    queries = [torch.tensor([5, 17, 42]), torch.tensor([8, 9])]
    responses = [torch.tensor([99, 7, 30]), torch.tensor([10, 11, 12, 13])]
    runs = []
    for prior_seed in (1, 2):
        torch.manual_seed(prior_seed)
        torch.rand(prior_seed * 10)  # whatever a script drew before building the trainer
        model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir)
        trainer = PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=1, seed=0), model, None, tokenizer)
        trainer.step(queries, responses, [torch.tensor(1.0), torch.tensor(-0.5)])
        runs.append({n: p.detach().clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


def test_gradient_checkpointing_keyword(tiny_decoder_dir):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir, peft_config=lora(),
                                                              use_gradient_checkpointing=True)
    assert model.pretrained_model.is_activation_checkpointing
    model.train()
    input_ids, attention_mask = inputs()
    _, _, values = model(input_ids=input_ids, attention_mask=attention_mask)
    values.sum().backward()  # the adapters below the checkpointed blocks still get gradients
    lora_a = model.pretrained_model.get_base_model().model.layers[0].self_attn.q_proj.lora_A["default"]
    assert lora_a.weight.grad is not None and lora_a.weight.grad.abs().sum() > 0


def test_token_and_revision_reach_the_file_lookups(tiny_decoder_dir, monkeypatch):
    import tether.models.value_head as value_head

    seen = []
    real = value_head.find_model_file

    def spy(name_or_path, filename, token=None, revision=None):
        seen.append((filename, token, revision))
        return real(name_or_path, filename, token, revision)

    monkeypatch.setattr(value_head, "find_model_file", spy)
    AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir, token="hf_x", revision="main")
    assert ("adapter_config.json", "hf_x", "main") in seen and ("value_head.safetensors", "hf_x", "main") in seen
