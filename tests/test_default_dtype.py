"""Models given by path load in float32 unless asked otherwise (issue 12, item 1): TRL's default, where
transformers 5 alone would keep a bf16 checkpoint in bf16."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from tether import AutoModelForCausalLMWithValueHead, SFTConfig, SFTTrainer
from tether.models.loading import load_language_model


@pytest.fixture(scope="module")
def bf16_checkpoint(tiny_decoder_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("bf16")
    AutoModelForCausalLM.from_pretrained(tiny_decoder_dir, dtype=torch.bfloat16).save_pretrained(path)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_decoder_dir).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("kwargs, expected", [({}, torch.float32), ({"dtype": "bfloat16"}, torch.bfloat16),
                                              ({"dtype": "auto"}, torch.bfloat16),
                                              ({"torch_dtype": "float16"}, torch.float16)])
def test_load_language_model_dtype(bf16_checkpoint, kwargs, expected):
    assert load_language_model(bf16_checkpoint, **kwargs).dtype == expected


def test_trainers_and_value_heads_train_in_float32_by_default(bf16_checkpoint, tmp_path):
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to="none", save_strategy="no")
    trainer = SFTTrainer(bf16_checkpoint, args=args, train_dataset=Dataset.from_dict({"text": ["a b c d"] * 4}))
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to="none", save_strategy="no",
                     model_init_kwargs={"dtype": "bfloat16"})
    trainer = SFTTrainer(bf16_checkpoint, args=args, train_dataset=Dataset.from_dict({"text": ["a b c d"] * 4}))
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
    assert AutoModelForCausalLMWithValueHead.from_pretrained(bf16_checkpoint).pretrained_model.dtype == torch.float32
