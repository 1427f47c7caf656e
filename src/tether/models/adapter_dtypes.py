"""Dtypes for training a PEFT model in bfloat16: adapters and large matrices in bf16, norms in float32."""

from __future__ import annotations

import torch
from torch import nn

# Name fragments of the embedding and output matrices (Llama/Mistral, GPT-2) cast with the adapters.
_EMBEDDING_NAMES = ("lm_head", "embed_tokens", "wte", "wpe")


def peft_module_casting_to_bf16(model: nn.Module) -> nn.Module:
    """Cast, in place: adapter layers (peft's tuner layers) to bfloat16; normalisation layers (LayerNorm,
    or any module whose name contains "norm") to float32, since their statistics lose precision in
    bf16; float32 embedding / LM-head modules to bfloat16. Everything else is left as it is.
    Returns the model (TRL's version returned None)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            module.to(torch.bfloat16)
        elif isinstance(module, nn.LayerNorm) or "norm" in name:
            module.to(torch.float32)
        elif any(part in name for part in _EMBEDDING_NAMES):
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dtype == torch.float32:
                module.to(torch.bfloat16)
    return model
