"""Multi-adapter RLHF (TRL's ppo_multi_adapter.py): a policy LoRA, the value head and a LoRA reward model
share one base model; `compute_reward_score` scores with the reward adapter and hands the model back to
the policy adapter unchanged.

The reference is the reward model as it was trained: AutoModelForSequenceClassification on the same base
plus the same adapter, read at the same positions.

Shapes: b = batch, t = tokens.
"""

from __future__ import annotations

import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification

from tether import AutoModelForCausalLMWithValueHead

TARGETS = ["q_proj", "v_proj"]


def policy_lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM",
                      init_lora_weights=False)  # random A and B: the policy adapter changes outputs


@pytest.fixture(scope="module")
def reward_adapter_dir(tmp_path_factory, tiny_decoder_dir):
    """A LoRA reward model with two labels (as the adapter ppo_multi_adapter.py reads), random adapter and
    score head, saved the way peft saves a SEQ_CLS adapter (LoRA weights + `score` head)."""
    torch.manual_seed(11)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_decoder_dir, num_labels=2)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, task_type="SEQ_CLS",
                        init_lora_weights=False)
    model = get_peft_model(base, config)
    with torch.no_grad():
        model.base_model.model.score.modules_to_save["default"].weight.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("reward-adapter")
    model.save_pretrained(path)
    return str(path)


def reference_reward_model(tiny_decoder_dir, reward_adapter_dir) -> PeftModel:
    base = AutoModelForSequenceClassification.from_pretrained(tiny_decoder_dir, num_labels=2)
    return PeftModel.from_pretrained(base, reward_adapter_dir).eval()


def reference_token_scores(model: PeftModel, input_ids, attention_mask) -> torch.Tensor:
    """The score head at every position, [b, t, 2], from the classifier's own forward."""
    captured = []
    head = model.base_model.model.score
    handle = head.register_forward_hook(lambda _m, _a, output: captured.append(output))
    with torch.no_grad():
        pooled = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [b, 2]
    handle.remove()
    return captured[-1], pooled


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded with the pad id 0 (the classifier pools at the last non-pad token): [3, 6]."""
    input_ids = torch.tensor([[5, 17, 42, 99, 7, 300], [8, 9, 10, 11, 0, 0], [20, 21, 22, 0, 0, 0]])
    return input_ids, (input_ids != 0).long()


@pytest.fixture()
def policy(tiny_decoder_dir, reward_adapter_dir):
    return AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir, peft_config=policy_lora(),
                                                             reward_adapter=reward_adapter_dir)


def test_reward_score_is_the_reward_models(policy, tiny_decoder_dir, reward_adapter_dir):
    assert policy.supports_rm_adapter and policy.rm_adapter_name == "reward_adapter"
    assert set(policy.pretrained_model.peft_config) == {"default", "reward_adapter"}
    input_ids, attention_mask = batch()
    scores = policy.compute_reward_score(input_ids=input_ids, attention_mask=attention_mask)
    assert scores.shape == (3, 6, 2) and scores.dtype == torch.float32 and not scores.requires_grad
    expected, pooled = reference_token_scores(reference_reward_model(tiny_decoder_dir, reward_adapter_dir),
                                              input_ids, attention_mask)
    real = attention_mask.bool()
    torch.testing.assert_close(scores[real], expected[real], rtol=0, atol=1e-5)
    last = attention_mask.sum(-1) - 1
    torch.testing.assert_close(scores[torch.arange(3), last], pooled, rtol=0, atol=1e-5)


def test_the_policy_adapter_is_back_and_untouched(policy):
    input_ids, attention_mask = batch()
    policy.train()
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n or n.startswith("v_head.") for n in trainable)
    assert not any("reward_adapter" in n for n in trainable) and not policy.score.weight.requires_grad
    policy.eval()
    with torch.no_grad():
        before = policy(input_ids=input_ids, attention_mask=attention_mask)
    policy.train()
    policy.compute_reward_score(input_ids=input_ids, attention_mask=attention_mask)
    assert policy.training and policy.pretrained_model.active_adapter == "default"
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == trainable
    policy.eval()
    with torch.no_grad():
        after = policy(input_ids=input_ids, attention_mask=attention_mask)
        # the reward adapter really was a different adapter: the score head over the policy's states differs
        policy_states = policy.pretrained_model(input_ids=input_ids, attention_mask=attention_mask,
                                                output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)
    torch.testing.assert_close(after[2], before[2], rtol=0, atol=0)
    scores = policy.compute_reward_score(input_ids=input_ids, attention_mask=attention_mask)
    real = attention_mask.bool()
    assert not torch.allclose(policy.score(policy_states)[real], scores[real], atol=1e-3)


def test_left_padding_gives_the_unpadded_scores(policy):
    row = torch.tensor([[8, 9, 10, 11]])
    alone = policy.compute_reward_score(row, torch.ones_like(row))
    padded = torch.tensor([[0, 0, 8, 9, 10, 11]])
    scores = policy.compute_reward_score(padded, (padded != 0).long())
    torch.testing.assert_close(scores[:, 2:], alone, rtol=0, atol=1e-5)


def test_restores_the_named_policy_adapter(policy):
    policy.pretrained_model.add_adapter("policy_2", policy_lora())
    input_ids, attention_mask = batch()
    policy.compute_reward_score(input_ids, attention_mask, ppo_adapter_name="policy_2")
    assert policy.pretrained_model.active_adapter == "policy_2"


def test_saving_keeps_the_reward_adapter_out(tmp_path, policy, tiny_decoder_dir, reward_adapter_dir):
    policy.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors", "value_head.safetensors"} <= set(os.listdir(tmp_path))
    assert not (tmp_path / "reward_adapter").exists()  # an input of the run, not something it trained
    reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path), reward_adapter=reward_adapter_dir)
    input_ids, attention_mask = batch()
    torch.testing.assert_close(reloaded.compute_reward_score(input_ids, attention_mask),
                               policy.compute_reward_score(input_ids, attention_mask), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids, attention_mask=attention_mask)[2],
                                   policy(input_ids=input_ids, attention_mask=attention_mask)[2], rtol=0, atol=0)


def test_errors(tmp_path, tiny_decoder_dir, reward_adapter_dir):
    with pytest.raises(ValueError, match="needs a PEFT policy"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir, reward_adapter=reward_adapter_dir)
    plain = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir, peft_config=policy_lora())
    with pytest.raises(ValueError, match="no reward adapter"):
        plain.compute_reward_score(torch.tensor([[5, 6]]))
    plain.pretrained_model.save_pretrained(tmp_path / "causal")  # an adapter without a score head
    with pytest.raises(ValueError, match="no saved classification head"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir, peft_config=policy_lora(),
                                                          reward_adapter=str(tmp_path / "causal"))
    with pytest.raises(ValueError, match="holds no adapter weights"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir, peft_config=policy_lora(),
                                                          reward_adapter=str(tmp_path))


def test_ppo_step_with_rewards_from_the_reward_adapter(policy, tokenizer):
    """ppo_multi_adapter.py's loop, one step: the policy adapter and head learn, the reward adapter does not."""
    from tether import PPOConfig, PPOTrainer

    trainer = PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=1, seed=0), policy, ref_model=None,
                         tokenizer=tokenizer)
    frozen = {n: p.clone() for n, p in policy.named_parameters() if "reward_adapter" in n or n.startswith("score.")}
    trained = {n: p.clone() for n, p in policy.named_parameters() if p.requires_grad}
    queries = [torch.tensor([5, 17, 42]), torch.tensor([8, 9])]
    responses = [torch.tensor([99, 7, 30]), torch.tensor([10, 11, 12, 13])]
    texts = [tokenizer.decode(torch.cat([q, r])) for q, r in zip(queries, responses)]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    raw_rewards = trainer.accelerator.unwrap_model(trainer.model).compute_reward_score(**encoded)
    rewards = [raw_rewards[i, -1, 1] for i in range(len(raw_rewards))]
    trainer.step(queries, responses, rewards)
    assert all(torch.equal(p, frozen[n]) for n, p in policy.named_parameters() if n in frozen)
    assert any(not torch.equal(p, trained[n]) for n, p in policy.named_parameters() if n in trained)
    assert policy.pretrained_model.active_adapter == "default"
