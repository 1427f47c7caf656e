"""data/tokenize.py and data/prepare.py: token ids and loss masks, checked by hand.

The expected ids are built here by tokenizing the pieces separately (prompt, then completion, then
EOS); the expected masks are written out. For conversations, the spans marked True are decoded back
to text and compared with the assistant contents plus their end-of-turn markup `<|end|>\\n`.
"""

from __future__ import annotations

import pytest
from datasets import Dataset

from tether.data import prepare_language_modeling
from tether.data.formats import DatasetError
from tether.data.tokenize import (
    tokenize_conversation,
    tokenize_prompt,
    tokenize_prompt_completion,
    tokenize_text,
    truncate,
)


def conv(*turns):
    return [{"role": r, "content": c} for r, c in zip(turns[::2], turns[1::2], strict=True)]


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def spans(tokenizer, ids, mask, value=True):
    """Decoded text of each maximal run of tokens whose mask equals `value`."""
    runs, current = [], []
    for token, m in zip(ids, mask, strict=True):
        if bool(m) == value:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r) for r in runs]


PROMPT, COMPLETION = "two plus two is", " four."


def test_plain_prompt_completion_mask(tokenizer):
    p, c, eos = ids_of(tokenizer, PROMPT), ids_of(tokenizer, COMPLETION), tokenizer.eos_token_id
    assert len(p) >= 3 and len(c) >= 2  # the example is not degenerate
    out = tokenize_prompt_completion(tokenizer, PROMPT, COMPLETION)
    assert out["input_ids"] == p + c + [eos]
    assert out["loss_mask"] == [False] * len(p) + [True] * (len(c) + 1)
    assert out["prompt_length"] == len(p)
    assert tokenizer.decode(out["input_ids"]) == "two plus two is four.<eos>"

    out = tokenize_prompt_completion(tokenizer, PROMPT, COMPLETION, completion_only_loss=False)
    assert out["input_ids"] == p + c + [eos]
    assert out["loss_mask"] == [False] + [True] * (len(p) + len(c))


def test_prepare_prompt_completion_matches_hand_mask(tokenizer):
    ds = Dataset.from_dict({"prompt": [PROMPT, "hello"], "completion": [COMPLETION, " world"]})
    eos = tokenizer.eos_token_id
    for completion_only_loss in (None, True, False):
        out = prepare_language_modeling(ds, tokenizer, completion_only_loss=completion_only_loss)
        assert out.column_names == ["input_ids", "loss_mask"]
        for row, prompt, completion in zip(out, ds["prompt"], ds["completion"], strict=True):
            p, c = ids_of(tokenizer, prompt), ids_of(tokenizer, completion)
            assert row["input_ids"] == p + c + [eos]
            if completion_only_loss is False:
                prompt_mask = [False] + [True] * (len(p) - 1)
            else:
                prompt_mask = [False] * len(p)
            assert row["loss_mask"] == prompt_mask + [True] * (len(c) + 1)


def test_plain_text(tokenizer):
    out = tokenize_text(tokenizer, "hello world")
    assert out["input_ids"] == ids_of(tokenizer, "hello world") + [tokenizer.eos_token_id]
    assert out["loss_mask"] == [False] + [True] * (len(out["input_ids"]) - 1)
    # A text that already ends with EOS does not get a second one.
    assert tokenize_text(tokenizer, "hello world<eos>")["input_ids"] == out["input_ids"]


def test_truncation_cuts_ids_and_mask_together(tokenizer):
    full = tokenize_prompt_completion(tokenizer, PROMPT, COMPLETION)
    n = len(ids_of(tokenizer, PROMPT)) + 1
    cut = truncate(full, n)
    assert cut["input_ids"] == full["input_ids"][:n] and cut["loss_mask"] == full["loss_mask"][:n]
    assert cut["loss_mask"][-1] is True and sum(cut["loss_mask"]) == 1
    assert truncate(full, None) is full and truncate(full, 1000) is full
    assert cut["prompt_length"] == n - 1
    assert truncate(full, 2)["prompt_length"] == 2  # the prompt itself was cut: it is all that is left

    ds = Dataset.from_dict({"prompt": [PROMPT], "completion": [COMPLETION]})
    row = prepare_language_modeling(ds, tokenizer, max_length=n)[0]
    assert row == {"input_ids": cut["input_ids"], "loss_mask": cut["loss_mask"]}


CHAT = conv("system", "be brief", "user", "hello", "assistant", "hello world", "user", "two plus two",
            "assistant", "four.")


def test_conversation_assistant_only_loss(tokenizer):
    out = tokenize_conversation(tokenizer, CHAT, assistant_only_loss=True)
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert tokenizer.decode(out["input_ids"]) == rendered
    assert len(out["loss_mask"]) == len(out["input_ids"])
    # Exactly the assistant contents with their end-of-turn markup count ...
    assert spans(tokenizer, out["input_ids"], out["loss_mask"]) == ["hello world<|end|>\n", "four.<|end|>\n"]
    # ... and everything else (system, user turns, the assistant headers) does not.
    assert spans(tokenizer, out["input_ids"], out["loss_mask"], False) == [
        "<|system|>\nbe brief<|end|>\n<|user|>\nhello<|end|>\n<|assistant|>\n",
        "<|user|>\ntwo plus two<|end|>\n<|assistant|>\n",
    ]


def test_conversation_starting_with_assistant(tokenizer):
    # A first assistant turn has no prefix to render: its header must still be left out.
    chat = conv("assistant", "hello", "user", "hi", "assistant", "four.")
    out = tokenize_conversation(tokenizer, chat, assistant_only_loss=True)
    assert tokenizer.decode(out["input_ids"]) == tokenizer.apply_chat_template(chat, tokenize=False)
    assert spans(tokenizer, out["input_ids"], out["loss_mask"]) == ["hello<|end|>\n", "four.<|end|>\n"]
    assert tokenizer.decode(out["input_ids"][:2]) == "<|assistant|>\n"
    assert out["loss_mask"][:2] == [False, False]


def test_conversation_all_tokens(tokenizer):
    out = tokenize_conversation(tokenizer, CHAT)
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert out["input_ids"] == ids_of(tokenizer, rendered)
    assert out["loss_mask"] == [False] + [True] * (len(out["input_ids"]) - 1)


def test_prefix_unstable_template_is_refused(tokenizer):
    # A template that drops earlier assistant answers altogether: nothing in the rendering depends on the
    # first answer, so it has no place to mark (offsets from rendered prefixes would mark
    # "<|end|>\n<|user|>..." as the first answer). Templates that only drop earlier thoughts are located:
    # tests/test_chat_templates.py.
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' }}"
        "{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}{% endif %}{{ '<|end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    )
    with pytest.raises(DatasetError, match="assistant turns cannot be located"):
        tokenize_conversation(tokenizer, CHAT, assistant_only_loss=True)


def test_prepare_messages_with_assistant_only_loss(tokenizer):
    ds = Dataset.from_dict({"messages": [CHAT, conv("user", "hi", "assistant", "hello")]})
    out = prepare_language_modeling(ds, tokenizer, assistant_only_loss=True)
    assert spans(tokenizer, out[0]["input_ids"], out[0]["loss_mask"]) == [
        "hello world<|end|>\n", "four.<|end|>\n"
    ]
    assert spans(tokenizer, out[1]["input_ids"], out[1]["loss_mask"]) == ["hello<|end|>\n"]


def test_conversational_prompt_completion(tokenizer):
    prompt = conv("system", "be brief", "user", "two plus two")
    completion = conv("assistant", "four.")
    out = tokenize_prompt_completion(tokenizer, prompt, completion)
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert prompt_text.endswith("<|user|>\ntwo plus two<|end|>\n<|assistant|>\n")
    expected = ids_of(tokenizer, prompt_text) + ids_of(tokenizer, "four.<|end|>\n")
    assert out["input_ids"] == expected  # no EOS: the template's end-of-turn marker ends the completion
    assert out["prompt_length"] == len(ids_of(tokenizer, prompt_text))
    n_prompt = out["prompt_length"]
    assert out["loss_mask"] == [False] * n_prompt + [True] * (len(expected) - n_prompt)
    assert spans(tokenizer, out["input_ids"], out["loss_mask"]) == ["four.<|end|>\n"]
    # The prompt ids are exactly what generation is given.
    assert tokenize_prompt(tokenizer, prompt) == out["input_ids"][: out["prompt_length"]]


def test_conversational_prompt_completion_with_assistant_only_loss(tokenizer):
    prompt = conv("user", "hello", "assistant", "hello world", "user", "two plus two")
    ds = Dataset.from_dict({"prompt": [prompt], "completion": [conv("assistant", "four.")]})
    # Completion only (the default): the last answer.
    row = prepare_language_modeling(ds, tokenizer, assistant_only_loss=True)[0]
    assert spans(tokenizer, row["input_ids"], row["loss_mask"]) == ["four.<|end|>\n"]
    # Whole conversation, assistant turns only: the earlier answer in the prompt counts too, no user turn.
    row = prepare_language_modeling(ds, tokenizer, assistant_only_loss=True, completion_only_loss=False)[0]
    assert spans(tokenizer, row["input_ids"], row["loss_mask"]) == ["hello world<|end|>\n", "four.<|end|>\n"]
    # Neither: everything after the first token.
    row = prepare_language_modeling(ds, tokenizer, completion_only_loss=False)[0]
    assert row["loss_mask"] == [False] + [True] * (len(row["input_ids"]) - 1)


QA = {"q": ["two plus two is", "hello"], "a": [" four.", " world"]}
TEXTS = ["Q: two plus two is A: four.", "Q: hello A: world"]


@pytest.mark.parametrize("func", [
    pytest.param(lambda ex: f"Q: {ex['q']} A:{ex['a']}", id="per-example f-string"),
    # Also valid on a batch of lists (list + list): must still be read as per-example.
    pytest.param(lambda ex: "Q: " + ex["q"] + " A:" + ex["a"], id="per-example concatenation"),
    pytest.param(lambda batch: [f"Q: {q} A:{a}" for q, a in zip(batch["q"], batch["a"], strict=True)],
                 id="batched"),
])
def test_formatting_func(tokenizer, func):
    out = prepare_language_modeling(Dataset.from_dict(QA), tokenizer, formatting_func=func)
    expected = [tokenize_text(tokenizer, t) for t in TEXTS]
    assert out[:] == {"input_ids": [e["input_ids"] for e in expected],
                      "loss_mask": [e["loss_mask"] for e in expected]}
    assert [tokenizer.decode(ids) for ids in out["input_ids"]] == [t + "<eos>" for t in TEXTS]


def test_formatting_func_ex_plus_ex_lists(tokenizer):
    # ex["q"] + ex["a"] on a batch is a list of 2 strings: probing with a batch would misread it.
    out = prepare_language_modeling(Dataset.from_dict(QA), tokenizer,
                                    formatting_func=lambda ex: ex["q"] + ex["a"])
    assert [tokenizer.decode(ids) for ids in out["input_ids"]] == ["two plus two is four.<eos>",
                                                                    "hello world<eos>"]


def test_truncate_keep_end_keeps_the_last_tokens_and_counts_the_prompt_kept():
    example = {"input_ids": [1, 2, 3, 4, 5, 6], "loss_mask": [False, False, False, True, True, True],
               "prompt_length": 3}
    assert truncate(example, 4, "keep_end") == {"input_ids": [3, 4, 5, 6], "loss_mask": [False, True, True, True],
                                                 "prompt_length": 1}
    assert truncate(example, 2, "keep_end")["prompt_length"] == 0
    assert truncate(example, 4)["input_ids"] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="truncation_mode"):
        truncate(example, 4, "keep_middle")
