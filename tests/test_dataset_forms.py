"""TRL 1.x's other dataset forms: pre-tokenized rows (SFT `input_ids` with its masks, reward `chosen_ids` /
`rejected_ids`, DPO-style `prompt_ids`, KTO `prompt_ids`/`completion_ids`), ShareGPT `conversations`, and TRL's
public collators, with `pad_to_multiple_of` on the preference collators. Each pre-tokenized form gives the batch
its raw form gives, and trains."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from tether import (
    DatasetError,
    DPOConfig,
    DPOTrainer,
    KTOConfig,
    RewardConfig,
    RewardTrainer,
    SFTConfig,
    SFTTrainer,
)
from tether.data import LanguageModelingCollator
from tether.data.formats import sharegpt_to_messages
from tether.data.preference import PreferenceCollator, UnpairedCollator, prepare_preference, prepare_unpaired
from tether.data.prepare import prepare_language_modeling

TEXTS = ["two plus two is four.", "hello world", "the capital of france is paris."]
PC = [("two plus two is", " four."), ("the capital of france is", " paris."), ("hello", " world")]


def ids_of(tokenizer, text: str, special: bool = True) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def with_eos(tokenizer, ids: list[int]) -> list[int]:
    return ids if ids and ids[-1] == tokenizer.eos_token_id else [*ids, tokenizer.eos_token_id]


def batch_of(rows) -> dict[str, torch.Tensor]:
    return LanguageModelingCollator(0)([dict(r) for r in rows])


def assert_same_batch(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def config(tmp_path, config_class=SFTConfig, **overrides):
    values = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, logging_steps=1,
                  report_to="none", save_strategy="no", disable_tqdm=True, learning_rate=1e-3, max_length=64)
    return config_class(**{**values, **overrides})


# ----- SFT: pre-tokenized rows ------------------------------------------------------------------------------
def test_pretokenized_text_rows_give_the_raw_batch(tokenizer):
    raw = prepare_language_modeling(Dataset.from_dict({"text": TEXTS}), tokenizer)
    # A text's tokens + EOS: what tokenizing the text gives; every token but the first counts.
    pre = Dataset.from_dict({"input_ids": [with_eos(tokenizer, ids_of(tokenizer, t)) for t in TEXTS]})
    prepared = prepare_language_modeling(pre, tokenizer)
    assert prepared[0]["loss_mask"] == [False] + [True] * (len(prepared[0]["input_ids"]) - 1)
    assert_same_batch(batch_of(prepared), batch_of(raw))


def test_pretokenized_completion_mask_applies_with_completion_only_loss(tokenizer):
    rows = []
    for prompt, completion in PC:
        p, c = ids_of(tokenizer, prompt), with_eos(tokenizer, ids_of(tokenizer, completion, False))
        rows.append({"input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c), "attention_mask": [1] * (
            len(p) + len(c))})
    raw = prepare_language_modeling(Dataset.from_list([{"prompt": p, "completion": c} for p, c in PC]), tokenizer)
    pre = prepare_language_modeling(Dataset.from_list(rows), tokenizer, completion_only_loss=True)
    assert_same_batch(batch_of(pre), batch_of(raw))
    # TRL's default (completion_only_loss=None) reads a completion_mask only on prompt-completion rows: here every
    # token after the first counts.
    default = prepare_language_modeling(Dataset.from_list(rows), tokenizer)
    assert all(mask == [False] + [True] * (len(mask) - 1) for mask in default["loss_mask"])


def test_pretokenized_assistant_masks_labels_and_attention(tokenizer):
    rows = [{"input_ids": [5, 6, 7, 8, 9], "assistant_masks": [0, 0, 1, 1, 0]}]
    # assistant_masks always apply (TRL), with or without assistant_only_loss
    for option in (False, True):
        out = prepare_language_modeling(Dataset.from_list(rows), tokenizer, assistant_only_loss=option)[0]
        assert out == {"input_ids": [5, 6, 7, 8, 9], "loss_mask": [False, False, True, True, False]}
    labels = [{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, -100, 8], "completion_mask": [0, 0, 0, 0]}]
    out = prepare_language_modeling(Dataset.from_list(labels), tokenizer, completion_only_loss=True)[0]
    assert out["loss_mask"] == [False, True, False, True]  # labels decide alone
    padded = [{"input_ids": [5, 6, 7, 0], "attention_mask": [1, 1, 1, 0]}]
    assert prepare_language_modeling(Dataset.from_list(padded), tokenizer)[0]["loss_mask"] == [False, True, True,
                                                                                             False]
    long = [{"input_ids": list(range(5, 25))}]
    assert len(prepare_language_modeling(Dataset.from_list(long), tokenizer, max_length=8)[0]["input_ids"]) == 8


@pytest.mark.parametrize("rows, options, match", [
    ([{"input_ids": [5, 6, 7]}], dict(assistant_only_loss=True), "assistant_masks"),
    ([{"input_ids": [5, 6, 7]}], dict(completion_only_loss=True), "completion_mask"),
    ([{"input_ids": [5, 6, 7], "labels": [-100, 6, 9]}], {}, r"labels\[2\] = 9"),
    ([{"input_ids": [5, 6, 7], "completion_mask": [0, 1]}], dict(completion_only_loss=True), "align"),
])
def test_pretokenized_rows_errors(tokenizer, rows, options, match):
    with pytest.raises(DatasetError, match=match):
        prepare_language_modeling(Dataset.from_list(rows), tokenizer, **options)


def test_sft_trains_on_pretokenized_rows(tmp_path, tiny_decoder_dir, tokenizer):
    rows = [{"input_ids": with_eos(tokenizer, ids_of(tokenizer, t))} for t in TEXTS * 2]
    trainer = SFTTrainer(tiny_decoder_dir, args=config(tmp_path, packing=True), train_dataset=Dataset.from_list(rows))
    assert set(trainer.train_dataset.column_names) == {"input_ids", "loss_mask", "position_ids"}
    trainer.train()
    assert trainer.state.global_step == 2


# ----- ShareGPT conversations ---------------------------------------------------------------------------------
def test_sharegpt_conversations_are_messages(tokenizer):
    turns = [("user", "two plus two?"), ("assistant", "four.")]
    sharegpt = Dataset.from_list([{"conversations": [{"from": r, "value": c} for r, c in turns]}] * 2)
    messages = Dataset.from_list([{"messages": [{"role": r, "content": c} for r, c in turns]}] * 2)
    for assistant_only in (False, True):
        a = prepare_language_modeling(sharegpt, tokenizer, assistant_only_loss=assistant_only)
        b = prepare_language_modeling(messages, tokenizer, assistant_only_loss=assistant_only)
        assert_same_batch(batch_of(a), batch_of(b))
    # Keys renamed as TRL's maybe_convert_to_chatml renames them; ShareGPT's speaker names become chat roles (TRL
    # keeps "human"/"gpt", which chat templates render as unknown roles), other role names are kept.
    row = {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"},
                             {"from": "gpt", "value": "yo"}], "id": 3}
    assert sharegpt_to_messages(row) == {"messages": [{"role": "system", "content": "be brief"},
                                                      {"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "yo"}], "id": 3}


def test_sft_trains_on_a_sharegpt_stream(tmp_path, tiny_decoder_dir):
    turns = [{"from": "user", "value": "two plus two?"}, {"from": "assistant", "value": "four."}]
    data = Dataset.from_list([{"conversations": turns}] * 4).to_iterable_dataset()
    trainer = SFTTrainer(tiny_decoder_dir, args=config(tmp_path, assistant_only_loss=True), train_dataset=data)
    trainer.train()
    assert trainer.state.global_step == 2


# ----- preference pairs: pre-tokenized ------------------------------------------------------------------------
def pair_rows(tokenizer):
    pairs = [("two plus two is", " four.", " five."), ("hello", " world", " there friend")]
    raw = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs]
    # The raw form's tokens: the prompt as the tokenizer encodes it, each completion without special tokens + EOS.
    split = [{"prompt_ids": ids_of(tokenizer, p), "chosen_ids": with_eos(tokenizer, ids_of(tokenizer, c, False)),
              "rejected_ids": with_eos(tokenizer, ids_of(tokenizer, r, False))} for p, c, r in pairs]
    whole = [{"chosen_ids": s["prompt_ids"] + s["chosen_ids"], "rejected_ids": s["prompt_ids"] + s["rejected_ids"],
              "margin": 0.5} for s in split]
    return Dataset.from_list(raw), Dataset.from_list(split), Dataset.from_list(whole)


def test_pretokenized_pairs_give_the_raw_batch(tokenizer):
    raw, split, whole = pair_rows(tokenizer)
    collate = PreferenceCollator(0)
    expected = collate(list(prepare_preference(raw, tokenizer)))
    assert_same_batch(collate(list(prepare_preference(split, tokenizer))), expected)
    # Whole sequences (TRL's reward rows): the same tokens; with no prompt, everything after the first token counts.
    got = collate(list(prepare_preference(whole, tokenizer)))
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(got[key], expected[key])
    assert torch.equal(got["loss_mask"], got["attention_mask"].bool() & (torch.arange(got["input_ids"].shape[1]) > 0))
    assert got["margin"].tolist() == [0.5, 0.5]
    legacy = whole.rename_columns({"chosen_ids": "chosen_input_ids", "rejected_ids": "rejected_input_ids"})
    with pytest.warns(FutureWarning, match="chosen_ids"):
        assert_same_batch(collate(list(prepare_preference(legacy, tokenizer))), got)


def test_pretokenized_unpaired_rows(tokenizer):
    raw = Dataset.from_list([{"prompt": "two plus two is", "completion": " four.", "label": True}])
    p, c = ids_of(tokenizer, "two plus two is"), with_eos(tokenizer, ids_of(tokenizer, " four.", False))
    pre = Dataset.from_list([{"prompt_ids": p, "completion_ids": c, "label": True}])
    assert list(prepare_unpaired(pre, tokenizer)) == list(prepare_unpaired(raw, tokenizer))


def test_reward_and_dpo_train_on_pretokenized_pairs(tmp_path, tiny_decoder_dir, tokenizer):
    from transformers import AutoModelForSequenceClassification

    _, split, whole = pair_rows(tokenizer)
    reward_model = AutoModelForSequenceClassification.from_pretrained(tiny_decoder_dir, num_labels=1)
    reward_model.config.pad_token_id = tokenizer.pad_token_id
    trainer = RewardTrainer(reward_model, args=config(tmp_path / "r", RewardConfig), processing_class=tokenizer,
                            train_dataset=whole)
    trainer.train()
    trainer = DPOTrainer(tiny_decoder_dir, args=config(tmp_path / "d", DPOConfig), train_dataset=split)
    trainer.train()
    assert trainer.state.global_step == 2


# ----- pad_to_multiple_of on the preference collators ---------------------------------------------------------
def test_preference_collators_pad_to_a_multiple(tokenizer):
    raw, _, _ = pair_rows(tokenizer)
    rows = list(prepare_preference(raw, tokenizer))
    plain = PreferenceCollator(0)(rows)
    width = plain["input_ids"].shape[1]
    for multiple in (None, "auto"):
        assert_same_batch(PreferenceCollator(0, pad_to_multiple_of=multiple)(rows), plain)
    padded = PreferenceCollator(0, pad_to_multiple_of=16)(rows)
    assert padded["input_ids"].shape[1] == -(-width // 16) * 16
    assert torch.equal(padded["input_ids"][:, :width], plain["input_ids"])
    assert not padded["attention_mask"][:, width:].any() and not padded["loss_mask"][:, width:].any()
    unpaired = [{"prompt_ids": [1, 2], "completion_ids": [3], "label": True}, {"prompt_ids": [4], "completion_ids": [5],
                                                                                 "label": False}]
    assert UnpairedCollator(0)(unpaired)["input_ids"].shape[1] == 3
    assert UnpairedCollator(0, pad_to_multiple_of=8)(unpaired)["input_ids"].shape[1] == 8
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        PreferenceCollator(0, pad_to_multiple_of=0)


# ----- TRL 1.x's public collators ----------------------------------------------------------------------------
def test_language_modeling_collator_as_trl_documents_it():
    from tether.trainer.sft_trainer import DataCollatorForLanguageModeling

    examples = [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}]
    out = DataCollatorForLanguageModeling(pad_token_id=0)(examples)
    assert out.keys() == {"input_ids", "attention_mask", "labels"}
    assert out["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert out["labels"].tolist() == [[1, 2, 3], [4, 5, -100]]
    labelled = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]}]
    assert DataCollatorForLanguageModeling(0)(labelled)["labels"].tolist() == [[-100, 2, 3], [-100, 5, -100]]
    free = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(labelled)
    assert free["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert free["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert free["labels"].tolist() == [[-100, 2, 3, -100, 5]]
    assert free["cu_seq_lens_q"].tolist() == [0, 3, 5] and free["cu_seq_lens_q"].dtype == torch.int32
    assert free["max_length_k"] == 3 and free["seq_idx"].tolist() == [[0, 0, 0, 1, 1]]
    multiple = DataCollatorForLanguageModeling(0, pad_to_multiple_of=4, return_position_ids=True)(examples)
    assert multiple["input_ids"].shape == (2, 4) and multiple["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 0]]


def test_language_modeling_collator_keeps_trl_0x_calls(tokenizer):
    import transformers

    from tether.trainer.sft_trainer import DataCollatorForLanguageModeling

    old = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    assert type(old) is transformers.DataCollatorForLanguageModeling
    assert type(DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False)) is type(old)


def test_preference_collators_as_trl_documents_them():
    from tether.trainer.dpo_trainer import DataCollatorForPreference
    from tether.trainer.reward_trainer import DataCollatorForPreference as RewardCollator

    examples = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
                {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]}]
    out = DataCollatorForPreference(pad_token_id=0)(examples)
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 0, 0], [1, 2, 3, 6, 0], [7, 8, 10, 11, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    assert out["completion_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 0]]
    cut = DataCollatorForPreference(pad_token_id=0, max_length=2, truncation_mode="keep_end")(examples)
    assert cut["input_ids"].tolist() == [[4, 5], [8, 9], [3, 6], [10, 11]]
    pairs = [{"chosen_ids": [1, 2, 3], "rejected_ids": [4, 5], "margin": 0.5},
             {"chosen_ids": [6, 7], "rejected_ids": [8], "margin": 0.0}]
    reward = RewardCollator(pad_token_id=0)(pairs)
    assert reward["input_ids"].tolist() == [[1, 2, 3], [6, 7, 0], [4, 5, 0], [8, 0, 0]]
    assert reward["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 0, 0]]
    assert reward["margin"].tolist() == [0.5, 0.0]


def test_trainers_train_with_trl_collators(tmp_path, tiny_decoder_dir, tokenizer):
    from tether.trainer.dpo_trainer import DataCollatorForPreference
    from tether.trainer.sft_trainer import DataCollatorForLanguageModeling

    data = Dataset.from_list([{"prompt": p, "completion": c} for p, c in PC] * 2)
    trainer = SFTTrainer(tiny_decoder_dir, args=config(tmp_path / "s"), train_dataset=data,
                         data_collator=DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id))
    rows = [trainer.train_dataset[i] for i in range(2)]
    batch = trainer.data_collator(rows)
    # completion-only data: the loss mask is the default collator's, and labels are -100 outside it
    assert torch.equal(batch["loss_mask"], LanguageModelingCollator(tokenizer.pad_token_id)(rows)["loss_mask"])
    assert torch.equal(batch["labels"] != -100, batch["loss_mask"])
    trainer.train()
    raw, _, _ = pair_rows(tokenizer)
    trainer = DPOTrainer(tiny_decoder_dir, args=config(tmp_path / "d", DPOConfig), train_dataset=raw,
                         data_collator=DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id))
    rows = [trainer.train_dataset[i] for i in range(2)]
    assert torch.equal(trainer.data_collator(rows)["loss_mask"], PreferenceCollator(tokenizer.pad_token_id)(rows)[
        "loss_mask"])
    trainer.train()
    assert trainer.state.global_step == 2


def test_kto_config_accepts_pretokenized_rows_in_a_trainer(tmp_path, tiny_decoder_dir, tokenizer):
    from tether import KTOTrainer

    p = ids_of(tokenizer, "two plus two is")
    rows = [{"prompt_ids": p, "completion_ids": with_eos(tokenizer, ids_of(tokenizer, c, False)), "label": c == " four."}
            for c in (" four.", " five.")] * 2
    trainer = KTOTrainer(tiny_decoder_dir, args=config(tmp_path, KTOConfig), train_dataset=Dataset.from_list(rows))
    trainer.train()
    assert trainer.state.global_step == 2


def test_pretokenized_rows_follow_truncation_mode_and_packing_strategy():
    rows = Dataset.from_list([{"input_ids": list(range(10, 20))}, {"input_ids": [30, 31, 32]}])
    kept = prepare_language_modeling(rows, None, max_length=4, truncation_mode="keep_end")
    assert kept[0]["input_ids"] == [16, 17, 18, 19] and kept[0]["loss_mask"] == [False, True, True, True]
    # bfd_split keeps every token of a long row (in pieces); plain bfd cuts it to max_length.
    split = prepare_language_modeling(rows, None, max_length=4, packing=True, packing_strategy="bfd_split")
    assert sorted(t for row in split["input_ids"] for t in row) == [*range(10, 20), 30, 31, 32]
    cut = prepare_language_modeling(rows, None, max_length=4, packing=True, packing_strategy="bfd")
    assert sorted(t for row in cut["input_ids"] for t in row) == [10, 11, 12, 13, 30, 31, 32]
