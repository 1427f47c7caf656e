"""data/formats.py and the validation in data/prepare.py: every dataset type is detected, plain and
conversational, and every bad dataset is refused with a message that names the column or row and the fix."""

from __future__ import annotations

import pytest
from datasets import Dataset

from tether.data import DatasetError, DatasetType, detect_format, load_any_dataset, prepare_language_modeling
from tether.data.prepare import LANGUAGE_MODELING_TYPES, prepare_seq2seq


def conv(*turns):
    """conv("user", "hi", "assistant", "yo") -> [{"role": "user", "content": "hi"}, ...]"""
    return [{"role": r, "content": c} for r, c in zip(turns[::2], turns[1::2], strict=True)]


PLAIN = {
    "text": {"text": ["a b", "c d"]},
    "prompt-completion": {"prompt": ["q1", "q2"], "completion": ["a1", "a2"]},
    "prompt-only": {"prompt": ["q1", "q2"]},
    "preference": {"prompt": ["q", "q"], "chosen": ["good", "fine"], "rejected": ["bad", "poor"]},
    "implicit preference": {"chosen": ["q good", "q fine"], "rejected": ["q bad", "q poor"]},
    "unpaired": {"prompt": ["q", "q"], "completion": ["good", "bad"], "label": [True, False]},
}
CONVERSATIONAL = {
    "messages": {"messages": [conv("user", "hi", "assistant", "yo"), conv("user", "a", "assistant", "b")]},
    "prompt-completion": {"prompt": [conv("user", "q1"), conv("user", "q2")],
                          "completion": [conv("assistant", "a1"), conv("assistant", "a2")]},
    "prompt-only": {"prompt": [conv("user", "q1"), conv("system", "s", "user", "q2")]},
    "preference": {"prompt": [conv("user", "q")] * 2, "chosen": [conv("assistant", "good")] * 2,
                   "rejected": [conv("assistant", "bad")] * 2},
    "implicit preference": {"chosen": [conv("user", "q", "assistant", "good")] * 2,
                            "rejected": [conv("user", "q", "assistant", "bad")] * 2},
    "unpaired": {"prompt": [conv("user", "q")] * 2, "completion": [conv("assistant", "x")] * 2,
                 "label": [True, False]},
}
EXPECTED = {
    "text": (DatasetType.LANGUAGE_MODELING, ("text",), False),
    "messages": (DatasetType.LANGUAGE_MODELING, ("messages",), False),
    "prompt-completion": (DatasetType.PROMPT_COMPLETION, ("prompt", "completion"), False),
    "prompt-only": (DatasetType.PROMPT_ONLY, ("prompt",), False),
    "preference": (DatasetType.PREFERENCE, ("prompt", "chosen", "rejected"), False),
    "implicit preference": (DatasetType.PREFERENCE, ("chosen", "rejected"), True),
    "unpaired": (DatasetType.UNPAIRED_PREFERENCE, ("prompt", "completion"), False),
}


@pytest.mark.parametrize("name", list(PLAIN))
def test_detects_plain_types(name):
    fmt = detect_format(Dataset.from_dict(PLAIN[name]))
    kind, columns, implicit = EXPECTED[name]
    got = (fmt.type, fmt.text_columns, fmt.implicit_prompt, fmt.conversational)
    assert got == (kind, columns, implicit, False)


@pytest.mark.parametrize("name", list(CONVERSATIONAL))
def test_detects_conversational_types(name):
    fmt = detect_format(Dataset.from_dict(CONVERSATIONAL[name]))
    kind, columns, implicit = EXPECTED[name]
    got = (fmt.type, fmt.text_columns, fmt.implicit_prompt, fmt.conversational)
    assert got == (kind, columns, implicit, True)


def test_extra_columns_are_ignored_and_custom_text_field():
    fmt = detect_format(Dataset.from_dict({"id": [1, 2], "body": ["x", "y"], "source": ["a", "b"]}),
                        text_field="body")
    assert fmt.type is DatasetType.LANGUAGE_MODELING
    assert (fmt.text_columns, fmt.conversational) == (("body",), False)
    # The text field is tried first: a dataset with both `text` and `prompt` is language modeling.
    fmt = detect_format(Dataset.from_dict({"prompt": ["p"], "text": ["t"]}))
    assert fmt.type is DatasetType.LANGUAGE_MODELING
    # Labels given as 0/1 integers are accepted as booleans.
    fmt = detect_format(Dataset.from_dict({**PLAIN["unpaired"], "label": [1, 0]}))
    assert fmt.type is DatasetType.UNPAIRED_PREFERENCE


def test_expected_types_accept():
    ds = Dataset.from_dict(PLAIN["prompt-completion"])
    assert detect_format(ds, expected=LANGUAGE_MODELING_TYPES).type is DatasetType.PROMPT_COMPLETION


def test_detect_format_reads_and_checks_only_the_first_rows(tokenizer):
    # A bad value among the first rows is refused by detect_format itself ...
    with pytest.raises(DatasetError, match="Row 1 of the dataset, column 'text'"):
        detect_format(Dataset.from_dict({"text": ["ok", None, "ok"]}))
    # ... one further down is not read by it (no pass over the whole dataset), but by the map that tokenizes it.
    texts = ["ok"] * 1300
    texts[1200] = None
    data = Dataset.from_dict({"text": texts})
    assert detect_format(data).type is DatasetType.LANGUAGE_MODELING
    with pytest.raises(DatasetError, match="Row 1200 of the train dataset, column 'text'"):
        prepare_language_modeling(data, tokenizer)


# ------------------------------------------------------------------------------------- bad datasets


def _error(dataset, **kwargs) -> str:
    with pytest.raises(DatasetError) as info:
        detect_format(dataset, **kwargs)
    return str(info.value)


def test_empty_dataset():
    msg = _error(Dataset.from_dict({"text": []}))
    assert "empty (0 rows)" in msg and "Fix:" in msg


def test_not_a_dataset():
    msg = _error([{"text": "a"}])
    assert "datasets.Dataset" in msg and "list" in msg


def test_no_known_column():
    msg = _error(Dataset.from_dict({"body": ["a"]}), expected=LANGUAGE_MODELING_TYPES)
    assert "['body']" in msg and "'text'" in msg and "'messages'" in msg and "'prompt', 'completion'" in msg
    assert "rename_column" in msg and "text field" in msg


def test_missing_column_is_named():
    # Only a prompt, for a trainer that needs a completion too.
    msg = _error(Dataset.from_dict({"prompt": ["q"]}), expected=LANGUAGE_MODELING_TYPES)
    assert "prompt-only" in msg
    assert "prompt-completion, also needs column(s) 'completion'" in msg


@pytest.mark.parametrize("columns, wrong, right", [
    ({"promt": ["q"], "completion": ["a"]}, "promt", "prompt"),
    ({"prompt": ["q"], "completon": ["a"]}, "completon", "completion"),
    ({"mesages": [conv("user", "hi")]}, "mesages", "messages"),
])
def test_misspelt_column_suggests_the_name(columns, wrong, right):
    msg = _error(Dataset.from_dict(columns), expected=LANGUAGE_MODELING_TYPES)
    assert f"column {wrong!r} looks like a misspelling of {right!r}" in msg
    assert "rename_column" in msg


def test_misspelt_custom_text_field_is_suggested():
    msg = _error(Dataset.from_dict({"bodyy": ["a"]}), text_field="body", expected=LANGUAGE_MODELING_TYPES)
    assert "'bodyy' looks like a misspelling of 'body'" in msg


@pytest.mark.parametrize("data, row, column, problem", [
    ({"text": [7, 8]}, 0, "text", "it holds int 7, but this dataset's 'text' values are strings"),
    ({"text": ["fine", None]}, 1, "text", "the value is missing (None)"),
    ({"messages": [conv("user", "hi"), []]}, 1, "messages", "it is an empty list of messages"),
    ({"messages": [conv("user", "hi"), [{"from": "human", "value": "x"}]]}, 1, "messages", "message 0 has no 'role'"),
])
def test_wrong_value_names_row_and_column(data, row, column, problem):
    msg = _error(Dataset.from_dict(data))
    assert msg.startswith(f"Row {row} of the dataset, column {column!r}: {problem}")
    assert "Fix:" in msg


@pytest.mark.parametrize("completion", [[{"from": "human", "value": "x"}], []])
def test_message_lists_beside_plain_strings_are_refused(completion):
    msg = _error(Dataset.from_dict({"prompt": ["p"], "completion": [completion]}))
    assert "mix plain strings and message lists" in msg and "Fix:" in msg


def test_mixed_plain_and_conversational():
    msg = _error(Dataset.from_dict({"prompt": ["q"], "completion": [conv("assistant", "a")]}))
    assert "['prompt', 'completion'] mix plain strings and message lists" in msg and "Fix:" in msg


@pytest.mark.parametrize("labels", [["good", "bad"], [2, 0], [0.5, 1.0]])
def test_unpaired_labels_must_be_bool(labels):
    msg = _error(Dataset.from_dict({**PLAIN["unpaired"], "label": labels}))
    assert "booleans" in msg and "Fix: map the column to bool" in msg
    assert msg.startswith(f"Row {0 if labels[0] not in (0, 1) else 1} of the dataset, column 'label': it is ")


@pytest.mark.parametrize("name", ["prompt-completion", "preference", "unpaired"])
def test_prompt_only_trainers_take_any_dataset_with_a_prompt(name):
    for data, conversational in ((PLAIN[name], False), (CONVERSATIONAL[name], True)):
        fmt = detect_format(Dataset.from_dict(data), expected=[DatasetType.PROMPT_ONLY])
        assert (fmt.type, fmt.text_columns, fmt.conversational) == (DatasetType.PROMPT_ONLY, ("prompt",),
                                                                    conversational)
    with pytest.raises(DatasetError, match="It looks like a preference dataset"):  # no prompt column
        detect_format(Dataset.from_dict(PLAIN["implicit preference"]), expected=[DatasetType.PROMPT_ONLY])


@pytest.mark.parametrize("name", ["preference", "implicit preference", "unpaired", "prompt-only"])
def test_type_the_trainer_does_not_accept(name):
    msg = _error(Dataset.from_dict(PLAIN[name]), expected=LANGUAGE_MODELING_TYPES)
    kind = EXPECTED[name][0].value
    assert f"It looks like a {kind} dataset." in msg
    assert "Accepted formats and their columns: language modeling: 'text'" in msg


# ------------------------------------------------------------ validation in prepare_language_modeling


def test_prepare_rejects_when_every_prompt_fills_max_length(tokenizer):
    ds = Dataset.from_dict({"prompt": ["the capital of france is paris."] * 3, "completion": [" yes"] * 3})
    prompt_len = len(tokenizer("the capital of france is paris.")["input_ids"])
    with pytest.raises(DatasetError) as info:
        prepare_language_modeling(ds, tokenizer, max_length=prompt_len)
    msg = str(info.value)
    assert f"max_length={prompt_len}" in msg and "No example of the train dataset" in msg
    assert "raise max_length" in msg
    # One token more leaves one completion token to train on: accepted.
    out = prepare_language_modeling(ds, tokenizer, max_length=prompt_len + 1)
    assert [sum(m) for m in out["loss_mask"]] == [1, 1, 1]


def test_prepare_drops_only_the_untrainable_rows(tokenizer, caplog):
    long = "the capital of france is paris. " * 4
    ds = Dataset.from_dict({"prompt": [long, "hello", long], "completion": [" a", " world", " b"]})
    out = prepare_language_modeling(ds, tokenizer, max_length=8)
    assert len(out) == 1
    assert tokenizer.decode(out[0]["input_ids"]) == "hello world<eos>"
    assert "Dropped 2 of 3 train examples" in caplog.text


def test_prepare_empty_dataset_with_formatting_func(tokenizer):
    with pytest.raises(DatasetError, match="empty"):
        prepare_language_modeling(Dataset.from_dict({"q": []}), tokenizer, formatting_func=lambda ex: ex["q"])


@pytest.mark.parametrize("func, shown", [(lambda ex: 3, "int"), (lambda ex: None, "NoneType"),
                                         (lambda ex: [ex["q"], ex["q"]], "list")])
def test_formatting_func_returning_non_string(tokenizer, func, shown):
    with pytest.raises(DatasetError) as info:
        prepare_language_modeling(Dataset.from_dict({"q": ["a", "b"]}), tokenizer, formatting_func=func)
    msg = str(info.value)
    assert f"formatting_func returned {shown}" in msg and "must return a string" in msg


def test_formatting_func_batched_wrong_length(tokenizer):
    def batched_drops_one(batch):
        return [q for q in batch["q"]][:-1] if len(batch["q"]) > 1 else list(batch["q"])

    with pytest.raises(DatasetError, match="a list of 2 strings"):
        prepare_language_modeling(Dataset.from_dict({"q": ["a", "b"]}), tokenizer,
                                  formatting_func=batched_drops_one)


def test_assistant_only_loss_needs_conversational_data(tokenizer):
    for data in (PLAIN["text"], PLAIN["prompt-completion"]):
        with pytest.raises(DatasetError) as info:
            prepare_language_modeling(Dataset.from_dict(data), tokenizer, assistant_only_loss=True)
        assert "assistant_only_loss=True needs conversational data" in str(info.value)
        assert "Fix: set assistant_only_loss=False" in str(info.value)


@pytest.mark.parametrize("name", ["messages", "prompt-completion"])
def test_conversational_data_needs_a_chat_template(tokenizer, name):
    tokenizer.chat_template = None
    with pytest.raises(DatasetError) as info:
        prepare_language_modeling(Dataset.from_dict(CONVERSATIONAL[name]), tokenizer)
    assert "no chat template" in str(info.value) and "Fix: set tokenizer.chat_template" in str(info.value)


def test_packing_needs_max_length(tokenizer):
    with pytest.raises(DatasetError, match="packing=True needs max_length"):
        prepare_language_modeling(Dataset.from_dict(PLAIN["text"]), tokenizer, packing=True, max_length=None)


def test_prepare_rejects_preference_data(tokenizer):
    with pytest.raises(DatasetError, match="It looks like a preference dataset"):
        prepare_language_modeling(Dataset.from_dict(PLAIN["preference"]), tokenizer)


def test_prepare_seq2seq_labels_end_with_eos(tokenizer):
    ds = Dataset.from_dict({"prompt": ["two plus two is", "hello"], "completion": ["four.", "world"]})
    out = prepare_seq2seq(ds, tokenizer, max_length=64)
    eos = tokenizer.eos_token_id
    for row, prompt, completion in zip(out, ds["prompt"], ds["completion"], strict=True):
        assert row["input_ids"] == tokenizer(prompt)["input_ids"]
        assert row["labels"] == tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos]
    assert set(out.column_names) == {"input_ids", "labels"}


def test_load_any_dataset_from_files(tmp_path):
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n')
    ds = load_any_dataset(str(jsonl))
    assert ds["prompt"] == ["a", "c"] and detect_format(ds).type is DatasetType.PROMPT_COMPLETION
    Dataset.from_dict(PLAIN["text"]).save_to_disk(str(tmp_path / "saved"))
    assert load_any_dataset(str(tmp_path / "saved"))["text"] == PLAIN["text"]["text"]
    bad = tmp_path / "data.txt"
    bad.write_text("x")
    with pytest.raises(ValueError, match="supported files are"):
        load_any_dataset(str(bad))


def test_formatting_func_error_is_the_users_own(tokenizer):
    def broken(example):
        return example["missing"]

    with pytest.raises(KeyError, match="missing"):
        prepare_language_modeling(Dataset.from_dict({"q": ["a"]}), tokenizer, formatting_func=broken)
