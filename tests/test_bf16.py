"""bf16 on the CPU (TRL's default precision; this machine's matrix units run bf16 several times faster than
fp32): the learning tests of SFT, reward modeling, DPO and GRPO pass under bf16 autocast as they do in fp32, and
the quantities tether keeps in fp32 (log-probs, losses) are fp32 under it.

Each run is its fp32 test's setup with `bf16=True, use_cpu=True` (use_cpu: transformers refuses bf16 on a
machine without an accelerator otherwise)."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import test_dpo
import test_grpo
import test_reward
import test_sft
from tether import DPOTrainer, GRPOConfig, GRPOTrainer, RewardTrainer, SFTTrainer
from tether.demo.corpus import preference_pairs
from tether.models.forward import causal_token_log_probs

BF16 = dict(bf16=True, use_cpu=True)


def test_sft_learns_in_bf16(tmp_path, tiny_decoder_dir):
    ds = Dataset.from_dict({"prompt": [p for p, _ in test_sft.FACTS] * 8,
                            "completion": [c for _, c in test_sft.FACTS] * 8})
    trainer = SFTTrainer(tiny_decoder_dir, args=test_sft.config(tmp_path, max_steps=60, **BF16), train_dataset=ds)
    assert trainer.accelerator.mixed_precision == "bf16"
    trainer.train()
    history = test_sft.losses(trainer)
    assert history[-1] < 0.25 * history[0], history
    assert test_sft.greedy(trainer.model, trainer.processing_class, "the capital of france is").startswith(" paris")


def test_reward_model_learns_in_bf16(tmp_path, tiny_decoder_dir, tokenizer):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_decoder_dir, num_labels=1)
    pairs = preference_pairs(360, seed=3)
    trainer = RewardTrainer(model=model, args=test_reward.config(tmp_path, max_steps=80, learning_rate=2e-3, **BF16),
                            processing_class=tokenizer, train_dataset=Dataset.from_list(pairs[:300]),
                            eval_dataset=Dataset.from_list(pairs[300:]))
    trainer.train()
    assert trainer.evaluate()["eval_accuracy"] > 0.9


def test_dpo_learns_in_bf16(tmp_path, tiny_decoder_dir):
    trainer = DPOTrainer(tiny_decoder_dir, args=test_dpo.config(tmp_path, max_steps=80, logging_steps=10, **BF16),
                         train_dataset=test_dpo.pairs(640), eval_dataset=test_dpo.pairs(64, seed=1))
    trainer.train()
    accuracies = test_dpo.logged(trainer, "rewards/accuracies")
    assert accuracies[0] < 0.8 and accuracies[-1] >= 0.9, accuracies
    assert trainer.evaluate()["eval_rewards/accuracies"] >= 0.85


def test_grpo_reward_rises_in_bf16(tiny_decoder_dir, tokenizer, tmp_path):
    policy = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)
    trainer = GRPOTrainer(policy, reward_funcs=test_grpo.low_token_share,
                          args=test_grpo.config(GRPOConfig, tmp_path, bf16=True),
                          train_dataset=test_grpo.prompts_dataset(), processing_class=tokenizer)
    trainer.train()
    rewards = test_grpo.logged(trainer, "reward")
    assert rewards[0] < 0.35 and rewards[-1] > rewards[0] + 0.2, rewards


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_log_probs_stay_float32_in_bf16(tiny_decoder_dir, tokenizer, weights):
    """Under bf16 autocast (fp32 weights) or with bf16 weights, per-token log-probs come out fp32 and within
    bf16's rounding of the fp32 model's."""
    model = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir).eval()
    ids = torch.tensor([tokenizer("the film was great and the music was lovely.").input_ids])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}
    with torch.no_grad():
        exact = causal_token_log_probs(model, batch).logps
        if weights == "bfloat16":
            model = model.to(torch.bfloat16)
            low = causal_token_log_probs(model, batch).logps
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = causal_token_log_probs(model, batch).logps
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, exact, atol=0.1, rtol=0.02)
    assert not torch.equal(low, exact)  # the body really ran in bf16
