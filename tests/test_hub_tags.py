"""Trainers tag the models they train ("tether" and the method), as TRL's do ("trl" and the method), so that a
pushed or locally written model card lists them."""

from __future__ import annotations

import pytest
import torch
import yaml
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tether import (
    AutoModelForCausalLMWithValueHead,
    CPOTrainer,
    DistillationTrainer,
    DPOConfig,
    DPOTrainer,
    GKDTrainer,
    GRPOConfig,
    GRPOTrainer,
    IterativeSFTTrainer,
    KTOTrainer,
    OnlineDPOTrainer,
    ORPOTrainer,
    PPOTrainer,
    RewardConfig,
    RewardTrainer,
    RLOOTrainer,
    SFTConfig,
    SFTTrainer,
)
from tether.trainers.hub_tags import card_tags, merge_hub_tags, model_tags, tag_model, trainer_tags


# ----- which tags ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("trainer", "method"), [
    (SFTTrainer, "sft"), (IterativeSFTTrainer, "iterative-sft"), (RewardTrainer, "reward-trainer"),
    (DPOTrainer, "dpo"), (KTOTrainer, "kto"), (ORPOTrainer, "orpo"), (CPOTrainer, "cpo"),
    (GRPOTrainer, "grpo"), (RLOOTrainer, "rloo"), (PPOTrainer, "ppo"), (OnlineDPOTrainer, "online-dpo"),
    (GKDTrainer, "gkd"), (DistillationTrainer, "distillation"),
])
def test_each_trainer_gets_the_library_and_its_method_tag(trainer, method):
    # TRL's names for the method tags (e.g. "reward-trainer"), with "tether" for the library
    assert trainer_tags(trainer) == ["tether", method]


def test_a_subclass_inherits_its_method_tag_and_adds_its_own_tag_names():
    class Plain(DPOTrainer):
        pass

    class Custom(SFTTrainer):  # how code written for TRL names its own method
        _tag_names = ["trl", "my-sft", "sft"]

    assert trainer_tags(Plain) == ["tether", "dpo"]
    assert trainer_tags(Custom) == ["tether", "sft", "trl", "my-sft"]
    assert trainer_tags(object) == ["tether"]


# ----- tagging models -----------------------------------------------------------------------------------------
def test_tag_model_sets_model_tags_without_duplicates(tiny_decoder):
    assert model_tags(tiny_decoder) == []
    tag_model(tiny_decoder, ["tether", "sft"])
    tag_model(tiny_decoder, ["sft", "extra"])
    assert tiny_decoder.model_tags == ["tether", "sft", "extra"]
    assert model_tags(tiny_decoder) == ["tether", "sft", "extra"]


def test_tag_model_reaches_the_base_model_of_a_peft_model(tiny_decoder):
    peft_model = get_peft_model(tiny_decoder, LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    tag_model(peft_model, ["tether", "dpo"])
    assert peft_model.get_base_model().model_tags == ["tether", "dpo"]
    assert model_tags(peft_model) == ["tether", "dpo"]


def test_tag_model_reaches_the_language_model_inside_a_value_head_wrapper(tiny_decoder_dir):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir)
    tag_model(model, ["tether", "ppo"])
    assert model.pretrained_model.model_tags == ["tether", "ppo"]


def test_a_module_that_cannot_carry_tags_is_left_alone():
    module = torch.nn.Linear(2, 2)
    tag_model(module, ["tether"])
    assert model_tags(module) == [] and not hasattr(module, "model_tags")


def test_card_tags_merge_user_trainer_and_model_tags(tiny_decoder):
    tag_model(tiny_decoder, ["from-model"])
    assert card_tags(tiny_decoder, ["tether", "sft"], None) == ["tether", "sft", "from-model"]
    assert card_tags(tiny_decoder, ["tether", "sft"], "mine") == ["mine", "tether", "sft", "from-model"]
    assert card_tags(tiny_decoder, ["tether", "sft"], ["sft", "mine"]) == ["sft", "mine", "tether", "from-model"]
    tiny_decoder.config.unsloth_version = "2025.1"
    assert card_tags(tiny_decoder, ["tether"], None)[-1] == "unsloth"


def test_merge_hub_tags_keeps_user_tags_first():
    model = torch.nn.Linear(1, 1)
    assert merge_hub_tags(model, ["tether", "sft"], None) is None
    assert merge_hub_tags(model, ["tether", "sft"], {}) == {"tags": ["tether", "sft"]}
    assert merge_hub_tags(model, ["tether", "sft"], {"tags": "x"}) == {"tags": ["tether", "sft", "x"]}
    assert merge_hub_tags(model, ["tether", "sft"], {"tags": ["sft", "x"]}) == {"tags": ["sft", "x", "tether"]}


# ----- trainers tag what they train ---------------------------------------------------------------------------

COMMON = dict(per_device_train_batch_size=2, max_steps=1, report_to="none", save_strategy="no",
              disable_tqdm=True, dataloader_pin_memory=False)


def _build(kind: str, tiny_decoder_dir: str, out: str):
    if kind == "sft":
        return SFTTrainer(tiny_decoder_dir, args=SFTConfig(output_dir=out, **COMMON),
                          train_dataset=Dataset.from_dict({"text": ["a b c", "d e f"]}))
    if kind == "reward":
        return RewardTrainer(tiny_decoder_dir, args=RewardConfig(output_dir=out, **COMMON),
                             train_dataset=Dataset.from_dict({"chosen": ["a b", "c d"], "rejected": ["e", "f"]}))
    if kind == "dpo":
        rows = {"prompt": ["a", "b"], "chosen": [" c", " d"], "rejected": [" e", " f"]}
        return DPOTrainer(tiny_decoder_dir, args=DPOConfig(output_dir=out, **COMMON),
                          train_dataset=Dataset.from_dict(rows))
    assert kind == "grpo"
    return GRPOTrainer(tiny_decoder_dir, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                       args=GRPOConfig(output_dir=out, num_generations=2, max_completion_length=4, **COMMON),
                       train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}))


@pytest.mark.parametrize(("kind", "method"), [("sft", "sft"), ("reward", "reward-trainer"), ("dpo", "dpo"),
                                              ("grpo", "grpo")])
def test_a_trainer_tags_its_model(tmp_path, tiny_decoder_dir, kind, method):
    trainer = _build(kind, tiny_decoder_dir, str(tmp_path / "out"))
    assert model_tags(trainer.model)[:2] == ["tether", method]


def test_a_written_model_card_lists_the_tags(tmp_path, tiny_decoder_dir):
    trainer = _build("sft", tiny_decoder_dir, str(tmp_path / "out"))
    trainer.save_model()
    trainer.create_model_card(tags=["mine"])
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    metadata = yaml.safe_load(card.split("---")[1])
    assert {"mine", "tether", "sft"} <= set(metadata["tags"])
    # the saved model loads back as a plain transformers model
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_ppo_trainer_tags_its_model(tiny_decoder_dir, tokenizer):
    from tether import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir)
    trainer = PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=1), model, None, tokenizer)
    assert model_tags(trainer.model)[:2] == ["tether", "ppo"]
