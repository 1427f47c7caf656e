"""DPOTrainer end to end on the tiny decoder: it learns, the reference in every form, the classic call,
preference data (explicit/implicit prompt, conversational, truncation, collation), every loss_type,
bad input rejected before training, eval metrics."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from tether import DatasetError, DPOConfig, DPOTrainer
from tether.data.preference import PreferenceCollator, prepare_preference, split_implicit_prompt
from tether.demo.corpus import preference_pairs
from tether.demo.tiny import tiny_llama_config
from tether.losses.preference import DPO_LOSSES, dpo_loss
from tether.models.forward import completion_log_probs
from tether.models.reference import reference_mode


def config(tmp_path, **overrides) -> DPOConfig:
    values = dict(
        output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=8, per_device_eval_batch_size=8,
        learning_rate=1e-3, max_steps=2, logging_steps=1, report_to="none", save_strategy="no",
        disable_tqdm=True, seed=0, dataloader_pin_memory=False,
    )
    values.update(overrides)
    return DPOConfig(**values)


def pairs(n: int = 16, seed: int = 0, implicit_prompt: bool = False) -> Dataset:
    return Dataset.from_list(preference_pairs(n, seed=seed, implicit_prompt=implicit_prompt))


def logged(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def batch_log_probs(model, rows, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs ([b] chosen, [b] rejected) of tokenized preference rows, no grad."""
    batch = PreferenceCollator(pad_token_id)(list(rows))
    with torch.no_grad():
        sums, _, _ = completion_log_probs(model, batch)
    return sums.chunk(2)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----- learning --------------------------------------------------------------------------------------
def test_learns_to_prefer_positive_continuations(tmp_path, tiny_decoder_dir):
    trainer = DPOTrainer(tiny_decoder_dir, args=config(tmp_path, max_steps=80, logging_steps=10),
                         train_dataset=pairs(640), eval_dataset=pairs(64, seed=1))
    trainer.train()
    accuracies, margins = logged(trainer, "rewards/accuracies"), logged(trainer, "rewards/margins")
    assert len(accuracies) == len(margins) == 8
    assert accuracies[0] < 0.8 and accuracies[-1] >= 0.9, accuracies
    assert margins[-1] > margins[0] + 0.7, margins
    assert logged(trainer, "loss")[-1] < 0.45  # from log 2 = 0.69 at the start
    metrics = trainer.evaluate()  # pairs the model never saw (a few hinge on negations it may not get)
    assert metrics["eval_rewards/accuracies"] >= 0.85, metrics
    assert metrics["eval_rewards/margins"] > 0.7, metrics


# ----- the reference in every form ----------------------------------------------------------------------
def test_no_reference_gives_a_frozen_copy_that_stays_put(tmp_path, tiny_decoder):
    trainer = DPOTrainer(tiny_decoder, args=config(tmp_path, max_steps=3), train_dataset=pairs(24))
    reference = trainer.ref_model
    assert reference is not None and reference is not trainer.model
    assert all(not p.requires_grad for p in reference.parameters())
    assert not reference.training
    start = snapshot(trainer.model)
    for name, value in reference.state_dict().items():
        assert torch.equal(value, start[name]), name
    assert not any(a.data_ptr() == b.data_ptr() for a, b in zip(reference.parameters(), trainer.model.parameters()))
    trainer.train()
    after = trainer.model.state_dict()
    assert any(not torch.equal(after[name], start[name]) for name in start), "the policy did not move"
    for name, value in reference.state_dict().items():
        assert torch.equal(value, start[name]), f"reference weight {name} changed"


@pytest.mark.parametrize("as_path", [False, True], ids=["object", "path"])
def test_explicit_reference_is_the_one_used(tmp_path, tiny_decoder, tokenizer, as_path):
    """A reference different from the policy: the logged rewards are beta * (policy - that reference)."""
    torch.manual_seed(1)
    other = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer)))
    other.save_pretrained(tmp_path / "other")
    ref_model = str(tmp_path / "other") if as_path else other
    data = pairs(8)
    trainer = DPOTrainer(tiny_decoder, ref_model, args=config(tmp_path), train_dataset=data, eval_dataset=data,
                         processing_class=tokenizer)
    assert trainer.ref_model is not trainer.model
    if not as_path:
        assert trainer.ref_model is other
    assert all(not p.requires_grad for p in trainer.ref_model.parameters())
    for name, value in other.state_dict().items():
        assert torch.equal(trainer.ref_model.state_dict()[name], value), name
    rows = trainer.eval_dataset
    policy_chosen, policy_rejected = batch_log_probs(tiny_decoder.eval(), rows, tokenizer.pad_token_id)
    ref_chosen, ref_rejected = batch_log_probs(other.eval(), rows, tokenizer.pad_token_id)
    metrics = trainer.evaluate()
    expected_chosen = (0.1 * (policy_chosen - ref_chosen)).mean().item()
    expected_rejected = (0.1 * (policy_rejected - ref_rejected)).mean().item()
    assert abs(expected_chosen) > 0.1  # a different reference: rewards far from 0
    assert metrics["eval_rewards/chosen"] == pytest.approx(expected_chosen, abs=1e-5)
    assert metrics["eval_rewards/rejected"] == pytest.approx(expected_rejected, abs=1e-5)


def test_peft_reference_is_the_adapter_disabled_policy(tmp_path, tiny_decoder_dir, tokenizer):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    data = pairs(16)
    trainer = DPOTrainer(AutoModelForCausalLM.from_pretrained(tiny_decoder_dir),
                         args=config(tmp_path, max_steps=6, learning_rate=1e-2), train_dataset=data,
                         processing_class=tokenizer, peft_config=lora)
    assert trainer.ref_model is None  # no second copy
    trainer.train()
    margins = logged(trainer, "rewards/margins")
    assert margins[-1] > margins[0]
    model = trainer.model.eval()
    rows = trainer.train_dataset.select(range(8))
    base = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir).eval()
    base_chosen, base_rejected = batch_log_probs(base, rows, tokenizer.pad_token_id)
    with reference_mode(model):
        ref_chosen, ref_rejected = batch_log_probs(model, rows, tokenizer.pad_token_id)
    assert torch.equal(ref_chosen, base_chosen) and torch.equal(ref_rejected, base_rejected)
    policy_chosen, _ = batch_log_probs(model, rows, tokenizer.pad_token_id)
    assert (policy_chosen - base_chosen).abs().max() > 0.1  # the adapter did change the policy
    batch = trainer._prepare_inputs(PreferenceCollator(tokenizer.pad_token_id)(list(rows)))
    live = trainer.reference_log_probs(model, batch)  # what the loss uses
    assert torch.equal(live["chosen"], base_chosen) and torch.equal(live["rejected"], base_rejected)


def test_precomputed_reference_log_probs(tmp_path, tiny_decoder_dir, tokenizer):
    data = pairs(16)
    args = config(tmp_path, max_steps=1, precompute_ref_log_probs=True, precompute_ref_batch_size=5)
    trainer = DPOTrainer(AutoModelForCausalLM.from_pretrained(tiny_decoder_dir), args=args, train_dataset=data,
                         eval_dataset=pairs(8, seed=1), processing_class=tokenizer)
    assert trainer.ref_model is None
    for dataset in (trainer.train_dataset, trainer.eval_dataset):
        assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(dataset.column_names)
        live_chosen, live_rejected = batch_log_probs(AutoModelForCausalLM.from_pretrained(tiny_decoder_dir).eval(),
                                                     dataset, tokenizer.pad_token_id)
        torch.testing.assert_close(torch.tensor(dataset["ref_chosen_logps"]), live_chosen, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(dataset["ref_rejected_logps"]), live_rejected, atol=1e-5, rtol=0)
    trainer.train()
    live = DPOTrainer(AutoModelForCausalLM.from_pretrained(tiny_decoder_dir), args=config(tmp_path, max_steps=1),
                      train_dataset=data, processing_class=tokenizer)
    live.train()
    assert logged(trainer, "loss")[0] == pytest.approx(logged(live, "loss")[0], abs=1e-5)
    assert logged(trainer, "rewards/margins")[0] == pytest.approx(logged(live, "rewards/margins")[0], abs=1e-5)


def test_gradient_accumulation_equals_the_whole_batch(tmp_path, tiny_decoder_dir):
    """8 pairs in one batch, as 2 x 4 or 4 x 2 accumulated micro-batches: the same first update."""
    results = []
    for batch_size, accumulation in ((8, 1), (4, 2), (2, 4)):
        args = config(tmp_path, max_steps=1, per_device_train_batch_size=batch_size,
                      gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=0.1, max_grad_norm=0.0)
        trainer = DPOTrainer(tiny_decoder_dir, args=args, train_dataset=pairs(8))
        trainer.train()
        entry = trainer.state.log_history[0]
        results.append((entry["loss"], entry["grad_norm"], snapshot(trainer.model)))
    loss, grad_norm, weights = results[0]
    assert loss == pytest.approx(math.log(2), abs=1e-6)
    for other_loss, other_norm, other_weights in results[1:]:
        assert other_loss == pytest.approx(loss, abs=1e-6)
        assert other_norm == pytest.approx(grad_norm, rel=1e-5)
        for name, value in weights.items():
            torch.testing.assert_close(other_weights[name], value, atol=1e-6, rtol=0)


# ----- the classic call ------------------------------------------------------------------------------
def test_classic_call_verbatim(tmp_path, tiny_decoder_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)
    model_ref = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)
    tok = AutoTokenizer.from_pretrained(tiny_decoder_dir)
    ds = pairs(16)
    training_args = TrainingArguments(output_dir=str(tmp_path / "classic"), per_device_train_batch_size=8,
                                      max_steps=2, learning_rate=1e-3, report_to="none", save_strategy="no",
                                      disable_tqdm=True, dataloader_pin_memory=False, logging_steps=1)
    with pytest.warns(FutureWarning, match="beta"):
        dpo_trainer = DPOTrainer(model, model_ref, beta=0.1, train_dataset=ds, tokenizer=tok, args=training_args)
    assert isinstance(dpo_trainer.args, DPOConfig)
    assert dpo_trainer.args.beta == 0.1
    assert dpo_trainer.ref_model is model_ref
    dpo_trainer.train()
    assert dpo_trainer.state.global_step == 2
    assert all(math.isfinite(x) for x in logged(dpo_trainer, "loss"))


# ----- data ------------------------------------------------------------------------------------------
def test_split_implicit_prompt_on_words_and_messages():
    assert split_implicit_prompt("the film was great.", "the film was dull.") == (
        "the film was", " great.", " dull.")
    # The shared prefix ends inside a word ("gr"eat / "gr"im): the split backs off to the word boundary.
    assert split_implicit_prompt("the film was great.", "the film was grim.") == (
        "the film was", " great.", " grim.")
    user = {"role": "user", "content": "how was the film?"}
    good, bad = {"role": "assistant", "content": "great."}, {"role": "assistant", "content": "dull."}
    assert split_implicit_prompt([user, good], [user, bad]) == ([user], [good], [bad])


def test_explicit_and_implicit_prompt(tmp_path, tiny_decoder_dir, tokenizer):
    explicit, implicit = pairs(16), pairs(16, implicit_prompt=True)
    assert "prompt" not in implicit.column_names
    for data in (explicit, implicit):
        trainer = DPOTrainer(tiny_decoder_dir, args=config(tmp_path), train_dataset=data)
        trainer.train()
        assert trainer.state.global_step == 2
    row, raw = trainer.train_dataset[0], implicit[0]
    prompt = tokenizer.decode(row["chosen_input_ids"][: row["prompt_length"]])
    prompt_again, _, _ = split_implicit_prompt(raw["chosen"], raw["rejected"])
    assert prompt == prompt_again and raw["chosen"].startswith(prompt) and raw["rejected"].startswith(prompt)
    # the explicit prompt is a prefix of the implicit one (which runs to the last shared word)
    assert prompt.startswith(explicit[0]["prompt"])


def test_conversational_preference_data(tmp_path, tiny_decoder_dir, tokenizer):
    def conversation(row):
        user = [{"role": "user", "content": row["prompt"]}]
        return {"prompt": user, "chosen": [{"role": "assistant", "content": row["chosen"].strip()}],
                "rejected": [{"role": "assistant", "content": row["rejected"].strip()}]}

    raw = preference_pairs(16)
    explicit = Dataset.from_list([conversation(r) for r in raw])
    implicit = Dataset.from_list([{"chosen": c["prompt"] + c["chosen"], "rejected": c["prompt"] + c["rejected"]}
                                  for c in map(conversation, raw)])
    rows = []
    for data in (explicit, implicit):
        trainer = DPOTrainer(tiny_decoder_dir, args=config(tmp_path), train_dataset=data)
        trainer.train()
        assert all(math.isfinite(x) for x in logged(trainer, "loss"))
        rows.append(trainer.train_dataset[0])
    assert rows[0] == rows[1]  # the implicit prompt is the shared user turn
    row = rows[0]
    ids, mask = row["chosen_input_ids"], row["chosen_loss_mask"]
    assert tokenizer.decode(ids[: row["prompt_length"]]) == f"<|user|>\n{raw[0]['prompt']}<|end|>\n<|assistant|>\n"
    completion = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert completion == f"{raw[0]['chosen'].strip()}<|end|>\n"


def test_max_prompt_length_keeps_the_last_prompt_tokens_and_max_length_truncates(tokenizer):
    prompt, chosen, rejected = "the film, the music, the cast and the plot", " was great.", " was dull."
    data = Dataset.from_list([{"prompt": prompt, "chosen": chosen, "rejected": rejected}])
    prompt_ids = tokenizer(prompt)["input_ids"]
    chosen_ids = tokenizer(chosen, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(prompt_ids) > 6 and len(chosen_ids) > 3
    row = prepare_preference(data, tokenizer, max_length=None, max_prompt_length=4)[0]
    assert row["prompt_length"] == 4
    assert row["chosen_input_ids"] == prompt_ids[-4:] + chosen_ids
    assert row["chosen_loss_mask"] == [False] * 4 + [True] * len(chosen_ids)
    row = prepare_preference(data, tokenizer, max_length=6, max_prompt_length=4)[0]
    assert row["chosen_input_ids"] == (prompt_ids[-4:] + chosen_ids)[:6]
    assert row["chosen_loss_mask"] == [False] * 4 + [True] * 2
    assert len(row["rejected_input_ids"]) == 6
    row = prepare_preference(data, tokenizer, max_length=len(prompt_ids) + 2, max_prompt_length=None)[0]
    assert row["chosen_input_ids"] == prompt_ids + chosen_ids[:2]
    row = prepare_preference(data, tokenizer, max_length=None, max_prompt_length=4, max_completion_length=2)[0]
    assert row["chosen_input_ids"] == prompt_ids[-4:] + chosen_ids[:2]  # the completion's first 2 tokens
    assert row["chosen_loss_mask"] == [False] * 4 + [True] * 2


def test_trl_0_7_max_target_length_is_max_completion_length(tiny_decoder_dir, tokenizer, tmp_path):
    data = Dataset.from_list([{"prompt": "the film", "chosen": " was great and moving.", "rejected": " was dull."}] * 2)
    with pytest.warns(FutureWarning, match="max_target_length"):
        trainer = DPOTrainer(tiny_decoder_dir, None, args=config(tmp_path), train_dataset=data, tokenizer=tokenizer,
                             max_target_length=2)
    assert trainer.args.max_completion_length == 2
    assert all(sum(row["chosen_loss_mask"]) == 2 for row in trainer.train_dataset)


def test_collator_puts_chosen_first_and_masks_only_the_completion(tokenizer):
    data = Dataset.from_list([
        {"prompt": "the film", "chosen": " was great.", "rejected": " was dull."},
        {"prompt": "the music was", "chosen": " lovely and fun.", "rejected": " bad."},
    ])
    rows = prepare_preference(data, tokenizer)
    batch = PreferenceCollator(tokenizer.pad_token_id)(list(rows))
    assert batch["input_ids"].shape[0] == 4
    decoded = [tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert decoded == ["the film was great.<eos>", "the music was lovely and fun.<eos>",
                       "the film was dull.<eos>", "the music was bad.<eos>"]
    targets = [tokenizer.decode(ids[mask]) for ids, mask in zip(batch["input_ids"], batch["loss_mask"])]
    assert targets == [" was great.<eos>", " lovely and fun.<eos>", " was dull.<eos>", " bad.<eos>"]
    assert not (batch["loss_mask"] & ~batch["attention_mask"].bool()).any()  # padding never counts


# ----- every loss_type -------------------------------------------------------------------------------
# sft is the chosen completions' NLL, not a function of the log-ratios (tested in test_dpo_options.py)
@pytest.mark.parametrize("loss_type", sorted(set(DPO_LOSSES) - {"sft"}))
def test_every_loss_type_trains(tmp_path, tiny_decoder_dir, loss_type):
    """One step each. At that step the policy is its reference, so every log-ratio is 0 and the loss is
    the loss_type's value at 0 (log 2 for sigmoid, 1 for hinge, 1/(2 beta)^2 for ipo, ...)."""
    smoothing = 1e-3 if loss_type == "exo_pair" else 0.0
    trainer = DPOTrainer(tiny_decoder_dir, args=config(tmp_path, max_steps=1, loss_type=loss_type,
                                                       label_smoothing=smoothing), train_dataset=pairs(8))
    start = snapshot(trainer.model)
    trainer.train()
    (loss,) = logged(trainer, "loss")
    zero = torch.zeros(8)
    at_zero = dpo_loss(loss_type, zero, zero, zero, zero, beta=0.1, label_smoothing=smoothing).losses.mean()
    assert math.isfinite(loss) and loss == pytest.approx(at_zero.item(), abs=1e-5)
    assert any(not torch.equal(v, start[k]) for k, v in trainer.model.state_dict().items())


def test_loss_hyperparameters_are_checked_by_the_config(tmp_path):
    with pytest.raises(ValueError, match=r"'exo_pair' needs label_smoothing in \(0, 1\)"):
        config(tmp_path, loss_type="exo_pair")
    with pytest.raises(ValueError, match="'hinge' has no label smoothing"):
        config(tmp_path, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 0.5\)"):
        config(tmp_path, loss_type="robust", label_smoothing=0.5)


def test_unknown_loss_type_names_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="Unknown loss_type 'dpo'") as error:
        config(tmp_path, loss_type="dpo")
    assert all(name in str(error.value) for name in DPO_LOSSES)


# ----- bad input, rejected before training ------------------------------------------------------------
@pytest.mark.parametrize(("data", "match"), [
    ({"prompt": ["a"], "chosen": [" b"], "rejectd": [" c"]}, "'rejectd' looks like a misspelling of 'rejected'"),
    ({"prompt": ["a"], "chosen": [" b"]}, "'rejected'"),
    ({"prompt": [], "chosen": [], "rejected": []}, "empty"),
    ({"text": ["the film was great."]}, "language modeling"),
], ids=["misspelt", "missing", "empty", "plain-text"])
def test_bad_datasets_fail_at_construction(tmp_path, tiny_decoder_dir, data, match):
    with pytest.raises(DatasetError, match=match):
        DPOTrainer(tiny_decoder_dir, args=config(tmp_path), train_dataset=Dataset.from_dict(data))


def test_prompts_longer_than_max_length(tmp_path, tiny_decoder_dir):
    data = Dataset.from_list([{"prompt": "the film, the music and the cast", "chosen": " great.",
                               "rejected": " dull."}] * 4)
    with pytest.raises(DatasetError, match="max_length=4"):
        DPOTrainer(tiny_decoder_dir, args=config(tmp_path, max_length=4, max_prompt_length=None),
                   train_dataset=data)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="max_completion_length"):
        config(tmp_path, max_completion_length=0)
    with pytest.raises(ValueError, match="beta"):
        config(tmp_path, beta=0.0)


@pytest.mark.parametrize("peft", [False, True], ids=["plain", "peft"])
def test_policy_as_its_own_reference(tmp_path, tiny_decoder, peft):
    """Also refused when the policy is a PEFT model wrapping that object: freezing it as the reference
    would freeze the adapter with it."""
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM") if peft else None
    with pytest.raises(ValueError, match="ref_model is the policy itself"):
        DPOTrainer(tiny_decoder, tiny_decoder, args=config(tmp_path), train_dataset=pairs(8), peft_config=lora)


def test_no_train_dataset(tmp_path, tiny_decoder):
    with pytest.raises(ValueError, match="train_dataset"):
        DPOTrainer(tiny_decoder, args=config(tmp_path))


# ----- eval ------------------------------------------------------------------------------------------
def test_eval_metrics_before_and_after_training(tmp_path, tiny_decoder_dir):
    trainer = DPOTrainer(tiny_decoder_dir, args=config(tmp_path, max_steps=10), train_dataset=pairs(32),
                         eval_dataset=pairs(16, seed=1))
    before = trainer.evaluate()
    # The policy is its reference: every implicit reward is 0 and the sigmoid loss is log 2.
    assert before["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert before["eval_rewards/chosen"] == 0.0 and before["eval_rewards/rejected"] == 0.0
    assert before["eval_rewards/accuracies"] == 0.0 and before["eval_rewards/margins"] == 0.0
    assert before["eval_logps/chosen"] < 0 and before["eval_logps/rejected"] < 0
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < before["eval_loss"]
    assert after["eval_rewards/margins"] > 0
    assert not any(k.startswith("rewards/") for k in after)  # eval metrics only carry the eval_ prefix


def test_max_length_at_the_default_max_prompt_length_works_as_in_trl(tiny_decoder_dir, tokenizer, tmp_path):
    """DPOConfig(max_length=512) keeps max_prompt_length=512: a warning, not an error; short prompts train."""
    with pytest.warns(UserWarning, match=r"max_prompt_length \(512\) >= max_length \(512\)"):
        args = config(tmp_path, max_length=512)
    assert args.max_prompt_length == 512
    data = Dataset.from_list([{"prompt": "the film", "chosen": " was great.", "rejected": " was dull."}] * 8)
    trainer = DPOTrainer(tiny_decoder_dir, args=args, train_dataset=data, processing_class=tokenizer)
    assert len(trainer.train_dataset) == 8
