"""ConstantLengthDataset: rows worked out by hand with a character tokenizer, buffer-size invariance,
infinite iteration, and SFTTrainer training on it as the stack-llama scripts do."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from datasets import Dataset

from tether.data import DatasetError
from tether.data.constant_length import ConstantLengthDataset


class CharTokenizer:
    """One token per character (its code point); `add_special_tokens` prepends BOS = 1; EOS = 0."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=True, truncation=False):
        return {"input_ids": [[1] * add_special_tokens + [ord(c) for c in text] for text in texts]}


TEXTS = [{"text": "ab"}, {"text": "cde"}, {"text": "f"}]


def rows(dataset) -> list[list[int]]:
    out = []
    for row in dataset:
        assert row["input_ids"].dtype == torch.long and torch.equal(row["input_ids"], row["labels"])
        out.append(row["input_ids"].tolist())
    return out


def test_rows_by_hand():
    # Stream: BOS a b EOS | BOS c d e EOS | BOS f EOS = [1,97,98,0, 1,99,100,101,0, 1,102,0], cut every 3 tokens.
    ds = ConstantLengthDataset(CharTokenizer(), TEXTS, dataset_text_field="text", seq_length=3, shuffle=False)
    assert rows(ds) == [[1, 97, 98], [0, 1, 99], [100, 101, 0], [1, 102, 0]]
    assert len(ds) == 3  # the examples of the dataset (TRL's convention), not the rows
    bare = ConstantLengthDataset(CharTokenizer(), TEXTS, dataset_text_field="text", seq_length=4, shuffle=False,
                                 append_concat_token=False, add_special_tokens=False)
    assert rows(bare) == [[97, 98, 99, 100]]  # "abcdef": the partial last row [101, 102] is dropped


def test_small_buffers_give_the_same_rows_as_one_buffer():
    """Tokens left after a buffer's last full row start the next buffer, so buffer size changes nothing."""
    rng = random.Random(0)
    data = [{"text": "".join(rng.choice("xyz ") for _ in range(rng.randint(1, 12)))} for _ in range(40)]
    whole = ConstantLengthDataset(CharTokenizer(), data, dataset_text_field="text", seq_length=5, shuffle=False)
    tiny = ConstantLengthDataset(CharTokenizer(), data, dataset_text_field="text", seq_length=5, shuffle=False,
                                 num_of_sequences=1, chars_per_token=1.0)  # a buffer of >= 5 characters
    expected = [t for r in data for t in [1, *map(ord, r["text"]), 0]]
    expected = [expected[i:i + 5] for i in range(0, len(expected) // 5 * 5, 5)]
    assert rows(whole) == expected
    assert rows(tiny) == expected


def test_shuffle_permutes_rows_within_the_buffer():
    data = [{"text": "abcdefgh"}] * 6
    plain = rows(ConstantLengthDataset(CharTokenizer(), data, dataset_text_field="text", seq_length=4, shuffle=False))
    random.seed(0)
    shuffled = rows(ConstantLengthDataset(CharTokenizer(), data, dataset_text_field="text", seq_length=4))
    assert shuffled != plain and sorted(shuffled) == sorted(plain)


def test_formatting_func_per_example_or_batched_and_infinite():
    data = [{"q": "a", "r": "b"}, {"q": "c", "r": "d"}]

    def per_example(example):
        return example["q"] + example["r"]

    def batched(batch):
        return [q + r for q, r in zip(batch["q"], batch["r"])]

    made = [rows(ConstantLengthDataset(CharTokenizer(), data, formatting_func=f, seq_length=4, shuffle=False))
            for f in (per_example, batched)]
    assert made[0] == made[1] == [[1, 97, 98, 0], [1, 99, 100, 0]]
    endless = ConstantLengthDataset(CharTokenizer(), data, formatting_func=per_example, seq_length=4, shuffle=False,
                                    infinite=True)
    first = [r["input_ids"].tolist() for r in itertools.islice(endless, 5)]
    assert first == [[1, 97, 98, 0], [1, 99, 100, 0]] * 2 + [[1, 97, 98, 0]]
    assert endless.current_size == 5


def test_bad_arguments_and_empty_data():
    with pytest.raises(ValueError, match="dataset_text_field"):
        ConstantLengthDataset(CharTokenizer(), TEXTS)
    with pytest.raises(ValueError, match="seq_length"):
        ConstantLengthDataset(CharTokenizer(), TEXTS, dataset_text_field="text", seq_length=0)
    with pytest.raises(DatasetError, match="'body'"):
        list(ConstantLengthDataset(CharTokenizer(), TEXTS, dataset_text_field="body"))
    with pytest.warns(UserWarning, match="no row"):
        assert rows(ConstantLengthDataset(CharTokenizer(), TEXTS, dataset_text_field="text", seq_length=100)) == []
    with pytest.raises(DatasetError, match="empty"):
        list(ConstantLengthDataset(CharTokenizer(), [], dataset_text_field="text", infinite=True))

    class NoEos(CharTokenizer):
        eos_token_id = None

    with pytest.warns(UserWarning, match="eos_token_id=7"):
        ds = ConstantLengthDataset(NoEos(), TEXTS[:1], dataset_text_field="text", seq_length=4, eos_token_id=7)
    assert rows(ds) == [[1, 97, 98, 7]]


def test_length_of_a_stream_is_undefined():
    stream = Dataset.from_list(TEXTS).to_iterable_dataset()
    ds = ConstantLengthDataset(CharTokenizer(), stream, dataset_text_field="text", seq_length=3, shuffle=False)
    with pytest.raises(TypeError):
        len(ds)
    assert rows(ds) == [[1, 97, 98], [0, 1, 99], [100, 101, 0], [1, 102, 0]]


def test_sft_trainer_on_constant_length_datasets_as_stack_llama(tmp_path, tiny_decoder_dir):
    """supervised_finetuning.py's call shape: ConstantLengthDataset train (infinite) and eval sets, plain
    TrainingArguments (remove_unused_columns=True), packing=True, max_steps."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from tether import SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_decoder_dir)
    data = Dataset.from_dict({"question": ["what is two plus two"] * 30, "response_j": ["four"] * 30})

    def prepare_sample_text(example):
        return f"Question: {example['question']}\n\nAnswer: {example['response_j']}"

    train = ConstantLengthDataset(tokenizer, data, formatting_func=prepare_sample_text, infinite=True, seq_length=32)
    valid = ConstantLengthDataset(tokenizer, data.select(range(8)), formatting_func=prepare_sample_text,
                                  infinite=False, seq_length=32)
    train.start_iteration = 0
    args = TrainingArguments(output_dir=str(tmp_path), dataloader_drop_last=True, eval_strategy="steps",
                             max_steps=12, eval_steps=12, save_strategy="no", logging_steps=4,
                             per_device_train_batch_size=4, per_device_eval_batch_size=4, learning_rate=3e-3,
                             report_to="none", disable_tqdm=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)
    with pytest.warns(FutureWarning, match="packing"):
        trainer = SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=valid, packing=True,
                             processing_class=tokenizer)
    assert trainer.train_dataset is train and train.infinite
    batch = trainer.data_collator([next(iter(train)) for _ in range(2)])
    assert batch["input_ids"].shape == (2, 32) and batch["loss_mask"][:, 1:].all()
    trainer.train()
    history = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert trainer.state.global_step == 12 and history[-1] < history[0]
    assert any("eval_loss" in e for e in trainer.state.log_history)
