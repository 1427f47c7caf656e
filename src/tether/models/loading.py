"""Loading models and tokenizers by name, path or object, the same way for every trainer."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _resolve_dtype(value: Any) -> Any:
    if isinstance(value, str) and value != "auto":
        if value not in _DTYPES:
            raise ValueError(f"Unknown dtype {value!r}: use one of {sorted(_DTYPES)} or 'auto'.")
        return _DTYPES[value]
    return value


def model_init_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Normalise `model_init_kwargs`: remote code stays off unless asked for, `torch_dtype` becomes `dtype`."""
    kwargs = dict(kwargs or {})
    if "torch_dtype" in kwargs:
        kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
    if "dtype" in kwargs:
        kwargs["dtype"] = _resolve_dtype(kwargs["dtype"])
    kwargs.setdefault("trust_remote_code", False)
    return kwargs


def is_encoder_decoder(model_or_config: Any) -> bool:
    config = getattr(model_or_config, "config", model_or_config)
    return bool(getattr(config, "is_encoder_decoder", False))


def load_language_model(name_or_path: str, **kwargs: Any) -> PreTrainedModel:
    """A causal or seq2seq LM from a hub id or a local path, chosen from its config."""
    kwargs = model_init_kwargs(kwargs)
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=kwargs["trust_remote_code"])
    auto_class = AutoModelForSeq2SeqLM if is_encoder_decoder(config) else AutoModelForCausalLM
    return auto_class.from_pretrained(name_or_path, **kwargs)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)


def model_name(model: Any) -> str:
    if isinstance(model, str):
        return model
    return getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> None:
    """Give a tokenizer without a pad token (GPT-2 style) the EOS token as pad, on tokenizer and model.

    Padding positions never count in any loss (masks decide), so reusing EOS as pad is safe.
    """
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(
                "The tokenizer has neither a pad token nor an EOS token, so batches cannot be padded. "
                "Fix: add one before training, e.g. tokenizer.add_special_tokens({'pad_token': '<pad>'}) "
                "and model.resize_token_embeddings(len(tokenizer))."
            )
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("The tokenizer had no pad token; using its EOS token %r for padding.", tokenizer.eos_token)
    if model is not None:
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and generation_config.pad_token_id is None:
            generation_config.pad_token_id = tokenizer.pad_token_id


def apply_peft(model: PreTrainedModel, peft_config: Any, activation_checkpointing: bool = False) -> Any:
    """Wrap `model` with a PEFT adapter described by `peft_config` (e.g. `LoraConfig`)."""
    from peft import get_peft_model

    if activation_checkpointing:
        # Frozen embeddings give checkpointed blocks inputs without grad; adapters downstream still need it.
        model.enable_input_require_grads()
    return get_peft_model(model, peft_config)


def is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but keep import-time failures out of unrelated paths
        return False
    return isinstance(model, PeftModel)


def load_reward_model(name_or_path: str, **kwargs: Any) -> PreTrainedModel:
    """A sequence-classification model with one output, the scalar reward."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=1, **model_init_kwargs(kwargs))


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off: pairwise losses compare two forward passes, which dropout noise would decorrelate."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def load_critic(name_or_path: str, **kwargs: Any) -> PreTrainedModel:
    """A value model initialised from a trained reward model's checkpoint (InstructGPT style), whether
    that checkpoint is a full model or a LoRA adapter (then merged into its base)."""
    if os.path.isfile(os.path.join(name_or_path, "adapter_config.json")):
        from peft import PeftConfig, PeftModel

        base_name = PeftConfig.from_pretrained(name_or_path).base_model_name_or_path
        base = load_reward_model(base_name, **kwargs)
        return PeftModel.from_pretrained(base, name_or_path).merge_and_unload()
    return load_reward_model(name_or_path, **kwargs)
