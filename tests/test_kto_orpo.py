"""KTOTrainer, ORPOTrainer and CPOTrainer (SimPO) end to end on the tiny decoder: each learns to prefer
positive continuations; KTO's unpaired data path (unpairing, mismatched pairs) and its refusals."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from tether import CPOConfig, CPOTrainer, DatasetError, KTOConfig, KTOTrainer, ORPOConfig, ORPOTrainer
from tether.data.preference import UnpairedCollator, prepare_unpaired
from tether.demo.corpus import preference_pairs
from tether.demo.tiny import tiny_llama_config


def config(config_class, tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, per_device_eval_batch_size=8,
        learning_rate=1e-3, max_steps=2, logging_steps=1, report_to="none", save_strategy="no",
        disable_tqdm=True, seed=0, dataloader_pin_memory=False,
    )
    values.update(overrides)
    return config_class(**values)


def pairs(n: int = 16, seed: int = 0, implicit_prompt: bool = False) -> Dataset:
    return Dataset.from_list(preference_pairs(n, seed=seed, implicit_prompt=implicit_prompt))


def logged(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


# ----- KTO -------------------------------------------------------------------------------------------
def test_kto_learns_from_unpaired_feedback(tmp_path, tiny_decoder_dir):
    """KTO sees each completion alone, labelled good or bad; the implicit reward gap between a pair's
    chosen and rejected completion still opens up (on held-out pairs too)."""
    trainer = KTOTrainer(tiny_decoder_dir, args=config(KTOConfig, tmp_path, max_steps=60, logging_steps=6),
                         train_dataset=pairs(240), eval_dataset=pairs(32, seed=1))
    before = trainer.evaluate()
    # The policy is its own reference: every reward is 0, the KL estimate 0, each loss 1 - sigma(0).
    assert before["eval_rewards/margins"] == 0.0 and before["eval_kl"] == 0.0
    assert before["eval_loss"] == pytest.approx(0.5, abs=1e-7)
    trainer.train()
    margins = logged(trainer, "rewards/margins")
    assert len(margins) == 10
    assert mean(margins[-4:]) > mean(margins[:2]) + 0.15, margins
    assert logged(trainer, "count/chosen") and "kl" in trainer.state.log_history[0]
    after = trainer.evaluate()
    assert after["eval_rewards/margins"] > 0.2, after
    assert after["eval_rewards/chosen"] > after["eval_rewards/rejected"]
    assert after["eval_loss"] < 0.48


def test_kto_unpairs_paired_data_into_two_labelled_rows(tokenizer):
    data = Dataset.from_list([
        {"prompt": "the film", "chosen": " was great.", "rejected": " was dull."},
        {"prompt": "the music", "chosen": " was lovely.", "rejected": " was bad."},
    ])
    rows = prepare_unpaired(data, tokenizer)
    assert len(rows) == 4
    assert rows["label"] == [True, False, True, False]
    texts = [(tokenizer.decode(r["prompt_ids"]), tokenizer.decode(r["completion_ids"])) for r in rows]
    assert texts == [("the film", " was great.<eos>"), ("the film", " was dull.<eos>"),
                     ("the music", " was lovely.<eos>"), ("the music", " was bad.<eos>")]
    implicit = Dataset.from_list([{"chosen": "the film was great.", "rejected": "the film was dull."}])
    rows = prepare_unpaired(implicit, tokenizer)
    assert [tokenizer.decode(r["prompt_ids"]) for r in rows] == ["the film was"] * 2
    assert [tokenizer.decode(r["completion_ids"]) for r in rows] == [" great.<eos>", " dull.<eos>"]


def test_unpaired_collator_mismatches_prompt_i_with_completion_i_plus_1(tokenizer):
    data = Dataset.from_dict({"prompt": ["the film", "the music", "the plot"],
                              "completion": [" was great.", " was bad.", " was fun."], "label": [True, False, True]})
    rows = list(prepare_unpaired(data, tokenizer))
    batch = UnpairedCollator(tokenizer.pad_token_id)(rows)
    assert batch["input_ids"].shape[0] == 6
    assert batch["label"].tolist() == [True, False, True]
    whole = [tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert whole == ["the film was great.<eos>", "the music was bad.<eos>", "the plot was fun.<eos>",
                     "the film was bad.<eos>", "the music was fun.<eos>", "the plot was great.<eos>"]
    targets = [tokenizer.decode(ids[mask]) for ids, mask in zip(batch["input_ids"], batch["loss_mask"])]
    assert targets == [" was great.<eos>", " was bad.<eos>", " was fun.<eos>",
                       " was bad.<eos>", " was fun.<eos>", " was great.<eos>"]


def test_kto_trains_on_unpaired_data_and_with_peft(tmp_path, tiny_decoder_dir, tokenizer):
    from peft import LoraConfig

    raw = preference_pairs(8)
    unpaired = Dataset.from_dict({"prompt": [r["prompt"] for r in raw],
                                  "completion": [r["chosen"] if i % 3 else r["rejected"] for i, r in enumerate(raw)],
                                  "label": [bool(i % 3) for i in range(len(raw))]})
    trainer = KTOTrainer(tiny_decoder_dir, args=config(KTOConfig, tmp_path), train_dataset=unpaired)
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    trainer.train()
    assert all(math.isfinite(x) for x in logged(trainer, "loss"))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = KTOTrainer(AutoModelForCausalLM.from_pretrained(tiny_decoder_dir), args=config(KTOConfig, tmp_path),
                         train_dataset=unpaired, processing_class=tokenizer, peft_config=lora)
    assert trainer.ref_model is None  # the adapter-disabled model is the reference
    trainer.train()
    assert all(math.isfinite(x) for x in logged(trainer, "loss"))


def test_kto_reference_point_is_the_mean_over_all_processes(tmp_path, tiny_decoder, tokenizer, monkeypatch):
    """Simulate a second process whose mismatched log-ratios are all 0: the KL estimate z0, a mean over
    every process's mismatched pairs, halves."""
    torch.manual_seed(1)
    policy = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer)))
    trainer = KTOTrainer(policy, tiny_decoder, args=config(KTOConfig, tmp_path), train_dataset=pairs(4),
                         processing_class=tokenizer)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(8)]))
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)
    monkeypatch.setattr(trainer.accelerator, "gather", lambda t: torch.cat([t, torch.zeros_like(t)]))
    trainer.compute_loss(trainer.model, batch)
    alone, with_other = trainer._metrics["train"]["kl"]
    assert alone > 0.1  # (a different reference, so not clamped to 0)
    assert with_other == pytest.approx(alone / 2, rel=1e-6)


def test_kto_refusals(tmp_path, tiny_decoder_dir):
    with pytest.raises(ValueError, match="per_device_train_batch_size >= 2"):
        config(KTOConfig, tmp_path, per_device_train_batch_size=1)
    with pytest.raises(ValueError, match="cannot be precomputed"):
        config(KTOConfig, tmp_path, precompute_ref_log_probs=True, kl_completions="batch")
    with pytest.raises(DatasetError, match="'label'"):
        KTOTrainer(tiny_decoder_dir, args=config(KTOConfig, tmp_path),
                   train_dataset=Dataset.from_dict({"prompt": ["a"], "completion": [" b"], "label": ["good"]}))
    too_long = Dataset.from_dict({"prompt": ["the film, the music and the cast"], "completion": [" was great."],
                                  "label": [True]})
    with pytest.raises(DatasetError, match="completion token"):
        KTOTrainer(tiny_decoder_dir, args=config(KTOConfig, tmp_path, max_length=4, max_prompt_length=None),
                   train_dataset=too_long)


# ----- ORPO ------------------------------------------------------------------------------------------
def test_orpo_learns_odds_and_likelihood(tmp_path, tiny_decoder_dir):
    trainer = ORPOTrainer(tiny_decoder_dir, args=config(ORPOConfig, tmp_path, max_steps=60, logging_steps=10,
                                                        learning_rate=3e-3, beta=1.0),
                          train_dataset=pairs(480), eval_dataset=pairs(32, seed=1))
    trainer.train()
    nll, log_odds = logged(trainer, "nll_loss"), logged(trainer, "log_odds_chosen")
    accuracies = logged(trainer, "rewards/accuracies")
    assert len(nll) == len(log_odds) == len(accuracies) == 6
    assert nll[-1] < 0.7 * nll[0], nll
    assert log_odds[-1] > log_odds[0] + 0.3, log_odds
    assert accuracies[-1] > accuracies[0] + 0.1 and accuracies[-1] >= 0.8, accuracies
    metrics = trainer.evaluate()
    assert metrics["eval_rewards/accuracies"] >= 0.8, metrics
    assert metrics["eval_log_odds_chosen"] > 0.3 and metrics["eval_nll_loss"] < 0.7 * nll[0]


# ----- CPO / SimPO -----------------------------------------------------------------------------------
def test_simpo_learns_to_prefer_positive_continuations(tmp_path, tiny_decoder_dir):
    args = config(CPOConfig, tmp_path, loss_type="simpo", cpo_alpha=0.0, beta=2.0, learning_rate=2e-3, max_steps=80,
                  logging_steps=10)
    trainer = CPOTrainer(tiny_decoder_dir, args=args, train_dataset=pairs(640), eval_dataset=pairs(32, seed=1))
    trainer.train()
    accuracies, margins = logged(trainer, "rewards/accuracies"), logged(trainer, "rewards/margins")
    assert len(accuracies) == 8
    assert accuracies[0] < 0.85 and accuracies[-1] >= 0.9, accuracies
    assert margins[-1] > margins[0] + 0.5, margins
    metrics = trainer.evaluate()
    assert metrics["eval_rewards/accuracies"] >= 0.85, metrics


def test_simpo_gradient_accumulation_equals_the_whole_batch(tmp_path, tiny_decoder_dir):
    """Pure SimPO (no NLL term) is a mean over pairs: 8 pairs at once or as 2 x 4 give the same gradient.
    (The NLL term of CPO and ORPO is a token-weighted mean per micro-batch, so it is left out here.)"""
    norms = []
    for batch_size, accumulation in ((8, 1), (4, 2)):
        args = config(CPOConfig, tmp_path, loss_type="simpo", cpo_alpha=0.0, max_steps=1,
                      per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation)
        trainer = CPOTrainer(tiny_decoder_dir, args=args, train_dataset=pairs(8))
        trainer.train()
        norms.append((trainer.state.log_history[0]["loss"], trainer.state.log_history[0]["grad_norm"]))
    assert norms[1][0] == pytest.approx(norms[0][0], rel=1e-6)
    assert norms[1][1] == pytest.approx(norms[0][1], rel=1e-5)


def test_cpo_sigmoid_trains_and_bad_loss_type(tmp_path, tiny_decoder_dir):
    trainer = CPOTrainer(tiny_decoder_dir, args=config(CPOConfig, tmp_path), train_dataset=pairs(16))
    trainer.train()
    assert all(math.isfinite(x) for x in logged(trainer, "loss")) and logged(trainer, "nll_loss")
    with pytest.raises(ValueError, match="one of sigmoid, hinge, ipo, simpo, alphapo"):  # ipo, hinge are CPO loss types since TRL 1.x
        config(CPOConfig, tmp_path, loss_type="kto_pair")


@pytest.mark.parametrize("trainer_class", [KTOTrainer, ORPOTrainer, CPOTrainer])
def test_misspelt_column_is_named(tmp_path, tiny_decoder_dir, trainer_class):
    config_class = {KTOTrainer: KTOConfig, ORPOTrainer: ORPOConfig, CPOTrainer: CPOConfig}[trainer_class]
    data = Dataset.from_dict({"prompt": ["a"], "chosen": [" b"], "rejectd": [" c"]})
    with pytest.raises(DatasetError, match="'rejectd' looks like a misspelling of 'rejected'"):
        trainer_class(tiny_decoder_dir, args=config(config_class, tmp_path), train_dataset=data)
