"""Reward modeling: the Bradley-Terry loss against its formula, learning, last-token scoring, scorers,
reward-function validation, bad input."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tether import RewardConfig, RewardFunctionError, RewardModelScorer, RewardTrainer
from tether.demo.corpus import preference_pairs
from tether.demo.tiny import train_tokenizer
from tether.losses.reward import bradley_terry_loss
from tether.models.scoring import sequence_scores
from tether.rollout.rewards import call_reward_function


def config(tmp_path, **overrides) -> RewardConfig:
    values = dict(output_dir=str(tmp_path / "rm"), per_device_train_batch_size=8, learning_rate=1e-3,
                  max_steps=10, logging_steps=5, report_to="none", save_strategy="no", disable_tqdm=True,
                  seed=0, dataloader_pin_memory=False)
    values.update(overrides)
    return RewardConfig(**values)


@pytest.fixture()
def reward_model(tiny_decoder_dir):
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(tiny_decoder_dir, num_labels=1)


# ----- the loss --------------------------------------------------------------------------------------
def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_bradley_terry_matches_formula():
    chosen, rejected = torch.tensor([1.0, 0.0, -0.5]), torch.tensor([0.0, 2.0, -0.5])
    # -log sigmoid(d) = log(1 + exp(-d)) with d = chosen - rejected = [1, -2, 0]
    expected = (softplus(-1.0) + softplus(2.0) + softplus(0.0)) / 3
    out = bradley_terry_loss(chosen, rejected)
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.accuracy.item() == pytest.approx(1 / 3)
    assert out.margin.item() == pytest.approx(-1 / 3)
    assert (out.min_reward.item(), out.max_reward.item()) == (-0.5, 2.0)
    assert out.mean_reward.item() == pytest.approx((1.0 + 0 - 0.5 + 0 + 2 - 0.5) / 6)


def test_bradley_terry_with_margin_and_centering():
    chosen, rejected = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.0])
    margin = torch.tensor([0.5, 1.0])
    # d - margin = [0.5, -1.5]; centering: mean((c + r)^2) = (1 + 2.25) / 2
    expected = (softplus(-0.5) + softplus(1.5)) / 2 + 0.1 * (1.0 + 2.25) / 2
    out = bradley_terry_loss(chosen, rejected, margin=margin, center_rewards_coefficient=0.1)
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)


def test_loss_direction():
    low = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0])).loss
    high = bradley_terry_loss(torch.tensor([0.0]), torch.tensor([2.0])).loss
    assert low < high
    with_margin = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0]), margin=torch.tensor([1.0])).loss
    assert with_margin > low  # a margin asks for more separation


# ----- scoring at the last real token ---------------------------------------------------------------
def test_score_read_at_last_real_token_left_and_right(reward_model, tokenizer):
    texts = ["the film was great.", "a dull and tedious plot with a weak ending."]
    single = [sequence_scores(reward_model, torch.tensor([tokenizer(t).input_ids]),
                              torch.ones(1, len(tokenizer(t).input_ids), dtype=torch.long)).item() for t in texts]
    for side in ("left", "right"):
        tokenizer.padding_side = side
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        scores = sequence_scores(reward_model, batch.input_ids, batch.attention_mask)
        torch.testing.assert_close(scores, torch.tensor(single), atol=1e-5, rtol=1e-5)


def test_pad_equal_to_eos_is_handled(reward_model, tokenizer):
    tokenizer.pad_token = tokenizer.eos_token  # GPT-2 style: pad and EOS share an id
    texts = ["great." + tokenizer.eos_token, "the music was lovely and moving." + tokenizer.eos_token]
    ids = [tokenizer(t).input_ids for t in texts]
    single = [sequence_scores(reward_model, torch.tensor([i]), torch.ones(1, len(i), dtype=torch.long)).item()
              for i in ids]
    batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
    scores = sequence_scores(reward_model, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(scores, torch.tensor(single), atol=1e-5, rtol=1e-5)


# ----- training --------------------------------------------------------------------------------------
def test_learns_a_separable_preference(tmp_path, reward_model, tokenizer):
    pairs = preference_pairs(360, seed=3)
    train, held_out = Dataset.from_list(pairs[:300]), Dataset.from_list(pairs[300:])
    trainer = RewardTrainer(model=reward_model, args=config(tmp_path, max_steps=80, learning_rate=2e-3),
                            processing_class=tokenizer, train_dataset=train, eval_dataset=held_out)
    before = trainer.evaluate()["eval_accuracy"]
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_accuracy"] > 0.9, (before, metrics)
    assert metrics["eval_margin"] > 0
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert {"accuracy", "margin", "mean_reward", "min_reward", "max_reward"} <= set(logged[0])


def test_classic_call(tmp_path, tiny_decoder_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_decoder_dir, num_labels=1)
    tok = AutoTokenizer.from_pretrained(tiny_decoder_dir)
    ds = Dataset.from_list(preference_pairs(8, seed=0))
    trainer = RewardTrainer(model=model, tokenizer=tok, train_dataset=ds)
    trainer.train()
    assert trainer.state.global_step == 3  # 8 pairs, batch 8, 3 epochs
    assert trainer.args.output_dir.endswith("-Reward")


def test_model_given_by_path_implicit_prompt_and_margin(tmp_path, tiny_decoder_dir):
    rows = preference_pairs(16, seed=1, implicit_prompt=True)
    ds = Dataset.from_list([{**r, "margin": 0.5} for r in rows])
    trainer = RewardTrainer(tiny_decoder_dir, args=config(tmp_path, max_steps=2), train_dataset=ds)
    assert trainer.model.config.num_labels == 1
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    # Packed by default (a transformers decoder): 8 sequences (4 chosen, 4 rejected) share fewer rows.
    assert int(batch["sequence_ids"].max()) + 1 == 8 and batch["margin"].tolist() == [0.5] * 4
    trainer.train()


def test_tokenizer_without_pad_token(tmp_path, reward_model, tokenizer):
    tokenizer.pad_token = None
    reward_model.config.pad_token_id = None
    ds = Dataset.from_list(preference_pairs(16, seed=2))
    trainer = RewardTrainer(reward_model, args=config(tmp_path, max_steps=2), processing_class=tokenizer,
                            train_dataset=ds)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert reward_model.config.pad_token_id == tokenizer.eos_token_id
    trainer.train()


def test_lora_reward_model_trains_and_saves(tmp_path, reward_model, tokenizer, tiny_decoder_dir):
    from peft import LoraConfig, PeftModel

    ds = Dataset.from_list(preference_pairs(64, seed=4))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")  # task_type filled in: SEQ_CLS
    with pytest.warns(UserWarning, match="SEQ_CLS"):
        trainer = RewardTrainer(reward_model, args=config(tmp_path, max_steps=6), processing_class=tokenizer,
                                train_dataset=ds, peft_config=lora)
    score_before = trainer.model.base_model.model.score.modules_to_save["default"].weight.clone()
    trainer.train()
    score_after = trainer.model.base_model.model.score.modules_to_save["default"].weight
    assert not torch.equal(score_before, score_after), "the score head must train under LoRA"
    trainer.save_model()
    out = trainer.args.output_dir
    assert os.path.exists(os.path.join(out, "adapter_model.safetensors"))
    torch.manual_seed(123)  # the adapter file must carry the trained score head, whatever this init is
    base = AutoModelForSequenceClassification.from_pretrained(tiny_decoder_dir, num_labels=1)
    reloaded = PeftModel.from_pretrained(base, out).eval()
    trainer.model.eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    torch.testing.assert_close(sequence_scores(reloaded, ids, mask), sequence_scores(trainer.model, ids, mask))


# ----- scorers and reward functions ------------------------------------------------------------------
def test_scorer_with_a_different_tokenizer(tmp_path, tiny_decoder_dir):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    texts = [r["chosen"] for r in preference_pairs(50, seed=5)]
    other_tok = train_tokenizer([t.upper() for t in texts] * 2, vocab_size=300)
    torch.manual_seed(1)
    rm = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(other_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_labels=1, pad_token_id=other_tok.pad_token_id))
    path = tmp_path / "other-rm"
    rm.save_pretrained(path)
    other_tok.save_pretrained(path)
    scorer = RewardModelScorer(str(path), batch_size=3)
    prompts, completions = ["this movie", "the plot"], [" was great.", " was a dull mess from start to end."]
    scores = scorer(prompts, completions)
    expected = []
    for p, c in zip(prompts, completions):  # as RewardTrainer tokenizes a pair's side: EOS appended
        ids = torch.tensor([other_tok(p + c).input_ids + [other_tok.eos_token_id]])
        expected.append(sequence_scores(scorer.model, ids, torch.ones_like(ids)).item())
    assert scores == pytest.approx(expected, abs=1e-5)
    assert scorer.score_texts([p + c for p, c in zip(prompts, completions)]) == pytest.approx(expected, abs=1e-5)


def test_reward_function_validation():
    prompts, completions = ["a", "b"], [" x", " y"]

    def good(prompts, completions, **kwargs):
        return [1.0, kwargs["bonus"][1]]

    assert call_reward_function(good, prompts, completions, bonus=[0, 2.5]).tolist() == [1.0, 2.5]
    assert call_reward_function(lambda prompts, completions: torch.tensor([1.0, 2.0]), prompts,
                                completions).tolist() == [1.0, 2.0]
    # Any real scalar is a number (issue 13): numpy scalars and 0-d tensors/arrays, in a plain list.
    import numpy as np

    assert call_reward_function(lambda prompts, completions: [np.float32(0.5), torch.tensor(1.5)], prompts,
                                completions).tolist() == [0.5, 1.5]
    assert call_reward_function(lambda prompts, completions: [np.array(2.0), np.int64(3)], prompts,
                                completions).tolist() == [2.0, 3.0]
    with pytest.raises(RewardFunctionError, match="completion 0"):  # a bool is not a reward, whatever its type
        call_reward_function(lambda prompts, completions: [np.bool_(True), 1.0], prompts, completions)

    def short(prompts, completions):
        return [1.0]

    def nan(prompts, completions):
        return [1.0, float("nan")]

    def broken(prompts, completions):
        raise KeyError("missing")

    def scalar(prompts, completions):
        return 1.0

    with pytest.raises(RewardFunctionError, match=r"'short' returned 1 values for 2 completions"):
        call_reward_function(short, prompts, completions)
    with pytest.raises(RewardFunctionError, match=r"'nan' returned nan for completion 1"):
        call_reward_function(nan, prompts, completions)
    with pytest.raises(RewardFunctionError, match=r"'broken' raised KeyError"):
        call_reward_function(broken, prompts, completions)
    with pytest.raises(RewardFunctionError, match=r"'scalar' returned float"):
        call_reward_function(scalar, prompts, completions)


# ----- bad input -------------------------------------------------------------------------------------
def test_bad_inputs(tmp_path, reward_model, tokenizer):
    from tether import DatasetError

    no_rejected = Dataset.from_dict({"prompt": ["a"], "chosen": [" b"], "rejectd": [" c"]})
    with pytest.raises(DatasetError, match="rejectd.*'rejected'"):
        RewardTrainer(reward_model, args=config(tmp_path), processing_class=tokenizer, train_dataset=no_rejected)
    nan_margin = Dataset.from_dict({"prompt": ["a"], "chosen": [" b"], "rejected": [" c"],
                                    "margin": [float("nan")]})
    with pytest.raises(DatasetError, match="margin"):
        RewardTrainer(reward_model, args=config(tmp_path), processing_class=tokenizer, train_dataset=nan_margin)
    two_label_config = copy.deepcopy(reward_model.config)
    two_label_config.num_labels = 2
    two_labels = AutoModelForSequenceClassification.from_config(two_label_config)
    with pytest.raises(ValueError, match="num_labels=1"):
        RewardTrainer(two_labels, args=config(tmp_path), processing_class=tokenizer,
                      train_dataset=Dataset.from_list(preference_pairs(4)))


# ----- TRL's reward-function contract -----------------------------------------------------------------
def test_none_means_not_scored_and_counts_for_nothing():
    from tether.rollout.rewards import RewardFunctions

    def only_even(prompts, completions, **kwargs):
        return [1.0 if i % 2 == 0 else None for i in range(len(completions))]

    def everywhere(prompts, completions, **kwargs):
        return [0.5] * len(completions)

    rewards = RewardFunctions([only_even, everywhere], reward_weights=[2.0, 1.0])
    total, per_function = rewards.score(["p"] * 4, ["a", "b", "c", "d"])
    assert total.tolist() == [2.5, 0.5, 2.5, 0.5]  # 2 * 1.0 + 0.5 where scored, 0.5 alone elsewhere
    assert torch.isnan(per_function["only_even"][1]) and per_function["only_even"][0] == 1.0
    nobody = RewardFunctions([lambda prompts, completions: [None, 1.0]])
    with pytest.warns(UserWarning, match=r"completion\(s\) \[0\]"):
        assert nobody.score(["p", "q"], ["a", "b"])[0].tolist() == [0.0, 1.0]


def test_async_functions_run_concurrently_and_trainer_state_is_passed():
    import asyncio
    import time

    from transformers import TrainerState

    from tether.rollout.rewards import RewardFunctions

    async def slow_a(prompts, completions, **kwargs):
        await asyncio.sleep(0.3)
        return [1.0] * len(completions)

    async def slow_b(prompts, completions, trainer_state, **kwargs):
        await asyncio.sleep(0.3)
        return [float(trainer_state.global_step)] * len(completions)

    def plain(prompts, completions):  # takes no trainer_state: none is passed
        return [0.0] * len(completions)

    rewards = RewardFunctions([slow_a, slow_b, plain])
    start = time.perf_counter()
    total, _ = rewards.score(["p"], ["a"], trainer_state=TrainerState(global_step=7))
    assert total.tolist() == [8.0]
    assert time.perf_counter() - start < 0.55  # the two sleeps overlapped


def test_async_function_errors_are_named():
    from tether.rollout.rewards import RewardFunctions

    async def failing(prompts, completions, **kwargs):
        raise KeyError("gone")

    with pytest.raises(RewardFunctionError, match=r"'failing' raised KeyError"):
        RewardFunctions(failing).score(["p"], ["a"])


def test_one_reward_processing_class_serves_every_reward_model(reward_model, tokenizer):
    from tether.rollout.rewards import RewardFunctions, RewardModelScorer

    rewards = RewardFunctions([reward_model, reward_model], reward_processing_classes=tokenizer)
    assert all(isinstance(f, RewardModelScorer) and f.tokenizer is tokenizer for f in rewards.funcs)
    with pytest.raises(ValueError, match="3 reward_processing_classes for 2"):
        RewardFunctions([reward_model, reward_model], reward_processing_classes=[tokenizer] * 3)
