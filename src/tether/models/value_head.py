"""Language models with a value head: a scalar value per token for PPO's critic.

`AutoModelForCausalLMWithValueHead.from_pretrained(path)` wraps a causal LM (optionally with a PEFT
adapter) and adds a linear head on the final hidden state; `forward` returns (lm_logits, loss, value)
as TRL's classic API did. `save_pretrained` writes the LM (or its adapter) and the value head as
safetensors; `from_pretrained` reads both back.

Shapes: b = batch, t = tokens, h = hidden size.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel

from .loading import apply_peft, model_init_kwargs

VALUE_HEAD_FILE = "value_head.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"


class ValueHead(nn.Module):
    """hidden [b, t, h] -> value [b, t]: optional dropout, then one linear unit."""

    def __init__(self, hidden_size: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.summary = nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.to(self.summary.weight.dtype)
        return self.summary(self.dropout(hidden)).squeeze(-1)


def _hidden_size(config: Any) -> int:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("hidden_size", "d_model", "n_embd"):
        if getattr(config, name, None):
            return getattr(config, name)
    raise ValueError(f"Cannot find the hidden size in {type(config).__name__}; set v_head_hidden_size.")


class _ModelWithValueHead(nn.Module):
    transformers_parent_class: Any = None

    def __init__(self, pretrained_model: PreTrainedModel | nn.Module, v_head_dropout: float = 0.0,
                 v_head_hidden_size: int | None = None) -> None:
        super().__init__()
        self.pretrained_model = pretrained_model
        self.config = pretrained_model.config
        self.v_head = ValueHead(v_head_hidden_size or _hidden_size(self.config), v_head_dropout)
        self.is_peft_model = hasattr(pretrained_model, "peft_config")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | PreTrainedModel, *model_args: Any,
                        peft_config: Any = None, v_head_dropout: float = 0.0, is_trainable: bool = True,
                        **kwargs: Any) -> _ModelWithValueHead:
        """Load (or wrap) a model and add a value head, restored from `value_head.safetensors` if the
        folder has one. kwargs go to the transformers `from_pretrained` (dtype, device_map, ...).

        A folder written by `save_pretrained` of a PEFT policy (adapter_config.json) loads as its base
        model plus that adapter, a `PeftModel` whose adapter trains unless `is_trainable=False`."""
        source, init_kwargs = pretrained_model_name_or_path, model_init_kwargs(kwargs)
        adapter_file = os.path.join(source, ADAPTER_CONFIG_FILE) if isinstance(source, str) else None
        if isinstance(source, nn.Module):
            model = source
        elif adapter_file and os.path.isfile(adapter_file):
            # A saved PEFT policy: its base model (by the path the adapter records) + the adapter, trainable.
            if peft_config is not None:
                raise ValueError(f"{source} already holds a PEFT adapter; drop peft_config to load it.")
            from peft import PeftConfig, PeftModel

            base_path = PeftConfig.from_pretrained(source).base_model_name_or_path
            base = cls.transformers_parent_class.from_pretrained(base_path, *model_args, **init_kwargs)
            model = PeftModel.from_pretrained(base, source, is_trainable=is_trainable)
        else:
            model = cls.transformers_parent_class.from_pretrained(source, *model_args, **init_kwargs)
        if peft_config is not None:
            model = apply_peft(model, peft_config)
        wrapper = cls(model, v_head_dropout=v_head_dropout)
        head_file = os.path.join(source, VALUE_HEAD_FILE) if isinstance(source, str) else None
        if head_file and os.path.isfile(head_file):
            wrapper.v_head.load_state_dict(load_file(head_file))
        device = next(model.parameters()).device
        return wrapper.to(device)

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """The LM (its adapter only, for PEFT) and `value_head.safetensors`, side by side."""
        os.makedirs(save_directory, exist_ok=True)
        self.pretrained_model.save_pretrained(save_directory, **kwargs)
        state = {k: v.detach().contiguous().cpu() for k, v in self.v_head.state_dict().items()}
        save_file(state, os.path.join(save_directory, VALUE_HEAD_FILE))

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.pretrained_model.generate(*args, **kwargs)

    def get_output_embeddings(self) -> nn.Module:
        return self.pretrained_model.get_output_embeddings()

    def activation_checkpointing_enable(self, **kwargs: Any) -> None:
        self.pretrained_model.gradient_checkpointing_enable(**kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


class AutoModelForCausalLMWithValueHead(_ModelWithValueHead):
    """A causal LM plus a value head on its final hidden state."""

    transformers_parent_class = AutoModelForCausalLM

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(lm_logits [b, t, v], loss or None, value [b, t])."""
        kwargs["output_hidden_states"] = True
        outputs = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        value = self.v_head(outputs.hidden_states[-1])
        return outputs.logits, getattr(outputs, "loss", None), value


class AutoModelForSeq2SeqLMWithValueHead(_ModelWithValueHead):
    """An encoder-decoder LM plus a value head on the decoder's final hidden state."""

    transformers_parent_class = AutoModelForSeq2SeqLM

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(lm_logits [b, t, v], loss or None, value [b, t]) over decoder positions."""
        kwargs["output_hidden_states"] = True
        outputs = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        value = self.v_head(outputs.decoder_hidden_states[-1])
        return outputs.logits, getattr(outputs, "loss", None), value
