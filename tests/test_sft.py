"""SFTTrainer end to end on tiny local models: it learns, the classic call works, LoRA, seq2seq."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from tether import SFTConfig, SFTTrainer

FACTS = [
    ("the capital of france is", " paris."),
    ("two plus two is", " four."),
    ("hello", " world"),
]


def config(tmp_path, **overrides) -> SFTConfig:
    values = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=3e-3, max_steps=40,
        logging_steps=5, report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
        dataloader_pin_memory=False,
    )
    values.update(overrides)
    return SFTConfig(**values)


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def greedy(model, tokenizer, prompt: str, new_tokens: int = 4) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    model.eval()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_learns_and_generates_memorised_completion(tmp_path, tiny_decoder_dir):
    ds = Dataset.from_dict({"prompt": [p for p, _ in FACTS] * 8, "completion": [c for _, c in FACTS] * 8})
    trainer = SFTTrainer(tiny_decoder_dir, args=config(tmp_path, max_steps=60), train_dataset=ds)
    trainer.train()
    history = losses(trainer)
    assert history[-1] < 0.25 * history[0], history
    logged = trainer.state.log_history[0]
    assert {"mean_token_accuracy", "entropy", "num_tokens"} <= set(logged)
    assert greedy(trainer.model, trainer.processing_class, "the capital of france is").startswith(" paris")
    assert greedy(trainer.model, trainer.processing_class, "two plus two is").startswith(" four")


def test_classic_call_with_legacy_keywords(tmp_path, tiny_decoder_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ds = Dataset.from_dict({"text": ["the film was great and the music was lovely."] * 8})
    with pytest.warns(FutureWarning, match="max_seq_length"):
        trainer = SFTTrainer(tiny_decoder_dir, train_dataset=ds, dataset_text_field="text", max_seq_length=512)
    assert trainer.args.max_length == 512
    assert trainer.args.dataset_text_field == "text"
    trainer.args.max_steps = 2  # keep the default epoch-based run short
    trainer.train()
    assert trainer.state.global_step == 2
    assert os.path.basename(trainer.args.output_dir).endswith("-SFT")


def test_unknown_keyword_is_an_error(tiny_decoder_dir):
    ds = Dataset.from_dict({"text": ["a b c"]})
    with pytest.raises(TypeError, match="max_seq_len"):
        SFTTrainer(tiny_decoder_dir, train_dataset=ds, max_seq_len=12)


def test_saves_safetensors_and_tokenizer(tmp_path, tiny_decoder_dir):
    ds = Dataset.from_dict({"text": ["the plot was dull."] * 4})
    trainer = SFTTrainer(tiny_decoder_dir, args=config(tmp_path, max_steps=1), train_dataset=ds)
    trainer.train()
    trainer.save_model()
    files = os.listdir(trainer.args.output_dir)
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert "pytorch_model.bin" not in files  # weights as safetensors only
    reloaded = AutoModelForCausalLM.from_pretrained(trainer.args.output_dir)
    for (name, p), q in zip(trainer.model.named_parameters(), reloaded.parameters()):
        assert torch.equal(p, q), name


def test_formatting_func_per_example_and_batched(tmp_path, tiny_decoder_dir):
    ds = Dataset.from_dict({"question": ["what is two plus two"] * 4, "answer": ["four"] * 4})

    def per_example(example):
        return f"question: {example['question']} answer: {example['answer']}"

    def batched(batch):
        return [f"question: {q} answer: {a}" for q, a in zip(batch["question"], batch["answer"])]

    rows = []
    for func in (per_example, batched):
        trainer = SFTTrainer(tiny_decoder_dir, args=config(tmp_path, max_steps=1), train_dataset=ds,
                             formatting_func=func)
        rows.append(trainer.train_dataset[0]["input_ids"])
    assert rows[0] == rows[1]
    tokenizer = AutoTokenizer.from_pretrained(tiny_decoder_dir)
    assert tokenizer.decode(rows[0], skip_special_tokens=True) == "question: what is two plus two answer: four"


def test_packing_trains_and_rows_are_packed(tmp_path, tiny_decoder_dir):
    ds = Dataset.from_dict({"text": ["a short one.", "a somewhat longer review of the film."] * 20})
    trainer = SFTTrainer(tiny_decoder_dir, args=config(tmp_path, max_steps=20, packing=True, max_length=64),
                         train_dataset=ds)
    assert len(trainer.train_dataset) < len(ds)
    assert all(len(r) <= 64 for r in trainer.train_dataset["input_ids"])
    trainer.train()
    history = losses(trainer)
    assert history[-1] < history[0]


def test_eval_metrics(tmp_path, tiny_decoder_dir):
    ds = Dataset.from_dict({"text": ["the music was lovely."] * 8})
    trainer = SFTTrainer(tiny_decoder_dir, args=config(tmp_path, max_steps=2), train_dataset=ds, eval_dataset=ds)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0
    assert 0.0 <= metrics["eval_mean_token_accuracy"] <= 1.0
    assert metrics["eval_entropy"] > 0


def test_lora_changes_only_adapters_and_round_trips(tmp_path, tiny_decoder_dir):
    from peft import LoraConfig, PeftModel

    ds = Dataset.from_dict({"text": ["the acting was superb and moving."] * 16})
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    base = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    trainer = SFTTrainer(base, args=config(tmp_path, max_steps=10, learning_rate=1e-2), train_dataset=ds,
                         processing_class=AutoTokenizer.from_pretrained(tiny_decoder_dir), peft_config=lora)
    trainer.train()
    model = trainer.model
    changed = {n for n, p in model.named_parameters() if "lora_" in n}
    assert changed and all(p.requires_grad for n, p in model.named_parameters() if n in changed)
    for name, param in model.get_base_model().named_parameters():
        if "lora_" in name:
            continue
        original = name.replace(".base_layer", "")
        assert torch.equal(param, before[original]), f"base weight {name} changed"
    assert any(not torch.allclose(p, torch.zeros_like(p)) for n, p in model.named_parameters() if "lora_B" in n)
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    assert (adapter_dir / "adapter_model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_decoder_dir), adapter_dir)
    ids = torch.tensor([[3, 10, 20, 30, 40]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reloaded(ids).logits)


def test_activation_checkpointing_with_lora(tmp_path, tiny_decoder_dir):
    from peft import LoraConfig

    ds = Dataset.from_dict({"text": ["the ending was wonderful."] * 8})
    lora = LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(tiny_decoder_dir, args=config(tmp_path, max_steps=8, logging_steps=1,
                                                                activation_checkpointing=True,
                                                                learning_rate=1e-2),
                         train_dataset=ds, peft_config=lora)
    trainer.train()
    history = losses(trainer)
    assert history[-1] < history[0]


def test_seq2seq_on_prompt_completion(tmp_path, tiny_seq2seq_dir):
    ds = Dataset.from_dict({"prompt": [p for p, _ in FACTS] * 8, "completion": [c for _, c in FACTS] * 8})
    trainer = SFTTrainer(tiny_seq2seq_dir, args=config(tmp_path, max_steps=40), train_dataset=ds)
    assert set(trainer.train_dataset.column_names) == {"input_ids", "labels"}
    trainer.train()
    history = losses(trainer)
    assert history[-1] < 0.5 * history[0], history


@pytest.mark.parametrize("model_dir", ["tiny_decoder_dir", "tiny_seq2seq_dir"])
def test_gradient_accumulation_gives_the_same_update(tmp_path, model_dir, request):
    """One step on 4 examples equals 2 accumulated steps of 2: the loss divides by the step's token count."""
    path = request.getfixturevalue(model_dir)
    ds = Dataset.from_dict({"prompt": ["the film", "the plot was", "two plus two is", "hello"],
                            "completion": [" was great.", " dull and slow.", " four.", " world"]})
    weights = []
    for batch, accumulation in ((4, 1), (2, 2)):
        trainer = SFTTrainer(path, args=config(tmp_path, max_steps=1, per_device_train_batch_size=batch,
                                               gradient_accumulation_steps=accumulation, optim="sgd",
                                               learning_rate=1.0, lr_scheduler_type="constant"),
                             train_dataset=ds)
        trainer.train()
        weights.append([p.detach().clone() for p in trainer.model.parameters()])
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ----- TRL 0.7.11's SFTTrainer: every keyword, streams, NEFTune, metrics ------------------------------------

def test_every_trl_0_7_11_keyword_is_accepted_and_means_what_it_did(tmp_path, tiny_decoder_dir):
    """One call with all of SFTTrainer.__init__'s keywords in TRL 0.7.11, plain TrainingArguments as then;
    compute_metrics receives preprocess_logits_for_metrics' output and labels -100 outside the targets."""
    from transformers import TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(tiny_decoder_dir)
    ds = Dataset.from_dict({"text": ["the music was lovely.", "the plot was dull.", "hello world", "two plus two is"]})
    seen = {}

    def preprocess_logits_for_metrics(logits, labels):
        return logits.argmax(-1)

    def compute_metrics(prediction):
        predicted, labels = prediction.predictions[:, :-1], prediction.label_ids[:, 1:]  # position j predicts j+1
        seen["labels"] = prediction.label_ids
        counted = labels != -100
        return {"accuracy": float((predicted == labels)[counted].mean())}

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_eval_batch_size=4,
                             report_to="none", save_strategy="no", disable_tqdm=True)
    with pytest.warns(FutureWarning):
        trainer = SFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(tiny_decoder_dir), args=args, data_collator=None,
            train_dataset=ds, eval_dataset=ds, tokenizer=tokenizer, model_init=None, compute_metrics=compute_metrics,
            callbacks=None, optimizers=(None, None), preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            peft_config=None, dataset_text_field="text", packing=False, formatting_func=None, max_seq_length=64,
            infinite=None, num_of_sequences=1024, chars_per_token=3.6, dataset_num_proc=None, dataset_batch_size=500,
            neftune_noise_alpha=5.0, model_init_kwargs=None, dataset_kwargs={"add_special_tokens": False},
            eval_packing=False,
        )
    assert (trainer.args.max_length, trainer.args.neftune_noise_alpha, trainer.args.dataset_batch_size) == (64, 5.0, 500)
    assert trainer.args.dataset_kwargs == {"add_special_tokens": False} and trainer.args.eval_packing is False
    metrics = trainer.evaluate()
    assert metrics["eval_accuracy"] == pytest.approx(metrics["eval_mean_token_accuracy"], abs=1e-6)
    first = tokenizer("the music was lovely.")["input_ids"] + [tokenizer.eos_token_id]
    assert seen["labels"][0, : len(first)].tolist() == [-100, *first[1:]]


def test_none_keywords_keep_the_config_and_model_init(tmp_path, tiny_decoder_dir):
    ds = Dataset.from_dict({"text": ["the plot was dull."] * 4})
    trainer = SFTTrainer(model_init=lambda: AutoModelForCausalLM.from_pretrained(tiny_decoder_dir),
                         args=config(tmp_path, max_length=32), train_dataset=ds,
                         processing_class=AutoTokenizer.from_pretrained(tiny_decoder_dir),
                         max_seq_length=None, dataset_text_field=None, packing=None)
    assert trainer.args.max_length == 32 and trainer.args.dataset_text_field == "text"
    with pytest.raises(ValueError, match="model_init"):
        SFTTrainer(train_dataset=ds)
    with pytest.raises(ValueError, match="skip_prepare"):
        config(tmp_path, dataset_kwargs={"skip_prepare": True})


def test_dataset_kwargs_add_special_tokens_and_skip_prepare(tmp_path, tiny_decoder_dir):
    from tokenizers.processors import TemplateProcessing

    tokenizer = AutoTokenizer.from_pretrained(tiny_decoder_dir)
    bos = tokenizer.bos_token_id
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    ds = Dataset.from_dict({"text": ["hello world"] * 4})
    firsts = []
    for options in (None, {"add_special_tokens": False}):
        trainer = SFTTrainer(tiny_decoder_dir, args=config(tmp_path, dataset_kwargs=options), train_dataset=ds,
                             processing_class=tokenizer)
        firsts.append(trainer.train_dataset[0]["input_ids"][0])
    assert firsts[0] == bos and firsts[1] != bos
    tokenized = Dataset.from_dict({"input_ids": [[5, 6, 7, 8]] * 8})
    trainer = SFTTrainer(tiny_decoder_dir, args=config(tmp_path, max_steps=2, dataset_kwargs={"skip_prepare_dataset": True}),
                         train_dataset=tokenized, processing_class=tokenizer)
    assert trainer.train_dataset is tokenized
    assert trainer.data_collator([tokenized[0]])["loss_mask"].tolist() == [[False, True, True, True]]
    trainer.train()


def test_streaming_dataset_is_tokenized_on_the_fly_and_needs_max_steps(tmp_path, tiny_decoder_dir):
    from tether.data.tokenize import tokenize_text

    texts = ["the music was lovely.", "the plot was dull and slow."] * 8
    stream = Dataset.from_dict({"text": texts}).to_iterable_dataset()
    with pytest.raises(ValueError, match="max_steps"):
        SFTTrainer(tiny_decoder_dir, args=config(tmp_path, max_steps=-1), train_dataset=stream)
    trainer = SFTTrainer(tiny_decoder_dir, args=config(tmp_path, max_steps=6, logging_steps=2), train_dataset=stream)
    tokenizer = trainer.processing_class
    assert next(iter(trainer.train_dataset)) == tokenize_text(tokenizer, texts[0])
    trainer.train()
    assert trainer.state.global_step == 6
    history = losses(trainer)
    assert history[-1] < history[0]


def test_streaming_with_packing_and_a_batched_formatting_func(tmp_path, tiny_decoder_dir):
    from tether.data.constant_length import ConstantLengthDataset

    stream = Dataset.from_dict({"q": ["two plus two"] * 20, "a": ["four"] * 20}).to_iterable_dataset()

    def batched(batch):
        return [f"question: {q} answer: {a}" for q, a in zip(batch["q"], batch["a"])]

    trainer = SFTTrainer(tiny_decoder_dir, args=config(tmp_path, max_steps=4, packing=True, max_length=16),
                         train_dataset=stream, formatting_func=batched)
    packed = trainer.train_dataset
    assert isinstance(packed, ConstantLengthDataset) and packed.seq_length == 16 and packed.infinite
    assert all(row["input_ids"].shape == (16,) for row in itertools.islice(packed, 5))
    trainer.train()
    assert trainer.state.global_step == 4


def test_neftune_noise_on_embeddings_while_training_only(tmp_path, tiny_decoder_dir):
    """NEFTune (Jain et al. 2023): the embeddings get uniform noise in [-alpha/sqrt(L d), alpha/sqrt(L d)]
    (L = sequence length, d = hidden size) during training; the hook is gone afterwards."""
    from transformers import TrainerCallback

    alpha = 5.0
    ds = Dataset.from_dict({"text": ["the music was lovely."] * 4})
    trainer = SFTTrainer(tiny_decoder_dir, args=config(tmp_path, max_steps=1), train_dataset=ds,
                         neftune_noise_alpha=alpha)
    model = trainer.model
    captured = []

    def before_first_layer(_module, args, kwargs):
        captured.append(args[0] if args else kwargs["hidden_states"])

    class Capture(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.weight = model.get_input_embeddings().weight.detach().clone()  # before this step's update
            self.handle = model.model.layers[0].register_forward_pre_hook(before_first_layer, with_kwargs=True)

        def on_step_end(self, *args, **kwargs):
            self.handle.remove()

    capture = Capture()
    trainer.add_callback(capture)
    trainer.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    clean = capture.weight[batch["input_ids"]]
    noise = (captured[0] - clean).abs()
    length, dim = batch["input_ids"].shape[1], clean.shape[-1]
    assert 0 < noise.max() <= alpha / (length * dim) ** 0.5 + 1e-6
    model.train()
    with torch.no_grad():
        after = model.get_input_embeddings()(batch["input_ids"])
    torch.testing.assert_close(after, model.get_input_embeddings().weight[batch["input_ids"]])


@pytest.mark.parametrize("first_step", [False, True])
def test_token_stats_are_measured_on_the_steps_that_log(tmp_path, tiny_decoder_dir, monkeypatch, first_step):
    """Entropy and accuracy cost passes over the vocabulary: measured on the optimizer steps that log (every
    logging_steps, the first with logging_first_step, the last), and logged there; the loss every step."""
    import tether.trainers.sft as sft_module

    asked = []
    fused = sft_module.causal_lm_loss

    def spy(model, batch, normalizer, chunk_size, with_stats=True):
        asked.append(with_stats)
        return fused(model, batch, normalizer, chunk_size, with_stats=with_stats)

    monkeypatch.setattr(sft_module, "causal_lm_loss", spy)
    ds = Dataset.from_dict({"text": ["the film was great and the music was lovely."] * 64})
    args = config(tmp_path, max_steps=7, logging_steps=3, logging_first_step=first_step)
    trainer = SFTTrainer(tiny_decoder_dir, args=args, train_dataset=ds)
    trainer.train()
    logging = {1} if first_step else set()
    assert asked == [step in logging | {3, 6, 7} for step in range(1, 8)]
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert [row["step"] for row in rows] == sorted(logging | {3, 6})
    assert all("entropy" in row and "mean_token_accuracy" in row for row in rows)
