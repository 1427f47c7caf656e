"""IterativeSFTTrainer: step() on ids or texts, its loss against the model's own cross-entropy, learning
by repeated steps (causal and seq2seq), mini-batches and accumulation, logging, evaluation, and input
validation."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    TrainingArguments,
)

from tether.trainers.iterative_sft import IterativeSFTTrainer


def arguments(tmp_path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path), learning_rate=1e-2, per_device_train_batch_size=4, max_steps=30,
                  logging_steps=5, report_to="none", save_strategy="no", disable_tqdm=True, seed=0)
    values.update(overrides)
    return TrainingArguments(**values)


@pytest.fixture()
def decoder(tiny_decoder_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_decoder_dir), AutoTokenizer.from_pretrained(tiny_decoder_dir)


def reference_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> float:
    """The model's own causal LM loss (mean over labels != -100), before any step."""
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids[None], labels=labels[None]).loss.item()


def test_step_loss_is_the_models_cross_entropy_and_repeated_steps_lower_it(tmp_path, decoder):
    model, tokenizer = decoder
    text = "the capital of france is paris."
    ids = torch.tensor(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])  # tether appends EOS to a text
    before = reference_loss(model, ids, ids)
    trainer = IterativeSFTTrainer(model, arguments(tmp_path), tokenizer=tokenizer)
    history = [trainer.step(texts=[text])["loss"] for _ in range(30)]
    assert history[0] == pytest.approx(before, rel=1e-5)
    assert history[-1] < 0.2 * history[0], history
    assert trainer.state.global_step == 30
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logged] == [5, 10, 15, 20, 25, 30]
    assert {"learning_rate", "grad_norm", "mean_token_accuracy", "entropy", "num_tokens"} <= set(logged[0])
    assert logged[0]["loss"] == pytest.approx(sum(history[:5]) / 5, abs=1e-4)


def test_docs_call_shape_ids_labels_and_padding(tmp_path, decoder, monkeypatch):
    """`IterativeSFTTrainer(model, tokenizer)` as TRL's docs write it; labels -100 leave tokens out and
    attention_mask 0 marks padding, both as in the model's own loss."""
    model, tokenizer = decoder
    ids = torch.tensor(tokenizer("two plus two is four.")["input_ids"])
    labels = ids.clone()
    labels[:3] = -100
    expected = reference_loss(model, ids, labels)
    pad = tokenizer.pad_token_id
    padded = torch.cat([ids, torch.tensor([pad, pad])])
    mask = torch.cat([torch.ones_like(ids), torch.zeros(2, dtype=torch.long)])
    monkeypatch.chdir(tmp_path)  # no args: the output dir is <model name>-IterativeSFT in the working directory
    with pytest.warns(UserWarning, match="max_steps"):  # no args: the default linear schedule has no length
        trainer = IterativeSFTTrainer(model, tokenizer)
    assert trainer.processing_class is tokenizer
    padded_labels = torch.cat([labels, torch.tensor([-100, -100])])
    stats = trainer.step(input_ids=[padded], attention_mask=[mask], labels=[padded_labels])
    assert stats["loss"] == pytest.approx(expected, rel=1e-5)


def test_a_causal_texts_label_is_a_completion_trained_alone(tmp_path, decoder):
    model, tokenizer = decoder
    prompt, completion = "the capital of france is", " paris."
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = torch.tensor(prompt_ids + tokenizer(completion, add_special_tokens=False)["input_ids"]
                       + [tokenizer.eos_token_id])
    labels = ids.clone()
    labels[: len(prompt_ids)] = -100
    expected = reference_loss(model, ids, labels)
    trainer = IterativeSFTTrainer(model, arguments(tmp_path), tokenizer=tokenizer)
    assert trainer.step(texts=[prompt], texts_labels=[completion])["loss"] == pytest.approx(expected, rel=1e-5)


def test_mini_batches_accumulation_truncation_and_a_hugging_face_collator(tmp_path, decoder):
    model, tokenizer = decoder
    texts = ["the film was great.", "the plot was dull.", "hello world", "two plus two is four.", "the end."]
    trainer = IterativeSFTTrainer(model, arguments(tmp_path, per_device_train_batch_size=2), tokenizer=tokenizer)
    trainer.step(texts=texts)
    assert trainer.state.global_step == 3  # ceil(5 / 2) mini-batches, one optimizer step each
    accumulating = IterativeSFTTrainer(model, arguments(tmp_path, per_device_train_batch_size=2,
                                                        gradient_accumulation_steps=2), tokenizer=tokenizer)
    accumulating.step(texts=texts)
    assert accumulating.state.global_step == 2
    ids = tokenizer("two plus two is four.")["input_ids"] + [tokenizer.eos_token_id]
    for mode, kept in (("keep_end", ids[-4:]), ("keep_start", ids[:4])):
        cut = IterativeSFTTrainer(model, arguments(tmp_path), tokenizer=tokenizer, max_length=4, truncation_mode=mode)
        assert cut._examples(None, None, None, ["two plus two is four."], None)[0]["input_ids"] == kept
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    hf = IterativeSFTTrainer(model, arguments(tmp_path), tokenizer=tokenizer, data_collator=collator,
                             optimize_device_cache=True)
    sample = torch.tensor(ids)
    expected = reference_loss(model, sample, sample)
    assert hf.step(input_ids=[sample])["loss"] == pytest.approx(expected, rel=1e-5)


def test_evaluates_every_eval_steps(tmp_path, decoder):
    model, tokenizer = decoder
    eval_dataset = Dataset.from_dict({"text": ["the film was great.", "hello world"]})
    trainer = IterativeSFTTrainer(model, arguments(tmp_path, eval_strategy="steps", eval_steps=2), tokenizer=tokenizer,
                                  eval_dataset=eval_dataset)
    for _ in range(4):
        trainer.step(texts=["the film was great."])
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert [e["step"] for e in evals] == [2, 4] and evals[1]["eval_loss"] < evals[0]["eval_loss"]


def test_seq2seq_steps_lower_the_loss(tmp_path, tiny_seq2seq_dir):
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_seq2seq_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_seq2seq_dir)
    trainer = IterativeSFTTrainer(model, arguments(tmp_path), tokenizer=tokenizer)
    history = [trainer.step(texts=["the capital of france is"], texts_labels=[" paris."])["loss"] for _ in range(30)]
    assert history[-1] < 0.3 * history[0], history
    ids = torch.tensor(tokenizer("hello")["input_ids"])
    target = torch.tensor(tokenizer(" world")["input_ids"] + [-100, -100])  # -100: padding of the target
    assert trainer.step(input_ids=[ids], labels=[target])["loss"] > 0
    with pytest.raises(ValueError, match="texts_labels"):
        trainer.step(texts=["hello"])
    # TRL's default seq2seq collator gives the same loss as tether's (before any step, on a fresh model).
    sample = dict(texts=["two plus two is"], texts_labels=[" four."])
    losses = []
    for collator in (None, DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, pad_to_multiple_of=8)):
        fresh = IterativeSFTTrainer(AutoModelForSeq2SeqLM.from_pretrained(tiny_seq2seq_dir), arguments(tmp_path),
                                    tokenizer=tokenizer, data_collator=collator)
        losses.append(fresh.step(**sample)["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    with pytest.raises(ValueError, match="labels"):
        trainer.step(input_ids=[ids])


@pytest.mark.parametrize("call, message", [
    (dict(), "either input_ids .* or texts .*neither"),
    (dict(input_ids=[torch.tensor([5, 6])], texts=["a"]), "both"),
    (dict(texts="hello"), "texts must be a non-empty list of strings, got str"),
    (dict(texts=[]), "texts must be a non-empty list"),
    (dict(texts=["a", 3]), r"texts\[1\] is a int"),
    (dict(input_ids=[[5, 6]]), r"input_ids\[0\] is a list"),
    (dict(input_ids=[torch.tensor([[5, 6]])]), r"input_ids\[0\] is a Tensor of shape \(1, 2\)"),
    (dict(input_ids=[torch.tensor([5, 6])] * 2, attention_mask=[torch.tensor([1, 1])]), "attention_mask has 1 items"),
    (dict(input_ids=[torch.tensor([5, 6])], attention_mask=[torch.tensor([1])]), r"attention_mask\[0\] has shape"),
    (dict(input_ids=[torch.tensor([5, 6])], labels=[torch.tensor([5, 6, 7])]), "labels has a tensor of shape"),
    (dict(input_ids=[torch.tensor([5, 6])], labels=[torch.tensor([5, 9])]), r"labels\[0, 1\] = 9"),
    (dict(input_ids=[torch.tensor([5, 6])], texts_labels=["a"]), "texts_labels go with texts"),
    (dict(texts=["a"], labels=[torch.tensor([5])]), "with texts, pass target texts as texts_labels"),
    (dict(texts=["a", "b"], texts_labels=["c"]), "texts_labels has 1 items but there are 2 samples"),
])
def test_step_input_validation(tmp_path, decoder, call, message):
    model, tokenizer = decoder
    trainer = IterativeSFTTrainer(model, arguments(tmp_path), tokenizer=tokenizer)
    with pytest.raises(ValueError, match=message):
        trainer.step(**call)
    assert trainer.state.global_step == 0


def test_constructor_validation(tmp_path, decoder):
    model, tokenizer = decoder
    with pytest.raises(ValueError, match="truncation_mode"):
        IterativeSFTTrainer(model, arguments(tmp_path), tokenizer=tokenizer, truncation_mode="keep_middle")
    with pytest.raises(ValueError, match="needs `model`"):
        IterativeSFTTrainer(None, arguments(tmp_path), tokenizer=tokenizer)
