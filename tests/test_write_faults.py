"""The output folder stops taking writes mid-run (a full disk, a folder made read-only): training stops with an
error that says so and names the last complete checkpoint, which stays whole and resumes to the weights of an
uninterrupted run (issue 13, items 5 and the fault test).

The fault is real, in a child process: a file size limit of 0 bytes (RLIMIT_FSIZE; every write fails with EFBIG,
as on a full disk, where torch reports "basic_ios::clear" or "unexpected pos"), or the folder made read-only and,
since root ignores permissions, the process switched to an unprivileged user.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from datasets import Dataset

from tether import SFTConfig, SFTTrainer
from tether.trainers.checkpoints import OutputWriteError, atomic_directory, write_failure_message

ROWS = [{"text": f"the film number {i} was good and long"} for i in range(16)]
SETTINGS = dict(per_device_train_batch_size=2, learning_rate=1e-3, max_steps=6, save_steps=2, logging_steps=1,
                max_length=24, report_to="none", disable_tqdm=True, seed=3)

CHILD = textwrap.dedent("""
    import json, os, resource, signal, sys
    from datasets import Dataset
    from transformers import TrainerCallback
    from tether import SFTConfig, SFTTrainer

    model_dir, out, fault, rows, settings = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), \\
        json.loads(sys.argv[5])

    class Fault(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step != 3:  # after checkpoint-2, before checkpoint-4
                return
            if fault == "full":
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
                resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
            else:
                os.chmod(out, 0o555)
                if os.geteuid() == 0:  # become nobody (group too): permissions now apply
                    os.setgroups([])
                    os.setgid(65534)
                    os.setuid(65534)

    trainer = SFTTrainer(model_dir, args=SFTConfig(output_dir=out, **settings), train_dataset=Dataset.from_list(rows),
                         callbacks=[Fault()])
    trainer.train()
""")


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def uninterrupted(tiny_decoder_dir, tmp_path_factory):
    trainer = SFTTrainer(tiny_decoder_dir, args=SFTConfig(output_dir=str(tmp_path_factory.mktemp("full")), **SETTINGS),
                         train_dataset=Dataset.from_list(ROWS))
    trainer.train()
    return weights(trainer.model)


@pytest.mark.parametrize("fault", ["full", pytest.param("read-only", marks=pytest.mark.slow)])
def test_output_folder_failing_mid_run(fault, tiny_decoder_dir, tmp_path, uninterrupted):
    out = tmp_path / "run"
    out.mkdir()
    # The unprivileged user must reach the folder (and read it) to be refused by it: let it through the parents.
    parents = [p for p in (tmp_path, *tmp_path.parents) if p != p.parent]
    modes = {p: os.stat(p).st_mode & 0o7777 for p in parents}
    try:
        for p in parents:
            os.chmod(p, modes[p] | 0o005)
        child = subprocess.run([sys.executable, "-c", CHILD, tiny_decoder_dir, str(out), fault, json.dumps(ROWS),
                                json.dumps(SETTINGS)], capture_output=True, text=True, timeout=300)
    finally:
        for p, mode in modes.items():
            os.chmod(p, mode)
        os.chmod(out, 0o755)
    assert child.returncode != 0
    last_line = child.stderr.strip().splitlines()[-1]
    # The first write after the fault fails: step 3's line of metrics.jsonl, else checkpoint-4
    assert last_line.startswith(f"tether.trainers.checkpoints.OutputWriteError: Could not write {out}/"), child.stderr
    assert ("a file size limit was reached" if fault == "full" else "the folder is not writable") in last_line
    assert f"The last complete checkpoint is {out}/checkpoint-2" in last_line and "--resume" in last_line
    assert "basic_ios" not in last_line
    # checkpoint-2 is whole; no half-written checkpoint-4 (nor its staging folder) was left behind
    assert sorted(os.listdir(out)) == ["checkpoint-2", "metrics.jsonl"] or "checkpoint-4" not in os.listdir(out)
    assert not (out / "checkpoint-4.partial").exists()

    resumed = SFTTrainer(tiny_decoder_dir, args=SFTConfig(output_dir=str(out), **SETTINGS),
                         train_dataset=Dataset.from_list(ROWS))
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 6
    for name, value in weights(resumed.model).items():
        torch.testing.assert_close(value, uninterrupted[name], rtol=1e-6, atol=1e-7)


def test_a_failed_final_save_says_what_happened(tiny_decoder_dir, tmp_path):
    (tmp_path / "taken").write_text("a file where the model folder should go")
    trainer = SFTTrainer(tiny_decoder_dir, args=SFTConfig(output_dir=str(tmp_path / "run"), **SETTINGS),
                         train_dataset=Dataset.from_list(ROWS))
    with pytest.raises(OutputWriteError, match="Could not write .*taken.*No complete checkpoint"):
        trainer.save_model(str(tmp_path / "taken"))


def test_write_failure_messages_name_the_cause(tmp_path):
    torch_full_disk = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    message = write_failure_message(str(tmp_path / "checkpoint-4"), torch_full_disk, str(tmp_path / "checkpoint-2"))
    assert "most often because the disk is full" in message and "GiB free there" in message
    assert f"The last complete checkpoint is {tmp_path / 'checkpoint-2'}" in message
    full = OSError(28, "No space left on device")
    assert "the disk is full (OSError: [Errno 28]" in write_failure_message(str(tmp_path / "x"), full, None)


def test_a_failed_checkpoint_write_removes_its_staging_folder_and_keeps_the_previous(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "weights").write_text("whole")
    with pytest.raises(OutputWriteError, match="checkpoint-4.*The last complete checkpoint is .*checkpoint-2"):
        with atomic_directory(str(tmp_path / "checkpoint-4")) as partial:
            (tmp_path / "checkpoint-4.partial" / "half").write_text("half")
            raise OSError(28, "No space left on device", os.path.join(partial, "optimizer.pt"))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"]
    with pytest.raises(KeyError):  # not a write failure: passed through as it is
        with atomic_directory(str(tmp_path / "checkpoint-6")):
            raise KeyError("a bug, not a disk")


def test_a_failed_ppo_save_says_what_happened(tiny_decoder_dir, tokenizer, tmp_path):
    from tether import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    (tmp_path / "taken").write_text("a file where the model folder should go")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir)
    trainer = PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=1, output_dir=str(tmp_path / "run")), model, None,
                         tokenizer)
    with pytest.raises(OutputWriteError, match="Could not write .*taken.*FileExistsError"):
        trainer.save_pretrained(str(tmp_path / "taken"))
