"""TRL 1.x's trainer callbacks under tether: BEMA against its equations (alone, and as DPO's reference),
LogCompletionsCallback against plain `generate`, the rich progress display, the optional-package errors."""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import GenerationConfig, TrainerCallback

from tether import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from tether.callbacks import (
    BEMACallback,
    LogCompletionsCallback,
    RefModelCallbackHandler,
    RichProgressCallback,
    WeaveCallback,
)
from tether.demo.corpus import preference_pairs


def state(step: int, max_steps: int = 10) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, max_steps=max_steps, is_world_process_zero=True)


# ----- BEMA ------------------------------------------------------------------------------------------------------
def bema_reference(thetas: dict[int, torch.Tensor], steps: list[int], start: int, lag: float, gamma: float,
                   kappa: float, eta: float, floor: float = 0.0) -> torch.Tensor:
    """Block & Zhang's Algorithm 1, written out: theta_0 = thetas[start], EMA from it, then at each update step t
    beta = max((lag + gamma t)^-kappa, floor), alpha = (lag + gamma t)^-eta, EMA = (1 - beta) EMA + beta theta_t,
    BEMA = EMA + alpha (theta_t - theta_0). Returns the last BEMA."""
    theta0, ema, bema = thetas[start], thetas[start].clone(), thetas[start].clone()
    for t in steps:
        beta = max((lag + gamma * t) ** -kappa, floor)
        alpha = (lag + gamma * t) ** -eta
        ema = (1 - beta) * ema + beta * thetas[t]
        bema = ema + alpha * (thetas[t] - theta0)
    return bema


@pytest.mark.parametrize("kappa, floor", [(0.5, 0.0), (0.5, 0.3), (0.0, 0.0)])
def test_bema_follows_the_equations_on_a_tiny_module(kappa, floor):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()
    module[1].bias.requires_grad_(False)  # frozen: not averaged, kept as it was
    frozen_bias = module[1].bias.detach().clone()
    callback = BEMACallback(update_freq=2, ema_power=kappa, bias_power=0.2, lag=10, update_after=1, multiplier=1.5,
                            min_ema_multiplier=floor)
    args = SimpleNamespace(output_dir="unused")
    callback.on_train_begin(args, state(0), None, model=module)
    weights = {0: module[0].weight.detach().clone()}
    running = dict(callback.running_model.named_parameters())
    for step in range(1, 8):
        with torch.no_grad():  # an "optimizer step"
            for p in module.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p))
        weights[step] = module[0].weight.detach().clone()
        before = running["0.weight"].detach().clone()
        callback.on_step_end(args, state(step), None, model=module)
        if step in (3, 5, 7):  # update_after + k * update_freq
            expected = bema_reference(weights, [t for t in (3, 5, 7) if t <= step], 1, 10, 1.5, kappa, 0.2, floor)
            torch.testing.assert_close(running["0.weight"], expected, rtol=0, atol=1e-12)
        else:
            assert torch.equal(running["0.weight"], before)  # steps 1 (snapshot of theta_0), 2, 4, 6: no update
    assert torch.equal(running["1.bias"], frozen_bias)
    # The module itself is untouched by the callback.
    assert torch.equal(module[0].weight, weights[7])


def test_bema_arguments_are_checked():
    with pytest.raises(ValueError, match="update_freq"):
        BEMACallback(update_freq=0)
    with pytest.raises(ValueError, match="positive base"):
        BEMACallback(lag=0, multiplier=0.0)


class WeightRecorder(TrainerCallback):
    """Policy weights at the start and after every optimizer step (runs before BEMACallback at each step end)."""

    def __init__(self, name: str) -> None:
        self.name, self.weights = name, {}

    def _record(self, step: int, model: nn.Module) -> None:
        self.weights[step] = dict(model.named_parameters())[self.name].detach().clone()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._record(0, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._record(state.global_step, model)


def dpo_args(tmp_path, **overrides) -> DPOConfig:
    values = dict(output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=4, learning_rate=1e-2,
                  max_steps=4, logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
                  dataloader_pin_memory=False)
    values.update(overrides)
    return DPOConfig(**values)


def test_bema_as_dpo_reference_model_follows_the_formula(tmp_path, tiny_decoder_dir):
    name = "model.layers.0.self_attn.q_proj.weight"
    recorder = WeightRecorder(name)
    bema = BEMACallback(update_freq=1, lag=10, ema_power=0.5, bias_power=0.2, update_ref_model=True,
                        ref_model_update_freq=2)
    trainer = DPOTrainer(tiny_decoder_dir, args=dpo_args(tmp_path),
                         train_dataset=Dataset.from_list(preference_pairs(16, seed=0)), callbacks=[recorder, bema])
    assert isinstance(trainer.callback_handler, RefModelCallbackHandler)  # DPOTrainer passes ref_model= to callbacks
    initial_reference = dict(trainer.ref_model.named_parameters())[name].detach().clone()
    trainer.train()

    weights = recorder.weights
    assert not torch.equal(weights[4], weights[0])  # the policy trained
    # The reference was last loaded at step 4 (0 + k * 2) with BEMA_4, built from updates at steps 1..4.
    expected = bema_reference({t: w.double() for t, w in weights.items()}, [1, 2, 3, 4], 0, 10, 1.0, 0.5, 0.2)
    reference = dict(trainer.ref_model.named_parameters())[name].detach()
    assert not torch.equal(reference, initial_reference)
    torch.testing.assert_close(reference.double(), expected, rtol=0, atol=1e-6)
    # The policy is left as trained; the BEMA model is saved and loads.
    assert torch.equal(dict(trainer.model.named_parameters())[name], weights[4])
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(os.path.join(tmp_path / "dpo", "bema"))
    torch.testing.assert_close(dict(saved.named_parameters())[name].double(), expected, rtol=0, atol=1e-6)


def test_bema_update_ref_model_needs_a_reference(tmp_path, tiny_decoder_dir):
    bema = BEMACallback(update_freq=1, update_ref_model=True)
    # SFT keeps no reference model: updating one is an error, not a silent no-op.
    trainer = SFTTrainer(tiny_decoder_dir, train_dataset=Dataset.from_list([{"text": "a b c"}] * 4), callbacks=[bema],
                         args=SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=1, report_to="none",
                                        per_device_train_batch_size=2, save_strategy="no"))
    with pytest.raises(ValueError, match="reference model"):
        trainer.train()


# ----- LogCompletionsCallback ------------------------------------------------------------------------------------
class FakeWriter:
    def __init__(self) -> None:
        self.texts = []

    def add_text(self, tag, text, global_step=None):
        self.texts.append((tag, global_step, text))

    def flush(self):
        pass


class FakeTensorBoard(TrainerCallback):
    """Stands in for transformers' TensorBoardCallback (its writer is `tb_writer`)."""

    def __init__(self) -> None:
        self.tb_writer = FakeWriter()


def prompt_completion(n: int, offset: int = 0) -> Dataset:
    return Dataset.from_list([{"prompt": f"review {i}: the film was", "completion": " good and fun."}
                              for i in range(offset, offset + n)])


@pytest.mark.parametrize("freq, logging_steps, steps", [(None, 2, ["2", "4"]), (3, 1, ["3"])])
def test_log_completions_match_plain_generate(tmp_path, tiny_decoder_dir, freq, logging_steps, steps):
    args = SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4, per_device_eval_batch_size=2,
                     learning_rate=1e-3, max_steps=4 if freq is None else 3, logging_steps=logging_steps,
                     report_to="none", save_strategy="no", disable_tqdm=True, dataloader_pin_memory=False)
    tensorboard = FakeTensorBoard()
    trainer = SFTTrainer(tiny_decoder_dir, args=args, train_dataset=prompt_completion(16),
                         eval_dataset=prompt_completion(5, offset=100), callbacks=[tensorboard])
    generation = GenerationConfig(max_new_tokens=5, do_sample=False)
    callback = LogCompletionsCallback(trainer, generation_config=generation, num_prompts=3, freq=freq)
    trainer.add_callback(callback)
    trainer.train()

    prompts = [f"review {i}: the film was" for i in range(100, 103)]
    assert [row[0] for row in callback.table] == [s for s in steps for _ in range(3)]
    assert [row[1] for row in callback.table] == prompts * len(steps)
    # The last logged step is the last training step: its completions are those of the final model.
    tokenizer, model = trainer.processing_class, trainer.model.eval()
    expected = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expected.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    assert [row[2] for row in callback.table[-3:]] == expected

    with open(tmp_path / "sft" / "samples.jsonl") as f:
        samples = [json.loads(line) for line in f]
    logged = [(str(s["step"]), s["prompt"], s["completion"]) for s in samples if s["prompt"] in prompts]
    assert logged == callback.table  # kept in the run's samples.jsonl after the report's end-of-run rewrite
    assert [(tag, step) for tag, step, _ in tensorboard.tb_writer.texts] == [("completions", int(s)) for s in steps]
    assert expected[0].replace("|", "\\|") in tensorboard.tb_writer.texts[-1][2]


def test_log_completions_needs_eval_prompts(tmp_path, tiny_decoder_dir):
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=1, report_to="none", disable_tqdm=True)
    trainer = SFTTrainer(tiny_decoder_dir, args=args, train_dataset=prompt_completion(4))
    with pytest.raises(ValueError, match="eval_dataset"):
        LogCompletionsCallback(trainer)
    text_only = SFTTrainer(tiny_decoder_dir, args=args, train_dataset=prompt_completion(4),
                           eval_dataset=Dataset.from_list([{"text": "a film"}] * 2))
    with pytest.raises(ValueError, match="'prompt' column"):
        LogCompletionsCallback(text_only)
    with pytest.raises(ValueError, match="freq"):
        LogCompletionsCallback(trainer, freq=0)


# ----- RichProgressCallback ----------------------------------------------------------------------------------------
def test_rich_progress_bars_and_metrics():
    from rich.console import Console

    callback = RichProgressCallback()
    callback.on_train_begin(None, state(0, max_steps=4), None)
    callback.on_step_end(None, state(3, max_steps=4), None)
    task = callback.training_bar.tasks[0]
    assert (task.completed, task.total) == (3, 4)
    callback.on_prediction_step(None, state(3), None, eval_dataloader=[0] * 5)
    callback.on_prediction_step(None, state(3), None, eval_dataloader=[0] * 5)
    eval_task = callback.evaluation_bar.tasks[0]
    assert (eval_task.completed, eval_task.total) == (2, 5)
    callback.on_evaluate(None, state(3), None)
    assert callback.evaluation_bar.tasks == [] and callback.evaluation_task is None
    callback.on_log(None, state(3), None, logs={"loss": 1.25, "rewards/chosen": 0.5})
    rendered = Console(file=None, record=True, width=120)
    rendered.print(callback.training_status.renderable)
    text = rendered.export_text()
    assert "Step 3" in text and "1.250" in text and "rewards" in text and "chosen" in text and "0.500" in text
    callback.on_train_end(None, state(4), None)
    assert callback.training_bar is None


def test_rich_and_weave_missing_name_the_package(monkeypatch):
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_rich_available", lambda: False)
    with pytest.raises(ImportError, match="pip install rich"):
        RichProgressCallback()
    monkeypatch.setitem(sys.modules, "weave", None)  # import weave -> ImportError
    with pytest.raises(ImportError, match="pip install weave"):
        WeaveCallback(trainer=SimpleNamespace(eval_dataset=None))


def test_sync_ref_model_callback_is_the_tr_dpo_one():
    import tether.callbacks as callbacks
    from tether.trainers import ref_sync

    assert callbacks.SyncRefModelCallback in {getattr(ref_sync, n, None)
                                              for n in ("SyncRefModelCallback", "ReferenceSyncCallback")}


def fake_weave(monkeypatch) -> SimpleNamespace:
    """A stand-in `weave` package recording what WeaveCallback logs (the real one is not installed here)."""
    import types

    record = SimpleNamespace(projects=[], loggers=[])

    class Prediction:
        def __init__(self, inputs, output):
            self.inputs, self.output, self.scores, self.finished = inputs, output, {}, False

        def log_score(self, scorer, score):
            self.scores[scorer] = score

        def finish(self):
            self.finished = True

    class EvaluationLogger:
        def __init__(self, model, dataset, eval_attributes):
            self.model, self.dataset, self.attributes = model, dataset, eval_attributes
            self.predictions, self.summary, self.finished = [], None, False
            record.loggers.append(self)

        def log_prediction(self, inputs, output):
            self.predictions.append(Prediction(inputs, output))
            return self.predictions[-1]

        def log_summary(self, summary):
            self.summary = summary

        def finish(self):
            self.finished = True

    weave = types.ModuleType("weave")
    weave.EvaluationLogger = EvaluationLogger
    weave.init = lambda project: record.projects.append(project) or "client"
    context = types.ModuleType("weave.trace.context")
    context.weave_client_context = SimpleNamespace(get_weave_client=lambda: None)
    monkeypatch.setitem(sys.modules, "weave", weave)
    monkeypatch.setitem(sys.modules, "weave.trace", types.ModuleType("weave.trace"))
    monkeypatch.setitem(sys.modules, "weave.trace.context", context)
    return record


def test_weave_logs_scored_completions_at_evaluation(tmp_path, tiny_decoder_dir, monkeypatch):
    record = fake_weave(monkeypatch)
    args = SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4, per_device_eval_batch_size=2,
                     max_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
                     dataloader_pin_memory=False)
    trainer = SFTTrainer(tiny_decoder_dir, args=args, train_dataset=prompt_completion(4),
                         eval_dataset=prompt_completion(3, offset=100))
    callback = WeaveCallback(trainer, project_name="team/run", num_prompts=2, model_name="tiny",
                             generation_config=GenerationConfig(max_new_tokens=3, do_sample=False),
                             scorers={"length": lambda prompt, completion: float(len(completion))})
    trainer.add_callback(callback)
    trainer.evaluate()
    assert record.projects == ["team/run"] and len(record.loggers) == 1
    evaluation = record.loggers[0]
    assert (evaluation.model, evaluation.dataset) == ("tiny", "eval_dataset")
    assert evaluation.attributes["training_step"] == 0
    assert [p.inputs["prompt"] for p in evaluation.predictions] == ["review 100: the film was",
                                                                   "review 101: the film was"]
    lengths = [float(len(p.output)) for p in evaluation.predictions]
    assert [p.scores["length"] for p in evaluation.predictions] == lengths
    assert all(p.finished for p in evaluation.predictions)
    assert evaluation.summary == {"total_predictions": 2, "successful_predictions": 2,
                                  "avg_length": sum(lengths) / 2}
