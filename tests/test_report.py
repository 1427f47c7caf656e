"""Run reports: real tiny SFT, DPO, reward and PPO runs write metrics.jsonl, samples and a report whose
plots hold exactly the logged values (read back from the JSON lines and from the figures); `tether report`
rebuilds it; a folder of runs (the demo's) gets one page; without matplotlib there is a page and a warning.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from tether import (
    AutoModelForCausalLMWithValueHead,
    DPOConfig,
    DPOTrainer,
    PPOConfig,
    PPOTrainer,
    RewardConfig,
    RewardTrainer,
    SFTConfig,
    SFTTrainer,
)
from tether.cli import main
from tether.demo.corpus import preference_pairs
from tether.reports import read_jsonl, write_jsonl, write_report
from tether.reports.callback import RunReportCallback, prompt_ids
from tether.reports.plots import metric_series, select_groups

PROMPTS = ["the capital of france is", "two plus two is", "hello world"]


def logged(rows: list[dict], name: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric, straight from the JSON lines."""
    return [float(r["step"]) for r in rows if name in r], [float(r[name]) for r in rows if name in r]


def coloured_pixels(png) -> int:
    """Pixels of a PNG that are clearly coloured (the curves), not white/grey/black (axes, text)."""
    from matplotlib.image import imread

    image = imread(png)[..., :3]  # [h, w, rgb] in [0, 1]
    return int(((image.max(-1) - image.min(-1)) > 0.3).sum())


def check_plots_equal_the_logs(run_dir, rows: list[dict], groups: dict[str, list[str]]) -> None:
    """Rebuild the report and check each named PNG exists, shows a curve, and drew exactly the logged values."""
    report = write_report(run_dir)
    drawn = {path.stem: series for path, series in report.plots.items()}
    for stem, names in groups.items():
        assert (run_dir / "plots" / f"{stem}.png").is_file()
        assert coloured_pixels(run_dir / "plots" / f"{stem}.png") > 100, stem
        assert sorted(drawn[stem]) == sorted(names), (stem, drawn[stem].keys())
        for name in names:
            steps, values = logged(rows, name)
            assert steps and drawn[stem][name] == (steps, values), name


# ----- trainer runs ------------------------------------------------------------------------------------------
def run_config(out, **overrides) -> dict:
    return dict(output_dir=str(out), logging_steps=1, per_device_train_batch_size=4, save_strategy="no",
                report_to="none", disable_tqdm=True, dataloader_pin_memory=False, **overrides)


class Recorder(TrainerCallback):
    """A user callback: it must keep receiving every log next to the report's."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append({**logs, "step": state.global_step})


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_decoder_dir):
    out = tmp_path_factory.mktemp("sft")
    rows = [{"prompt": p, "completion": " " + c} for p, c in zip(PROMPTS * 4, ["paris.", "four.", "again."] * 4)]
    args = SFTConfig(**run_config(out, max_steps=3, learning_rate=1e-3, eval_strategy="steps", eval_steps=2))
    recorder = Recorder()
    trainer = SFTTrainer(tiny_decoder_dir, args=args, train_dataset=Dataset.from_list(rows),
                         eval_dataset=Dataset.from_list(rows[:4]), callbacks=[recorder])
    trainer.train()
    return out, trainer, recorder


def test_sft_metrics_are_every_log(sft_run):
    out, trainer, recorder = sft_run
    rows = read_jsonl(out / "metrics.jsonl")
    assert rows == json.loads(json.dumps(trainer.state.log_history))  # the Trainer's own record, row for row
    assert rows == recorder.logs  # and what a user's callback saw: the report did not get in its way
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3] and [r["step"] for r in rows if "eval_loss" in r] == [2, 3]
    assert json.loads((out / "run_config.json").read_text())["method"] == "sft"


def test_sft_report_plots_the_logged_values(sft_run):
    out, _, _ = sft_run
    assert (out / "report.html").is_file()  # written at the end of training
    assert {p.stem for p in (out / "plots").glob("*.png")} == {"loss", "token_accuracy", "entropy", "learning_rate",
                                                             "grad_norm"}
    rows = read_jsonl(out / "metrics.jsonl")
    check_plots_equal_the_logs(out, rows, {"loss": ["loss", "eval_loss"], "learning_rate": ["learning_rate"],
                                           "token_accuracy": ["mean_token_accuracy", "eval_mean_token_accuracy"]})


def test_sft_samples_are_greedy_completions_of_the_first_prompts(sft_run):
    out, trainer, _ = sft_run
    samples = read_jsonl(out / "samples.jsonl")
    assert [s["prompt"] for s in samples] == PROMPTS  # the distinct prompts, in dataset order
    assert all(s["step"] == 3 for s in samples)
    tokenizer, model = trainer.processing_class, trainer.model.eval()
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]  # [1, t]
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
    assert samples[0]["completion"] == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)
    page = (out / "report.html").read_text()
    assert "Sample generations" in page and "the capital of france is" in page


def test_cli_report_rebuilds_the_report(sft_run, capsys):
    out, _, _ = sft_run
    before = (out / "report.html").read_text()
    (out / "report.html").unlink()
    for png in (out / "plots").glob("*.png"):
        png.unlink()
    assert main(["report", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"Report: {out / 'report.html'}"
    assert (out / "report.html").read_text() == before  # built from the run's files alone
    assert (out / "plots" / "loss.png").is_file()


def test_cli_report_names_the_problem(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "No metrics.jsonl in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path / "missing")])
    assert "no such folder" in capsys.readouterr().err


def test_dpo_report_plots_accuracies_and_margins(tmp_path, tiny_decoder_dir):
    args = DPOConfig(**run_config(tmp_path, max_steps=3, learning_rate=1e-3, max_length=64, max_prompt_length=16))
    trainer = DPOTrainer(tiny_decoder_dir, args=args, train_dataset=Dataset.from_list(preference_pairs(12, seed=5)))
    trainer.train()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert rows == json.loads(json.dumps(trainer.state.log_history))
    assert len([r for r in rows if "rewards/margins" in r]) == 3
    check_plots_equal_the_logs(tmp_path, rows, {
        "loss": ["loss"], "preference_accuracy": ["rewards/accuracies"], "preference_margin": ["rewards/margins"],
        "preference_rewards": ["rewards/chosen", "rewards/rejected"]})
    samples = read_jsonl(tmp_path / "samples.jsonl")
    openings = {row["prompt"] for row in preference_pairs(12, seed=5)}
    assert samples and all(s["prompt"] in openings for s in samples)


def test_reward_model_report_plots_accuracy_and_has_no_samples(tmp_path, tiny_decoder_dir):
    args = RewardConfig(**run_config(tmp_path, max_steps=2, max_length=64))
    trainer = RewardTrainer(tiny_decoder_dir, args=args, train_dataset=Dataset.from_list(preference_pairs(8, seed=2)))
    trainer.train()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    check_plots_equal_the_logs(tmp_path, rows, {"reward_accuracy": ["accuracy"], "reward_margin": ["margin"]})
    assert read_jsonl(tmp_path / "samples.jsonl") == []  # a reward model does not generate


def vowel_share(prompts: list[str], completions: list[str], **_: list) -> list[float]:
    return [sum(c.count(v) for v in "aeiou") / max(1, len(c)) for c in completions]


def test_ppo_report_plots_reward_and_kl(tmp_path, tiny_decoder_dir, tokenizer):
    torch.manual_seed(0)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir)
    config = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=1, learning_rate=1e-3, total_steps=3,
                       max_new_tokens=6, output_dir=str(tmp_path), logging_steps=1)
    trainer = PPOTrainer(config, model, None, tokenizer, dataset=Dataset.from_dict({"prompt": PROMPTS * 2}),
                         reward_funcs=vowel_share)
    history = trainer.train()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert rows == json.loads(json.dumps(history))
    assert (tmp_path / "report.html").is_file()
    assert json.loads((tmp_path / "run_config.json").read_text())["method"] == "ppo"
    check_plots_equal_the_logs(tmp_path, rows, {
        "ppo_reward": ["env/reward_mean", "rewards/vowel_share"], "ppo_kl": ["objective/kl"],
        "ppo_kl_coef": ["objective/kl_coef"], "ppo_losses": ["ppo/loss/policy", "ppo/loss/value", "ppo/loss/total"]})
    samples = read_jsonl(tmp_path / "samples.jsonl")
    assert sorted({s["step"] for s in samples}) == [1, 2, 3] and all(len([s for s in samples if s["step"] == k]) <= 4
                                                                  for k in (1, 2, 3))
    for sample in samples:  # each row's reward is the reward function's score of its completion
        assert sample["prompt"] in PROMPTS
        assert sample["reward"] == pytest.approx(vowel_share([], [sample["completion"]])[0], abs=1e-6)


# ----- the page, from hand-written run files -----------------------------------------------------------------
def fake_run(run_dir, losses: list[float], samples: list[dict] | None = None) -> list[dict]:
    rows = [{"loss": v, "learning_rate": 1e-3, "step": k} for k, v in enumerate(losses, 1)]
    write_jsonl(run_dir / "metrics.jsonl", rows)
    if samples:
        write_jsonl(run_dir / "samples.jsonl", samples)
    return rows


def test_text_is_escaped(tmp_path):
    fake_run(tmp_path, [2.0, 1.0], [{"prompt": "<script>alert(1)</script>", "completion": "a & b", "step": 2}])
    page = write_report(tmp_path).path.read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "a &amp; b" in page
    assert "<script>" not in page


def test_a_folder_of_runs_gets_one_page_and_rebuilds_the_same(tmp_path):
    rows_a = fake_run(tmp_path / "a", [3.0, 2.0, 1.5])
    rows_b = fake_run(tmp_path / "b", [5.0, 4.0])
    report = write_report(tmp_path, title="two runs", notes=["a then b"], runs=[("Run A", tmp_path / "a"),
                                                                               ("Run B", tmp_path / "b")])
    page = report.path.read_text()
    assert page.index("Run A") < page.index("Run B") and "a then b" in page
    assert 'data-file="a/plots/loss.png"' in page and 'data-file="b/plots/loss.png"' in page
    assert report.plots[tmp_path / "a" / "plots" / "loss.png"]["loss"] == logged(rows_a, "loss")
    assert report.plots[tmp_path / "b" / "plots" / "loss.png"]["loss"] == logged(rows_b, "loss")
    report.path.unlink()
    assert write_report(tmp_path).path.read_text() == page  # the runs, title and notes were saved


def test_without_matplotlib_there_is_a_page_and_one_warning(tmp_path, monkeypatch):
    """A partial install without matplotlib still gets its pages, and one warning however many are written
    (a trainer rewrites its report after every log; the demo writes one per stage and one over all)."""
    import warnings

    from tether.reports import page as page_module

    fake_run(tmp_path, [2.0, 1.0], [{"prompt": "p", "completion": "c"}])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setattr(page_module, "_warned_no_matplotlib", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reports = [write_report(tmp_path) for _ in range(3)]
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and "pip install matplotlib" in messages[0], messages
    assert all(r.plots == {} for r in reports) and not (tmp_path / "plots").exists()
    page = reports[-1].path.read_text()
    assert "matplotlib is not installed" in page and "Sample generations" in page


def test_the_page_embeds_its_plots(tmp_path):
    """report.html holds each plot as a PNG data URI (the bytes of the PNG file it names), so it shows them
    wherever it is copied; nothing on the page points to a file."""
    import base64
    import re
    import shutil

    fake_run(tmp_path / "a", [3.0, 2.0, 1.5])
    fake_run(tmp_path / "b", [5.0, 4.0])
    report = write_report(tmp_path, runs=[("Run A", tmp_path / "a"), ("Run B", tmp_path / "b")])
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copy(report.path, moved / "report.html")
    page = (moved / "report.html").read_text()
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="[^"]*" data-file="([^"]+)">', page)
    assert len(images) == page.count("<img") == len(report.plots) == 4  # loss and learning rate, twice
    for encoded, name in images:
        assert base64.b64decode(encoded) == (tmp_path / name).read_bytes()
        assert (tmp_path / name) in report.plots
    assert not re.search(r'(src|href)="(?!data:)', page)


# ----- the pieces -------------------------------------------------------------------------------------------
def test_series_keep_the_last_value_of_a_step_logged_twice():
    rows = [{"loss": 3.0, "step": 1}, {"loss": 2.0, "step": 2}, {"loss": 9.0, "step": 3},  # killed after step 3,
            {"loss": 2.5, "step": 3}, {"loss": float("nan"), "step": 4}, {"loss": 1.0, "step": 5},  # resumed at 2
            {"note": "text", "flag": True, "step": 5}]
    assert metric_series(rows) == {"loss": ([1, 2, 3, 5], [3.0, 2.0, 2.5, 1.0])}


def test_unknown_methods_get_one_plot_per_metric():
    names = ["score", "eval_score", "sub/metric", "train_runtime", "epoch", "time/generation"]
    groups = select_groups(None, names)
    assert [(stem, members) for stem, _, members in groups] == [("score", ["score", "eval_score"]),
                                                                ("sub_metric", ["sub/metric"])]
    # A known method whose curves were not logged falls back the same way.
    assert [stem for stem, _, _ in select_groups("dpo", ["score"])] == ["score"]


def test_prompts_of_prepared_rows():
    assert prompt_ids({"prompt_input_ids": [5, 6]}) == [5, 6]
    assert prompt_ids({"chosen_input_ids": [1, 2, 3, 4], "rejected_input_ids": [1, 2, 9], "prompt_length": 2}) == [1, 2]
    # prompt-completion: the tokens before the first trained one
    assert prompt_ids({"input_ids": [1, 2, 3, 4, 5], "loss_mask": [False, False, False, True, True]}) == [1, 2, 3]
    # plain text, packed: the first half (at most 8 tokens) of the first sequence
    row = {"input_ids": list(range(10, 16)) + [30, 31], "loss_mask": [False] + [True] * 5 + [False, True],
           "position_ids": list(range(6)) + [0, 1]}
    assert prompt_ids(row) == [10, 11, 12]


def test_callback_starts_a_resumed_run_with_the_checkpoint_history(tmp_path):
    """A resumed run's metrics.jsonl reads as one run: the checkpoint's log history, then the new logs."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    write_jsonl(tmp_path / "metrics.jsonl", [{"loss": 9.0, "step": 1}] * 5)  # the killed run wrote more
    state = TrainerState(global_step=2, log_history=[{"loss": 3.0, "step": 1}, {"loss": 2.0, "step": 2}])
    callback = RunReportCallback("sft")
    callback.on_train_begin(args, state, TrainerControl())
    state.global_step = 3
    state.log_history.append({"loss": 1.5, "step": 3})  # as Trainer.log does before calling on_log
    callback.on_log(args, state, TrainerControl(), logs={"loss": 1.5})
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"loss": 3.0, "step": 1}, {"loss": 2.0, "step": 2},
                                                      {"loss": 1.5, "step": 3}]


def test_png_check_sees_curves(tmp_path):
    """The pixel check used above tells a plot with a curve from an empty one."""
    from matplotlib.figure import Figure

    for name, ys in (("empty", []), ("curve", [1.0, 3.0, 2.0])):
        figure = Figure(figsize=(6.4, 3.6), dpi=100)
        figure.subplots().plot(np.arange(len(ys)), ys)
        figure.savefig(tmp_path / f"{name}.png")
    assert coloured_pixels(tmp_path / "empty.png") == 0 and coloured_pixels(tmp_path / "curve.png") > 100


def test_methods_that_write_their_own_samples_keep_them(tmp_path):
    """GRPO/RLOO/PPO trainers log rollouts to samples.jsonl while training: the end of training keeps them."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    rollouts = [{"step": 1, "prompt": "p", "completion": "c", "reward": 0.5}]
    fake_run(tmp_path, [1.0], rollouts)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    RunReportCallback("grpo").on_train_end(args, TrainerState(global_step=1), TrainerControl())
    assert read_jsonl(tmp_path / "samples.jsonl") == rollouts
    assert "0.5" in (tmp_path / "report.html").read_text()
