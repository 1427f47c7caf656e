"""Issue 13 item 4: every row of a dataset is checked in the map that tokenizes it, for every trainer's data path,
and a bad value stops the trainer's constructor (before any training step, with nothing written to output_dir)
with a DatasetError naming the split, the row, the column, what is wrong and the fix. Streams are checked as
their rows are read. Pairs that train on nothing useful (chosen == rejected, an empty side) and a tokenizer
without an EOS token are warnings."""

from __future__ import annotations

import os
import re
import warnings

import pytest
from datasets import Dataset, IterableDataset

from tether import (
    DatasetError,
    DPOConfig,
    DPOTrainer,
    GRPOConfig,
    GRPOTrainer,
    KTOConfig,
    KTOTrainer,
    ORPOConfig,
    ORPOTrainer,
    RewardConfig,
    RewardTrainer,
    RLOOConfig,
    RLOOTrainer,
    SFTConfig,
    SFTTrainer,
)
from tether.data.constant_length import ConstantLengthDataset
from tether.data.prepare import prepare_language_modeling, prepare_prompts
from tether.data.validate import KNOWN_ROLES, chat_roles


def args(config_class, tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=1, report_to="none",
                  save_strategy="no", disable_tqdm=True, learning_rate=1e-3, seed=0)
    if config_class in (GRPOConfig, RLOOConfig):
        values.update(num_generations=2, max_completion_length=4)
    return config_class(**{**values, **overrides})


def refused(make, tmp_path) -> str:
    """The message of the DatasetError `make()` raises; nothing may have been written to output_dir (Trainer's
    constructor creates it, empty)."""
    with pytest.raises(DatasetError) as info:
        make()
    out = tmp_path / "out"
    assert not out.exists() or os.listdir(out) == []
    return str(info.value)


def conv(*turns):
    return [{"role": r, "content": c} for r, c in zip(turns[::2], turns[1::2], strict=True)]


def texts(n: int, bad_row: int, bad_value=None) -> Dataset:
    rows = [f"the film number {i} was good." for i in range(n)]
    rows[bad_row] = bad_value
    return Dataset.from_dict({"text": rows})


# ----- SFT ------------------------------------------------------------------------------------------------------
def test_sft_checks_every_row_not_only_the_first_thousand(tmp_path, tiny_decoder_dir, tokenizer):
    data = texts(1300, 1200)
    msg = refused(lambda: SFTTrainer(model=tiny_decoder_dir, args=args(SFTConfig, tmp_path), train_dataset=data,
                                     processing_class=tokenizer), tmp_path)
    assert msg.startswith("Row 1200 of the train dataset, column 'text': the value is missing (None). Fix: ")
    assert "dataset.filter(lambda row: row['text'] is not None)" in msg


def test_row_index_is_global_with_several_processes(tmp_path, tiny_decoder_dir, tokenizer):
    data = texts(1300, 1200)
    msg = refused(lambda: SFTTrainer(model=tiny_decoder_dir, args=args(SFTConfig, tmp_path, dataset_num_proc=2),
                                     train_dataset=data, processing_class=tokenizer), tmp_path)
    assert msg.startswith("Row 1200 of the train dataset, column 'text'")


def test_row_index_is_the_users_when_sft_shuffles(tmp_path, tiny_decoder_dir, tokenizer):
    data = texts(300, 200)
    msg = refused(lambda: SFTTrainer(model=tiny_decoder_dir, args=args(SFTConfig, tmp_path, shuffle_dataset=True),
                                     train_dataset=data, processing_class=tokenizer), tmp_path)
    assert msg.startswith("Row 200 of the train dataset, column 'text': the value is missing")


def test_eval_dataset_rows_are_named_as_eval(tmp_path, tiny_decoder_dir, tokenizer):
    good, bad = texts(4, 0, "fine"), texts(20, 13)
    msg = refused(lambda: SFTTrainer(model=tiny_decoder_dir, args=args(SFTConfig, tmp_path), train_dataset=good,
                                     eval_dataset={"held": bad}, processing_class=tokenizer), tmp_path)
    assert msg.startswith("Row 13 of the eval held dataset, column 'text'")


@pytest.mark.parametrize("rows, bad, expected", [
    # prompt-completion, a missing completion
    ({"prompt": ["q"] * 6, "completion": ["a", "b", "c", None, "e", "f"]}, None,
     "Row 3 of the train dataset, column 'completion': the value is missing (None)"),
    # messages: content None (else a Jinja TypeError inside the template)
    ({"messages": [conv("user", "hi", "assistant", "yo")] * 5 + [conv("user", "hi", "assistant", None)]}, None,
     "Row 5 of the train dataset, column 'messages': message 1 (assistant) has content None"),
    # messages: roles no chat template knows, with the likely meaning suggested
    ({"messages": [conv("user", "hi", "assistant", "yo")] * 9 + [conv("usr", "hi", "assistant", "yo")]}, None,
     "Row 9 of the train dataset, column 'messages': message 0 has role 'usr', which is not a chat role"),
    ({"messages": [conv("user", "hi", "assistant", "yo")] * 9 + [conv("user", "hi", "bot", "yo")]}, None,
     "Row 9 of the train dataset, column 'messages': message 1 has role 'bot', which is not a chat role"),
    # messages: an empty conversation
    ({"messages": [conv("user", "hi", "assistant", "yo")] * 9 + [[]]}, None,
     "Row 9 of the train dataset, column 'messages': it is an empty list of messages"),
    # pre-tokenized rows: a missing input_ids, labels missing in one row of a dataset that has them
    ({"input_ids": [[5, 6, 7]] * 3 + [None]}, None,
     "Row 3 of the train dataset, column 'input_ids': the value is missing (None)"),
    ({"input_ids": [[5, 6, 7]] * 4, "labels": [[-100, 6, 7]] * 3 + [None]}, None,
     "Row 3 of the train dataset, column 'labels': the value is missing (None)"),
], ids=["completion-None", "content-None", "role-usr", "role-bot", "no-messages", "input_ids-None", "labels-None"])
def test_sft_row_forms(tmp_path, tiny_decoder_dir, tokenizer, rows, bad, expected):
    data = Dataset.from_dict(rows)
    msg = refused(lambda: SFTTrainer(model=tiny_decoder_dir, args=args(SFTConfig, tmp_path), train_dataset=data,
                                     processing_class=tokenizer), tmp_path)
    assert msg.startswith(expected) and "Fix: " in msg
    if "'usr'" in expected:
        assert "('usr' -> 'user'?)" in msg
    if "'bot'" in expected:
        assert "('bot' -> 'assistant'?)" in msg


def test_sharegpt_rows_are_named_as_the_user_wrote_them(tokenizer):
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    good = Dataset.from_list([{"conversations": turns}] * 6)
    assert len(prepare_language_modeling(good, tokenizer)) == 6  # human/gpt are ShareGPT's user/assistant
    bad = Dataset.from_list([{"conversations": turns}] * 5 + [{"conversations": [{"from": "usr", "value": "hi"}]}])
    with pytest.raises(DatasetError) as info:
        prepare_language_modeling(bad, tokenizer)
    assert str(info.value).startswith("Row 5 of the train dataset, column 'conversations': message 0 has from 'usr'")


def test_roles_the_chat_template_names_are_accepted(tokenizer):
    assert set(KNOWN_ROLES) <= chat_roles(tokenizer)
    data = Dataset.from_dict({"messages": [conv("user", "hi", "observation", "42", "assistant", "yo")] * 2})
    with pytest.raises(DatasetError, match="role 'observation', which is not a chat role"):
        prepare_language_modeling(data, tokenizer)
    # A template that handles "observation" (GLM-4 style) names it: accepted.
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'observation' %}{{ '<|user|>\n' }}"
                               "{% else %}{{ '<|' + m['role'] + '|>\n' }}{% endif %}{{ m['content'] + '<|end|>\n' }}"
                               "{% endfor %}")
    assert "observation" in chat_roles(tokenizer)
    assert len(prepare_language_modeling(data, tokenizer)) == 2


def test_sft_seq2seq_rows(tmp_path, tiny_seq2seq_dir):
    data = Dataset.from_dict({"prompt": ["q"] * 12, "completion": ["a"] * 11 + [None]})
    msg = refused(lambda: SFTTrainer(model=tiny_seq2seq_dir, args=args(SFTConfig, tmp_path), train_dataset=data),
                  tmp_path)
    assert msg.startswith("Row 11 of the train dataset, column 'completion': the value is missing")


def test_formatting_func_result_names_the_row(tokenizer):
    data = Dataset.from_dict({"q": ["a", "b", None, "d"]})
    with pytest.raises(DatasetError) as info:
        prepare_language_modeling(data, tokenizer, formatting_func=lambda ex: ex["q"], what="eval")
    assert "formatting_func returned NoneType for row 2 of the eval dataset; it must return a string" in str(info.value)


# ----- streams: checked as each row is read, the index being the stream position --------------------------------
def stream_of(rows: list[dict]) -> IterableDataset:
    return Dataset.from_list(rows).to_iterable_dataset()


def test_stream_rows_are_checked_when_read(tmp_path, tiny_decoder_dir, tokenizer):
    rows = [{"text": f"film {i} was good."} for i in range(30)]
    rows[20] = {"text": None}
    trainer = SFTTrainer(model=tiny_decoder_dir, args=args(SFTConfig, tmp_path), train_dataset=stream_of(rows),
                         processing_class=tokenizer)  # row 20 is past the first rows read ahead
    with pytest.raises(DatasetError, match=re.escape("Row 20 (stream position) of the train dataset, column 'text'")):
        list(trainer.train_dataset)
    # A bad row among the first ones fails in the constructor.
    rows[3] = {"text": None}
    msg = refused(lambda: SFTTrainer(model=tiny_decoder_dir, args=args(SFTConfig, tmp_path),
                                     train_dataset=stream_of(rows), processing_class=tokenizer), tmp_path)
    assert msg.startswith("Row 3 (stream position) of the train dataset, column 'text'")


def test_wrong_types_in_a_generated_stream(tokenizer):
    # Arrow gives a Dataset's column one type; a generator's stream can mix them.
    def rows(bad_row):
        yield from ({"prompt": "q", "completion": 3 if i == bad_row else "a"} for i in range(12))

    prepared = prepare_language_modeling(IterableDataset.from_generator(rows, gen_kwargs={"bad_row": 10}), tokenizer)
    with pytest.raises(DatasetError, match=re.escape("Row 10 (stream position) of the train dataset, column "
                                                     "'completion': it holds int 3, but this dataset's")):
        list(prepared)
    # Among the rows read ahead to detect the format, the mix is named before training.
    with pytest.raises(DatasetError, match=re.escape("column 'completion' (row by row: str, str, int, str")):
        prepare_language_modeling(IterableDataset.from_generator(rows, gen_kwargs={"bad_row": 2}), tokenizer)


def test_packed_text_stream_refuses_a_missing_text(tokenizer):
    # A None used to end the packed stream early, silently.
    rows = [{"text": f"film {i} was good."} for i in range(30)]
    rows[20] = {"text": None}
    packed = ConstantLengthDataset(tokenizer, stream_of(rows), dataset_text_field="text", seq_length=8,
                                   num_of_sequences=1, chars_per_token=1, what="train")
    with pytest.raises(DatasetError, match=re.escape("Row 20 (stream position) of the train dataset, column 'text'")):
        list(packed)


def test_streamed_prompts_are_checked_when_read(tokenizer):
    rows = [{"prompt": f"film {i}"} for i in range(20)]
    rows[12] = {"prompt": "  "}
    prepared = prepare_prompts(stream_of(rows), tokenizer)
    with pytest.raises(DatasetError, match=re.escape("Row 12 (stream position) of the train dataset, column "
                                                     "'prompt': the prompt is empty")):
        list(prepared)


# ----- reward, DPO/ORPO, KTO -------------------------------------------------------------------------------------
PAIRS = [{"prompt": f"film {i} was", "chosen": " good.", "rejected": " bad."} for i in range(6)]


@pytest.mark.parametrize("trainer_class, config_class", [(RewardTrainer, RewardConfig), (DPOTrainer, DPOConfig),
                                                         (ORPOTrainer, ORPOConfig)])
def test_preference_rows(tmp_path, tiny_decoder_dir, tokenizer, trainer_class, config_class):
    rows = [dict(r) for r in PAIRS]
    rows[4]["rejected"] = None
    msg = refused(lambda: trainer_class(model=tiny_decoder_dir, args=args(config_class, tmp_path),
                                        train_dataset=Dataset.from_list(rows), processing_class=tokenizer), tmp_path)
    assert msg.startswith("Row 4 of the train dataset, column 'rejected': the value is missing (None). Fix: ")


def test_implicit_prompt_pairs_and_margins(tokenizer):
    from tether.data.preference import prepare_preference

    implicit = [{"chosen": [*conv("user", "q", "assistant", "good")], "rejected": conv("user", "q", "assistant", "x")}
                for _ in range(3)]
    implicit[2]["rejected"][1]["role"] = "bot"
    with pytest.raises(DatasetError, match=re.escape("Row 2 of the eval dataset, column 'rejected': message 1 has "
                                                     "role 'bot'")):
        prepare_preference(Dataset.from_list(implicit), tokenizer, what="eval")
    margins = [{**r, "margin": m} for r, m in zip(PAIRS, [1.0, 0.5, float("nan"), 1.0, 1.0, 1.0])]
    with pytest.raises(DatasetError, match=re.escape("Row 2 of the train dataset, column 'margin': it holds nan")):
        prepare_preference(Dataset.from_list(margins), tokenizer)


def test_pairs_that_train_on_nothing_are_counted_in_one_warning(tmp_path, tiny_decoder_dir, tokenizer):
    rows = [dict(r) for r in PAIRS]
    rows[1]["rejected"] = rows[1]["chosen"]
    rows[4]["rejected"] = rows[4]["chosen"]
    rows[5]["rejected"] = ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = DPOTrainer(model=tiny_decoder_dir, args=args(DPOConfig, tmp_path),
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    messages = [str(w.message) for w in caught if "preference pairs" in str(w.message)]
    assert len(messages) == 2
    assert messages[0].startswith("2 of 6 train preference pairs have chosen == rejected (rows 1, 4)")
    assert messages[1].startswith("1 of 6 train preference pairs have an empty rejected completion (row 5)")
    assert len(trainer.train_dataset) == 6  # kept, as TRL keeps them
    assert "_tether_pair_flags" not in trainer.train_dataset.column_names


def test_kto_counts_the_pairs_it_unpairs_into_contradictions(tokenizer):
    from tether.data.preference import prepare_unpaired

    rows = [dict(r) for r in PAIRS]
    rows[2]["rejected"] = rows[2]["chosen"]
    with pytest.warns(UserWarning, match=re.escape("1 of 6 train preference pairs have chosen == rejected (row 2)")):
        unpaired = prepare_unpaired(Dataset.from_list(rows), tokenizer)
    assert len(unpaired) == 12 and "_tether_pair_flags" not in unpaired.column_names


def test_row_index_is_global_for_pairs_with_several_processes(tokenizer):
    from tether.data.preference import prepare_preference

    rows = [dict(PAIRS[i % 6]) for i in range(400)]
    rows[345]["chosen"] = None
    with pytest.raises(DatasetError, match=re.escape("Row 345 of the train dataset, column 'chosen': the value is")):
        prepare_preference(Dataset.from_list(rows), tokenizer, num_proc=2)


def test_kto_rows(tmp_path, tiny_decoder_dir, tokenizer):
    unpaired = [{"prompt": f"film {i} was", "completion": " good.", "label": i % 2 == 0} for i in range(6)]
    unpaired[3]["label"] = None
    msg = refused(lambda: KTOTrainer(model=tiny_decoder_dir, args=args(KTOConfig, tmp_path),
                                     train_dataset=Dataset.from_list(unpaired), processing_class=tokenizer), tmp_path)
    assert msg.startswith("Row 3 of the train dataset, column 'label': it is None")
    # Paired data is unpaired for KTO: a bad pair is named by its row in the paired dataset.
    rows = [dict(r) for r in PAIRS]
    rows[5]["prompt"] = None
    msg = refused(lambda: KTOTrainer(model=tiny_decoder_dir, args=args(KTOConfig, tmp_path),
                                     train_dataset=Dataset.from_list(rows), processing_class=tokenizer), tmp_path)
    assert msg.startswith("Row 5 of the train dataset, column 'prompt': the value is missing (None)")


# ----- online methods --------------------------------------------------------------------------------------------
def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


@pytest.mark.parametrize("trainer_class, config_class", [(GRPOTrainer, GRPOConfig), (RLOOTrainer, RLOOConfig)])
def test_empty_prompt_is_refused_before_training(tmp_path, tiny_decoder_dir, tokenizer, trainer_class, config_class):
    prompts = [f"film {i}" for i in range(40)]
    prompts[29] = ""
    data = Dataset.from_dict({"prompt": prompts})
    msg = refused(lambda: trainer_class(model=tiny_decoder_dir, reward_funcs=length_reward,
                                        args=args(config_class, tmp_path), train_dataset=data,
                                        processing_class=tokenizer), tmp_path)
    assert msg.startswith("Row 29 of the train dataset, column 'prompt': the prompt is empty ('')")
    assert "Fix: " in msg


def test_conversational_prompt_with_content_none(tokenizer):
    data = Dataset.from_dict({"prompt": [conv("user", "hi")] * 3 + [conv("system", None, "user", "hi")]})
    with pytest.raises(DatasetError, match=re.escape("Row 3 of the train dataset, column 'prompt': message 0 (system) "
                                                     "has content None")):
        prepare_prompts(data, tokenizer)


# ----- a tokenizer without an EOS token ------------------------------------------------------------------------
def test_missing_eos_token_warns_where_one_is_appended(tokenizer):
    tokenizer.eos_token = None
    assert tokenizer.eos_token_id is None and tokenizer.pad_token_id is not None
    with pytest.warns(UserWarning, match="has no EOS token, so plain-text examples end without one") as caught:
        prepare_language_modeling(Dataset.from_dict({"text": ["a b", "c d"]}), tokenizer)
    assert "Fix: set tokenizer.eos_token" in str(caught[0].message)
    # A conversation ends where its chat template ends it: no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_language_modeling(Dataset.from_dict({"messages": [conv("user", "a", "assistant", "b")]}), tokenizer)


def test_iterative_sft_texts_warn_without_an_eos_token(tokenizer, tiny_decoder_dir, tmp_path):
    from transformers import TrainingArguments

    from tether import IterativeSFTTrainer

    tokenizer.eos_token = None
    trainer = IterativeSFTTrainer(tiny_decoder_dir, processing_class=tokenizer,
                                  args=TrainingArguments(output_dir=str(tmp_path), report_to="none"))
    with pytest.warns(UserWarning, match="has no EOS token, so the texts end without one"):
        trainer.step(texts=["the film was good", "a plot with holes"])
