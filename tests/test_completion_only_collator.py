"""DataCollatorForCompletionOnlyLM against label masks worked out by hand, its use in SFTTrainer as TRL
0.7.11's docs show it, and LabelsToLossMask (Hugging Face labels -> tether's loss mask)."""

from __future__ import annotations

import warnings

import pytest
import torch
from datasets import Dataset

from tether.data.collate import (
    DataCollatorForCompletionOnlyLM,
    LabelsToLossMask,
    LanguageModelingCollator,
    completion_token_mask,
)

X = -100  # ignored label
R = [50, 51]  # a response template, as token ids
INSTRUCTION = [40, 41]


def rows(*sequences):
    return [{"input_ids": list(s)} for s in sequences]


def test_response_template_ids_mask_everything_up_to_the_template(tokenizer):
    collator = DataCollatorForCompletionOnlyLM(R, tokenizer=tokenizer)
    batch = collator(rows([5, 6, *R, 9, 10], [5, *R, 11]))
    pad = tokenizer.pad_token_id
    assert batch["input_ids"].tolist() == [[5, 6, 50, 51, 9, 10], [5, 50, 51, 11, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[X, X, X, X, 9, 10], [X, X, X, 11, X, X]]


def test_last_response_template_starts_the_completion():
    # Few-shot prompts hold earlier templates; the completion follows the last one (as TRL 0.7.11).
    ids = [5, *R, 20, 6, *R, 21, 22]
    assert completion_token_mask(ids, R) == [False] * 7 + [True, True]


def test_instruction_template_keeps_only_assistant_turns(tokenizer):
    collator = DataCollatorForCompletionOnlyLM(R, INSTRUCTION, tokenizer=tokenizer)
    chat = [*INSTRUCTION, 60, 61, *R, 70, 71, *INSTRUCTION, 62, *R, 72]
    starts_with_assistant = [*R, 73, *INSTRUCTION, 63, *R, 74, 75]
    user_turn_last = [*INSTRUCTION, 64, *R, 76, *INSTRUCTION, 65]
    batch = collator(rows(chat, starts_with_assistant, user_turn_last))
    assert batch["labels"].tolist() == [
        [X, X, X, X, X, X, 70, 71, X, X, X, X, X, 72],
        [X, X, 73, X, X, X, X, X, 74, 75, X, X, X, X],
        [X, X, X, X, X, 76, X, X, X, X, X, X, X, X],
    ]


def test_string_template_matches_its_token_ids(tokenizer):
    text = "question: two plus two answer: four"
    ids = tokenizer.encode(" answer:", add_special_tokens=False)
    batches = [DataCollatorForCompletionOnlyLM(t, tokenizer=tokenizer)([tokenizer(text)]) for t in (" answer:", ids)]
    torch.testing.assert_close(batches[0]["labels"], batches[1]["labels"])
    kept = batches[0]["labels"][0][batches[0]["labels"][0] != X]
    assert tokenizer.decode(kept) == " four"


def test_template_ids_taken_in_context_find_what_the_string_misses(tokenizer):
    """The docs' trick: "answer:" alone tokenizes unlike " answer:" after a newline in the text, so the
    string is not found; the ids of the template encoded with its context, context tokens cut, are."""
    text = "question: two plus two\n answer: four"
    with pytest.warns(UserWarning, match="not in its tokens"):
        missed = DataCollatorForCompletionOnlyLM("answer:", tokenizer=tokenizer)([tokenizer(text)])
    assert (missed["labels"] == X).all()
    in_context = tokenizer.encode("\n answer:", add_special_tokens=False)[1:]
    found = DataCollatorForCompletionOnlyLM(in_context, tokenizer=tokenizer)([tokenizer(text)])
    labels = found["labels"][0]
    assert tokenizer.decode(labels[labels != X]) == " four"


def test_missing_template_warns_with_row_and_template_and_masks_the_row(tokenizer):
    collator = DataCollatorForCompletionOnlyLM(R, tokenizer=tokenizer)
    with pytest.warns(UserWarning) as record:
        batch = collator(rows([5, *R, 9], [5, 6, 7]))
    message = str(record[0].message)
    assert "Row 1 of the batch" in message and "[50, 51]" in message
    assert batch["labels"].tolist() == [[X, X, X, 9], [X, X, X, X]]
    instruction = DataCollatorForCompletionOnlyLM(R, INSTRUCTION, tokenizer=tokenizer)
    with pytest.warns(UserWarning, match=r"Row 0 of the batch: the instruction template \[40, 41\]"):
        batch = instruction(rows([5, *R, 9]))
    assert batch["labels"].tolist() == [[X, X, X, X]]


def test_positional_tokenizer_custom_ignore_index_and_bad_templates(tokenizer):
    collator = DataCollatorForCompletionOnlyLM(R, None, tokenizer, ignore_index=-1)
    assert collator.tokenizer is tokenizer and not collator.mlm
    assert collator(rows([5, *R, 9]))["labels"].tolist() == [[-1, -1, -1, 9]]
    with pytest.raises(ValueError, match="response_template"):
        DataCollatorForCompletionOnlyLM("", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="instruction_template"):
        DataCollatorForCompletionOnlyLM(R, [None], tokenizer=tokenizer)


def test_pad_equal_to_eos_warns_for_multi_turn(tokenizer):
    tokenizer.pad_token = tokenizer.eos_token
    with pytest.warns(UserWarning, match="pads with its EOS"):
        DataCollatorForCompletionOnlyLM(R, INSTRUCTION, tokenizer=tokenizer)


def test_labels_to_loss_mask(tokenizer):
    pad = tokenizer.pad_token_id

    def collator(_examples):
        return {"input_ids": torch.tensor([[pad, 5, 6, 7], [8, 9, 10, pad]]),
                "attention_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]]),
                "labels": torch.tensor([[X, 5, 6, 7], [X, 9, 10, X]])}

    wrapped = LabelsToLossMask(collator, pad)
    # Left padding: the first real token (5) has nothing before it, so it is not a target either.
    assert wrapped([])["loss_mask"].tolist() == [[False, False, True, True], [False, True, True, False]]

    def wrong(_examples):
        return {"input_ids": torch.tensor([[5, 6]]), "labels": torch.tensor([[5, 7]])}

    with pytest.raises(ValueError, match=r"labels\[0, 1\] = 7"):
        LabelsToLossMask(wrong, pad)([])
    # Rows of a torch dataset with labels (e.g. a ConstantLengthDataset's) reach tether's own collator.
    rows_with_labels = [{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([X, X, 7])},
                        {"input_ids": [8, 9], "labels": [8, 9]}, {"input_ids": [10, 11]}]
    assert LanguageModelingCollator(pad)(rows_with_labels)["loss_mask"].tolist() == [
        [False, False, True], [False, True, False], [False, True, False]]


def test_sft_trainer_with_the_collator_trains_on_answers_only(tmp_path, tiny_decoder_dir, tokenizer):
    """The docs' example: a batched formatting_func and the collator; the batches the loss reads count the
    answer tokens (and EOS) only, and training lowers the loss."""
    from tether import SFTConfig, SFTTrainer

    ds = Dataset.from_dict({"instruction": ["two plus two", "the capital of france"] * 8,
                            "output": ["four", "paris"] * 8})

    def formatting_prompts_func(example):
        return [f"question: {q}\n answer: {a}" for q, a in zip(example["instruction"], example["output"])]

    response_ids = tokenizer.encode("\n answer:", add_special_tokens=False)[1:]
    collator = DataCollatorForCompletionOnlyLM(response_ids, tokenizer=tokenizer)
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=12, learning_rate=3e-3,
                     logging_steps=4, report_to="none", save_strategy="no", disable_tqdm=True)
    trainer = SFTTrainer(tiny_decoder_dir, args=args, train_dataset=ds, formatting_func=formatting_prompts_func,
                         data_collator=collator, processing_class=tokenizer)
    assert set(trainer.train_dataset.column_names) == {"input_ids", "attention_mask"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every row has its template
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    for row, answer in zip(range(2), ["four", "paris"]):
        counted = batch["input_ids"][row][batch["loss_mask"][row]]
        assert tokenizer.decode(counted) == f" {answer}{tokenizer.eos_token}"
    trainer.train()
    history = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert history[-1] < history[0]
    with pytest.raises(ValueError, match="packing"):
        SFTTrainer(tiny_decoder_dir, args=args, train_dataset=ds, formatting_func=formatting_prompts_func,
                   data_collator=collator, processing_class=tokenizer, packing=True)
