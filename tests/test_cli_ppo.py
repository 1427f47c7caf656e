"""`tether ppo`: the command-line form of PPOTrainer.train() (reward function from a file, YAML config,
LoRA, checkpoints and --resume), run in-process on the tiny model."""

from __future__ import annotations

import json

import pytest
import yaml

from tether.cli import RESOLVED_CONFIG_NAME, main, parse_command_args

REWARD_FILE = '''
def short_and_e(prompts, completions, **columns):
    """Rewards completions that use the letter e, a little per occurrence."""
    return [min(c.count("e"), 5) / 5.0 for c in completions]
'''


@pytest.fixture()
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    texts = ["this movie was", "the plot", "great acting and", "what a waste of", "i loved the", "the ending"]
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts * 2))
    return str(path)


@pytest.fixture()
def reward_file(tmp_path):
    path = tmp_path / "rewards.py"
    path.write_text(REWARD_FILE)
    return f"{path}:short_and_e"


def test_ppo_command_trains_saves_and_resumes(tiny_decoder_dir, prompt_file, reward_file, tmp_path):
    out = tmp_path / "out"
    config = tmp_path / "ppo.yaml"
    config.write_text(yaml.safe_dump({"batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1, "max_new_tokens": 6,
                                      "learning_rate": "1e-3", "save_steps": 1, "seed": 3}))
    common = ["ppo", "--model_name_or_path", tiny_decoder_dir, "--dataset_name", prompt_file, "--reward_funcs",
              reward_file, "--output_dir", str(out), "--config", str(config), "--use_peft", "--lora_r", "4",
              "--lora_target_modules", "q_proj,v_proj"]
    assert main([*common, "--total_steps", "2"]) == 0
    assert (out / "checkpoint-2").is_dir() and (out / "adapter_model.safetensors").is_file()
    assert (out / "report.html").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("rewards/short_and_e" in r for r in rows)
    resolved = yaml.safe_load((out / RESOLVED_CONFIG_NAME).read_text())
    assert resolved["batch_size"] == 4 and resolved["use_peft"] and resolved["total_steps"] == 2
    assert "resume" not in resolved
    # --resume continues the run from checkpoint-2 to step 3
    assert main([*common, "--total_steps", "3", "--resume"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_ppo_flags_are_the_config_fields(tmp_path):
    _, config = parse_command_args("ppo", [
        "--model_name_or_path", "m", "--dataset_name", "d.jsonl", "--output_dir", str(tmp_path), "--steps", "64",
        "--batch_size", "16", "--forward_batch_size", "4", "--gradient_accumulation_steps", "2",
        "--use_score_scaling", "--tracker_kwargs", '{"wandb": {"entity": "me"}}', "--ptx_coef", "0.5"])
    assert config.mini_batch_size == 4 and config.backward_batch_size == 8 and config.train_steps == 4
    assert config.tracker_kwargs == {"wandb": {"entity": "me"}} and config.ptx_coef == 0.5


def test_ppo_command_needs_rewards(tiny_decoder_dir, prompt_file, tmp_path):
    with pytest.raises(SystemExit, match="--reward_funcs is required"):
        main(["ppo", "--model_name_or_path", tiny_decoder_dir, "--dataset_name", prompt_file,
              "--output_dir", str(tmp_path)])
