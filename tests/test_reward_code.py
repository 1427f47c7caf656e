"""Issue 13, item 6: reward functions are user code. `--help` says the file runs; loading one leaves sys.path
as it was and never shadows a real module; a slow call warns, and a hung one stops training (reward_timeout)
with an error naming the function, before any weight changes or any checkpoint is written."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from tether import GRPOConfig, GRPOTrainer, RLOOConfig
from tether.cli import main, parse_command_args
from tether.rollout.reward_specs import resolve_reward_spec
from tether.rollout.rewards import RewardFunctionTimeout, call_reward_functions


# ----- (e) --help says that reward files run -------------------------------------------------------------
@pytest.mark.parametrize("command", ["grpo", "rloo", "ppo"])
def test_help_says_reward_files_are_run(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    assert ("Reward functions are code: the file or module is imported and RUN inside the training process, with "
            "your permissions, so name only code you trust.") in text
    assert "A bare name is an error, never a hub lookup." in text


# ----- (f) sys.path and sys.modules after loading a reward --------------------------------------------------
def test_loading_a_reward_file_leaves_sys_path_and_real_modules_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "rewards"
    folder.mkdir()
    (folder / "reward_helpers_13.py").write_text("BONUS = 2.0\n")
    # Named like the standard library's json: it must not replace it, and it can import its neighbour.
    (folder / "json.py").write_text("from reward_helpers_13 import BONUS\n\n"
                                    "def bonus(completions, **_):\n    return [BONUS] * len(completions)\n")
    before = list(sys.path)
    func = resolve_reward_spec("rewards/json.py:bonus")
    assert sys.path == before
    assert func(completions=["a", "b"]) == [2.0, 2.0]
    assert sys.modules["json"] is json and json.dumps([1]) == "[1]"
    assert func.__module__.startswith("tether_reward_file_json_") and sys.modules[func.__module__].bonus is func
    assert resolve_reward_spec(f"{folder / 'json.py'}:bonus") is func  # the same file is run once, not twice


def test_importing_a_reward_module_leaves_sys_path_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reward_mod_13f.py").write_text("def one(completions, **_):\n    return [1.0] * len(completions)\n")
    before = list(sys.path)
    assert resolve_reward_spec("reward_mod_13f:one")(completions=["x"]) == [1.0]
    assert sys.path == before
    assert resolve_reward_spec("reward_mod_13f.one")(completions=["x"]) == [1.0]  # TRL's dotted form
    assert sys.path == before


def test_a_reward_file_that_raises_is_named_and_restores_sys_path(tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('no API key')\n")
    before, modules = list(sys.path), set(sys.modules)
    with pytest.raises(ValueError, match=re.escape(f"Running {tmp_path / 'broken.py'} (reward spec ") +
                       r".*raised RuntimeError: no API key"):
        resolve_reward_spec(f"{tmp_path / 'broken.py'}:f")
    assert sys.path == before and set(sys.modules) == modules


# ----- (g) slow and hung reward functions -----------------------------------------------------------------
def sleeps_half_a_second(prompts, completions, **_):
    time.sleep(0.5)
    return [1.0] * len(completions)


def quick(prompts, completions, **_):
    return [0.5] * len(completions)


def test_a_call_past_the_timeout_is_an_error_naming_the_function():
    started = time.monotonic()
    with pytest.raises(RewardFunctionTimeout) as error:
        call_reward_functions([quick, sleeps_half_a_second], ["p"] * 2, ["c"] * 2, reward_timeout=0.1)
    assert time.monotonic() - started < 0.4  # abandoned at the timeout, not waited for
    assert type(error.value) is RewardFunctionTimeout
    assert isinstance(error.value, TimeoutError) and isinstance(error.value, ValueError)
    assert str(error.value).startswith("Reward function 'sleeps_half_a_second' did not return within "
                                       "reward_timeout=0.1 s (one call on 2 completions). Training stops here")
    assert "it may still be running in the background" in str(error.value)


def test_async_function_past_the_timeout_is_named_too():
    async def slow_async(prompts, completions, **_):
        await asyncio.sleep(0.5)
        return [1.0] * len(completions)

    with pytest.raises(RewardFunctionTimeout, match="^Reward function 'slow_async' did not return within"):
        call_reward_functions([quick, slow_async], ["p"], ["c"], reward_timeout=0.1)


def test_a_slow_call_warns_once_with_the_elapsed_time(caplog):
    with caplog.at_level(logging.WARNING, logger="tether.rollout.rewards"):
        values = call_reward_functions([quick, sleeps_half_a_second], ["p"] * 3, ["c"] * 3, reward_warn_after=0.1)
    assert values.tolist() == [[0.5] * 3, [1.0] * 3]  # the call still completes: a warning, not an error
    messages = [r.getMessage() for r in caplog.records if r.name == "tether.rollout.rewards"]
    assert len(messages) == 1, messages
    match = re.match(r"Reward function 'sleeps_half_a_second' has been running for (\d+\.\d) s on 3 completions "
                     r"and has not returned yet; still waiting", messages[0])
    assert match and 0.1 <= float(match.group(1)) < 0.5
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tether.rollout.rewards"):  # fast calls: silent
        call_reward_functions([quick], ["p"], ["c"], reward_warn_after=0.1)
        call_reward_functions([sleeps_half_a_second], ["p"], ["c"], reward_warn_after=None)
    assert not [r for r in caplog.records if r.name == "tether.rollout.rewards"]


def test_training_stops_at_a_hung_reward_before_anything_changes(tiny_decoder_dir, tmp_path):
    policy = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    out = tmp_path / "out"
    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=4, num_generations=2, max_completion_length=4,
                      max_steps=2, save_strategy="steps", save_steps=1, report_to=[], use_cpu=True,
                      disable_tqdm=True, reward_timeout=0.1)
    trainer = GRPOTrainer(policy, reward_funcs=sleeps_half_a_second, args=args,
                          train_dataset=Dataset.from_dict({"prompt": [f"the film {i}" for i in range(8)]}))
    with pytest.raises(RewardFunctionTimeout, match="^Reward function 'sleeps_half_a_second' did not return"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(p, before[name]) for name, p in trainer.model.named_parameters())
    assert not list(out.glob("checkpoint-*")) and not (out / "model.safetensors").exists()


def test_timeout_fields_validated_and_set_from_the_command_line(tmp_path):
    for field in ("reward_timeout", "reward_warn_after"):
        for bad in (0, -1.0, float("inf"), float("nan")):
            with pytest.raises(ValueError, match=f"^GRPOConfig.{field} must be a finite number of seconds > 0"):
                GRPOConfig(output_dir=str(tmp_path), **{field: bad})
    assert RLOOConfig(output_dir=str(tmp_path)).reward_timeout is None
    assert RLOOConfig(output_dir=str(tmp_path)).reward_warn_after == 10.0
    _, config = parse_command_args("grpo", ["--model_name_or_path", "m", "--dataset_name", "d.jsonl", "--output_dir",
                                            str(tmp_path), "--reward_timeout", "30", "--reward_warn_after", "2.5"])
    assert config.reward_timeout == 30.0 and config.reward_warn_after == 2.5


def test_ppo_train_stops_at_a_hung_reward_too(tiny_decoder_dir, tokenizer, tmp_path):
    from tether import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    for bad in (0, float("nan")):
        with pytest.raises(ValueError, match="^PPOConfig.reward_timeout must be a finite number of seconds > 0"):
            PPOConfig(reward_timeout=bad)
    out = tmp_path / "ppo"
    config = PPOConfig(batch_size=2, mini_batch_size=1, total_steps=2, max_new_tokens=4, save_steps=1,
                       output_dir=str(out), reward_timeout=0.1)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = PPOTrainer(config, model, None, tokenizer, dataset=Dataset.from_dict({"prompt": ["a", "b", "c", "d"]}),
                         reward_funcs=sleeps_half_a_second)
    with pytest.raises(RewardFunctionTimeout, match="^Reward function 'sleeps_half_a_second' did not return"):
        trainer.train()
    assert all(torch.equal(p, before[name]) for name, p in trainer.accelerator.unwrap_model(trainer.model)
               .named_parameters())
    assert not list(out.glob("checkpoint-*"))
