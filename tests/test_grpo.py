"""GRPOTrainer and RLOOTrainer: they learn, they compare the right completions, rewards get what they need,
bad rewards fail clearly, and the update does not depend on how a step is split."""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from tether import GRPOConfig, GRPOTrainer, RewardFunctionError, RLOOConfig, RLOOTrainer
from tether.data.formats import DatasetError
from tether.losses.advantages import group_relative_advantages, leave_one_out_advantages

LOW_IDS = 100  # the "good" tokens of the learning tests: ids below this (a quarter of the 400-token vocabulary)


def low_token_share(prompts, completions, completion_ids, **_):
    return [sum(i < LOW_IDS for i in ids) / max(len(ids), 1) for ids in completion_ids]


def prompts_dataset(n: int = 64, **columns) -> Dataset:
    words = ["the film", "this movie", "a story", "the plot", "my review", "an actor", "the ending", "one scene"]
    return Dataset.from_dict({"prompt": [f"{words[i % 8]} number {i}" for i in range(n)], **columns})


def config(cls, tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
                  max_completion_length=12, learning_rate=1e-2, max_steps=30, logging_steps=5, report_to=[],
                  use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True)
    values.update(overrides)
    return cls(**values)


@pytest.fixture()
def policy(tiny_decoder_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)


def logged(trainer, key):
    return [row[key] for row in trainer.state.log_history if key in row]


# ----- learning -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trainer_class,config_class,extra", [
    (GRPOTrainer, GRPOConfig, {}),
    (GRPOTrainer, GRPOConfig, {"loss_type": "dr_grpo", "scale_rewards": "none"}),
    (RLOOTrainer, RLOOConfig, {"num_generations": 4, "beta": 0.0}),
])
def test_reward_rises(trainer_class, config_class, extra, policy, tokenizer, tmp_path):
    """The share of low-id tokens starts near 1/4 (an untrained model is nearly uniform) and must climb."""
    trainer = trainer_class(policy, reward_funcs=low_token_share, args=config(config_class, tmp_path, **extra),
                            train_dataset=prompts_dataset(), processing_class=tokenizer)
    trainer.train()
    rewards = logged(trainer, "reward")
    assert rewards[0] < 0.35, rewards
    assert rewards[-1] > rewards[0] + 0.2, rewards
    assert logged(trainer, "entropy")[-1] < logged(trainer, "entropy")[0]


# ----- what reward functions receive; groups --------------------------------------------------------------
def test_reward_functions_get_columns_and_groups(policy, tokenizer, tmp_path):
    calls = []

    def spy(prompts, completions, completion_ids, answer, **kwargs):
        calls.append((list(prompts), list(completions), [list(c) for c in completion_ids], list(answer), kwargs))
        return [float(len(c)) for c in completion_ids]

    ds = prompts_dataset(16, answer=[f"answer {i}" for i in range(16)])
    args = config(GRPOConfig, tmp_path, max_steps=2, per_device_train_batch_size=6, num_generations=3,
                  temperature=1.5)
    trainer = GRPOTrainer(policy, reward_funcs=[spy, low_token_share], args=args, train_dataset=ds,
                          processing_class=tokenizer)
    trainer.train()
    assert len(calls) == 2  # one scoring call per round, one round per step here
    for prompts, completions, ids, answers, kwargs in calls:
        # TRL's contract: the trainer's state and the two logging hooks come along (and nothing else unasked)
        assert len(prompts) == len(completions) == len(answers) == 6
        assert set(kwargs) == {"trainer_state", "log_extra", "log_metric"}
        assert kwargs["trainer_state"].max_steps == 2
        for g in range(2):  # each group: one prompt, its own dataset row's extra column, three samples
            group = slice(3 * g, 3 * g + 3)
            assert len(set(prompts[group])) == 1 and len(set(answers[group])) == 1
            row = int(prompts[group][0].rsplit(" ", 1)[1])
            assert answers[group][0] == f"answer {row}"
        assert completions == tokenizer.batch_decode(ids, skip_special_tokens=True)
    # Advantages of the last round are the group-normalised weighted sum of both functions.
    last_ids = calls[-1][2]
    rewards = torch.tensor([float(len(c)) for c in last_ids]) + torch.tensor(low_token_share(None, None, last_ids))
    torch.testing.assert_close(trainer._round.advantages, group_relative_advantages(rewards, 3))
    torch.testing.assert_close(trainer._round.rewards, rewards)


def test_reward_weights_and_per_function_metrics(policy, tokenizer, tmp_path):
    def one(completion_ids, **_):
        return [1.0] * len(completion_ids)

    def length(completion_ids, **_):
        return [float(len(c)) for c in completion_ids]

    args = config(GRPOConfig, tmp_path, max_steps=1, logging_steps=1, reward_weights=[2.0, 0.5])
    trainer = GRPOTrainer(policy, reward_funcs=[one, length], args=args, train_dataset=prompts_dataset(16),
                          processing_class=tokenizer)
    trainer.train()
    row = trainer.state.log_history[0]
    assert row["rewards/one/mean"] == 1.0 and row["rewards/one/std"] == 0.0
    assert row["reward"] == pytest.approx(2.0 + 0.5 * row["rewards/length/mean"], rel=1e-5)
    assert row["completions/mean_length"] == pytest.approx(row["rewards/length/mean"], rel=1e-5)
    for key in ("completions/min_length", "completions/max_length", "completions/clipped_ratio", "entropy",
                "clip_ratio/region_mean", "time/generation", "time/update", "reward_std"):
        assert key in row, key


def test_conversational_prompts_get_message_completions(policy, tokenizer, tmp_path):
    seen = []

    def spy(prompts, completions, **_):
        seen.append((prompts[0], completions[0]))
        return [0.0] * len(completions)

    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"review {i}"}] for i in range(16)]})
    trainer = GRPOTrainer(policy, reward_funcs=spy, args=config(GRPOConfig, tmp_path, max_steps=1),
                          train_dataset=ds, processing_class=tokenizer)
    trainer.train()
    prompt, completion = seen[0]
    assert prompt[0]["role"] == "user"
    assert isinstance(completion, list) and completion[0]["role"] == "assistant"


# ----- bad rewards ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,message", [
    (lambda completions, **_: [0.0] * (len(completions) - 1), "returned 7 values for 8 completions"),
    (lambda completions, **_: [math.nan] * len(completions), "finite number"),
    (lambda completions, **_: 1 / 0, "raised ZeroDivisionError"),
])
def test_bad_reward_output_names_the_function(bad, message, policy, tokenizer, tmp_path):
    def broken_reward(**kwargs):
        return bad(**kwargs)

    trainer = GRPOTrainer(policy, reward_funcs=[low_token_share, broken_reward],
                          args=config(GRPOConfig, tmp_path, max_steps=1), train_dataset=prompts_dataset(16),
                          processing_class=tokenizer)
    with pytest.raises(RewardFunctionError, match="broken_reward") as error:
        trainer.train()
    assert message in str(error.value)


# ----- bad input before training ---------------------------------------------------------------------------
def test_input_errors_before_training(policy, tokenizer, tmp_path):
    with pytest.raises(DatasetError, match="prompt"):
        GRPOTrainer(policy, reward_funcs=low_token_share, args=config(GRPOConfig, tmp_path),
                    train_dataset=Dataset.from_dict({"text": ["a", "b"]}), processing_class=tokenizer)
    with pytest.raises(DatasetError, match="max_prompt_length"):
        GRPOTrainer(policy, reward_funcs=low_token_share, args=config(GRPOConfig, tmp_path, max_prompt_length=3),
                    train_dataset=prompts_dataset(16), processing_class=tokenizer)
    with pytest.raises(ValueError, match="multiple of num_generations"):
        config(GRPOConfig, tmp_path, per_device_train_batch_size=6, num_generations=4)
    with pytest.raises(ValueError, match="at least 2"):
        config(GRPOConfig, tmp_path, num_generations=1)
    with pytest.raises(ValueError, match="loss_type"):
        config(GRPOConfig, tmp_path, loss_type="ppo")
    trainer = GRPOTrainer(policy, reward_funcs=low_token_share, args=config(GRPOConfig, tmp_path),
                          train_dataset=prompts_dataset(1), processing_class=tokenizer)
    with pytest.raises(ValueError, match="one round of generation needs 2"):
        trainer.train()


def test_use_vllm_without_vllm_is_a_clear_error(policy, tokenizer, tmp_path):
    with pytest.raises(ImportError, match="pip install vllm"):
        GRPOTrainer(policy, reward_funcs=low_token_share, args=config(GRPOConfig, tmp_path, use_vllm=True),
                    train_dataset=prompts_dataset(16), processing_class=tokenizer)


# ----- old log-probs, references, splitting -------------------------------------------------------------
def _capture_policy_loss(trainer):
    captured = []
    original = trainer.policy_loss

    def spy(logps, old_logps, advantages, mask, *rest):
        captured.append((logps.detach().clone(), old_logps.clone(), mask.clone()))
        return original(logps, old_logps, advantages, mask, *rest)

    trainer.policy_loss = spy
    return captured


def test_num_iterations_reuses_one_generation_with_stored_old_logps(policy, tokenizer, tmp_path):
    args = config(GRPOConfig, tmp_path, max_steps=4, num_iterations=2, learning_rate=1e-2)
    trainer = GRPOTrainer(policy, reward_funcs=low_token_share, args=args, train_dataset=prompts_dataset(16),
                          processing_class=tokenizer)
    rounds, generate = [], trainer._generate_round
    trainer._generate_round = lambda batch, training=True: rounds.append(generate(batch, training)) or rounds[-1]
    captured = _capture_policy_loss(trainer)
    trainer.train()
    assert len(rounds) == 2  # 4 updates, 2 per generation
    for i, (logps, old, mask) in enumerate(captured):
        stored = rounds[i // 2].old_logps
        assert stored is not None
        torch.testing.assert_close(old, stored)  # the sampling policy's log-probs, kept from generation
        if i % 2 == 0:  # first update of a round: the policy has not moved since it sampled
            torch.testing.assert_close(logps[mask], old[mask], atol=1e-5, rtol=0)
        else:  # second update: it has, so the ratio is no longer 1
            assert (logps[mask] - old[mask]).abs().max() > 1e-4


def test_single_iteration_is_on_policy(policy, tokenizer, tmp_path):
    trainer = GRPOTrainer(policy, reward_funcs=low_token_share, args=config(GRPOConfig, tmp_path, max_steps=2),
                          train_dataset=prompts_dataset(16), processing_class=tokenizer)
    captured = _capture_policy_loss(trainer)
    trainer.train()
    assert trainer._round.old_logps is None  # no stored copy needed: old = current, detached
    for logps, old, _ in captured:
        assert torch.equal(logps, old)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_gradient_accumulation_matches_one_big_batch(loss_type, tiny_decoder_dir, tokenizer, tmp_path):
    """8 completions in one micro-batch == 2 micro-batches of 4 (same round, same samples), because each
    micro-batch's loss carries the whole step's normaliser."""
    weights = []
    for batch, accumulation in ((8, 1), (4, 2)):
        model = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)
        args = config(GRPOConfig, tmp_path / f"{batch}", per_device_train_batch_size=batch,
                      gradient_accumulation_steps=accumulation, max_steps=2, loss_type=loss_type,
                      learning_rate=1e-3)
        trainer = GRPOTrainer(model, reward_funcs=low_token_share, args=args, train_dataset=prompts_dataset(16),
                              processing_class=tokenizer)
        trainer.train()
        weights.append([p.detach().clone() for p in trainer.model.parameters()])
    # Two Adam steps of lr 1e-3: a wrong split moves weights by ~lr; summation-order rounding in the split
    # gradients, which Adam's normalisation amplifies where a gradient is near 0, by a few 1e-6 at most.
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_rloo_puts_the_kl_in_the_reward(policy, tiny_decoder_dir, tokenizer, tmp_path):
    args = config(RLOOConfig, tmp_path, max_steps=3, beta=0.5, learning_rate=1e-2)
    trainer = RLOOTrainer(policy, reward_funcs=low_token_share, args=args, train_dataset=prompts_dataset(16),
                          processing_class=tokenizer)
    trainer.train()
    round_ = trainer._round
    mask = round_.completion_mask
    sampled = trainer._token_logps(trainer.model, round_.prompt_ids, round_.completion_ids, mask).logps_grid
    assert round_.ref_logps is not None and trainer.ref_model is not None
    # The reference is the initial policy: frozen while the policy moved.
    initial = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)
    reference = trainer._token_logps(initial, round_.prompt_ids, round_.completion_ids, mask).logps_grid
    torch.testing.assert_close(round_.ref_logps, reference.detach(), atol=1e-5, rtol=0)
    assert (sampled.detach() - reference.detach())[mask].abs().max() > 1e-3
    assert logged(trainer, "kl")  # the sequence KL is logged


def test_rloo_advantages_are_leave_one_out_of_the_penalised_reward(policy, tokenizer, tmp_path):
    trainer = RLOOTrainer(policy, reward_funcs=low_token_share, args=config(RLOOConfig, tmp_path, beta=0.3),
                          train_dataset=prompts_dataset(16), processing_class=tokenizer)
    rewards, kl = torch.tensor([1.0, 0.0, 0.5, 0.5]), torch.tensor([0.2, -0.1, 0.0, 0.4])
    expected = leave_one_out_advantages(rewards - 0.3 * kl, 4)
    torch.testing.assert_close(trainer.compute_advantages(rewards, kl), expected)
    trainer.args.reward_clip_range = (0.0, 0.6)
    expected = leave_one_out_advantages(rewards.clamp(0.0, 0.6) - 0.3 * kl, 4)
    torch.testing.assert_close(trainer.compute_advantages(rewards, kl), expected)


def test_peft_reference_is_the_base_model(tiny_decoder_dir, tokenizer, tmp_path):
    from peft import LoraConfig

    base = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)
    args = config(GRPOConfig, tmp_path, max_steps=2, beta=0.1, learning_rate=5e-2)
    trainer = GRPOTrainer(AutoModelForCausalLM.from_pretrained(tiny_decoder_dir), reward_funcs=low_token_share,
                          args=args, train_dataset=prompts_dataset(16), processing_class=tokenizer,
                          peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    assert trainer.ref_model is None  # no copy: the adapter is switched off instead
    trainer.train()
    round_ = trainer._round
    expected = trainer._token_logps(base, round_.prompt_ids, round_.completion_ids, round_.completion_mask)
    torch.testing.assert_close(round_.ref_logps, expected.logps_grid.detach(), atol=1e-5, rtol=0)
    assert logged(trainer, "kl")[-1] > 0


def test_mask_truncated_completions(policy, tokenizer, tmp_path):
    args = config(GRPOConfig, tmp_path, max_steps=1, mask_truncated_completions=True, max_completion_length=3)
    trainer = GRPOTrainer(policy, reward_funcs=low_token_share, args=args, train_dataset=prompts_dataset(16),
                          processing_class=tokenizer)
    trainer.train()
    round_ = trainer._round
    ended = (round_.completion_ids == tokenizer.eos_token_id).any(-1)
    assert torch.equal(round_.completion_mask.any(-1), ended)  # truncated rows are out of the loss


def test_evaluation_logs_rewards(policy, tokenizer, tmp_path):
    args = config(GRPOConfig, tmp_path, max_steps=1, per_device_eval_batch_size=8)
    trainer = GRPOTrainer(policy, reward_funcs=low_token_share, args=args, train_dataset=prompts_dataset(16),
                          eval_dataset=prompts_dataset(4), processing_class=tokenizer)
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_reward"] <= 1.0
    assert metrics["eval_loss"] == pytest.approx(-metrics["eval_reward"], abs=1e-6)


# ----- command line ----------------------------------------------------------------------------------------
def test_cli_grpo_and_rloo_with_a_reward_module(tiny_decoder_dir, tmp_path, monkeypatch):
    from tether.cli import main

    (tmp_path / "my_rewards.py").write_text(
        "def short(completion_ids, **_):\n    return [-float(len(c)) for c in completion_ids]\n")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(f'{{"prompt": "the film {i}"}}\n' for i in range(16)))
    monkeypatch.chdir(tmp_path)
    for method in ("grpo", "rloo"):
        out = tmp_path / method
        code = main([method, "--model_name_or_path", tiny_decoder_dir, "--dataset_name", str(data),
                     "--output_dir", str(out), "--reward_funcs", "my_rewards:short", "--max_steps", "2",
                     "--per_device_train_batch_size", "4", "--num_generations", "2", "--max_completion_length",
                     "4", "--report_to", "none", "--use_cpu", "--save_strategy", "no"])
        assert code == 0
        assert (out / "model.safetensors").is_file() and (out / "tether_config.yaml").is_file()
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert any("rewards/short/mean" in row for row in rows)
    with pytest.raises(SystemExit, match="no function 'nope'"):
        main(["grpo", "--model_name_or_path", tiny_decoder_dir, "--dataset_name", str(data), "--output_dir",
              str(tmp_path / "x"), "--reward_funcs", "my_rewards:nope", "--use_cpu"])


def test_generation_batch_size_sets_the_round_and_survives_a_rebuild(tmp_path):
    from tether.trainers.base import _init_values

    args = config(GRPOConfig, tmp_path, per_device_train_batch_size=4, generation_batch_size=16)
    assert args.steps_per_generation == 4  # 16 completions per round = 4 micro-batches of 4 (one process)
    assert GRPOConfig(**_init_values(args)).steps_per_generation == 4  # both fields set, and they agree
    with pytest.raises(ValueError, match="disagree"):
        config(GRPOConfig, tmp_path, per_device_train_batch_size=4, generation_batch_size=16, steps_per_generation=2)


@pytest.mark.parametrize("keep_top", [1.0, 0.5])
def test_token_entropy_is_measured_where_it_is_logged_or_used(policy, tokenizer, tmp_path, monkeypatch, keep_top):
    """The training pass measures the detached entropy (a pass over the vocabulary) on the steps that log it,
    and on every step when the high-entropy mask (top_entropy_quantile < 1) needs it; reference and old-policy
    passes never do."""
    import torch

    from tether.trainers.online import OnlineTrainer

    asked = []
    original = OnlineTrainer._token_logps

    def spy(self, *args, **kwargs):
        asked.append((torch.is_grad_enabled(), kwargs.get("with_stats", True)))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(OnlineTrainer, "_token_logps", spy)
    args = config(GRPOConfig, tmp_path, max_steps=7, logging_steps=3, beta=0.1, top_entropy_quantile=keep_top)
    trainer = GRPOTrainer(policy, reward_funcs=low_token_share, args=args, train_dataset=prompts_dataset(),
                          processing_class=tokenizer)
    trainer.train()
    training = [stats for grad, stats in asked if grad]
    assert len(training) == 7
    assert training == ([True] * 7 if keep_top < 1 else [step in (3, 6, 7) for step in range(1, 8)])
    assert not any(stats for grad, stats in asked if not grad)  # the reference passes (beta 0.1)
    assert [row["step"] for row in trainer.state.log_history if "entropy" in row and "loss" in row] == [3, 6]
