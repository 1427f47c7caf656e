"""Turn text or conversations into token ids with a loss mask, the same way for every trainer.

Convention: `loss_mask[j]` is True when token j is a training target (predicted from tokens < j).
The first token of every sequence is never a target, so sequences can be packed end to end.

Conversations are rendered with the tokenizer's chat template. A prompt and its completion are
tokenized separately and concatenated, which is also how generation sees them (prompt ids, then
sampled ids), so training and sampling agree on token boundaries.
"""

from __future__ import annotations

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


def tokenize_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | Messages) -> list[int]:
    """Ids of a prompt as generation sees it (chat template with the generation prompt)."""
    if isinstance(prompt, list):
        return _ids(tokenizer, render_chat(tokenizer, prompt, add_generation_prompt=True), False)
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


def tokenize_conversation(tokenizer: PreTrainedTokenizerBase, messages: Messages,
                          assistant_only_loss: bool = False) -> dict[str, list]:
    """A whole conversation; with `assistant_only_loss`, only assistant turns (and their end-of-turn
    markup) are targets. Spans come from rendering growing prefixes of the conversation."""
    full_text = render_chat(tokenizer, messages)
    if not assistant_only_loss:
        ids = _ids(tokenizer, full_text, False)
        return {"input_ids": ids, "loss_mask": [False] + [True] * (len(ids) - 1)}
    input_ids: list[int] = []
    loss_mask: list[bool] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _text_before_assistant_content(tokenizer, messages, i)
        through = render_chat(tokenizer, messages[: i + 1])
        start, end = (len(before) if before is not None else -1), len(through)
        prefix_stable = before is not None and full_text.startswith(before) and full_text.startswith(through)
        if not (prefix_stable and cursor <= start <= end):
            raise DatasetError(
                "The chat template does not render a conversation as the concatenation of its turns, so "
                "assistant turns cannot be located. Fix: set assistant_only_loss=False or use a "
                "prefix-stable chat template."
            )
        for text, counts in ((full_text[cursor:start], False), (full_text[start:end], True)):
            if text:
                ids = _ids(tokenizer, text, False)
                input_ids += ids
                loss_mask += [counts] * len(ids)
        cursor = end
    if cursor < len(full_text):
        ids = _ids(tokenizer, full_text[cursor:], False)
        input_ids += ids
        loss_mask += [False] * len(ids)
    if loss_mask:
        loss_mask[0] = False
    return {"input_ids": input_ids, "loss_mask": loss_mask}


_SENTINEL = "\u2063tether-assistant-content\u2063"


def _text_before_assistant_content(tokenizer: PreTrainedTokenizerBase, messages: Messages, i: int,
                                   ) -> str | None:
    """The rendered text that precedes assistant turn i's content (its header included).

    After an earlier turn it is the rendered prefix plus the generation prompt. A first turn has no
    prefix (templates refuse empty conversations), so its header is found by rendering the turn with a
    sentinel as content; None when the template does not show the content verbatim."""
    if i:
        return render_chat(tokenizer, messages[:i], add_generation_prompt=True)
    probe = render_chat(tokenizer, [{**messages[0], "content": _SENTINEL}])
    start = probe.find(_SENTINEL)
    return probe[:start] if start >= 0 else None


def truncate(example: dict[str, list], max_length: int | None) -> dict[str, list]:
    """Keep the first `max_length` tokens of every per-token list; `prompt_length` stays within them."""
    if max_length is None or len(example["input_ids"]) <= max_length:
        return example
    out = {k: (v[:max_length] if isinstance(v, list) else v) for k, v in example.items()}
    if "prompt_length" in out:
        out["prompt_length"] = min(out["prompt_length"], max_length)
    return out


def formatting_func_to_text(func: Callable, dataset: Any) -> tuple[Callable[[dict], dict], bool]:
    """Adapt a user `formatting_func` into a map function producing a `text` column.

    The function may format one example (returning a string) or a batch (returning a list of
    strings). Which one is found by calling it on the first example, then, if that did not give a
    string, on a one-row batch. (Probing with the batch first misreads per-example functions whose
    expressions also work on lists, e.g. `ex["question"] + ex["answer"]`.)

    Returns (map function, batched).
    """
    try:
        single, single_error = func(dataset[0]), None
    except Exception as error:  # a batched function may fail on a single example
        single, single_error = None, error
    if isinstance(single, str):
        return (lambda example: {"text": _checked_str(func(example))}), False
    try:
        batch = func(dataset[:1])
    except Exception:
        batch = None
    if isinstance(batch, list) and len(batch) == 1 and isinstance(batch[0], str):
        return (lambda rows: {"text": _checked_strs(func(rows), len(next(iter(rows.values()))))}), True
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


def _checked_strs(values: Any, expected: int) -> list[str]:
    if not isinstance(values, list) or len(values) != expected or not all(isinstance(v, str) for v in values):
        raise DatasetError(
            f"formatting_func (batched) returned {type(values).__name__} for a batch of {expected} examples; "
            f"it must return a list of {expected} strings."
        )
    return values


def _checked_str(value: Any) -> str:
    if not isinstance(value, str):
        raise DatasetError(f"formatting_func returned {type(value).__name__}; it must return a string.")
    return value
