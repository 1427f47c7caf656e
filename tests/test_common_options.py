"""The options every TRL 1.16 trainer has, written as a TRL user writes them: trust_remote_code,
quantization_config=, activation_offloading, router_aux_loss_coef (MoE), model_init_kwargs as JSON, and
ModelConfig's TRL 1.16 fields."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, MixtralConfig

from tether import (
    CPOConfig,
    CPOTrainer,
    DPOConfig,
    DPOTrainer,
    GRPOConfig,
    GRPOTrainer,
    KTOConfig,
    KTOTrainer,
    ORPOConfig,
    ORPOTrainer,
    RewardConfig,
    RewardTrainer,
    RLOOConfig,
    RLOOTrainer,
    SFTConfig,
    SFTTrainer,
)

TEXTS = [{"text": t} for t in ("the capital of france is paris.", "two plus two is four.", "hello world",
                               "question: answer:")]
PAIRS = [{"prompt": "the capital of france is", "chosen": " paris.", "rejected": " four."},
         {"prompt": "two plus two is", "chosen": " four.", "rejected": " paris."},
         {"prompt": "hello", "chosen": " world", "rejected": " four."},
         {"prompt": "question:", "chosen": " answer:", "rejected": " hello"}]
UNPAIRED = [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"} for p in PAIRS
            for k in ("chosen", "rejected")]


def constant_reward(completions, **_):
    return [0.0] * len(completions)


def common(tmp_path, **overrides) -> dict:
    values = dict(output_dir=str(tmp_path / "run"), report_to="none", save_strategy="no", disable_tqdm=True,
                  dataloader_pin_memory=False, seed=0, logging_steps=1)
    return {**values, **overrides}


# trainer class, config class, extra constructor keywords, dataset: each trainer as TRL's docs call it
ONLINE = dict(num_generations=2, per_device_train_batch_size=4, max_completion_length=4)
TRAINERS = {
    "sft": (SFTTrainer, SFTConfig, {}, TEXTS, {}),
    "reward": (RewardTrainer, RewardConfig, {}, [{k: p[k] for k in ("chosen", "rejected")} for p in PAIRS], {}),
    "dpo": (DPOTrainer, DPOConfig, {}, PAIRS, {}),
    "kto": (KTOTrainer, KTOConfig, {}, UNPAIRED, {}),
    "cpo": (CPOTrainer, CPOConfig, {}, PAIRS, {}),
    "orpo": (ORPOTrainer, ORPOConfig, {}, PAIRS, {}),
    "grpo": (GRPOTrainer, GRPOConfig, {"reward_funcs": constant_reward}, [{"prompt": p["prompt"]} for p in PAIRS],
             ONLINE),
    "rloo": (RLOOTrainer, RLOOConfig, {"reward_funcs": constant_reward}, [{"prompt": p["prompt"]} for p in PAIRS],
             ONLINE),
}


def build(name: str, model, tmp_path, **config_overrides):
    trainer_class, config_class, extra, rows, defaults = TRAINERS[name]
    args = config_class(**common(tmp_path, **{**defaults, **config_overrides}))
    return trainer_class(model=model, args=args, train_dataset=Dataset.from_list(rows), **extra)


def inner_model(trainer):
    model = trainer.model
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ----- trust_remote_code -------------------------------------------------------------------------------------
CONFIG_CODE = '''from transformers import LlamaConfig


class CustomConfig(LlamaConfig):
    model_type = "tether_custom_llama"
'''
MODELING_CODE = '''from torch import nn
from transformers import LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel, LlamaPreTrainedModel

from .configuration_custom import CustomConfig


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig


class CustomForSequenceClassification(LlamaForSequenceClassification):
    config_class = CustomConfig

    def __init__(self, config):  # the backbone built directly: transformers' AutoModel does not know CustomConfig
        LlamaPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = LlamaModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()
'''


@pytest.fixture(scope="module")
def custom_code_dir(tmp_path_factory, tiny_decoder_dir):
    """The tiny decoder saved as a checkpoint whose architecture exists only in Python files next to its
    weights (config.json's auto_map), as hub models with custom code are."""
    path = tmp_path_factory.mktemp("custom-code")
    shutil.copytree(tiny_decoder_dir, path, dirs_exist_ok=True)
    (path / "configuration_custom.py").write_text(CONFIG_CODE)
    (path / "modeling_custom.py").write_text(MODELING_CODE)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="tether_custom_llama", architectures=["CustomForCausalLM"], auto_map={
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
        "AutoModelForSequenceClassification": "modeling_custom.CustomForSequenceClassification"})
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize("name", list(TRAINERS))
def test_trust_remote_code_loads_custom_code_only_when_allowed(name, tmp_path, custom_code_dir):
    with pytest.raises(ValueError, match="trust_remote_code"):
        build(name, custom_code_dir, tmp_path)
    trainer = build(name, custom_code_dir, tmp_path, trust_remote_code=True)
    assert type(inner_model(trainer)).__name__.startswith("Custom")  # the checkpoint's own class ran


def test_trust_remote_code_in_model_init_kwargs_wins(tmp_path, custom_code_dir):
    """As in TRL: the key in model_init_kwargs, when present, decides; the field fills in when it is absent."""
    trainer = build("sft", custom_code_dir, tmp_path, model_init_kwargs={"trust_remote_code": True})
    assert type(trainer.model).__name__ == "CustomForCausalLM"
    with pytest.raises(ValueError, match="trust_remote_code"):
        build("sft", custom_code_dir, tmp_path, trust_remote_code=True,
              model_init_kwargs={"trust_remote_code": False})


def test_trust_remote_code_for_a_reference_given_by_path(tmp_path, tiny_decoder_dir, custom_code_dir):
    trainer = DPOTrainer(model=tiny_decoder_dir, ref_model=custom_code_dir, train_dataset=Dataset.from_list(PAIRS),
                         args=DPOConfig(**common(tmp_path, trust_remote_code=True)))
    assert type(trainer.ref_model).__name__ == "CustomForCausalLM"
    with pytest.raises(ValueError, match="trust_remote_code"):
        DPOTrainer(model=tiny_decoder_dir, ref_model=custom_code_dir, train_dataset=Dataset.from_list(PAIRS),
                   args=DPOConfig(**common(tmp_path)))


def test_trust_remote_code_for_a_reward_model_given_by_path(tmp_path, tiny_decoder_dir, custom_code_dir):
    rows = [{"prompt": p["prompt"]} for p in PAIRS]
    trainer = GRPOTrainer(model=tiny_decoder_dir, reward_funcs=custom_code_dir, train_dataset=Dataset.from_list(rows),
                          args=GRPOConfig(**common(tmp_path, trust_remote_code=True, **ONLINE)))
    assert any("Custom" in type(getattr(f, "model", f)).__name__ for f in trainer.rewards.funcs)
    with pytest.raises(ValueError, match="trust_remote_code"):
        GRPOTrainer(model=tiny_decoder_dir, reward_funcs=custom_code_dir, train_dataset=Dataset.from_list(rows),
                    args=GRPOConfig(**common(tmp_path, **ONLINE)))


# ----- quantization_config= -----------------------------------------------------------------------------------
def four_bit():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def lora():
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def linear4bit_count(model) -> int:
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_sft_quantization_config_trains_qlora(tmp_path, tiny_decoder_dir):
    pytest.importorskip("bitsandbytes")
    trainer = SFTTrainer(model=tiny_decoder_dir, train_dataset=Dataset.from_list(TEXTS), peft_config=lora(),
                         quantization_config=four_bit(),
                         args=SFTConfig(**common(tmp_path, max_steps=2, learning_rate=1e-2,
                                                 per_device_train_batch_size=2)))
    assert linear4bit_count(trainer.model) == 14  # 2 layers x 7 projections, all 4-bit
    lora_b = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_B" in k}
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    moved = [k for k, v in trainer.model.named_parameters() if k in lora_b and not torch.equal(v, lora_b[k])]
    assert len(moved) == len(lora_b)  # every adapter trained through the 4-bit layers


@pytest.mark.parametrize("name", ["reward", "dpo", "kto", "grpo", "rloo"])
def test_quantization_config_keyword_on_every_trainer(name, tmp_path, tiny_decoder_dir):
    pytest.importorskip("bitsandbytes")
    trainer_class, config_class, extra, rows, defaults = TRAINERS[name]
    peft_config = lora()
    if name == "reward":
        peft_config.task_type = "SEQ_CLS"
    trainer = trainer_class(model=tiny_decoder_dir, train_dataset=Dataset.from_list(rows), peft_config=peft_config,
                            quantization_config=four_bit(), args=config_class(**common(tmp_path, **defaults)), **extra)
    assert linear4bit_count(trainer.model) == 14


def test_quantization_config_twice_or_on_a_loaded_model(tmp_path, tiny_decoder_dir):
    pytest.importorskip("bitsandbytes")
    with pytest.raises(ValueError, match="quantization_config was given both"):
        SFTTrainer(model=tiny_decoder_dir, train_dataset=Dataset.from_list(TEXTS), peft_config=lora(),
                   quantization_config=four_bit(),
                   args=SFTConfig(**common(tmp_path, model_init_kwargs={"load_in_4bit": True})))
    model = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)
    with pytest.warns(UserWarning, match="quantization_config .* already loaded, so it was ignored"):
        trainer = SFTTrainer(model=model, processing_class=AutoTokenizer.from_pretrained(tiny_decoder_dir),
                             train_dataset=Dataset.from_list(TEXTS), quantization_config=four_bit(),
                             args=SFTConfig(**common(tmp_path)))
    assert linear4bit_count(trainer.model) == 0


# ----- activation_offloading ----------------------------------------------------------------------------------
def _offload_hooks_active() -> bool:
    """Whether the innermost saved-tensor hooks are torch's save_on_cpu ones (private API, test only)."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return hooks is not None and "save_on_cpu" in getattr(hooks[0], "__qualname__", "")


@pytest.mark.parametrize("name", ["sft", "dpo"])
def test_activation_offloading_same_gradients_and_hooks_on(name, tmp_path, tiny_decoder_dir):
    grads, seen = {}, {}
    for offload in (False, True):
        trainer = build(name, tiny_decoder_dir, tmp_path, activation_offloading=offload, max_steps=1,
                        per_device_train_batch_size=2, max_grad_norm=None)
        flags: list[bool] = []

        def note(*_, flags=flags):
            flags.append(torch.is_grad_enabled() and _offload_hooks_active())

        trainer.model.model.layers[0].register_forward_pre_hook(note)
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.0)  # training_step needs one
        trainer.create_scheduler(1, trainer.optimizer)
        trainer.current_gradient_accumulation_steps = 1  # train() sets it before its first step
        loss = trainer.training_step(trainer.model, batch)
        grads[offload] = {k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.grad is not None}
        seen[offload] = (any(flags), float(loss))
    assert seen[True][0] and not seen[False][0]  # the policy's forward ran inside save_on_cpu only when asked
    assert seen[True][1] == seen[False][1]
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for key, grad in grads[False].items():
        assert torch.equal(grads[True][key], grad), key


# ----- router_aux_loss_coef (Mixture of Experts) ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                           tie_word_embeddings=False, router_aux_loss_coef=0.02)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    path = tmp_path_factory.mktemp("tiny-moe")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def reference_router_loss(model, forwards) -> torch.Tensor:
    """transformers' own load_balancing_loss_func on the router logits of the recorded forwards, mean of them."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    config = model.config
    return torch.stack([load_balancing_loss_func(out.router_logits, config.num_local_experts,
                                                 config.num_experts_per_tok, kwargs.get("attention_mask"))
                        for kwargs, out in forwards]).mean()


@pytest.mark.parametrize("name", ["sft", "dpo"])
def test_router_aux_loss_is_added_with_its_coefficient(name, tmp_path, tiny_moe_dir):
    coef = 0.5
    trainer = build(name, tiny_moe_dir, tmp_path, router_aux_loss_coef=coef, per_device_train_batch_size=2)
    plain = build(name, tiny_moe_dir, tmp_path, router_aux_loss_coef=0.0, per_device_train_batch_size=2)
    assert trainer.router_aux_loss_coef == coef and trainer.model.config.output_router_logits
    assert plain.router_aux_loss_coef == 0.0 and not plain.model.config.output_router_logits
    assert trainer.aux_loss_enabled and not plain.aux_loss_enabled  # TRL's attribute
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    forwards = []
    trainer.model.register_forward_hook(
        lambda _m, _a, kwargs, out: forwards.append((kwargs, out)) if torch.is_grad_enabled() else None,
        with_kwargs=True)
    trainer.model.train(), plain.model.train()
    with_aux = trainer.compute_loss(trainer.model, batch)
    without = plain.compute_loss(plain.model, batch)
    assert forwards
    expected = coef * reference_router_loss(trainer.model, forwards)
    assert float(expected) > 0.1  # the term is large enough here for the comparison to mean something
    torch.testing.assert_close(with_aux - without, expected, rtol=1e-5, atol=1e-6)
    # its gradient reaches the routers (which the main loss also moves): compare with the loss without it
    with_aux.backward()
    without.backward()
    gate = "model.layers.0.mlp.gate.weight"
    router_grads = [dict(m.named_parameters())[gate].grad for m in (trainer.model, plain.model)]
    assert not torch.allclose(*router_grads)


def test_router_aux_loss_default_and_errors(tmp_path, tiny_moe_dir, tiny_decoder_dir):
    trainer = build("sft", tiny_moe_dir, tmp_path)  # None: the model config's own coefficient
    assert trainer.router_aux_loss_coef == pytest.approx(0.02) and trainer.model.config.output_router_logits
    trainer.args.max_steps = 2
    trainer.train()
    assert any("aux_loss" in entry for entry in trainer.state.log_history)
    with pytest.raises(ValueError, match="router_aux_loss_coef=0.1.*not a Mixture-of-Experts"):
        build("sft", tiny_decoder_dir, tmp_path, router_aux_loss_coef=0.1)
    dense = build("sft", tiny_decoder_dir, tmp_path)
    assert dense.router_aux_loss_coef == 0.0 and not dense.aux_loss_enabled  # None on a dense model: nothing


# ----- model_init_kwargs as JSON (command lines) --------------------------------------------------------------
def test_model_init_kwargs_json_string(tmp_path, tiny_decoder_dir):
    config = SFTConfig(**common(tmp_path, model_init_kwargs='{"dtype": "bfloat16"}'))
    assert config.model_init_kwargs == {"dtype": "bfloat16"}
    trainer = SFTTrainer(model=tiny_decoder_dir, args=config, train_dataset=Dataset.from_list(TEXTS))
    assert trainer.model.dtype == torch.bfloat16
    (parsed,) = HfArgumentParser(GRPOConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--model_init_kwargs", '{"dtype": "float16", "trust_remote_code": true}',
         "--report_to", "none"])
    assert parsed.model_init_kwargs == {"dtype": "float16", "trust_remote_code": True}
    with pytest.raises(ValueError, match="model_init_kwargs must be a dict or a JSON object"):
        SFTConfig(**common(tmp_path, model_init_kwargs="{dtype: bfloat16}"))


def test_ref_model_init_kwargs_json_string(tmp_path):
    assert DPOConfig(**common(tmp_path, ref_model_init_kwargs='{"dtype": "bfloat16"}')).ref_model_init_kwargs == {
        "dtype": "bfloat16"}
    (parsed,) = HfArgumentParser(DPOConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--model_init_kwargs", '{"dtype": "float16"}',
         "--ref_model_init_kwargs", '{"attn_implementation": "eager"}', "--report_to", "none"])
    assert parsed.model_init_kwargs == {"dtype": "float16"}
    assert parsed.ref_model_init_kwargs == {"attn_implementation": "eager"}


def test_no_warning_from_the_defaults(tmp_path, tiny_decoder_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        build("sft", tiny_decoder_dir, tmp_path)
    assert not os.path.exists(os.path.join(tmp_path, "run", "samples.jsonl"))


# ----- ModelConfig: TRL 1.16's fields --------------------------------------------------------------------------
def test_model_config_trl_1_16_fields_parse_and_mean_what_they_say(tmp_path):
    from tether import ModelConfig, get_peft_config, get_quantization_config

    def script_dtype(m):  # TRL 1.x's example scripts' line
        return m.dtype if m.dtype in ("auto", None) else getattr(torch, m.dtype)

    assert ModelConfig().dtype == "float32" and script_dtype(ModelConfig()) is torch.float32
    (model_args,) = HfArgumentParser(ModelConfig).parse_args_into_dataclasses([
        "--model_name_or_path", "m", "--dtype", "bfloat16", "--use_peft", "--use_dora", "--use_rslora",
        "--lora_task_type", "SEQ_CLS", "--lora_target_modules", "all-linear", "--lora_target_parameters",
        "mlp.experts.gate_up_proj", "--load_in_4bit", "--bnb_4bit_quant_storage", "bfloat16"])
    assert script_dtype(model_args) is torch.bfloat16
    assert model_args.to_model_init_kwargs()["dtype"] is torch.bfloat16
    peft_config = get_peft_config(model_args)
    assert peft_config.use_dora and peft_config.use_rslora and peft_config.task_type == "SEQ_CLS"
    assert peft_config.target_modules == "all-linear"  # one name on the command line: peft's string form
    assert peft_config.target_parameters == ["mlp.experts.gate_up_proj"]
    pytest.importorskip("bitsandbytes")
    quantization = get_quantization_config(model_args)
    assert quantization.bnb_4bit_quant_storage == torch.bfloat16  # as transformers stores it
    assert quantization.bnb_4bit_compute_dtype == torch.bfloat16  # follows dtype, as in TRL
    # TRL 0.7's torch_dtype still sets it; the two names disagreeing is an error
    assert ModelConfig(torch_dtype="float16").dtype == "float16"
    with pytest.raises(ValueError, match="dtype='bfloat16' and torch_dtype='float16' disagree"):
        ModelConfig(dtype="bfloat16", torch_dtype="float16")
    with pytest.raises(ValueError, match="bnb_4bit_quant_storage"):
        ModelConfig(bnb_4bit_quant_storage="int3")


def test_model_config_rslora_scaling_reaches_the_adapter(tiny_decoder_dir):
    """use_rslora: the adapter's scale is alpha / sqrt(r) instead of alpha / r (r=4, alpha=8: 4 instead of 2)."""
    from peft import get_peft_model

    from tether import ModelConfig, get_peft_config

    for rslora, scale in ((False, 2.0), (True, 4.0)):
        config = get_peft_config(ModelConfig(use_peft=True, lora_r=4, lora_alpha=8, use_rslora=rslora,
                                             lora_target_modules=["q_proj"]))
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_decoder_dir), config)
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        assert layer.scaling["default"] == pytest.approx(scale)


def test_use_auth_token_is_token(tiny_decoder_dir):
    """TRL 0.7's scripts pass use_auth_token=True, which transformers 5's from_pretrained rejects: it is token."""
    from tether import AutoModelForCausalLMWithValueHead
    from tether.models.loading import model_init_kwargs

    with pytest.warns(FutureWarning, match="use_auth_token"):
        assert model_init_kwargs({"use_auth_token": "hf_x"})["token"] == "hf_x"
    with pytest.warns(FutureWarning):
        model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir, use_auth_token=True)
    assert hasattr(model, "v_head")
