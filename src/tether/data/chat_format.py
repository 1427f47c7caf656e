"""Giving a base model and its tokenizer a chat format: special tokens, a chat template, and embeddings
resized for the new tokens (TRL's `setup_chat_format` and `clone_chat_template`), and the trainer options that
change the tokenizer (`eos_token`, `pad_token`, `chat_template_path`: `apply_tokenizer_options`).

ChatML (the only format TRL 0.7 offered) renders each message as

    <|im_start|>{role}\n{content}<|im_end|>\n

and the generation prompt as `<|im_start|>assistant\n`. `<|im_start|>` becomes the BOS token and
`<|im_end|>` both the EOS token (generation stops after a turn) and the pad token (padding never counts
in a loss: masks decide).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
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


def _embedding_rows(model: Any) -> int:
    return model.get_input_embeddings().weight.shape[0]


def _text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def clone_chat_template(model: Any, tokenizer: Any, source_tokenizer_path: str,
                        resize_to_multiple_of: int | None = 64) -> tuple[Any, Any, list[int]]:
    """Give `tokenizer` the chat template of the tokenizer saved at `source_tokenizer_path` (a local directory,
    or a name the Hugging Face cache holds), with what the template needs around it (TRL's function of this
    name, same arguments and results):

    - the source's added tokens (its chat markup, e.g. "<|im_start|>") missing from `tokenizer` are added, keeping
      whether each is special;
    - the source's EOS token becomes the EOS token of `tokenizer` and of the model's config (and generation
      config), so a turn ends where the template ends it;
    - the model's token embeddings (and LM head) are resized to the new vocabulary, rounded up to a multiple of
      `resize_to_multiple_of` (None: not rounded); the rows added by rounding get placeholder tokens
      "<extra_id_N>" in the tokenizer, so tokenizer and embeddings keep the same size.

    Both objects are changed in place. Returns (model, tokenizer, ids of the tokens added to `tokenizer`).
    """
    from transformers import AddedToken, AutoTokenizer

    if resize_to_multiple_of is not None and resize_to_multiple_of < 1:
        raise ValueError(f"clone_chat_template: resize_to_multiple_of={resize_to_multiple_of}; use a positive "
                         "int or None.")
    from ..models.loading import resolve_model_source  # lazily: data/ does not need the loaders otherwise

    source = AutoTokenizer.from_pretrained(resolve_model_source(source_tokenizer_path, "tokenizer"))
    if not source.chat_template:
        raise ValueError(f"clone_chat_template: the tokenizer at {source_tokenizer_path!r} has no chat template to "
                         "copy. Fix: point source_tokenizer_path at a tokenizer that has one.")
    tokenizer.chat_template = source.get_chat_template()
    vocab = tokenizer.get_vocab()
    added = [token for _, token in sorted(source.added_tokens_decoder.items()) if token.content not in vocab]
    tokenizer.add_tokens(added)
    tokenizer.eos_token = source.eos_token
    _text_config(model).eos_token_id = tokenizer.eos_token_id
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=resize_to_multiple_of)
    # Rounding up left embedding rows no token names: name them, so ids and rows stay one to one.
    index = 0
    while _embedding_rows(model) > len(tokenizer):
        filler = AddedToken(f"<extra_id_{index}>")
        if tokenizer.add_tokens(filler):
            added.append(filler)
        index += 1
    if len(tokenizer) != _embedding_rows(model):
        raise RuntimeError(f"clone_chat_template: the tokenizer has {len(tokenizer)} tokens but the model "
                           f"{_embedding_rows(model)} embedding rows after resizing.")
    return model, tokenizer, tokenizer.convert_tokens_to_ids([token.content for token in added])


@dataclass
class TokenizerOptionFields:
    """Config fields that change the tokenizer before training (SFTConfig, RewardConfig), named as in TRL;
    the trainer applies them with `apply_tokenizer_options`."""

    chat_template_path: str | None = field(default=None, metadata={
        "help": "Chat template to train with: a Jinja file (its tokens must be in the vocabulary), or a tokenizer "
                "directory whose template, special tokens and EOS are copied (clone_chat_template; the embeddings "
                "grow to hold new tokens)."})
    eos_token: str | None = field(default=None, metadata={
        "help": "A token of the vocabulary to use as EOS: it ends plain-text sequences and stops generation "
                "(default: the tokenizer's)."})
    pad_token: str | None = field(default=None, metadata={
        "help": "A token of the vocabulary to pad with (default: the tokenizer's pad token, else its EOS); the "
                "model config's pad_token_id follows (a reward model reads its score by it)."})


def _require_in_vocab(tokenizer: Any, token: str, field: str) -> None:
    if token not in tokenizer.get_vocab():
        raise ValueError(
            f"{field}={token!r} is not a token of the tokenizer ({type(tokenizer).__name__}). Fix: name a token of "
            f"its vocabulary, or add it first (tokenizer.add_special_tokens(...) and "
            "model.resize_token_embeddings(len(tokenizer))), or take a chat template with its tokens through "
            "chat_template_path / clone_chat_template."
        )


def apply_tokenizer_options(model: Any, tokenizer: Any, *, eos_token: str | None = None,
                            pad_token: str | None = None, chat_template_path: str | None = None,
                            ) -> tuple[Any, list[int]]:
    """The config options that change the tokenizer (SFTConfig/RewardConfig `eos_token`, `chat_template_path`,
    `pad_token`), applied to `tokenizer` and mirrored on `model`, in TRL's order:

    1. eos_token: a token of the vocabulary becomes the EOS token (appended to plain-text examples, ends a turn);
       the model config's eos_token_id follows, and it is added to the generation config's EOS ids (any of
       which stops generation).
    2. chat_template_path: a file is read as a Jinja chat template (its tokens must already be in the
       vocabulary); a directory (or cached name) is a tokenizer whose template, special tokens and EOS are
       copied by `clone_chat_template`, resizing the embeddings.
    3. pad_token: a token of the vocabulary becomes the pad token, on the model's configs too.

    Changes both in place (the model may be resized) and returns (model, ids of tokens added to the tokenizer).
    Calling it again on a tokenizer it already changed (a fresh model from `model_init`) only resizes the model.
    """
    if eos_token is not None:
        _require_in_vocab(tokenizer, eos_token, "eos_token")
        tokenizer.eos_token = eos_token
        _text_config(model).eos_token_id = tokenizer.eos_token_id
        generation = getattr(model, "generation_config", None)
        if generation is not None and model.can_generate():
            current = generation.eos_token_id
            current = [] if current is None else [current] if isinstance(current, int) else list(current)
            if tokenizer.eos_token_id not in current:
                generation.eos_token_id = [tokenizer.eos_token_id, *current]
    added: list[int] = []
    if chat_template_path is not None:
        if os.path.isfile(chat_template_path):
            with open(chat_template_path, encoding="utf-8") as file:
                tokenizer.chat_template = file.read()
        else:
            model, tokenizer, added = clone_chat_template(model, tokenizer, chat_template_path)
    if _embedding_rows(model) < len(tokenizer):  # a tokenizer grown for an earlier model
        model.resize_token_embeddings(len(tokenizer))
    if pad_token is not None:
        _require_in_vocab(tokenizer, pad_token, "pad_token")
        tokenizer.pad_token = pad_token
        _text_config(model).pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, added


def peft_config_training_new_tokens(peft_config: Any, model: Any, token_ids: list[int]) -> Any:
    """A copy of `peft_config` that also trains what new tokens need (as TRL's trainers do after
    clone_chat_template): the embedding rows of `token_ids` (PEFT's `trainable_token_indices`, on the model's
    input embedding module) and the whole output layer (`modules_to_save`), since an adapter alone cannot learn
    to produce a token whose rows are fresh. `peft_config` itself unchanged when there is no new token."""
    if not token_ids:
        return peft_config
    names = {module: name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    embedding = names.get(model.get_input_embeddings(), "embed_tokens")
    config = copy.deepcopy(peft_config)
    indices = config.trainable_token_indices
    indices = {} if indices is None else {embedding: list(indices)} if isinstance(indices, list) else dict(indices)
    indices[embedding] = sorted({*indices.get(embedding, []), *token_ids})
    config.trainable_token_indices = indices
    head = names.get(model.get_output_embeddings()) if model.get_output_embeddings() is not None else None
    if head is not None and head not in (config.modules_to_save or []):
        config.modules_to_save = [*(config.modules_to_save or []), head]
    return config
