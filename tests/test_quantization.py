"""Quantization (QLoRA) on CPU: bitsandbytes 4-bit/8-bit loading from TRL-style keys, k-bit preparation,
QLoRA SFT -> merge -> QLoRA DPO end to end, 8-bit optimizers, merging adapters into full-precision weights,
the CLI flags, and the errors (missing bitsandbytes, a quantized model without an adapter, bad options)."""

from __future__ import annotations

import json
import sys

import bitsandbytes as bnb  # the `quant` extra; these tests exercise it for real
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from tether import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from tether.cli import parse_command_args
from tether.data.preference import PreferenceCollator
from tether.demo.corpus import generate_reviews, preference_pairs
from tether.models.forward import completion_log_probs
from tether.models.loading import (
    apply_peft,
    load_language_model,
    load_reward_model,
    merge_adapter_and_save,
    model_init_kwargs,
)

FACTS = [("the capital of france is", " paris."), ("two plus two is", " four."), ("hello", " world")]
FOUR_BIT = {"load_in_4bit": True, "bnb_4bit_use_double_quant": True}
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def common(tmp_path, name: str, **overrides) -> dict:
    values = dict(output_dir=str(tmp_path / name), report_to="none", save_strategy="no", disable_tqdm=True,
                  dataloader_pin_memory=False, seed=0)
    return {**values, **overrides}


def lora(r: int = 16, **overrides) -> LoraConfig:
    return LoraConfig(**{"r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0, "target_modules": "all-linear",
                         "task_type": "CAUSAL_LM", **overrides})


def logged(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def decoder_linears(model) -> dict[str, torch.nn.Module]:
    """The decoder's projection layers (the base layer under a LoRA wrapper), by name."""
    return {name.removesuffix(".base_layer"): module for name, module in model.named_modules()
            if name.removesuffix(".base_layer").endswith(LINEAR_NAMES) and hasattr(module, "weight")}


def ids_batch() -> torch.Tensor:
    return torch.randint(8, 300, (2, 12), generator=torch.Generator().manual_seed(0))  # [b=2, t=12]


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory, tiny_decoder_dir):
    """The tiny decoder after a short full-precision pretraining on reviews: the "base model" of a QLoRA
    recipe (a random model gives LoRA, which cannot touch the embeddings or the LM head, little to work with)."""
    path = tmp_path_factory.mktemp("pretrained")
    data = Dataset.from_list([{"text": r["text"]} for r in generate_reviews(960, seed=3)])
    trainer = SFTTrainer(tiny_decoder_dir, train_dataset=data, args=SFTConfig(**common(
        path, "run", per_device_train_batch_size=16, learning_rate=3e-3, max_steps=60, logging_steps=60)))
    trainer.train()
    trainer.save_model(str(path))
    return str(path)


# ----- options -> one BitsAndBytesConfig -------------------------------------------------------------------
def test_quantization_keys_become_one_bitsandbytes_config():
    kwargs = model_init_kwargs({"load_in_4bit": True})
    config = kwargs["quantization_config"]
    assert isinstance(config, BitsAndBytesConfig) and config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "nf4"  # QLoRA's default, not BitsAndBytesConfig's fp4
    assert config.bnb_4bit_compute_dtype == torch.float32 and not config.bnb_4bit_use_double_quant
    assert not {"load_in_4bit", "load_in_8bit"} & set(kwargs)

    # TRL's ModelConfig names; the compute dtype follows `dtype` unless given.
    kwargs = model_init_kwargs({"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "use_bnb_nested_quant": True,
                                "torch_dtype": "bfloat16"})
    config = kwargs["quantization_config"]
    assert (config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant) == ("fp4", True)
    assert config.bnb_4bit_compute_dtype == torch.bfloat16 and kwargs["dtype"] == torch.bfloat16
    assert not {"bnb_4bit_quant_type", "use_bnb_nested_quant"} & set(kwargs)

    assert model_init_kwargs({"load_in_8bit": True})["quantization_config"].load_in_8bit
    as_dict = model_init_kwargs({"quantization_config": {"load_in_4bit": True, "bnb_4bit_compute_dtype": "bfloat16",
                                                         "bnb_4bit_quant_type": "nf4"}})["quantization_config"]
    assert isinstance(as_dict, BitsAndBytesConfig) and as_dict.bnb_4bit_compute_dtype == torch.bfloat16
    given = BitsAndBytesConfig(load_in_4bit=True)
    assert model_init_kwargs({"quantization_config": given})["quantization_config"] is given
    # Trainers normalise kwargs that were normalised already (DPO's reference): nothing changes the 2nd time.
    once = model_init_kwargs(FOUR_BIT)
    assert model_init_kwargs(once)["quantization_config"] is once["quantization_config"]
    assert "quantization_config" not in model_init_kwargs({"dtype": "float32"})


@pytest.mark.parametrize("kwargs, match", [
    ({"load_in_4bit": True, "load_in_8bit": True}, "choose one"),
    ({"load_in_4bit": True, "quantization_config": {"load_in_4bit": True}}, "Both quantization_config"),
    ({"bnb_4bit_quant_type": "nf4"}, "only to 4-bit loading: add load_in_4bit=True"),
    ({"load_in_8bit": True, "use_bnb_nested_quant": True}, "only to 4-bit loading"),
    ({"load_in_4bit": True, "bnb_4bit_use_double_quant": True, "use_bnb_nested_quant": False}, "disagree"),
    ({"quantization_config": {"load_in_4bit": True, "bnb_4bit_quant_typo": "nf4"}}, "unknown key.*quant_typo"),
])
def test_conflicting_or_misspelt_quantization_options_are_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        model_init_kwargs(kwargs)


def test_missing_bitsandbytes_says_how_to_install_it(monkeypatch, tmp_path, tiny_decoder_dir):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails as if absent
    with pytest.raises(ImportError, match=r"pip install bitsandbytes.*pip install -e \"\.\[quant\]\""):
        model_init_kwargs({"load_in_4bit": True})
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        model_init_kwargs({"quantization_config": {"load_in_8bit": True}})
    # A trainer asked for 4 bits stops: it does not quietly train in full precision instead.
    data = Dataset.from_dict({"text": ["the film was great."] * 4})
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        SFTTrainer(tiny_decoder_dir, train_dataset=data, peft_config=lora(),
                   args=SFTConfig(**common(tmp_path, "sft", max_steps=1, model_init_kwargs={"load_in_4bit": True})))


# ----- loading -----------------------------------------------------------------------------------------------
def test_4bit_model_computes_with_its_dequantized_weights(tiny_decoder_dir):
    """Every decoder projection becomes an NF4 Linear4bit (the LM head stays full precision), the memory
    they take shrinks ~8x, and the model equals a full-precision one holding the dequantized weights."""
    full = load_language_model(tiny_decoder_dir).eval()
    quantized = load_language_model(tiny_decoder_dir, **FOUR_BIT).eval()
    linears = decoder_linears(quantized)
    assert len(linears) == 2 * len(LINEAR_NAMES)
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in linears.values())
    assert all(m.weight.quant_state.quant_type == "nf4" and m.weight.quant_state.nested for m in linears.values())
    assert type(quantized.lm_head) is torch.nn.Linear
    linear_bytes = sum(m.weight.numel() * 4 for m in decoder_linears(full).values())
    saved = full.get_memory_footprint() - quantized.get_memory_footprint()
    assert saved > 0.8 * linear_bytes * (1 - 1 / 8), (saved, linear_bytes)  # fp32 -> 4 bits per weight

    dequantized = load_language_model(tiny_decoder_dir).eval()
    for name, module in decoder_linears(dequantized).items():
        weight = bnb.functional.dequantize_4bit(linears[name].weight.data, linears[name].weight.quant_state)
        module.weight.data = weight.to(torch.float32)
    ids = ids_batch()
    with torch.no_grad():
        reference, original = dequantized(ids).logits, full(ids).logits
        # Train mode (no dropout in this model) keeps the float32 compute path. In eval mode, bitsandbytes
        # on an AVX512-BF16 CPU repacks the weights and multiplies in bf16: the same model to bf16 rounding.
        got = quantized.train()(ids).logits
        inference = quantized.eval()(ids).logits
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inference, reference, atol=2e-2, rtol=2e-2)
    error = ((got - original).norm() / original.norm()).item()
    assert 0.01 < error < 0.3, error  # 4-bit rounding is visible, but the model is the same model


def test_adapter_gradients_survive_an_inference_pass(tiny_decoder_dir):
    """After an eval-mode forward without grad (an evaluation, a generation, a reference pass), a model being
    trained must backpropagate exactly as before: bitsandbytes' CPU repacking would cut the gradient path
    through the frozen 4-bit layers, so every adapter below the last layer would get a wrong gradient."""
    torch.manual_seed(0)
    model = apply_peft(load_language_model(tiny_decoder_dir, **FOUR_BIT), lora(r=4, init_lora_weights=False))
    ids = ids_batch()

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = gradients()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = gradients()
    assert set(after) == set(before) and len(before) == 4 * len(LINEAR_NAMES)  # A and B, 2 layers
    for name, grad in before.items():
        torch.testing.assert_close(after[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.filterwarnings("ignore:MatMul8bitLt")
def test_8bit_model_trains_lora_with_a_paged_8bit_optimizer(tmp_path, tiny_decoder_dir):
    """load_in_8bit + optim="paged_adamw_8bit" (bitsandbytes falls back to unpaged memory on CPU): Adam
    states of tensors of >= 4096 values are held in 8 bits; adapters learn, the int8 base stays put."""
    data = Dataset.from_dict({"prompt": [p for p, _ in FACTS] * 8, "completion": [c for _, c in FACTS] * 8})
    trainer = SFTTrainer(tiny_decoder_dir, train_dataset=data, peft_config=lora(r=64), args=SFTConfig(**common(
        tmp_path, "sft8", per_device_train_batch_size=8, learning_rate=1e-2, max_steps=3, logging_steps=1,
        optim="paged_adamw_8bit", model_init_kwargs={"load_in_8bit": True})))
    linears = decoder_linears(trainer.model)
    assert all(isinstance(m, bnb.nn.Linear8bitLt) for m in linears.values())
    base_before = {name: m.weight.data.clone() for name, m in linears.items()}
    assert all(w.dtype == torch.int8 for w in base_before.values())
    with pytest.warns(UserWarning, match="Paged optimizers are not supported on CPU"):
        trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # under accelerate's wrapper
    assert isinstance(optimizer, bnb.optim.optimizer.Optimizer8bit) and optimizer.args.optim_bits == 8
    states = [optimizer.state[p] for group in optimizer.param_groups for p in group["params"] if p.numel() >= 4096]
    assert states and all(s["state1"].dtype == torch.uint8 for s in states)
    assert all(torch.equal(m.weight.data, base_before[name]) for name, m in linears.items())
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # initialised at zero, moved by training
    assert logged(trainer, "loss")[-1] < logged(trainer, "loss")[0]


def test_training_a_quantized_model_without_an_adapter_is_an_error(tmp_path, tiny_decoder_dir):
    data = Dataset.from_dict({"text": ["the film was great."] * 4})
    with pytest.raises(ValueError, match="quantized weights cannot be trained directly.*peft_config=LoraConfig"):
        SFTTrainer(tiny_decoder_dir, train_dataset=data,
                   args=SFTConfig(**common(tmp_path, "sft", max_steps=1, model_init_kwargs=FOUR_BIT)))
    quantized = load_language_model(tiny_decoder_dir, **FOUR_BIT)
    with pytest.raises(ValueError, match="quantized weights cannot be trained directly"):
        DPOTrainer(quantized, train_dataset=Dataset.from_list(preference_pairs(4)),
                   args=DPOConfig(**common(tmp_path, "dpo", max_steps=1)))


def test_activation_checkpointing_reaches_the_adapters_of_a_4bit_model(tmp_path, tiny_decoder_dir):
    """Checkpointed blocks over a frozen 4-bit base get inputs without grad; the adapters inside them must
    still learn. Without activation_checkpointing, preparing the model does not switch it on."""
    data = Dataset.from_dict({"text": ["the ending was wonderful."] * 8})
    for checkpointing in (True, False):
        trainer = SFTTrainer(tiny_decoder_dir, train_dataset=data, peft_config=lora(r=4), args=SFTConfig(**common(
            tmp_path, f"ckpt{checkpointing}", per_device_train_batch_size=4, learning_rate=1e-2, max_steps=2,
            activation_checkpointing=checkpointing, model_init_kwargs=FOUR_BIT)))
        trainer.train()
        assert trainer.model.get_base_model().is_activation_checkpointing is checkpointing
        lora_b = {n: p for n, p in trainer.model.named_parameters() if "lora_B" in n}
        assert lora_b and all(p.abs().sum() > 0 for p in lora_b.values()), checkpointing


# ----- QLoRA end to end --------------------------------------------------------------------------------------
def test_qlora_sft_then_merge_then_qlora_dpo_on_cpu(tmp_path, pretrained_dir):
    """The dpo-qlora recipe on a 4-bit tiny model: SFT with LoRA memorises three facts, the adapter is
    merged into the full-precision base, and DPO with a fresh LoRA over the merged model (loaded in 4 bits,
    its reference the adapter-disabled model) learns to prefer positive continuations."""
    # 1. SFT over the 4-bit base.
    facts = Dataset.from_dict({"prompt": [p for p, _ in FACTS] * 8, "completion": [c for _, c in FACTS] * 8})
    sft = SFTTrainer(pretrained_dir, train_dataset=facts, peft_config=lora(), args=SFTConfig(**common(
        tmp_path, "sft", per_device_train_batch_size=8, learning_rate=1e-2, max_steps=30, logging_steps=5,
        model_init_kwargs=FOUR_BIT)))
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in decoder_linears(sft.model).values())
    assert {n for n, p in sft.model.named_parameters() if p.requires_grad} == {
        n for n, _ in sft.model.named_parameters() if "lora_" in n}
    packed = {n: m.weight.data.clone() for n, m in decoder_linears(sft.model).items()}
    sft.train()
    losses, accuracies = logged(sft, "loss"), logged(sft, "mean_token_accuracy")
    assert losses[-1] < 0.7 * losses[0] and accuracies[-1] == 1.0, (losses, accuracies)
    assert all(torch.equal(m.weight.data, packed[n]) for n, m in decoder_linears(sft.model).items())
    tokenizer, model = sft.processing_class, sft.model.eval()
    for prompt, completion in FACTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).startswith(completion)

    # 2. Merge into the full-precision base (reloaded: the 4-bit weights in memory are not merged into).
    merged_dir = merge_adapter_and_save(sft.model, str(tmp_path / "merged"))
    saved = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in saved and (tmp_path / "merged" / "tokenizer.json").is_file()
    sft.model.save_pretrained(tmp_path / "adapter")
    reference = PeftModel.from_pretrained(load_language_model(pretrained_dir), tmp_path / "adapter").eval()
    merged = load_language_model(merged_dir).eval()
    ids = ids_batch()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)

    # 3. DPO with a new LoRA over the merged model in 4 bits; the reference is that model, adapter off.
    dpo = DPOTrainer(merged_dir, train_dataset=Dataset.from_list(preference_pairs(480)), peft_config=lora(),
                     eval_dataset=Dataset.from_list(preference_pairs(64, seed=1)),
                     args=DPOConfig(**common(tmp_path, "dpo", per_device_train_batch_size=8, learning_rate=5e-3,
                                             max_steps=60, logging_steps=10, model_init_kwargs=FOUR_BIT)))
    assert dpo.ref_model is None  # no second copy of the base
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in decoder_linears(dpo.model).values())
    dpo.train()
    accuracies, margins = logged(dpo, "rewards/accuracies"), logged(dpo, "rewards/margins")
    assert len(accuracies) == 6 and accuracies[-1] >= 0.8 and accuracies[-1] > accuracies[0] + 0.15, accuracies
    assert margins[-1] > margins[0] + 0.7, margins  # each log averages 10 batches of 8 pairs
    metrics = dpo.evaluate()  # pairs never trained on; before training every margin is 0 (policy = reference)
    assert metrics["eval_rewards/accuracies"] >= 0.8 and metrics["eval_rewards/margins"] > 0.7, metrics
    rows = list(dpo.train_dataset.select(range(8)))
    batch = PreferenceCollator(tokenizer.pad_token_id)(rows)
    base_4bit = load_language_model(merged_dir, **FOUR_BIT).train()  # float32 compute path, as in training
    with torch.no_grad():
        base_sums, _, _ = completion_log_probs(base_4bit, batch)
        live = dpo.reference_log_probs(dpo.model.eval(), batch)  # what the loss used as the reference
    torch.testing.assert_close(torch.cat([live["chosen"], live["rejected"]]), base_sums, atol=1e-5, rtol=0)


# ----- merging -----------------------------------------------------------------------------------------------
def test_merge_full_precision_peft_model_in_a_copy(tmp_path, tiny_decoder_dir):
    torch.manual_seed(0)
    model = get_peft_model(load_language_model(tiny_decoder_dir), lora(r=4, init_lora_weights=False)).eval()
    ids = ids_batch()
    with torch.no_grad():
        before = model(ids).logits
    out = merge_adapter_and_save(model, str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert not any("lora" in key for key in f.keys())
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, before, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)  # the PEFT model is untouched
        with model.disable_adapter():
            assert (model(ids).logits - before).abs().max() > 1e-2  # the adapter mattered


def test_merge_adapter_folder_trained_over_4bit_base(tmp_path, tiny_decoder_dir):
    """An adapter saved from a 4-bit PEFT model merges into the base reloaded in full precision: the result
    equals full-precision base + adapter, not the 4-bit model."""
    torch.manual_seed(0)
    quantized = get_peft_model(load_language_model(tiny_decoder_dir, **FOUR_BIT), lora(r=4, init_lora_weights=False))
    quantized.save_pretrained(tmp_path / "adapter")
    merge_adapter_and_save(str(tmp_path / "adapter"), str(tmp_path / "merged"))
    merged = load_language_model(str(tmp_path / "merged")).eval()
    reference = PeftModel.from_pretrained(load_language_model(tiny_decoder_dir), tmp_path / "adapter").eval()
    ids = ids_batch()
    with torch.no_grad():
        got, expected, four_bit = merged(ids).logits, reference(ids).logits, quantized.eval()(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - four_bit).abs().max() > 1e-3  # it is not the quantized model that was saved
    assert (tmp_path / "merged" / "tokenizer.json").is_file()  # found next to the base
    with pytest.raises(ValueError, match="drop the quantization options"):
        merge_adapter_and_save(str(tmp_path / "adapter"), str(tmp_path / "again"), load_in_4bit=True)


def test_merge_reward_model_adapter_keeps_its_score_head(tmp_path, tiny_decoder_dir):
    """A SEQ_CLS adapter (a LoRA-trained reward model, its score head saved alongside) merges into a
    sequence-classification base, from a folder or from a 4-bit model in memory (task type as peft's enum)."""
    from peft import TaskType

    torch.manual_seed(0)
    config = lora(r=4, task_type=TaskType.SEQ_CLS, init_lora_weights=False)
    model = get_peft_model(load_reward_model(tiny_decoder_dir), config).eval()
    model.save_pretrained(tmp_path / "adapter")
    merge_adapter_and_save(str(tmp_path / "adapter"), str(tmp_path / "merged"))
    ids = ids_batch()
    with torch.no_grad():
        expected = model(ids).logits  # [b, 1]
        torch.testing.assert_close(load_reward_model(str(tmp_path / "merged"))(ids).logits, expected,
                                   atol=1e-5, rtol=1e-5)
    quantized = get_peft_model(load_reward_model(tiny_decoder_dir, **FOUR_BIT), config)
    set_peft_model_state_dict(quantized, get_peft_model_state_dict(model))  # the same adapter and score head
    merge_adapter_and_save(quantized, str(tmp_path / "merged-4bit"), base_model_name_or_path=tiny_decoder_dir)
    with torch.no_grad():
        torch.testing.assert_close(load_reward_model(str(tmp_path / "merged-4bit"))(ids).logits, expected,
                                   atol=1e-5, rtol=1e-5)


# ----- CLI ---------------------------------------------------------------------------------------------------
def test_cli_quantization_flags(tmp_path):
    base = ["--model_name_or_path", "m", "--dataset_name", "d.jsonl", "--output_dir", str(tmp_path)]
    script_args, _ = parse_command_args("dpo", [*base, "--use_peft", "--load_in_4bit", "--bnb_4bit_quant_type",
                                                "fp4", "--use_bnb_nested_quant"])
    kwargs = script_args.quantization_kwargs()
    assert kwargs == {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "use_bnb_nested_quant": True}
    config = model_init_kwargs(kwargs)["quantization_config"]
    assert (config.load_in_4bit, config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant) == (True, "fp4", True)
    script_args, _ = parse_command_args("sft", [*base, "--use_peft", "--load_in_8bit"])
    assert script_args.quantization_kwargs() == {"load_in_8bit": True}
    assert parse_command_args("sft", base)[0].quantization_kwargs() == {}
    with pytest.raises(ValueError, match="add --use_peft"):
        parse_command_args("sft", [*base, "--load_in_4bit"])
    with pytest.raises(ValueError, match="apply only with --load_in_4bit"):
        parse_command_args("sft", [*base, "--use_peft", "--use_bnb_nested_quant"])
    with pytest.raises(ValueError, match="choose one"):
        parse_command_args("sft", [*base, "--use_peft", "--load_in_4bit", "--load_in_8bit"])


def test_cli_trains_a_4bit_lora_and_writes_a_resolved_config(tmp_path, tiny_decoder_dir):
    import yaml

    from tether.cli import RESOLVED_CONFIG_NAME, main

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in generate_reviews(16, seed=4)))
    out = tmp_path / "out"
    code = main(["sft", "--model_name_or_path", tiny_decoder_dir, "--dataset_name", str(data), "--output_dir",
                 str(out), "--use_peft", "--lora_r", "4", "--load_in_4bit", "--max_steps", "2",
                 "--per_device_train_batch_size", "4", "--report_to", "none", "--save_strategy", "no",
                 "--disable_tqdm", "true", "--dataloader_pin_memory", "false"])
    assert code == 0
    assert (out / "adapter_model.safetensors").is_file()
    resolved = yaml.safe_load((out / RESOLVED_CONFIG_NAME).read_text())
    assert resolved["load_in_4bit"] is True
    assert resolved["model_init_kwargs"]["load_in_4bit"] is True
