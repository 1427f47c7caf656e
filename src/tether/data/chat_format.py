"""Giving a base model and its tokenizer a chat format: special tokens, a chat template, and embeddings
resized for the new tokens (TRL's `setup_chat_format`).

ChatML (the only format TRL 0.7 offered) renders each message as

    <|im_start|>{role}\n{content}<|im_end|>\n

and the generation prompt as `<|im_start|>assistant\n`. `<|im_start|>` becomes the BOS token and
`<|im_end|>` both the EOS token (generation stops after a turn) and the pad token (padding never counts
in a loss: masks decide).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ChatFormat:
    """The special tokens of a chat format; `chat_template` is the Jinja template built from them."""

    bos_token: str
    eos_token: str
    pad_token: str

    @property
    def chat_template(self) -> str:
        turn = f"'{self.bos_token}' + message['role'] + '\n' + message['content'] + '{self.eos_token}' + '\n'"
        return (
            "{% for message in messages %}{{ " + turn + " }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '" + self.bos_token + "assistant\n' }}{% endif %}"
        )


CHAT_FORMATS = {"chatml": ChatFormat(bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>")}


def setup_chat_format(model: Any, tokenizer: Any, format: str | None = "chatml",
                      resize_to_multiple_of: int | None = None) -> tuple[Any, Any]:
    """Add `format`'s special tokens to `tokenizer`, make them its BOS/EOS/pad tokens, set its chat
    template, and resize `model`'s token embeddings (and LM head) to the new vocabulary size, rounded up
    to a multiple of `resize_to_multiple_of` if given (e.g. 64, for faster matrix multiplies).

    The model's config and generation config get the new BOS/EOS/pad ids, so `generate` stops at the end
    of a turn. Both objects are changed in place and returned: (model, tokenizer). A template the
    tokenizer already had is replaced.
    """
    if format not in CHAT_FORMATS:
        raise ValueError(f"setup_chat_format: unknown format {format!r}; available: {sorted(CHAT_FORMATS)}.")
    if resize_to_multiple_of is not None and resize_to_multiple_of < 1:
        raise ValueError(f"setup_chat_format: resize_to_multiple_of={resize_to_multiple_of}; use a positive int "
                         "or None.")
    chat = CHAT_FORMATS[format]
    new_tokens = list(dict.fromkeys([chat.bos_token, chat.eos_token, chat.pad_token]))
    try:  # keep the tokenizer's other special tokens special (decode(skip_special_tokens=True) still drops them)
        tokenizer.add_special_tokens({"additional_special_tokens": new_tokens}, replace_additional_special_tokens=False)
    except TypeError:  # tokenizers without that keyword
        tokenizer.add_special_tokens({"additional_special_tokens": new_tokens})
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = chat.bos_token, chat.eos_token, chat.pad_token
    tokenizer.chat_template = chat.chat_template

    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=resize_to_multiple_of)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    for config in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        if config is not None:
            for key, value in ids.items():
                setattr(config, key, value)
    return model, tokenizer
