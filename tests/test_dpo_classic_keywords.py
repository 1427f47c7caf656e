"""Every keyword TRL 0.7.11's DPOTrainer / RewardTrainer / SFTTrainer took, in TRL's call shape
`DPOTrainer(model, None, args=TrainingArguments(...), train_dataset=ds, tokenizer=tok, KEYWORD=...)`, shown to
have its effect on the tiny decoder: truncation_mode, padding_value, label_pad_token_id (with TRL's collator),
model_init, preprocess_logits_for_metrics, is_encoder_decoder, generate_during_eval, model_adapter_name /
ref_adapter_name, reference_free; then each trainer built with all of TRL 0.7.11's keywords at once."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
    TrainingArguments,
)

from test_dpo import batch_log_probs, pairs
from tether import DPOConfig, DPOTrainer, RewardTrainer, SFTTrainer
from tether.data.collate import IGNORE_INDEX
from tether.data.preference import PairBatch, PreferenceCollator, prepare_preference
from tether.models.forward import completion_log_probs
from tether.trainer import compute_accuracy
from tether.trainer.utils import DPODataCollatorWithPadding

# TRL 0.7.11's __init__ parameters, in order, from trl/trainer/{dpo,reward,sft}_trainer.py at tag v0.7.11.
TRL_0_7_11_DPO = (
    "model", "ref_model", "beta", "label_smoothing", "loss_type", "args", "data_collator", "label_pad_token_id",
    "padding_value", "truncation_mode", "train_dataset", "eval_dataset", "tokenizer", "model_init", "callbacks",
    "optimizers", "preprocess_logits_for_metrics", "max_length", "max_prompt_length", "max_target_length",
    "peft_config", "is_encoder_decoder", "disable_dropout", "generate_during_eval", "compute_metrics",
    "precompute_ref_log_probs", "dataset_num_proc", "model_init_kwargs", "ref_model_init_kwargs",
    "model_adapter_name", "ref_adapter_name", "reference_free",
)
TRL_0_7_11_REWARD = (
    "model", "args", "data_collator", "train_dataset", "eval_dataset", "tokenizer", "model_init", "compute_metrics",
    "callbacks", "optimizers", "preprocess_logits_for_metrics", "max_length", "peft_config",
)
TRL_0_7_11_SFT = (
    "model", "args", "data_collator", "train_dataset", "eval_dataset", "tokenizer", "model_init", "compute_metrics",
    "callbacks", "optimizers", "preprocess_logits_for_metrics", "peft_config", "dataset_text_field", "packing",
    "formatting_func", "max_seq_length", "infinite", "num_of_sequences", "chars_per_token", "dataset_num_proc",
    "dataset_batch_size", "neftune_noise_alpha", "model_init_kwargs", "dataset_kwargs",
)


def training_args(tmp_path, **overrides) -> TrainingArguments:
    """Plain TrainingArguments, as TRL 0.7 scripts pass them."""
    values = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, per_device_eval_batch_size=8,
                  max_steps=2, learning_rate=1e-3, logging_steps=1, report_to="none", save_strategy="no",
                  disable_tqdm=True, seed=0, dataloader_pin_memory=False)
    values.update(overrides)
    return TrainingArguments(**values)


def classic_dpo(tmp_path, model, tokenizer, data=None, ref_model=None, args=None, **keywords) -> DPOTrainer:
    """DPOTrainer called as in TRL 0.7; a keyword that is a DPOConfig field warns (it moves onto the config)."""
    fields = [k for k in keywords if k in DPOConfig.__dataclass_fields__]
    with pytest.warns(FutureWarning) if fields else contextlib.nullcontext():
        return DPOTrainer(model, ref_model, args=args or training_args(tmp_path), train_dataset=data or pairs(8),
                          tokenizer=tokenizer, **keywords)


def two_adapter_model(tiny_decoder_dir):
    """A PEFT policy holding two LoRA adapters: "policy" (B = 0: starts as the base) and "reference"
    (random A and B: computes something else than the base)."""
    torch.manual_seed(3)
    lora = dict(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_decoder_dir), LoraConfig(**lora),
                           adapter_name="policy")
    model.add_adapter("reference", LoraConfig(**lora, init_lora_weights=False))
    return model


def lora_weights(model, adapter: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{adapter}." in n}


# ----- truncation_mode ---------------------------------------------------------------------------------
def test_truncation_mode_keeps_either_end_of_a_long_prompt(tmp_path, tiny_decoder_dir, tokenizer):
    prompt, chosen, rejected = "the film, the music, the cast and the plot", " was great.", " was dull."
    data = Dataset.from_list([{"prompt": prompt, "chosen": chosen, "rejected": rejected}] * 2)
    prompt_ids = tokenizer(prompt)["input_ids"]
    chosen_ids = tokenizer(chosen, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(prompt_ids) > 6
    rows = {}
    for mode in ("keep_end", "keep_start"):
        trainer = classic_dpo(tmp_path, tiny_decoder_dir, tokenizer, data, truncation_mode=mode, max_prompt_length=4,
                              max_length=64)
        assert trainer.args.truncation_mode == mode
        rows[mode] = trainer.train_dataset[0]
    # keep_end: the prompt's last 4 tokens; keep_start: its first 4; the completion whole either way.
    assert rows["keep_end"]["chosen_input_ids"] == prompt_ids[-4:] + chosen_ids
    assert rows["keep_start"]["chosen_input_ids"] == prompt_ids[:4] + chosen_ids
    for row in rows.values():
        assert row["prompt_length"] == 4
        assert row["chosen_loss_mask"] == [False] * 4 + [True] * len(chosen_ids)
    # A prompt within max_prompt_length is kept whole by both modes.
    whole = prepare_preference(data, tokenizer, max_prompt_length=64, truncation_mode="keep_start")[0]
    assert whole["chosen_input_ids"] == prompt_ids + chosen_ids


def test_bad_truncation_mode_names_the_field(tmp_path, tiny_decoder_dir, tokenizer):
    with pytest.raises(ValueError, match="truncation_mode must be 'keep_end'.*'keep_start'.*got 'keep_middle'"):
        classic_dpo(tmp_path, tiny_decoder_dir, tokenizer, truncation_mode="keep_middle")
    with pytest.raises(ValueError, match="truncation_mode"):
        prepare_preference(pairs(2), tokenizer, truncation_mode="end")


# ----- padding_value / label_pad_token_id ------------------------------------------------------------------
def test_padding_value_pads_the_input_batches_and_changes_no_loss(tmp_path, tiny_decoder_dir, tokenizer):
    pad = tokenizer.convert_tokens_to_ids("the")
    assert pad != tokenizer.pad_token_id
    data = pairs(8)
    losses = []
    for padding_free in (False, True):
        args = training_args(tmp_path)
        trainer = classic_dpo(tmp_path, tiny_decoder_dir, tokenizer, data, args=args, padding_value=pad,
                              padding_free=padding_free, max_length=24, max_prompt_length=8)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
        padding = batch["attention_mask"] == 0 if not padding_free else batch["sequence_ids"] == -1
        assert padding.any()
        assert (batch["input_ids"][padding] == pad).all()
        assert not (batch["input_ids"][padding] == tokenizer.pad_token_id).any()
    default = DPOTrainer(tiny_decoder_dir, ref_model=None, args=training_args(tmp_path, max_steps=1),
                         train_dataset=data, eval_dataset=data, tokenizer=tokenizer)
    padded = classic_dpo(tmp_path, tiny_decoder_dir, tokenizer, data, args=training_args(tmp_path, max_steps=1),
                         eval_dataset=data, padding_value=pad)
    for trainer in (default, padded):
        trainer.train()  # one step: policy moved, the reference not
        losses.append(trainer.evaluate()["eval_loss"])
    assert losses[0] != pytest.approx(math.log(2), abs=1e-4)
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)


def test_label_pad_token_id_is_validated(tmp_path, tiny_decoder_dir, tokenizer):
    for bad in ("-100", 1.5, True):
        with pytest.raises(ValueError, match="label_pad_token_id must be an integer"):
            classic_dpo(tmp_path, tiny_decoder_dir, tokenizer, label_pad_token_id=bad)
    with pytest.raises(ValueError, match="padding_value must be an integer"):
        classic_dpo(tmp_path, tiny_decoder_dir, tokenizer, padding_value="0")


def test_trl_collator_with_label_pad_token_id_gives_the_same_batch(tmp_path, tiny_decoder_dir, tokenizer):
    """A custom data_collator: rows carry TRL 0.7's columns, labels built with label_pad_token_id, and TRL's
    DPODataCollatorWithPadding batches them; the loss masks and the evaluation are those of tether's collator."""
    data, label_pad = pairs(8), -7
    collator = DPODataCollatorWithPadding(pad_token_id=tokenizer.pad_token_id, label_pad_token_id=label_pad)
    trainer = classic_dpo(tmp_path, tiny_decoder_dir, tokenizer, data, data_collator=collator, eval_dataset=data,
                          label_pad_token_id=label_pad)
    row = trainer.train_dataset[0]
    n = row["prompt_length"]
    assert row["chosen_labels"][:n] == [label_pad] * n
    assert row["chosen_labels"][n:] == row["chosen_input_ids"][n:]
    assert row["prompt_input_ids"] == row["chosen_input_ids"][:n]
    rows = [trainer.train_dataset[i] for i in range(8)]
    batch = trainer.data_collator(rows)
    reference = PreferenceCollator(tokenizer.pad_token_id)(rows)
    width = reference["input_ids"].shape[1]
    for key in ("input_ids", "attention_mask", "loss_mask"):
        assert torch.equal(batch[key][:, :width], reference[key]), key
        assert not batch["attention_mask"][:, width:].any()
    default = DPOTrainer(tiny_decoder_dir, None, args=training_args(tmp_path), train_dataset=data, eval_dataset=data,
                         tokenizer=tokenizer)
    for one in (trainer, default):
        one.train()
    assert trainer.evaluate()["eval_loss"] == pytest.approx(default.evaluate()["eval_loss"], abs=1e-5)


def test_pair_batch_reads_labels_with_the_label_pad_id():
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 0], [5, 6, 4, 0], [5, 3, 0, 0]])  # [2b, t], chosen rows first
    labels = torch.tensor([[-1, -1, 7, 8], [-1, -1, 9, -1], [-1, -1, 4, -1], [-1, 3, -1, -1]])
    attention = (torch.arange(4) < torch.tensor([[4], [3], [3], [2]])).long()

    def collate(rows):
        return {"input_ids": ids, "labels": labels, "attention_mask": attention, "margin": [0.5, 1.0]}

    batch = PairBatch(collate, padding_value=0, label_pad_token_id=-1)([])
    assert torch.equal(batch["loss_mask"], labels != -1)
    assert batch["margin"].tolist() == [0.5, 1.0]
    wrong = labels.clone()
    wrong[0, 3] = 2  # a label that is not the input token there
    with pytest.raises(ValueError, match=r"labels\[0, 3\] = 2 but input_ids\[0, 3\] = 8"):
        PairBatch(lambda rows: {"input_ids": ids, "labels": wrong}, 0, -1)([])
    with pytest.raises(ValueError, match="returned keys"):
        PairBatch(lambda rows: {"input_ids": ids}, 0, IGNORE_INDEX)([])


# ----- model_init / preprocess_logits_for_metrics ---------------------------------------------------------
def test_model_init_builds_the_model_and_rebuilds_it_at_train(tmp_path, tiny_decoder_dir, tokenizer):
    calls = []

    def model_init():
        calls.append(1)
        return AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)

    trainer = classic_dpo(tmp_path, None, tokenizer, model_init=model_init)
    assert len(calls) == 1 and trainer.model_init is model_init
    loaded = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir).state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in trainer.model.state_dict().items())
    first_reference = trainer.ref_model
    trainer.train()  # transformers' Trainer calls model_init again, and the reference is copied from that model
    assert len(calls) == 2
    assert trainer.ref_model is not first_reference
    assert all(torch.equal(v, loaded[k]) for k, v in trainer.ref_model.state_dict().items())
    assert any(not torch.equal(v, loaded[k]) for k, v in trainer.model.state_dict().items())
    with pytest.raises(ValueError, match="both `model` and `model_init`"):
        classic_dpo(tmp_path, tiny_decoder_dir, tokenizer, model_init=model_init)
    with pytest.raises(ValueError, match="`model_init`"):
        classic_dpo(tmp_path, None, tokenizer)


def test_reward_model_init_and_preprocess_logits_for_metrics(tmp_path, tiny_decoder_dir, tokenizer):
    seen = []

    def preprocess(logits, labels):
        seen.append((logits.clone(), labels.clone()))
        return logits

    def model_init():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(tiny_decoder_dir, num_labels=1)

    data = pairs(8)
    trainer = RewardTrainer(args=training_args(tmp_path), train_dataset=data, eval_dataset=data, tokenizer=tokenizer,
                            model_init=model_init, compute_metrics=compute_accuracy,
                            preprocess_logits_for_metrics=preprocess)
    metrics = trainer.evaluate()
    (logits, labels), = seen
    assert logits.shape == (8, 2) and labels.tolist() == [0] * 8
    torch.testing.assert_close(logits.sum(1), torch.ones(8))  # softmax over (chosen, rejected), as TRL
    rows = [trainer.eval_dataset[i] for i in range(8)]
    batch = PreferenceCollator(tokenizer.pad_token_id)(rows)
    with torch.no_grad():
        scores = trainer.model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    chosen, rejected = scores[:, 0].chunk(2)  # transformers pools each row at its last non-pad token
    torch.testing.assert_close(logits, torch.stack([chosen, rejected], 1).softmax(1), atol=1e-5, rtol=0)
    assert metrics["eval_accuracy"] == pytest.approx(float((chosen > rejected).float().mean()), abs=1e-6)


def test_dpo_preprocess_logits_for_metrics_gets_the_implicit_rewards(tmp_path, tiny_decoder_dir, tokenizer):
    seen = []

    def preprocess(logits, labels):
        seen.append(logits.clone())
        return logits

    def compute_metrics(prediction):
        return {"pairs_seen": float(len(prediction.predictions))}

    data, other = pairs(8), pairs(8, seed=1)
    torch.manual_seed(1)
    reference = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer = classic_dpo(tmp_path, tiny_decoder_dir, tokenizer, data, ref_model=reference, eval_dataset=other,
                          preprocess_logits_for_metrics=preprocess, compute_metrics=compute_metrics)
    metrics = trainer.evaluate()
    (rewards,) = seen
    policy = batch_log_probs(trainer.model.eval(), trainer.eval_dataset, tokenizer.pad_token_id)
    ref = batch_log_probs(reference.eval(), trainer.eval_dataset, tokenizer.pad_token_id)
    expected = 0.1 * torch.stack([policy[0] - ref[0], policy[1] - ref[1]], 1)  # [b, 2]: beta * log-ratio
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(rewards, expected, atol=1e-5, rtol=0)
    assert metrics["eval_pairs_seen"] == 8
    assert metrics["eval_rewards/chosen"] == pytest.approx(expected[:, 0].mean().item(), abs=1e-5)


# ----- is_encoder_decoder -------------------------------------------------------------------------------
def test_is_encoder_decoder_must_agree_with_the_model(tmp_path, tiny_decoder_dir, tokenizer):
    trainer = classic_dpo(tmp_path, tiny_decoder_dir, tokenizer, is_encoder_decoder=False)
    assert trainer.args.is_encoder_decoder is False
    with pytest.raises(ValueError, match="is_encoder_decoder=True but the model .* is decoder-only"):
        classic_dpo(tmp_path, tiny_decoder_dir, tokenizer, is_encoder_decoder=True)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                             num_heads=2, decoder_start_token_id=tokenizer.pad_token_id))
    with pytest.raises(ValueError, match="is_encoder_decoder=False but the model .* is an encoder-decoder"):
        classic_dpo(tmp_path, t5, tokenizer, is_encoder_decoder=False)
    with pytest.raises(ValueError, match="trains decoder-only"):
        classic_dpo(tmp_path, t5, tokenizer)


# ----- generate_during_eval -----------------------------------------------------------------------------
def test_generate_during_eval_writes_policy_and_reference_completions(tmp_path, tiny_decoder_dir, tokenizer):
    args = training_args(tmp_path, max_steps=4, learning_rate=5e-3, eval_strategy="steps", eval_steps=2)
    data = pairs(16, seed=1)
    trainer = classic_dpo(tmp_path, tiny_decoder_dir, tokenizer, pairs(32), args=args, eval_dataset=data,
                          generate_during_eval=True, max_completion_length=6)
    path = tmp_path / "run" / "samples.jsonl"
    trainer.evaluate()  # step 0: the policy is its reference
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 4 and {r["step"] for r in rows} == {0} and {r["split"] for r in rows} == {"eval"}
    prompts = []
    for row in trainer.eval_dataset:
        prompt = row["chosen_input_ids"][: row["prompt_length"]]
        if prompt not in prompts:
            prompts.append(prompt)
    model = trainer.model.eval()
    for row, prompt in zip(rows, prompts):  # the first distinct eval prompts, greedy, 6 new tokens
        assert row["prompt"] == tokenizer.decode(prompt, skip_special_tokens=True)
        out = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)[0, len(prompt):]
        assert row["completion"] == tokenizer.decode(out, skip_special_tokens=True)
        assert row["reference_completion"] == row["completion"]
    trainer.train()  # evaluations at steps 2 and 4; then the report callback writes its own samples
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    eval_rows = [r for r in rows if r.get("split") == "eval"]
    assert [r["step"] for r in eval_rows] == [0] * 4 + [2] * 4 + [4] * 4
    assert any(r["completion"] != r["reference_completion"] for r in eval_rows[-4:])  # the policy moved
    assert any("split" not in r for r in rows)  # the end-of-training samples of the report are there too
    assert (tmp_path / "run" / "report.html").is_file()
    trainer.evaluate()  # after training: appended, the report's samples kept
    again = [json.loads(line) for line in path.read_text().splitlines()]
    assert again[: len(rows)] == rows and [r["step"] for r in again[len(rows):]] == [4] * 4


# ----- model_adapter_name / ref_adapter_name -----------------------------------------------------------------
def test_reference_adapter_is_switched_on_for_reference_log_probs(tmp_path, tiny_decoder_dir, tokenizer):
    model = two_adapter_model(tiny_decoder_dir)
    start = {name: lora_weights(model, name) for name in ("policy", "reference")}
    trainer = classic_dpo(tmp_path, model, tokenizer, pairs(16), args=training_args(tmp_path, learning_rate=1e-2),
                          model_adapter_name="policy", ref_adapter_name="reference")
    assert trainer.ref_model is None and model.active_adapter == "policy"
    rows = [trainer.train_dataset[i] for i in range(8)]
    batch = PreferenceCollator(tokenizer.pad_token_id)(rows)
    model.eval()
    live = trainer.reference_log_probs(model, batch)
    assert model.active_adapter == "policy"
    assert all(p.requires_grad for n, p in model.named_parameters() if ".policy." in n)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".reference." in n)
    model.set_adapter("reference")  # by hand
    with torch.no_grad():
        by_hand, _, _ = completion_log_probs(model, batch)
    model.set_adapter("policy")
    with torch.no_grad():
        policy, _, _ = completion_log_probs(model, batch)
    torch.testing.assert_close(torch.cat([live["chosen"], live["rejected"]]), by_hand, atol=0, rtol=0)
    assert (policy - by_hand).abs().max() > 0.1  # the reference adapter is not the policy
    trainer.train()
    after = {name: lora_weights(model, name) for name in ("policy", "reference")}
    assert all(torch.equal(v, start["reference"][k]) for k, v in after["reference"].items())
    assert any(not torch.equal(v, start["policy"][k]) for k, v in after["policy"].items())


def test_adapter_names_are_checked(tmp_path, tiny_decoder_dir, tokenizer):
    with pytest.raises(ValueError, match=r"no adapter named \['nope'\]; its adapters: \['policy', 'reference'\]"):
        classic_dpo(tmp_path, two_adapter_model(tiny_decoder_dir), tokenizer, ref_adapter_name="nope")
    with pytest.raises(ValueError, match="adapter to train would be 'reference'"):
        model = two_adapter_model(tiny_decoder_dir)
        model.set_adapter("reference")
        classic_dpo(tmp_path, model, tokenizer, ref_adapter_name="reference")
    with pytest.raises(ValueError, match="not a PEFT model"):
        classic_dpo(tmp_path, tiny_decoder_dir, tokenizer, ref_adapter_name="reference")
    with pytest.raises(ValueError, match="Both ref_model and ref_adapter_name"):
        classic_dpo(tmp_path, two_adapter_model(tiny_decoder_dir), tokenizer, ref_adapter_name="reference",
                    ref_model=AutoModelForCausalLM.from_pretrained(tiny_decoder_dir))


# ----- reference_free --------------------------------------------------------------------------------------
def test_reference_free_loss_is_the_policy_only_formula(tmp_path, tiny_decoder_dir, tokenizer):
    data = pairs(8)
    trainer = classic_dpo(tmp_path, tiny_decoder_dir, tokenizer, data, eval_dataset=data, reference_free=True,
                          beta=0.3)
    assert trainer.ref_model is None
    metrics = trainer.evaluate()
    chosen, rejected = batch_log_probs(trainer.model.eval(), trainer.eval_dataset, tokenizer.pad_token_id)
    expected = -F.logsigmoid(0.3 * (chosen - rejected)).mean()  # the sigmoid loss with a reference log-ratio of 0
    assert abs(expected.item() - math.log(2)) > 0.01
    assert metrics["eval_loss"] == pytest.approx(expected.item(), abs=1e-5)
    assert metrics["eval_rewards/chosen"] == pytest.approx((0.3 * chosen).mean().item(), abs=1e-5)
    trainer.train()
    assert all(math.isfinite(x) for x in [e["loss"] for e in trainer.state.log_history if "loss" in e])


def test_reference_free_conflicts(tmp_path, tiny_decoder_dir, tokenizer):
    with pytest.warns(UserWarning, match="ref_model given is not used"):
        trainer = classic_dpo(tmp_path, tiny_decoder_dir, tokenizer, ref_model=tiny_decoder_dir, reference_free=True)
    assert trainer.ref_model is None
    with pytest.raises(ValueError, match="precompute_ref_log_probs has nothing to compute"):
        classic_dpo(tmp_path, tiny_decoder_dir, tokenizer, reference_free=True, precompute_ref_log_probs=True)


# ----- every TRL 0.7.11 keyword at once --------------------------------------------------------------------
def _dpo_keywords(tmp_path, tiny_decoder_dir, tokenizer, variant: str) -> dict:
    def metrics(prediction):
        return {"pairs": float(len(prediction.predictions))}

    common = dict(
        beta=0.2, label_smoothing=0.0, loss_type="sigmoid", args=training_args(tmp_path, max_steps=1),
        label_pad_token_id=-100, padding_value=tokenizer.pad_token_id, train_dataset=pairs(8),
        eval_dataset=pairs(4, seed=1), tokenizer=tokenizer, callbacks=[], optimizers=(None, None),
        preprocess_logits_for_metrics=lambda logits, labels: logits, max_length=64, max_prompt_length=16,
        max_target_length=32, is_encoder_decoder=False, disable_dropout=True, generate_during_eval=True,
        compute_metrics=metrics, dataset_num_proc=None,
    )
    if variant == "plain":  # models by path, with their init kwargs; TRL's collator
        return dict(common, model=tiny_decoder_dir, ref_model=tiny_decoder_dir, truncation_mode="keep_start",
                    data_collator=DPODataCollatorWithPadding(pad_token_id=tokenizer.pad_token_id),
                    model_init=None, peft_config=None, precompute_ref_log_probs=False,
                    model_init_kwargs={"dtype": torch.float32}, ref_model_init_kwargs={"dtype": torch.float32},
                    model_adapter_name=None, ref_adapter_name=None, reference_free=False)
    if variant == "adapters":  # model_init builds a two-adapter PEFT policy; precomputed reference
        return dict(common, model=None, ref_model=None, truncation_mode="keep_end", data_collator=None,
                    model_init=lambda: two_adapter_model(tiny_decoder_dir), peft_config=None,
                    precompute_ref_log_probs=True, model_init_kwargs=None, ref_model_init_kwargs=None,
                    model_adapter_name="policy", ref_adapter_name="reference", reference_free=False)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    return dict(common, model=AutoModelForCausalLM.from_pretrained(tiny_decoder_dir), ref_model=None,
                truncation_mode="keep_end", data_collator=None, model_init=None, peft_config=lora,
                precompute_ref_log_probs=False, model_init_kwargs=None, ref_model_init_kwargs=None,
                model_adapter_name=None, ref_adapter_name=None, reference_free=True)


@pytest.mark.parametrize("variant", ["plain", "adapters", "peft-reference-free"])
def test_dpo_takes_every_trl_0_7_11_keyword(tmp_path, tiny_decoder_dir, tokenizer, variant):
    keywords = _dpo_keywords(tmp_path, tiny_decoder_dir, tokenizer, variant)
    assert sorted(keywords) == sorted(TRL_0_7_11_DPO)
    with pytest.warns(FutureWarning):
        trainer = DPOTrainer(**keywords)
    assert (trainer.args.beta, trainer.args.max_completion_length) == (0.2, 32)
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_pairs"] == 4 and math.isfinite(metrics["eval_loss"])


def test_reward_takes_every_trl_0_7_11_keyword(tmp_path, tiny_decoder_dir, tokenizer):
    keywords = dict(
        model=AutoModelForSequenceClassification.from_pretrained(tiny_decoder_dir, num_labels=1),
        args=training_args(tmp_path, max_steps=1), data_collator=PreferenceCollator(tokenizer.pad_token_id),
        train_dataset=pairs(8), eval_dataset=pairs(4, seed=1), tokenizer=tokenizer, model_init=None,
        compute_metrics=compute_accuracy, callbacks=[], optimizers=(None, None),
        preprocess_logits_for_metrics=lambda logits, labels: logits, max_length=64,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS"),
    )
    assert sorted(keywords) == sorted(TRL_0_7_11_REWARD)
    with pytest.warns(FutureWarning, match="max_length"):
        trainer = RewardTrainer(**keywords)
    trainer.train()
    assert 0 <= trainer.evaluate()["eval_accuracy"] <= 1


def test_sft_takes_every_trl_0_7_11_keyword(tmp_path, tiny_decoder_dir, tokenizer):
    keywords = dict(
        model=None, args=training_args(tmp_path, max_steps=1), data_collator=None,
        train_dataset=Dataset.from_dict({"text": ["the film was great."] * 8}), eval_dataset=None,
        tokenizer=tokenizer, model_init=lambda: AutoModelForCausalLM.from_pretrained(tiny_decoder_dir),
        compute_metrics=None, callbacks=[], optimizers=(None, None), preprocess_logits_for_metrics=None,
        peft_config=None, dataset_text_field="text", packing=False, formatting_func=None, max_seq_length=32,
        infinite=None, num_of_sequences=1024, chars_per_token=3.6, dataset_num_proc=None, dataset_batch_size=1000,
        neftune_noise_alpha=None, model_init_kwargs=None, dataset_kwargs=None,
    )
    assert sorted(keywords) == sorted(TRL_0_7_11_SFT)
    with pytest.warns(FutureWarning):
        trainer = SFTTrainer(**keywords)
    assert trainer.args.max_length == 32
    trainer.train()
    assert trainer.state.global_step == 1

