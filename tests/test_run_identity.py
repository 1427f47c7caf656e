"""A run knows its checkpoints (issue 13, item 2): a fresh run refuses a folder holding an earlier run's
checkpoints (overwrite_output_dir deletes them), and resuming refuses a checkpoint whose configuration differs in
anything that changes the math, naming each field."""

from __future__ import annotations

import json
import os

import pytest
import torch
from datasets import Dataset

from tether import SFTConfig, SFTTrainer
from tether.cli import main
from tether.trainers.run_identity import (
    RUN_FILE,
    ForeignCheckpointsError,
    ResumeMismatchError,
    check_resume,
    describe_run,
)

ROWS = [{"text": f"the film number {i} was good and long"} for i in range(12)]


def make(out, model_dir, **options):
    settings = dict(output_dir=str(out), per_device_train_batch_size=2, learning_rate=1e-3, max_steps=4,
                    save_steps=2, logging_steps=1, max_length=24, report_to="none", disable_tqdm=True, seed=1)
    return SFTTrainer(model_dir, args=SFTConfig(**{**settings, **options}), train_dataset=Dataset.from_list(ROWS))


def snapshot(folder) -> dict[str, float]:
    """Every file under `folder` with its modification time: what a refused run must leave as it was."""
    return {os.path.join(root, f): os.path.getmtime(os.path.join(root, f))
            for root, _, files in os.walk(folder) for f in files}


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture()
def earlier_run(tmp_path, tiny_decoder_dir):
    """An output folder holding a finished run's checkpoints (steps 2 and 4)."""
    out = tmp_path / "out"
    make(out, tiny_decoder_dir).train()
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-4"]
    return out


def test_every_checkpoint_records_its_run(earlier_run):
    records = [json.loads((earlier_run / c / RUN_FILE).read_text()) for c in ("checkpoint-2", "checkpoint-4")]
    assert records[0]["run_id"] == records[1]["run_id"] and len(records[0]["run_id"]) == 16
    assert records[0]["config"]["learning_rate"] == 1e-3 and records[0]["config"]["train_rows"] == 12
    assert records[0]["length"]["max_steps"] == 4
    assert "logging_steps" not in records[0]["config"] and "output_dir" not in records[0]["config"]


def test_a_fresh_run_refuses_a_folder_with_an_earlier_runs_checkpoints(earlier_run, tiny_decoder_dir):
    before = snapshot(earlier_run)
    trainer = make(earlier_run, tiny_decoder_dir, learning_rate=5e-4)
    start = weights(trainer.model)
    with pytest.raises(ForeignCheckpointsError, match=r"checkpoint-2, checkpoint-4.*overwrite_output_dir.*--resume"):
        trainer.train()
    assert snapshot(earlier_run) == before  # nothing written, nothing deleted
    assert trainer.state.global_step == 0
    assert all(torch.equal(p, start[n]) for n, p in weights(trainer.model).items())  # nothing trained


def test_overwrite_output_dir_deletes_the_earlier_checkpoints(earlier_run, tiny_decoder_dir):
    old_id = json.loads((earlier_run / "checkpoint-4" / RUN_FILE).read_text())["run_id"]
    (earlier_run / "checkpoint-6.partial").mkdir()  # a leftover of the old run's kill mid-save
    trainer = make(earlier_run, tiny_decoder_dir, learning_rate=5e-4, max_steps=2, overwrite_output_dir=True)
    with pytest.warns(UserWarning, match="deleting the earlier run's checkpoint-2, checkpoint-4"):
        trainer.train()
    assert sorted(d for d in os.listdir(earlier_run) if d.startswith("checkpoint-")) == ["checkpoint-2"]
    record = json.loads((earlier_run / "checkpoint-2" / RUN_FILE).read_text())
    assert record["run_id"] != old_id and record["config"]["learning_rate"] == 5e-4


def test_resume_refuses_a_checkpoint_of_a_differently_configured_run(earlier_run, tiny_decoder_dir):
    before = snapshot(earlier_run)
    trainer = make(earlier_run, tiny_decoder_dir, learning_rate=5e-4, weight_decay=0.1, max_steps=6)
    start = weights(trainer.model)
    with pytest.raises(ResumeMismatchError) as error:
        trainer.train(resume_from_checkpoint=True)
    message = str(error.value)
    assert "checkpoint-4" in message
    assert "learning_rate: 0.001 in the checkpoint, 0.0005 now" in message
    assert "weight_decay: 0.0 in the checkpoint, 0.1 now" in message
    assert "max_steps" not in message  # the length may change (see below)
    assert snapshot(earlier_run) == before
    assert all(torch.equal(p, start[n]) for n, p in weights(trainer.model).items())


def test_resume_refuses_other_data(earlier_run, tiny_decoder_dir):
    args = SFTConfig(output_dir=str(earlier_run), per_device_train_batch_size=2, learning_rate=1e-3, max_steps=4,
                     save_steps=2, max_length=24, report_to="none", seed=1)
    trainer = SFTTrainer(tiny_decoder_dir, args=args, train_dataset=Dataset.from_list(ROWS[:10]))
    with pytest.raises(ResumeMismatchError, match="train_rows: 12 in the checkpoint, 10 now"):
        trainer.train(resume_from_checkpoint=True)


def test_resume_accepts_operational_changes_and_a_longer_run(earlier_run, tiny_decoder_dir):
    run_id = json.loads((earlier_run / "checkpoint-4" / RUN_FILE).read_text())["run_id"]
    trainer = make(earlier_run, tiny_decoder_dir, max_steps=6, logging_steps=3, save_steps=3, save_total_limit=5,
                   disable_tqdm=False, dataset_num_proc=1)
    with pytest.warns(UserWarning, match=r"different training length \(max_steps 4 -> 6\)"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 6
    assert json.loads((earlier_run / "checkpoint-6" / RUN_FILE).read_text())["run_id"] == run_id  # the same run


def test_a_checkpoint_without_a_record_resumes_with_a_warning(earlier_run, tiny_decoder_dir):
    os.remove(earlier_run / "checkpoint-4" / RUN_FILE)  # e.g. written by TRL
    trainer = make(earlier_run, tiny_decoder_dir, max_steps=5)
    with pytest.warns(UserWarning, match="has no tether_run.json"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 5


def test_describe_run_separates_math_from_operations():
    a = SFTConfig(output_dir="a", learning_rate=1e-3, report_to="none")
    b = SFTConfig(output_dir="b", learning_rate=1e-3, report_to="none", logging_steps=7, save_steps=9,
                  eval_steps=3, push_to_hub=False, run_name="other", dataloader_num_workers=1)
    assert describe_run(a)["config"] == describe_run(b)["config"]
    for change in ({"seed": 7}, {"gradient_accumulation_steps": 2}, {"lr_scheduler_type": "constant"},
                   {"max_length": 64}, {"packing": True}, {"completion_only_loss": False}, {"neftune_noise_alpha": 5.0}):
        c = SFTConfig(output_dir="a", learning_rate=1e-3, report_to="none", **change)
        assert describe_run(c)["config"] != describe_run(a)["config"], change


def test_check_resume_lists_every_changed_field(tmp_path):
    saved = describe_run(SFTConfig(output_dir="a", learning_rate=1e-3, seed=1, report_to="none"), train_rows=5)
    (tmp_path / RUN_FILE).write_text(json.dumps({"run_id": "abc", **saved}))
    now = describe_run(SFTConfig(output_dir="a", learning_rate=1e-3, seed=2, report_to="none"), train_rows=6)
    with pytest.raises(ResumeMismatchError) as error:
        check_resume(str(tmp_path), now)
    assert "seed: 1 in the checkpoint, 2 now" in str(error.value)
    assert "train_rows: 5 in the checkpoint, 6 now" in str(error.value)
    assert check_resume(str(tmp_path), saved) == "abc"


def test_cli_run_twice_into_one_folder(tiny_decoder_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))

    def argv(*extra: str) -> list[str]:
        return ["sft", "--model_name_or_path", tiny_decoder_dir, "--dataset_name", str(data), "--output_dir",
                str(tmp_path / "run"), "--max_steps", "2", "--save_steps", "2", "--max_length", "24",
                "--per_device_train_batch_size", "2", "--report_to", "none", "--disable_tqdm", "true", *extra]

    assert main(argv()) == 0
    with pytest.raises(ForeignCheckpointsError, match="--overwrite_output_dir"):
        main(argv("--learning_rate", "1e-4"))
    with pytest.raises(ResumeMismatchError, match="learning_rate"):
        main(argv("--learning_rate", "1e-4", "--resume"))
    assert main(argv("--learning_rate", "1e-4", "--overwrite_output_dir", "true")) == 0


# ----- PPOTrainer.train(), the classic trainer's own loop ----------------------------------------------------
def ppo(out, model_dir, tokenizer, **options):
    from tether import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    settings = dict(batch_size=2, mini_batch_size=1, ppo_epochs=1, learning_rate=1e-3, total_steps=2,
                    max_new_tokens=4, save_steps=1, output_dir=str(out), seed=5)
    config = PPOConfig(**{**settings, **options})
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
    prompts = Dataset.from_dict({"prompt": ["the film", "a plot", "great acting", "the end"]})
    return PPOTrainer(config, model, None, tokenizer, dataset=prompts,
                      reward_funcs=lambda prompts, completions, **_: [len(c) / 10 for c in completions])


def test_ppo_train_knows_its_checkpoints(tmp_path, tiny_decoder_dir, tokenizer):
    out = tmp_path / "ppo"
    ppo(out, tiny_decoder_dir, tokenizer).train()
    record = json.loads((out / "checkpoint-2" / RUN_FILE).read_text())
    assert record["config"]["learning_rate"] == 1e-3 and record["length"]["total_steps"] == 2
    before = snapshot(out)
    with pytest.raises(ForeignCheckpointsError, match="checkpoint-1, checkpoint-2"):
        ppo(out, tiny_decoder_dir, tokenizer).train()
    with pytest.raises(ResumeMismatchError, match="init_kl_coef: 0.2 in the checkpoint, 0.05 now"):
        ppo(out, tiny_decoder_dir, tokenizer, init_kl_coef=0.05, total_steps=3).train(resume_from_checkpoint=True)
    assert snapshot(out) == before
    with pytest.warns(UserWarning, match="total_steps 2 -> 3"):
        resumed = ppo(out, tiny_decoder_dir, tokenizer, total_steps=3)
        resumed.train(resume_from_checkpoint=True)
    assert json.loads((out / "checkpoint-3" / RUN_FILE).read_text())["run_id"] == record["run_id"]
    with pytest.warns(UserWarning, match="deleting the earlier run's"):
        ppo(out, tiny_decoder_dir, tokenizer, overwrite_output_dir=True, total_steps=1).train()
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-1"]
