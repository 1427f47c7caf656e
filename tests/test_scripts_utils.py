"""TRL 1.x script utilities under tether: TrlParser (--config YAML, env section, remaining strings), the
script-argument dataclasses, and get_dataset's mixtures, on local files only."""

from __future__ import annotations

import argparse
import json
import logging
import os
import warnings
from dataclasses import dataclass, field

import datasets
import pytest

from tether import DPOConfig, ModelConfig, SFTConfig
from tether.scripts import DatasetMixtureConfig, ScriptArguments, TrlParser, get_dataset, init_zero_verbose
from tether.scripts.utils import DatasetConfig


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture()
def data_files(tmp_path):
    """Two local datasets: 10 prompt-completion rows (jsonl) and 6 rows with an extra column (csv)."""
    first = write_jsonl(tmp_path / "first.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(10)])
    second = tmp_path / "second.csv"
    second.write_text("prompt,completion,source\n" + "".join(f"q{i},d{i},csv\n" for i in range(6)))
    return first, str(second)


def test_trl_script_call_shape_yaml_env_and_mixture(tmp_path, data_files, monkeypatch):
    """What TRL 1.16's trl/scripts/sft.py does: one TrlParser over the four dataclasses, a YAML config with an
    env section, flags overriding the file, then get_dataset on the mixture."""
    first, second = data_files
    monkeypatch.setenv("TETHER_TEST_VAR", "before")  # restored after the test
    config = tmp_path / "sft.yaml"
    config.write_text(f"""
env:
  TETHER_TEST_VAR: from_yaml
  TETHER_TEST_NUMBER: 3
dataset_name: ignored/by-the-mixture
dataset_test_split: validation
dataset_streaming: false
output_dir: {tmp_path / "out"}
learning_rate: 2.0e-5
max_length: 64
packing: true
num_train_epochs: 2
model_name_or_path: some/model
use_peft: true
lora_r: 8
lora_target_modules: [q_proj, v_proj]
datasets:
  - path: json
    data_files: {first}
    columns: [prompt, completion]
  - path: csv
    data_files: {second}
    columns: [prompt, completion]
test_split_size: 4
""")
    monkeypatch.delenv("TETHER_TEST_NUMBER", raising=False)
    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig))
    script_args, training_args, model_args, dataset_args, rest = parser.parse_args_and_config(
        ["--config", str(config), "--max_length", "32", "--lora_r", "4", "--unknown_flag", "x"],
        return_remaining_strings=True)

    assert os.environ["TETHER_TEST_VAR"] == "from_yaml" and os.environ["TETHER_TEST_NUMBER"] == "3"
    assert isinstance(script_args, ScriptArguments) and script_args.dataset_name == "ignored/by-the-mixture"
    assert script_args.dataset_test_split == "validation" and script_args.dataset_train_split == "train"
    assert isinstance(training_args, SFTConfig)
    assert training_args.learning_rate == 2e-5 and training_args.packing is True
    assert training_args.num_train_epochs == 2
    assert training_args.max_length == 32  # the flag wins over the file
    assert (model_args.model_name_or_path, model_args.use_peft, model_args.lora_r) == ("some/model", True, 4)
    assert model_args.lora_target_modules == ["q_proj", "v_proj"]
    assert rest == ["--unknown_flag", "x"]
    assert [d.path for d in dataset_args.datasets] == ["json", "csv"]
    assert all(isinstance(d, DatasetConfig) for d in dataset_args.datasets)

    mixed = get_dataset(dataset_args)
    assert isinstance(mixed, datasets.DatasetDict) and set(mixed) == {"train", "test"}
    assert (len(mixed["train"]), len(mixed["test"])) == (12, 4)  # 10 + 6 rows, 4 of them for test
    assert mixed["train"].column_names == ["prompt", "completion"]
    everything = sorted(list(mixed["train"]["prompt"]) + list(mixed["test"]["prompt"]))
    assert everything == sorted([f"p{i}" for i in range(10)] + [f"q{i}" for i in range(6)])


def test_script_arguments_have_trl_1_16_fields_and_defaults():
    assert ScriptArguments() == ScriptArguments(
        dataset_name=None, dataset_config=None, dataset_train_split="train", dataset_test_split="test",
        dataset_streaming=False, ignore_bias_buffers=False)
    assert DatasetMixtureConfig() == DatasetMixtureConfig(datasets=[], streaming=False, test_split_size=None)


@dataclass
class LoadingA:
    trust_remote_code: bool = False


@dataclass
class LoadingB:
    trust_remote_code: bool = False
    revision: str = "main"


def test_shared_field_is_one_flag_for_every_dataclass():
    """A field name two dataclasses share must not fail on the duplicate flag, and the flag sets both."""
    parser = TrlParser((LoadingA, LoadingB))
    a, b = parser.parse_args_and_config(["--trust_remote_code", "--revision", "v2"])
    assert a.trust_remote_code is True and b.trust_remote_code is True and b.revision == "v2"
    a, b = parser.parse_args_and_config([])
    assert a.trust_remote_code is False and b.trust_remote_code is False


def test_trl_1_scripts_read_trust_remote_code_from_the_training_config():
    # TRL 1.x's scripts pass training_args.trust_remote_code to from_pretrained (ModelConfig lost the field).
    parser = TrlParser((ScriptArguments, DPOConfig, ModelConfig))
    _, training_args, _ = parser.parse_args_and_config(["--output_dir", "o", "--trust_remote_code"])
    assert training_args.trust_remote_code is True
    _, training_args, _ = parser.parse_args_and_config(["--output_dir", "o"])
    assert training_args.trust_remote_code is False


@dataclass
class Toy:
    arg1: int
    arg2: str = "alpha"
    limit: int | None = 5
    label: str | None = "x"
    tags: list[str] = field(default_factory=list)
    extra: dict | None = None


def test_config_sets_defaults_and_flags_override(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("arg1: 23\narg2: from_file\ntags: [a, b]\n")
    parser = TrlParser(Toy)
    (toy,) = parser.parse_args_and_config(["--config", str(config)])
    assert toy == Toy(arg1=23, arg2="from_file", tags=["a", "b"])
    (toy,) = parser.parse_args_and_config([f"--config={config}", "--arg1", "5"])
    assert (toy.arg1, toy.arg2) == (5, "from_file")
    (toy,) = parser.parse_args_and_config(["--arg1", "7"])  # no config: plain flags
    assert toy == Toy(arg1=7)


def test_none_sentinel_json_dicts_and_strings():
    parser = TrlParser(Toy)
    (toy,) = parser.parse_args_and_config(["--arg1", "1", "--limit", "None", "--label", "none",
                                           "--extra", '{"a": 1}'])
    assert toy.limit is None  # an optional number can be unset from the command line
    assert toy.label == "none"  # a string field keeps the text "none"
    assert toy.extra == {"a": 1}


def test_unknown_config_keys(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("arg1: 2\nnot_a_field: 9\n")
    parser = TrlParser(Toy)
    with pytest.raises(ValueError, match="not_a_field"):
        parser.parse_args_and_config(["--config", str(config)])
    (toy,) = parser.parse_args_and_config(["--config", str(config)], fail_with_unknown_args=False)
    assert toy.arg1 == 2
    toy, rest = parser.parse_args_and_config(["--config", str(config), "--more", "1"], return_remaining_strings=True)
    assert rest == ["--not_a_field", "9", "--more", "1"]
    toy, from_config, from_args = parser.parse_args_and_config(
        ["--config", str(config), "--more", "1"], return_remaining_strings=True, separate_remaining_strings=True)
    assert (from_config, from_args) == (["--not_a_field", "9"], ["--more", "1"])


def test_bad_configs_raise(tmp_path):
    @dataclass
    class HasConfig:
        config: str = "x"

    with pytest.raises(ValueError, match="'config'"):
        TrlParser(HasConfig)
    env_list = tmp_path / "env.yaml"
    env_list.write_text("env: [A, B]\narg1: 1\n")
    with pytest.raises(ValueError, match="`env`"):
        TrlParser(Toy).parse_args_and_config(["--config", str(env_list)])
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="YAML mapping"):
        TrlParser(Toy).parse_args_and_config(["--config", str(not_mapping)])


def test_config_defaults_reach_subparsers(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("arg1: 2\narg2: config_value\n")
    parser = TrlParser()
    subparsers = parser.add_subparsers(dest="command", parser_class=TrlParser)
    subparsers.add_parser("first", dataclass_types=[Toy])
    subparsers.add_parser("second", dataclass_types=[Toy])
    for command in ("first", "second"):
        (namespace,) = parser.parse_args_and_config([command, "--config", str(config)])
        assert (namespace.command, namespace.arg1, namespace.arg2) == (command, 2, "config_value")
    (namespace,) = parser.parse_args_and_config(["first", "--arg1", "3", "--config", str(config)])
    assert namespace.arg1 == 3


def test_datasets_from_command_line_are_paths(data_files):
    first, _ = data_files
    parser = TrlParser(DatasetMixtureConfig)
    (mixture,) = parser.parse_args_and_config(["--datasets", "json", "--streaming"])
    assert mixture.datasets == [DatasetConfig(path="json")] and mixture.streaming is True


def test_fraction_takes_target_shares_without_oversampling(data_files):
    first, second = data_files
    # Shares 0.75 / 0.25 of datasets of 10 and 6 rows: N = min(10 / 0.75, 6 / 0.25) = 13.33, so the first is
    # taken whole (round(0.75 * 13.33) = 10) and the second gives round(0.25 * 13.33) = 3 rows.
    mixture = DatasetMixtureConfig(datasets=[
        DatasetConfig(path="json", data_files=first, fraction=0.75),
        DatasetConfig(path="csv", data_files=second, columns=["prompt", "completion"], fraction=0.25),
    ])
    train = get_dataset(mixture)["train"]
    assert list(train["prompt"]) == [f"p{i}" for i in range(10)] + ["q0", "q1", "q2"]
    # Equal shares (unnormalised 2 and 2) of 10 and 6 rows: N = min(20, 12) = 12, six rows of each.
    mixture.datasets[0].fraction, mixture.datasets[1].fraction = 2.0, 2.0
    assert list(get_dataset(mixture)["train"]["prompt"]) == [f"p{i}" for i in range(6)] + [f"q{i}" for i in range(6)]


def test_fraction_errors_and_empty_mixture(data_files):
    first, second = data_files
    partial = DatasetMixtureConfig(datasets=[DatasetConfig(path="json", data_files=first, fraction=0.5),
                                             DatasetConfig(path="json", data_files=first)])
    with pytest.raises(ValueError, match="either all datasets"):
        get_dataset(partial)
    streamed = DatasetMixtureConfig(datasets=[DatasetConfig(path="json", data_files=first, fraction=0.5)],
                                    streaming=True)
    with pytest.raises(ValueError, match="streaming"):
        get_dataset(streamed)
    with pytest.raises(ValueError, match="No datasets"):
        get_dataset(DatasetMixtureConfig())
    with pytest.raises(ValueError, match="columns"):
        get_dataset(DatasetMixtureConfig(datasets=[DatasetConfig(path="json", data_files=first, columns=["text"])]))


def test_split_slices_streaming_and_row_count_test_split(data_files):
    first, second = data_files
    sliced = get_dataset(DatasetMixtureConfig(datasets=[DatasetConfig(path="json", data_files=first,
                                                                      split="train[:40%]")]))
    assert list(sliced["train"]["prompt"]) == ["p0", "p1", "p2", "p3"]
    streamed = get_dataset(DatasetMixtureConfig(datasets=[DatasetConfig(path="csv", data_files=second)],
                                                streaming=True))
    assert isinstance(streamed["train"], datasets.IterableDataset)
    assert [r["prompt"] for r in streamed["train"]] == [f"q{i}" for i in range(6)]
    # `--test_split_size 2` parses as the float 2.0: a row count, not a fraction.
    (mixture,) = TrlParser(DatasetMixtureConfig).parse_args_and_config(["--test_split_size", "2"])
    mixture.datasets = [DatasetConfig(path="json", data_files=first)]
    split = get_dataset(mixture)
    assert (len(split["train"]), len(split["test"])) == (8, 2)
    mixture.test_split_size = 0.3
    assert len(get_dataset(mixture)["test"]) == 3


def test_init_zero_verbose_quiets_logging_and_routes_warnings():
    root = logging.getLogger()
    handlers, level, show = root.handlers[:], root.level, warnings.showwarning
    root.handlers = []
    try:
        init_zero_verbose()
        assert root.level == logging.ERROR and len(root.handlers) == 1
        records = []
        catcher = logging.Handler()
        catcher.emit = records.append
        root.addHandler(catcher)
        root.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show  # catch_warnings restores it; put ours back inside
            init_zero_verbose()  # root has handlers now: only the warnings hook is set again
            warnings.warn("careful", UserWarning, stacklevel=1)
        assert any("UserWarning: careful" in r.getMessage() for r in records)
    finally:
        root.handlers, warnings.showwarning = handlers, show
        root.setLevel(level)


def test_top_level_names_resolve():
    import tether.scripts as scripts

    assert scripts.TrlParser is TrlParser and scripts.get_dataset is get_dataset
    assert isinstance(TrlParser(Toy), argparse.ArgumentParser)
