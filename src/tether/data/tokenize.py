"""Turn text or conversations into token ids with a loss mask, the same way for every trainer.

Convention: `loss_mask[j]` is True when token j is a training target (predicted from tokens < j).
The first token of every sequence is never a target, so sequences can be packed end to end.

Conversations are rendered with the tokenizer's chat template. A prompt and its completion are
tokenized separately and concatenated, which is also how generation sees them (prompt ids, then
sampled ids), so training and sampling agree on token boundaries. A whole conversation is rendered and
tokenized once; its assistant tokens come from the template's `{% generation %}` blocks when it has them,
else from probing the template (`assistant_char_spans`), which also handles templates that are not
prefix-stable (reasoning templates that drop earlier thoughts).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from transformers import PreTrainedTokenizerBase

from .formats import DatasetError

Messages = list[dict[str, Any]]


def require_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DatasetError(
            "The dataset is conversational (lists of role/content messages) but the tokenizer has no chat "
            "template. Fix: set tokenizer.chat_template, or convert the messages to plain text first."
        )


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Messages, add_generation_prompt: bool = False,
                **template_kwargs: Any) -> str:
    require_chat_template(tokenizer)
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **template_kwargs
    )


def split_rendered(tokenizer: PreTrainedTokenizerBase, prompt: Messages, completion: Messages) -> tuple[str, str]:
    """Render a conversational prompt and completion as (prompt text, completion text)."""
    prompt_text = render_chat(tokenizer, prompt, add_generation_prompt=True)
    full_text = render_chat(tokenizer, prompt + completion)
    if not full_text.startswith(prompt_text):
        raise DatasetError(
            "The chat template renders the prompt differently when the completion follows it, so the "
            "completion cannot be separated. Fix: use a template whose rendering of a conversation "
            "starts with the rendering of its prompt plus the generation prompt."
        )
    return prompt_text, full_text[len(prompt_text):]


def _ids(tokenizer: PreTrainedTokenizerBase, text: str, add_special_tokens: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def with_eos(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        return [*ids, eos]
    return ids


def tokenize_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | Messages, **template_kwargs: Any) -> list[int]:
    """Ids of a prompt as generation sees it (chat template with the generation prompt; `template_kwargs` go to
    the template of a conversational prompt, e.g. enable_thinking=False)."""
    if isinstance(prompt, list):
        return _ids(tokenizer, render_chat(tokenizer, prompt, add_generation_prompt=True, **template_kwargs), False)
    return _ids(tokenizer, prompt, True)


def tokenize_prompt_completion(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | Messages,
    completion: str | Messages,
    completion_only_loss: bool = True,
    add_special_tokens: bool = True,
) -> dict[str, list]:
    """{"input_ids", "loss_mask", "prompt_length"} for prompt followed by completion (+ EOS if plain).

    add_special_tokens: let the tokenizer add its special tokens (e.g. BOS) to a plain prompt."""
    if isinstance(prompt, list):
        prompt_text, completion_text = split_rendered(tokenizer, prompt, completion)
        prompt_ids = _ids(tokenizer, prompt_text, False)
        completion_ids = _ids(tokenizer, completion_text, False)
    else:
        prompt_ids = _ids(tokenizer, prompt, add_special_tokens)
        completion_ids = with_eos(tokenizer, _ids(tokenizer, completion, False))
    prompt_counts = not completion_only_loss
    loss_mask = [prompt_counts] * len(prompt_ids) + [True] * len(completion_ids)
    loss_mask[0] = False
    return {"input_ids": prompt_ids + completion_ids, "loss_mask": loss_mask, "prompt_length": len(prompt_ids)}


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str,
                  add_special_tokens: bool = True) -> dict[str, list]:
    """{"input_ids", "loss_mask"} of a text + EOS; every token but the first is a target."""
    ids = with_eos(tokenizer, _ids(tokenizer, text, add_special_tokens))
    return {"input_ids": ids, "loss_mask": [False] + [True] * (len(ids) - 1)}


def has_generation_markers(chat_template: Any) -> bool:
    """Whether a chat template marks the assistant's output with `{% generation %}` blocks (any whitespace-trim
    variant), which Hugging Face's `return_assistant_tokens_mask` reads. A template given as named variants (a
    dict) is judged by its "default" one."""
    if isinstance(chat_template, dict):
        chat_template = chat_template.get("default", "")
    return bool(chat_template) and re.search(r"\{%-?\s*generation\s*-?%\}", chat_template) is not None


def tokenize_conversation(tokenizer: PreTrainedTokenizerBase, messages: Messages,
                          assistant_only_loss: bool = False) -> dict[str, list]:
    """A whole conversation, rendered once and tokenized once; with `assistant_only_loss`, only the tokens the
    assistant produces (its turns and their end-of-turn markup) are targets.

    A template with `{% generation %}` blocks decides itself which tokens are the assistant's (Hugging Face's
    assistant mask, as TRL's training templates do). Any other template is probed (`assistant_char_spans`), which
    also works for templates that render earlier turns differently from the last one (e.g. reasoning templates
    that drop earlier thoughts), where a rendered prefix of the conversation is not a prefix of its rendering.
    """
    if assistant_only_loss and has_generation_markers(tokenizer.chat_template):
        require_chat_template(tokenizer)
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
        if not any(mask):
            raise DatasetError(
                "assistant_only_loss=True, but the chat template's {% generation %} blocks mark no token of this "
                "conversation as the assistant's. Fix: put each assistant turn's output (and its end-of-turn "
                "token) inside {% generation %}...{% endgeneration %}, or check that the conversation has an "
                "assistant turn."
            )
    elif assistant_only_loss:
        text, char_spans = assistant_char_spans(tokenizer, messages)
        ids, mask = _tokenize_marking_spans(tokenizer, text, char_spans)
    else:
        ids = _ids(tokenizer, render_chat(tokenizer, messages), False)
        mask = [True] * len(ids)
    if mask:
        mask[0] = False
    return {"input_ids": ids, "loss_mask": mask}


# Stand-ins for an assistant message's text fields while probing a template: characters no real text starts or
# ends with and no template strips, so where a rendering with them differs from the real one is exactly where the
# template put that message's text.
_PROBED_FIELDS = ("content", "reasoning_content", "reasoning", "thinking")


def _sentinel(field: str) -> str:
    return f"\u2063tether-{field}\u2063"


def _difference(text: str, probe: str) -> tuple[int, int, str]:
    """(start, end, probe_part): text[start:end] and probe_part are where `text` and `probe` differ, between
    their longest common prefix and longest common suffix."""
    prefix = 0
    limit = min(len(text), len(probe))
    while prefix < limit and text[prefix] == probe[prefix]:
        prefix += 1
    suffix = 0
    while suffix < limit - prefix and text[-1 - suffix] == probe[-1 - suffix]:
        suffix += 1
    return prefix, len(text) - suffix, probe[prefix:len(probe) - suffix]


def assistant_char_spans(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> tuple[str, list[tuple[int, int]]]:
    """(rendered conversation, [(start, end)] character spans of what each assistant turn produced in it).

    A turn's span is the text that depends on its message, found by rendering the conversation again with that
    message's text fields (content, and reasoning fields if any) replaced by sentinels and comparing the two
    renderings, followed by its end-of-turn markup: the text the template writes after the turn when it is the
    last message (e.g. "<|im_end|>\n"), as far as the whole rendering has it there. Each turn is judged in the
    whole conversation, so a template that renders earlier turns differently (hides earlier reasoning) gets the
    span as it renders it. Raises DatasetError when a turn cannot be located (e.g. the template drops an earlier
    turn's content altogether).
    """
    text = render_chat(tokenizer, messages)
    specials = [t for t in {*tokenizer.all_special_tokens, *tokenizer.get_added_vocab()} if t]
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        if not isinstance(message.get("content"), str):
            raise DatasetError(f"assistant_only_loss: message {i} has non-text content "
                               f"({type(message.get('content')).__name__}); only text turns can be located.")
        probe = {**message, **{k: _sentinel(k) for k in _PROBED_FIELDS if isinstance(message.get(k), str)}}
        start, end, probed = _difference(text, render_chat(tokenizer, [*messages[:i], probe, *messages[i + 1:]]))
        if _sentinel("content") not in probed or (spans and start < spans[-1][1]):
            raise DatasetError(
                f"The chat template does not show assistant message {i}'s content where it renders that turn, so "
                "assistant turns cannot be located for assistant_only_loss. Fix: mark the assistant's output with "
                "{% generation %}...{% endgeneration %} in the template (Hugging Face's assistant mask), or set "
                "assistant_only_loss=False."
            )
        # The end-of-turn markup: what follows the turn's text when the turn ends the conversation.
        alone = render_chat(tokenizer, messages[: i + 1])
        _, alone_end, _ = _difference(alone, render_chat(tokenizer, [*messages[:i], probe]))
        end += _shared_markup(alone[alone_end:], text[end:], specials)
        spans.append((start, end))
    return text, spans


def _shared_markup(tail: str, following: str, specials: list[str]) -> int:
    """Length of the end-of-turn markup `tail` that `following` starts with: all of it, or else up to the end of
    the last special token they share (a template may add more after the conversation's last turn, e.g. an EOS,
    and a cut inside a token would mark the next turn's first token)."""
    if following.startswith(tail):
        return len(tail)
    shared = 0
    while shared < min(len(tail), len(following)) and tail[shared] == following[shared]:
        shared += 1
    # str.rfind(token, 0, shared) only finds a token lying wholly inside tail[:shared]
    return max((tail.rfind(token, 0, shared) + len(token) for token in specials
                if tail.rfind(token, 0, shared) >= 0), default=0)


def _tokenize_marking_spans(tokenizer: PreTrainedTokenizerBase, text: str, spans: list[tuple[int, int]]
                            ) -> tuple[list[int], list[bool]]:
    """Tokenize `text` once and mark the tokens that overlap a character span. A tokenizer without offsets (a
    slow one) tokenizes the pieces between span edges separately instead."""
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        mask = [any(a < e and b > s for s, e in spans) for a, b in encoded["offset_mapping"]]
        return list(encoded["input_ids"]), mask
    ids: list[int] = []
    mask: list[bool] = []
    cursor = 0
    for start, end in [*spans, (len(text), len(text))]:
        for piece, counts in ((text[cursor:start], False), (text[start:end], True)):
            if piece:
                piece_ids = _ids(tokenizer, piece, False)
                ids += piece_ids
                mask += [counts] * len(piece_ids)
        cursor = end
    return ids, mask


TRUNCATION_MODES = ("keep_start", "keep_end")


def truncate(example: dict[str, list], max_length: int | None, mode: str = "keep_start") -> dict[str, list]:
    """At most `max_length` tokens of every per-token list: the first ones (`mode="keep_start"`) or the last ones
    (`"keep_end"`, e.g. to keep the end of long conversations); `prompt_length` counts the prompt tokens kept."""
    if mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode={mode!r}; use one of {TRUNCATION_MODES}.")
    if max_length is None or len(example["input_ids"]) <= max_length:
        return example
    cut = len(example["input_ids"]) - max_length  # tokens dropped
    kept = slice(None, max_length) if mode == "keep_start" else slice(cut, None)
    out = {k: (v[kept] if isinstance(v, list) else v) for k, v in example.items()}
    if "prompt_length" in out:
        prompt = out["prompt_length"]
        out["prompt_length"] = min(prompt, max_length) if mode == "keep_start" else max(prompt - cut, 0)
    return out


def formatting_func_to_text(func: Callable, dataset: Any, check: Any = None) -> tuple[Callable[..., dict], bool]:
    """Adapt a user `formatting_func` into a map function producing a `text` column.

    The function may format one example (returning a string) or a batch (returning a list of
    strings). Which one is found by calling it on the first example, then, if that did not give a
    string, on a one-row batch. (Probing with the batch first misreads per-example functions whose
    expressions also work on lists, e.g. `ex["question"] + ex["answer"]`.)

    Returns (map function, batched). The map function also takes the row's index (the batch's indices), which
    an error for a non-string result names, with the split of `check` (a `validate.RowCheck`).
    """
    try:
        single, single_error = func(dataset[0]), None
    except Exception as error:  # a batched function may fail on a single example
        single, single_error = None, error
    if isinstance(single, str):
        return (lambda example, index=None: {"text": _checked_str(func(example), index, check)}), False
    try:
        batch = func(dataset[:1])
    except Exception:
        batch = None
    if isinstance(batch, list) and len(batch) == 1 and isinstance(batch[0], str):
        return (lambda rows, indices=None: {"text": _checked_strs(func(rows), len(next(iter(rows.values()))),
                                                                  indices, check)}), True
    if single_error is not None:
        raise single_error
    raise DatasetError(
        f"formatting_func returned {type(single).__name__} {repr(single)[:60]} for the first example "
        f"(and {type(batch).__name__} for a one-example batch); it must return a string per example, "
        "or a list of one string per example of a batch. Fix: make it return the formatted text."
    )


def example_formatter(func: Callable, first_example: dict[str, Any]) -> Callable[[dict[str, Any]], str]:
    """A user `formatting_func` as a function of one example returning its text, for data read one example
    at a time (streams). Whether `func` formats one example or a batch is decided on the first example, as
    in `formatting_func_to_text`: a batch-style function is called on one-example batches."""
    import datasets

    to_text, batched = formatting_func_to_text(func, datasets.Dataset.from_list([first_example]))
    if batched:
        return lambda example: to_text({key: [value] for key, value in example.items()})["text"][0]
    return lambda example: to_text(example)["text"]


def _rows_named(indices: Any, check: Any) -> str:
    """' for rows 3-5 of the train dataset' (what an error says of the rows a formatting_func was given)."""
    if indices is None:
        return ""
    indices = [indices] if isinstance(indices, int) else list(indices)
    numbers = [check.row_number(i) if check is not None else int(i) for i in indices]
    split = f"the {check.what} dataset" if check is not None and check.what else "the dataset"
    stream = " (stream positions)" if check is not None and check.stream else ""
    rows = f"row {numbers[0]}" if len(numbers) == 1 else f"rows {numbers[0]}-{numbers[-1]}"
    return f" for {rows}{stream} of {split}"


def _checked_strs(values: Any, expected: int, indices: Any = None, check: Any = None) -> list[str]:
    if not isinstance(values, list) or len(values) != expected or not all(isinstance(v, str) for v in values):
        shown = type(values).__name__
        if isinstance(values, list) and len(values) == expected:
            wrong = next(j for j, v in enumerate(values) if not isinstance(v, str))
            shown += f" (item {wrong} is {type(values[wrong]).__name__})"
        raise DatasetError(
            f"formatting_func (batched) returned {shown}{_rows_named(indices, check)}, a batch of {expected} "
            f"examples; it must return a list of {expected} strings. Fix: return one string per example."
        )
    return values


def _checked_str(value: Any, index: int | None = None, check: Any = None) -> str:
    if not isinstance(value, str):
        raise DatasetError(f"formatting_func returned {type(value).__name__}{_rows_named(index, check)}; it must "
                           "return a string. Fix: return the example's text (handle missing fields in it).")
    return value
