"""Issue 13, item 5: messages that point the right way. A missing local model folder is named as one (not as a
malformed hub id); `--learning_rate -1e-2` reaches the config, which names the field; abbreviated flags are
errors; a bare `--reward_funcs name` is an error listing the accepted forms, never a hub lookup. Each case
checks the exact error class, its text, and that nothing was trained or written."""

from __future__ import annotations

import json
import os
import re

import pytest
from datasets import Dataset

from tether import AutoModelForCausalLMWithValueHead, SFTConfig, SFTTrainer
from tether.cli import main, parse_command_args
from tether.models.loading import load_language_model, load_reward_model, load_tokenizer, resolve_model_source
from tether.rollout.reward_specs import RewardSpecError, resolve_reward_spec
from tether.rollout.rewards import RewardModelScorer
from tether.scripts import TrlParser
from tether.scripts.strict import NEGATIVE_NUMBER

HUB_FORM = "a hub model id must look like 'name' or 'namespace/name'"


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"the film {i}", "completion": " was fine."}) + "\n"
                            for i in range(8)))
    return str(path)


def written(folder) -> list[str]:
    return sorted(os.listdir(folder)) if os.path.exists(folder) else []


# ----- (a) a missing local model folder --------------------------------------------------------------------
def test_trainer_with_missing_relative_model_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError) as error:
        SFTTrainer(model="./no-such-dir", args=SFTConfig(output_dir=str(out), report_to=[], use_cpu=True),
                   train_dataset=Dataset.from_dict({"text": ["a b c"] * 4}))
    assert type(error.value) is FileNotFoundError
    message = str(error.value)
    assert message.startswith(f"Model './no-such-dir': no such local folder ({tmp_path / 'no-such-dir'})")
    assert HUB_FORM in message and "starts like a path" in message
    assert "Repo id must" not in message
    assert not out.exists()


@pytest.mark.parametrize("load, what", [
    (load_language_model, "Model"),
    (load_tokenizer, "Tokenizer"),
    (load_reward_model, "Reward model"),
    (RewardModelScorer, "Reward model"),
    (AutoModelForCausalLMWithValueHead.from_pretrained, "Model"),
])
def test_every_loader_names_a_missing_absolute_path(load, what):
    with pytest.raises(FileNotFoundError) as error:
        load("/abs/missing")
    assert type(error.value) is FileNotFoundError
    assert str(error.value).startswith(f"{what} '/abs/missing': no such local folder; the nearest existing folder, "
                                       "/, has no 'abs'.")
    assert HUB_FORM in str(error.value)


def test_path_under_an_existing_folder_suggests_the_close_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "sft_model").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=re.escape(
            "the nearest existing folder, " + str(tmp_path / "outputs") + ", has no 'sft_modle' (similar names "
            "there: sft_model). It was read as a local path because its first part 'outputs' is a folder of the "
            "working directory")):
        resolve_model_source("outputs/sft_modle")
    with pytest.raises(FileNotFoundError, match=r"because it has 2 '/' \(a hub id has at most one\)"):
        resolve_model_source("a/b/c")


def test_hub_ids_and_existing_paths_pass_through(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Shaped like hub ids (and no local folder of their first part): left to transformers and the hub.
    assert resolve_model_source("no-such-model") == "no-such-model"
    assert resolve_model_source("namespace/no-such-model") == "namespace/no-such-model"
    (tmp_path / "model").mkdir()
    assert resolve_model_source("./model") == "./model"
    assert resolve_model_source(tmp_path / "model") == str(tmp_path / "model")


def test_cli_names_the_flag_of_a_missing_model_before_loading_anything(data_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError) as error:
        main(["sft", "--model_name_or_path", "./no-such-dir", "--dataset_name", data_file, "--output_dir", str(out),
              "--report_to", "none"])
    assert type(error.value) is FileNotFoundError
    assert str(error.value).startswith("--model_name_or_path './no-such-dir': no such local folder")
    assert not out.exists()


# ----- (b) negative numbers are values --------------------------------------------------------------------
def test_negative_learning_rate_reaches_the_config(tmp_path):
    args = ["--model_name_or_path", "m", "--dataset_name", "d.jsonl", "--output_dir", str(tmp_path / "out"),
            "--learning_rate", "-1e-2"]
    with pytest.raises(ValueError) as error:  # argparse used to say "expected one argument"
        parse_command_args("sft", args)
    assert type(error.value) is ValueError
    assert str(error.value) == "SFTConfig.learning_rate must be >= 0, got -0.01."
    with pytest.raises(ValueError) as error:
        TrlParser((SFTConfig,)).parse_args_and_config(["--output_dir", str(tmp_path / "out"), "--learning_rate",
                                                       "-1E-2"])
    assert str(error.value) == "SFTConfig.learning_rate must be >= 0, got -0.01."
    assert not (tmp_path / "out").exists()


def test_negative_numbers_in_any_notation_parse_as_values(tmp_path):
    _, config = parse_command_args("grpo", [
        "--model_name_or_path", "m", "--dataset_name", "d.jsonl", "--output_dir", str(tmp_path),
        "--reward_weights", "1", "-5e-1", "-.25", "-3.", "--num_generations", "2"])
    assert config.reward_weights == [1.0, -0.5, -0.25, -3.0]
    for text in ("-1", "-1.5", "-.5", "-5.", "-1e-2", "-1E+3", "-2.5e3", "-inf", "-nan"):
        assert NEGATIVE_NUMBER.match(text), text
    for text in ("-e", "--1", "-1e", "-learning_rate", "-x1"):
        assert not NEGATIVE_NUMBER.match(text), text


# ----- (c) no abbreviated flags ---------------------------------------------------------------------------
def test_abbreviated_flag_is_an_error_naming_it(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        parse_command_args("sft", ["--model_name_or_path", "m", "--dataset_name", "d.jsonl", "--output_dir",
                                   str(out), "--learning_rat", "1e-3"])
    assert exit_info.value.code == 2
    assert ("error: unrecognized arguments: --learning_rat (did you mean --learning_rate?) 1e-3. Abbreviated flags "
            "are not accepted: write the full name.") in capsys.readouterr().err
    with pytest.raises(ValueError) as error:
        TrlParser((SFTConfig,)).parse_args_and_config(["--output_dir", str(out), "--learning_rat", "1e-3"])
    assert type(error.value) is ValueError
    assert "unrecognized arguments: --learning_rat (did you mean --learning_rate?) 1e-3." in str(error.value)
    # TRL's call shape that keeps unknown strings gets them back, unparsed, instead of a silent abbreviation.
    config, rest = TrlParser((SFTConfig,)).parse_args_and_config(
        ["--output_dir", str(out), "--learning_rat", "1e-3"], return_remaining_strings=True)
    assert rest == ["--learning_rat", "1e-3"] and config.learning_rate == SFTConfig.learning_rate
    assert not out.exists()


def test_abbreviations_are_off_in_every_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--output_dir", str(tmp_path / "demo"), "--quic"])  # --quick, abbreviated
    assert exit_info.value.code == 2 and "unrecognized arguments: --quic" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path), "--titl", "x"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --titl" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--vers"])
    assert exit_info.value.code == 2
    assert TrlParser((SFTConfig,)).allow_abbrev is False
    assert TrlParser((SFTConfig,), allow_abbrev=True).allow_abbrev is True  # asked for explicitly


# ----- (d) `--reward_funcs` forms --------------------------------------------------------------------------
def grpo_args(tmp_path, data_file, reward):
    return ["grpo", "--model_name_or_path", str(tmp_path), "--dataset_name", data_file, "--output_dir",
            str(tmp_path / "out"), "--reward_funcs", reward, "--report_to", "none"]


@pytest.mark.parametrize("spec, expected", [
    ("length_reward", "Reward spec 'length_reward' names no reward function (one needs its module or file, e.g. "
                      "my_rewards:length_reward or my_rewards.py:length_reward) and no reward model (no local folder "
                      "'length_reward' exists, and a hub model is given as namespace/name)."),
    ("gpt2-reward", "Reward spec 'gpt2-reward' names no reward function"),
    ("accuracy_reward", "Reward spec 'accuracy_reward' is one of TRL's built-in reward functions (trl.rewards), "
                        "which tether does not ship. Fix: with TRL installed, pass trl.rewards:accuracy_reward"),
    ("no_such_module.fn", "Cannot import 'no_such_module' (reward spec 'no_such_module.fn')"),
    ("./no-such-file.py", "Reward spec './no-such-file.py': no such file"),
])
def test_reward_spec_without_a_usable_form_is_an_error(spec, expected, data_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(grpo_args(tmp_path, data_file, spec))
    message = str(exit_info.value.code)
    assert message.startswith(f"error: --reward_funcs {spec}: {expected}")
    if "no such file" not in expected:
        assert "Accepted forms: `path/to/file.py:function`, `package.module:function`" in message
    assert not (tmp_path / "out").exists()
    with pytest.raises(RewardSpecError):  # the Python form of the same check
        resolve_reward_spec(spec)


def test_reward_spec_missing_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"^Reward model './no-such-rm': no such local folder"):
        resolve_reward_spec("./no-such-rm")


def test_reward_spec_accepted_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec_rewards_mod.py").write_text("def short(completions, **_):\n    return [0.0] * len(completions)\n")
    (tmp_path / "rm").mkdir()
    by_colon = resolve_reward_spec("spec_rewards_mod:short")
    assert by_colon.__name__ == "short" and by_colon(completions=["a", "b"]) == [0.0, 0.0]
    assert resolve_reward_spec("spec_rewards_mod.short") is by_colon  # TRL's dotted form
    assert resolve_reward_spec(f"{tmp_path / 'spec_rewards_mod.py'}:short")(completions=["a"]) == [0.0]
    assert resolve_reward_spec("./rm") == "./rm"  # a local reward-model folder
    assert resolve_reward_spec("namespace/reward-model") == "namespace/reward-model"  # a hub id, loaded later
    with pytest.raises(RewardSpecError, match="is a file; name the function too: spec_rewards_mod.py:function_name"):
        resolve_reward_spec("spec_rewards_mod.py")


def test_a_test_split_of_a_single_file_is_an_error(data_file, tmp_path):
    """A single file holds one split: asked for a test split, it would give its training rows to evaluate on.
    A folder with a file per split is what to use, and it works."""
    args = ["--model_name_or_path", "m", "--dataset_name", data_file, "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match="a single file holds one split.*a folder with a file per split"):
        parse_command_args("sft", [*args, "--dataset_test_split", "test"])
    script_args, _ = parse_command_args("sft", args)  # no test split: fine
    assert script_args.dataset_test_split is None
    folder = tmp_path / "splits"
    folder.mkdir()
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text(open(data_file).read())
    script_args, _ = parse_command_args("sft", [*args[:3], str(folder), *args[4:], "--dataset_test_split", "test"])
    assert script_args.dataset_test_split == "test"

    from tether.data import load_any_dataset

    assert len(load_any_dataset(str(folder), "test")) == 8
