"""The `tether` command: parsing (in process, fast) and one real `tether sft` run (in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from launching import OFFLINE_ENV
from tether.cli import RESOLVED_CONFIG_NAME, main, parse_command_args
from tether.demo.corpus import generate_reviews


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "data.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for row in generate_reviews(40, seed=3):
            f.write(json.dumps(row) + "\n")
    return str(path)


def write_yaml(path, values: dict) -> str:
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_sft_end_to_end_in_a_subprocess(tiny_decoder_dir, data_file, tmp_path):
    out = tmp_path / "out"
    config = write_yaml(tmp_path / "run.yaml", {"learning_rate": "1e-3", "max_steps": 50, "packing": True,
                                                "max_length": 64})
    cmd = [sys.executable, "-m", "tether.cli", "sft", "--model_name_or_path", tiny_decoder_dir,
           "--dataset_name", data_file, "--output_dir", str(out), "--config", config, "--max_steps", "3",
           "--per_device_train_batch_size", "4", "--report_to", "none", "--save_strategy", "no"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=OFFLINE_ENV, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", RESOLVED_CONFIG_NAME):
        assert (out / name).is_file(), f"{name} missing from {sorted(os.listdir(out))}"
    resolved = yaml.safe_load((out / RESOLVED_CONFIG_NAME).read_text())
    # The flag overrides the YAML's value; YAML values without a flag stay.
    assert resolved["max_steps"] == 3
    assert resolved["learning_rate"] == pytest.approx(1e-3)
    assert resolved["packing"] is True and resolved["max_length"] == 64
    assert resolved["dataset_name"] == data_file
    # The trained model really is what came out: it loads, with its tokenizer, from output_dir alone.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tokenizer)


def test_yaml_sets_defaults_and_flags_override(tmp_path):
    config = write_yaml(tmp_path / "run.yaml", {
        "model_name_or_path": "some/model", "dataset_name": "data.jsonl", "learning_rate": "3e-4",
        "max_steps": 10, "packing": True, "output_dir": str(tmp_path / "from-yaml"), "report_to": "none",
    })
    script_args, config_obj = parse_command_args("sft", ["--config", config, "--max_steps", "7",
                                                         "--packing", "false"])
    assert script_args.model_name_or_path == "some/model" and script_args.dataset_name == "data.jsonl"
    assert config_obj.learning_rate == pytest.approx(3e-4)  # YAML reads 3e-4 as a string; argparse converts
    assert config_obj.max_steps == 7 and config_obj.packing is False
    assert config_obj.output_dir == str(tmp_path / "from-yaml")


def test_resolved_config_round_trips(tmp_path):
    """The tether_config.yaml a run writes is itself a valid --config file giving the same values."""
    from tether.cli import _write_resolved_config

    script_args, config = parse_command_args("sft", [
        "--model_name_or_path", "m", "--dataset_name", "d.jsonl", "--output_dir", str(tmp_path),
        "--learning_rate", "0.01", "--model_init_kwargs", '{"dtype": "float32"}', "--report_to", "none"])
    path = tmp_path / RESOLVED_CONFIG_NAME
    _write_resolved_config(script_args, config, str(path))
    script_again, config_again = parse_command_args("sft", ["--config", str(path)])
    assert script_again == script_args
    assert config_again.to_dict() == config.to_dict()
    assert config_again.model_init_kwargs == {"dtype": "float32"}


def test_unknown_yaml_key_is_an_error(tmp_path, capsys):
    config = write_yaml(tmp_path / "run.yaml", {"model_name_or_path": "m", "dataset_name": "d.jsonl",
                                                "learning_rat": 0.1})
    with pytest.raises(SystemExit) as exit_info:
        parse_command_args("sft", ["--config", config])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown option(s) 'learning_rat'" in err and "did you mean 'learning_rate'" in err


def test_missing_model_or_dataset_is_an_error(capsys):
    with pytest.raises(SystemExit):
        parse_command_args("sft", ["--dataset_name", "d.jsonl"])
    assert "--model_name_or_path" in capsys.readouterr().err


def test_sft_help_lists_script_arguments_and_sft_config_fields(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sft", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model_name_or_path", "--dataset_name", "--dataset_test_split", "--config",
                 "--dataset_text_field", "--packing", "--max_length", "--completion_only_loss",
                 "--learning_rate", "--output_dir"):
        assert flag in out
    assert "Pack examples into rows of max_length" in out  # help strings come from SFTConfig itself


def test_top_level_help_and_version(capsys):
    from tether import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"tether {__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "sft" in out and "demo" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-command"])
    assert exit_info.value.code == 2


@pytest.fixture()
def preference_file(tmp_path):
    from tether.demo.corpus import preference_pairs

    path = tmp_path / "pairs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for row in preference_pairs(24, seed=5):
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.mark.parametrize("command, extra", [
    ("reward", ["--use_peft", "true", "--lora_r", "4"]),
    ("dpo", ["--beta", "0.2", "--loss_type", "ipo"]),
    ("kto", []),
    ("orpo", []),
])
def test_preference_commands_end_to_end(command, extra, tiny_decoder_dir, preference_file, tmp_path):
    out = tmp_path / command
    cmd = [sys.executable, "-m", "tether.cli", command, "--model_name_or_path", tiny_decoder_dir,
           "--dataset_name", preference_file, "--output_dir", str(out), "--max_steps", "2",
           "--per_device_train_batch_size", "4", "--report_to", "none", "--save_strategy", "no", *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, env=OFFLINE_ENV, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    weights = "adapter_model.safetensors" if "--use_peft" in extra else "model.safetensors"
    assert (out / weights).is_file(), sorted(os.listdir(out))
    resolved = yaml.safe_load((out / RESOLVED_CONFIG_NAME).read_text())
    if command == "dpo":
        assert resolved["beta"] == pytest.approx(0.2) and resolved["loss_type"] == ["ipo"]
    if command == "reward":
        from peft import PeftConfig

        assert PeftConfig.from_pretrained(out).task_type == "SEQ_CLS"
