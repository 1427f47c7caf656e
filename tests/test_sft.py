"""SFTTrainer end to end on tiny local models: it learns, the classic call works, LoRA, seq2seq."""

from __future__ import annotations

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
