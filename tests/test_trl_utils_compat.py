"""TRL 0.7's model/trainer helpers under tether: ModelConfig and the configs it builds (parsed from a
command line as the example scripts do), setup_chat_format, the TRL-keyed collators, compute_accuracy,
import_utils, and the small trainer utilities. References are written out here: expected LoRA fields,
rendered ChatML strings, padded rows by hand."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    EvalPrediction,
    HfArgumentParser,
    TrainingArguments,
)

from tether import ModelConfig, SFTConfig, get_kbit_device_map, get_peft_config, get_quantization_config
from tether.trainer import RewardConfig


# ----- ModelConfig --------------------------------------------------------------------------------------------
@dataclass
class SFTScriptArguments:  # examples/scripts/sft.py's, verbatim in shape
    dataset_name: str = field(default="timdettmers/openassistant-guanaco", metadata={"help": "the dataset name"})
    dataset_text_field: str = field(default="text", metadata={"help": "the text field of the dataset"})
    max_seq_length: int = field(default=512, metadata={"help": "The maximum sequence length for SFT Trainer"})


@dataclass
class DPOScriptArguments:  # examples/scripts/dpo.py's fields
    beta: float = field(default=0.1, metadata={"help": "the beta parameter for DPO loss"})
    max_length: int = field(default=512, metadata={"help": "max length of each sample"})
    max_prompt_length: int = field(default=128, metadata={"help": "max length of each sample's prompt"})
    sanity_check: bool = field(default=True, metadata={"help": "only train on 1000 samples"})


def test_model_config_parses_as_the_example_scripts_do(tmp_path):
    argv = ["--output_dir", str(tmp_path), "--model_name_or_path", "facebook/opt-350m", "--torch_dtype", "bfloat16",
            "--use_peft", "--lora_r", "8", "--lora_alpha", "16", "--lora_target_modules", "q_proj", "v_proj",
            "--load_in_4bit", "--bnb_4bit_quant_type", "fp4", "--max_seq_length", "128"]
    args, training_args, model_config = HfArgumentParser(
        (SFTScriptArguments, TrainingArguments, ModelConfig)).parse_args_into_dataclasses(argv)
    assert args.max_seq_length == 128 and training_args.output_dir == str(tmp_path)
    assert model_config.model_name_or_path == "facebook/opt-350m" and model_config.torch_dtype == "bfloat16"
    assert model_config.use_peft and model_config.lora_r == 8 and model_config.lora_alpha == 16
    assert model_config.lora_target_modules == ["q_proj", "v_proj"]
    assert model_config.load_in_4bit and model_config.bnb_4bit_quant_type == "fp4"
    # the scripts' own dtype line, unchanged, works on the field
    assert getattr(torch, model_config.torch_dtype) is torch.bfloat16 and model_config.resolved_dtype is torch.bfloat16

    script, training_args, model_config = HfArgumentParser(
        (DPOScriptArguments, TrainingArguments, ModelConfig)).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--beta", "0.2", "--model_name_or_path", "m"])
    assert script.beta == 0.2 and script.max_length == 512 and not model_config.trust_remote_code
    # TRL 1.x moved trust_remote_code onto the training configs; ModelConfig keeps it as a Python argument only,
    # so that a training config and ModelConfig in one parser register the flag once (the config's).
    assert ModelConfig(trust_remote_code=True).trust_remote_code
    assert ModelConfig(trust_remote_code=True).to_model_init_kwargs()["trust_remote_code"] is True
    sft_config, model_config = HfArgumentParser((SFTConfig, ModelConfig)).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--model_name_or_path", "m", "--trust_remote_code"])
    assert sft_config.trust_remote_code and not model_config.trust_remote_code

    reward_config, model_config = HfArgumentParser((RewardConfig, ModelConfig)).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--model_name_or_path", "m", "--max_length", "512",
         "--remove_unused_columns", "False", "--per_device_train_batch_size", "4"])
    assert reward_config.max_length == 512 and model_config.model_name_or_path == "m"
    assert not model_config.trust_remote_code  # off by default


def test_model_config_validation_and_dtype_mapping():
    with pytest.raises(ValueError, match="load_in_8bit and load_in_4bit"):
        ModelConfig(load_in_8bit=True, load_in_4bit=True)
    with pytest.raises(ValueError, match="torch_dtype"):
        ModelConfig(torch_dtype="float64")
    with pytest.raises(ValueError, match="bnb_4bit_quant_type"):
        ModelConfig(bnb_4bit_quant_type="int4")
    assert ModelConfig().dtype == "float32" and ModelConfig(torch_dtype="auto").dtype == "auto"
    assert ModelConfig(torch_dtype="float16").resolved_dtype is torch.float16
    kwargs = ModelConfig(torch_dtype="float16", model_revision="v2", attn_implementation="sdpa").to_model_init_kwargs()
    assert kwargs == {"revision": "v2", "trust_remote_code": False, "dtype": torch.float16,
                      "attn_implementation": "sdpa"}
    flat = ModelConfig(model_name_or_path="m").to_dict()
    assert flat["model_name_or_path"] == "m" and flat["lora_r"] == 16


def test_get_peft_config_fields():
    assert get_peft_config(ModelConfig()) is None
    config = get_peft_config(ModelConfig(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.1,
                                         lora_target_modules=["q_proj", "v_proj"], lora_modules_to_save=["lm_head"]))
    from peft import LoraConfig

    assert isinstance(config, LoraConfig)
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (4, 8, 0.1, "none")
    assert config.task_type == "CAUSAL_LM" and set(config.target_modules) == {"q_proj", "v_proj"}
    assert config.modules_to_save == ["lm_head"]


def test_get_quantization_config_fields():
    pytest.importorskip("bitsandbytes")
    assert get_quantization_config(ModelConfig()) is None
    four = get_quantization_config(ModelConfig(load_in_4bit=True, torch_dtype="bfloat16", bnb_4bit_quant_type="fp4",
                                               use_bnb_nested_quant=True))
    assert four.load_in_4bit and not four.load_in_8bit
    assert four.bnb_4bit_compute_dtype is torch.bfloat16 and four.bnb_4bit_quant_type == "fp4"
    assert four.bnb_4bit_use_double_quant
    default = get_quantization_config(ModelConfig(load_in_4bit=True, torch_dtype="auto"))
    assert default.bnb_4bit_compute_dtype is torch.float32 and default.bnb_4bit_quant_type == "nf4"
    assert not default.bnb_4bit_use_double_quant
    eight = get_quantization_config(ModelConfig(load_in_8bit=True))
    assert eight.load_in_8bit and not eight.load_in_4bit


def test_get_kbit_device_map(monkeypatch):
    import accelerate

    if not torch.cuda.is_available():
        assert get_kbit_device_map() is None

    class ThirdProcess:  # a stand-in: the real PartialState is a process-wide singleton other tests share
        local_process_index = 3

    monkeypatch.setattr(accelerate, "PartialState", ThirdProcess)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_kbit_device_map() == {"": 3}  # this process's own GPU


# ----- setup_chat_format ---------------------------------------------------------------------------------------
def test_setup_chat_format_round_trip(tiny_decoder_dir):
    from tether import setup_chat_format

    model = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_decoder_dir)
    old_vocab = len(tokenizer)
    old_rows = model.get_input_embeddings().weight[:old_vocab].clone()
    model, tokenizer = setup_chat_format(model, tokenizer)

    assert len(tokenizer) == old_vocab + 2
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                                               "<|im_end|>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (start, end, end)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer)
    assert torch.equal(model.get_input_embeddings().weight[:old_vocab], old_rows)  # old rows kept
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (end, end)
    assert model.generation_config.bos_token_id == start

    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nworld<|im_end|>\n"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == start and ids.count(end) == 2  # each special token is one id
    assert tokenizer.decode(ids) == text
    out = model(torch.tensor([ids]))  # the new ids index the resized embeddings
    assert out.logits.shape == (1, len(ids), len(tokenizer))


def test_setup_chat_format_resize_multiple_and_bad_format(tiny_decoder_dir):
    from tether.models import setup_chat_format

    model = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_decoder_dir)
    model, tokenizer = setup_chat_format(model, tokenizer, resize_to_multiple_of=64)
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows % 64 == 0 and len(tokenizer) <= rows < len(tokenizer) + 64
    with pytest.raises(ValueError, match="unknown format"):
        setup_chat_format(model, tokenizer, format="llama")


# ----- collators with TRL's column names -------------------------------------------------------------------------
def test_reward_data_collator_with_padding(tokenizer):
    from tether.trainer.utils import RewardDataCollatorWithPadding

    pad = tokenizer.pad_token_id
    rows = [
        {"input_ids_chosen": [5, 6, 7], "attention_mask_chosen": [1, 1, 1], "input_ids_rejected": [8],
         "attention_mask_rejected": [1], "margin": 0.5},
        {"input_ids_chosen": [9], "attention_mask_chosen": [1], "input_ids_rejected": [10, 11],
         "attention_mask_rejected": [1, 1], "margin": 2.0},
    ]
    batch = RewardDataCollatorWithPadding(tokenizer)(rows)
    side = tokenizer.padding_side
    chosen_1 = [9, pad, pad] if side == "right" else [pad, pad, 9]
    assert batch["input_ids_chosen"].tolist() == [[5, 6, 7], chosen_1]
    assert batch["attention_mask_chosen"].tolist() == [[1, 1, 1], [1, 0, 0] if side == "right" else [0, 0, 1]]
    assert batch["input_ids_rejected"].shape == (2, 2)
    assert batch["return_loss"] is True and batch["margin"].tolist() == [0.5, 2.0]
    with pytest.raises(ValueError, match="attention_mask_rejected"):
        RewardDataCollatorWithPadding(tokenizer)([{"input_ids_chosen": [1], "attention_mask_chosen": [1],
                                                   "input_ids_rejected": [2]}])


def test_dpo_data_collator_with_padding():
    from tether.trainer.utils import DPODataCollatorWithPadding

    rows = [
        {"prompt_input_ids": [1, 2, 3], "prompt_attention_mask": [1, 1, 1], "chosen_input_ids": [1, 2, 3, 4],
         "chosen_labels": [-100, -100, -100, 4], "reference_chosen_logps": -1.5, "prompt": "a b c"},
        {"prompt_input_ids": [5], "prompt_attention_mask": [1], "chosen_input_ids": [5, 6],
         "chosen_labels": [-100, 6], "reference_chosen_logps": -2.0, "prompt": "e"},
    ]
    batch = DPODataCollatorWithPadding(pad_token_id=0)(rows)
    assert batch["prompt_input_ids"].tolist() == [[1, 2, 3], [0, 0, 5]]  # prompts padded on the left
    assert batch["prompt_attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["chosen_input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 0, 0]]
    assert batch["chosen_labels"].tolist() == [[-100, -100, -100, 4], [-100, 6, -100, -100]]
    assert batch["chosen_input_ids"].dtype == torch.long
    assert batch["reference_chosen_logps"].tolist() == [-1.5, -2.0] and batch["prompt"] == ["a b c", "e"]
    seq2seq = DPODataCollatorWithPadding(pad_token_id=0, is_encoder_decoder=True)(
        [{"prompt_input_ids": [1], "chosen_labels": [7, 8]}, {"prompt_input_ids": [2, 3], "chosen_labels": [9]}])
    assert seq2seq["prompt_input_ids"].tolist() == [[1, 0], [2, 3]]  # right-padded for an encoder
    assert seq2seq["chosen_labels"].tolist() == [[7, 8], [9, -100]]
    with pytest.raises(ValueError, match="pad_token_id is None"):
        DPODataCollatorWithPadding(pad_token_id=None)(rows)


# ----- compute_accuracy ------------------------------------------------------------------------------------------
def test_compute_accuracy():
    from tether.trainer import compute_accuracy

    predictions = np.array([[2.0, 1.0], [0.5, 1.5], [3.0, -1.0], [0.0, 0.1]])
    labels = np.zeros(4, dtype=int)  # column 0 (chosen) is always the preferred one
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compute_accuracy(EvalPrediction(predictions=predictions, label_ids=labels)) == {"accuracy": 0.5}
    assert compute_accuracy((predictions, labels)) == {"accuracy": 0.5}
    with pytest.warns(UserWarning, match="1 of 2 pairs have equal rewards"):
        assert compute_accuracy((np.array([[1.0, 1.0], [0.0, 2.0]]), np.zeros(2)))["accuracy"] == 0.5
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        compute_accuracy((np.zeros(3), np.zeros(3)))


# ----- import_utils ----------------------------------------------------------------------------------------------
def test_import_utils_answers():
    from tether import import_utils as iu

    for name in ("peft", "diffusers", "wandb", "rich", "torchvision", "unsloth", "bitsandbytes"):
        assert getattr(iu, f"is_{name}_available")() is (importlib.util.find_spec(name) is not None), name
    assert iu.is_peft_available()  # a dependency of tether
    assert iu.is_accelerate_greater_20_0() and iu.is_torch_greater_2_0()
    assert iu.is_transformers_greater_than("4.99.0") and not iu.is_transformers_greater_than("999.0")
    assert iu.is_xpu_available() is (hasattr(torch, "xpu") and torch.xpu.is_available())
    assert iu.is_npu_available() is False or importlib.util.find_spec("torch_npu") is not None


def test_compat_modules_import_lazily_and_checks_import_nothing():
    """`import tether` and the TRL-path packages load no trainer (not even torch); asking whether a
    package is installed does not import it."""
    code = ("import sys; import tether, tether.trainer, tether.trainer.utils, tether.models, tether.extras, "
            "tether.import_utils as iu; assert iu.is_rich_available(); "
            "print(sorted(m for m in ('torch', 'rich', 'tether.trainers.ppo', 'tether.trainers.sft') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ----- small trainer utilities ----------------------------------------------------------------------------------
def test_trl_sanitze_kwargs_for_tagging():
    from tether.trainer.utils import trl_sanitze_kwargs_for_tagging as tag

    class Config:
        unsloth_version = None

    class Model:
        config = Config()

    model, names = Model(), ["trl", "sft"]
    assert tag(model, names) is None
    assert tag(model, names, {}) == {"tags": ["trl", "sft"]}
    assert tag(model, names, {"tags": ["mine"]}) == {"tags": ["mine", "trl", "sft"]}
    assert tag(model, names, {"tags": "mine", "private": True}) == {"tags": ["trl", "sft", "mine"], "private": True}
    assert names == ["trl", "sft"]  # the trainer's list is not modified
    model.config.unsloth_version = "2024.1"
    assert tag(model, names, {})["tags"] == ["trl", "sft", "unsloth"]


def test_peft_module_casting_to_bf16(tiny_decoder):
    from peft import LoraConfig, get_peft_model

    from tether.trainer import peft_module_casting_to_bf16

    model = get_peft_model(tiny_decoder, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    peft_module_casting_to_bf16(model)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    lora = [d for n, d in dtypes.items() if "lora_" in n]
    assert lora and all(d == torch.bfloat16 for d in lora)
    assert all(d == torch.float32 for n, d in dtypes.items() if "norm" in n)
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if "embed_tokens" in n or "lm_head" in n)
    assert all(d == torch.float32 for n, d in dtypes.items() if "mlp" in n)  # untouched


def test_disable_dropout_in_model():
    from tether.trainer.utils import disable_dropout_in_model

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.3), torch.nn.Dropout1d(0.2))
    disable_dropout_in_model(model)
    assert [m.p for m in model if isinstance(m, torch.nn.modules.dropout._DropoutNd)] == [0.0, 0.0]


def test_base_trainer_is_abstract(tmp_path):
    from tether.trainer import BaseTrainer

    trainer = BaseTrainer(config={"lr": 1.0})
    assert trainer.config == {"lr": 1.0}
    for method in (trainer.step, trainer.loss, trainer.compute_rewards):
        with pytest.raises(NotImplementedError):
            method()
    with pytest.raises(NotImplementedError):
        trainer.save_pretrained(tmp_path)

    class Saving(BaseTrainer):
        def _save_pretrained(self, save_directory):
            (save_directory / "weights.txt").write_text("w")

    Saving(config=None).save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "weights.txt").read_text() == "w"


def test_neftune_hook_is_transformers():
    from transformers.integrations.neftune import neftune_post_forward_hook

    from tether.trainer.utils import neftune_post_forward_hook as ours

    assert ours is neftune_post_forward_hook
