"""Turning dropout off in a model, for methods that compare two forward passes of the same weights.

PPO's ratio pi_new / pi_old must be exactly 1 before the first update; with dropout active in the update
pass (and not in the rollout pass, or with another mask) it is not, and the clipped objective then
trains on noise. transformers models drop in two ways: `nn.Dropout` modules, and attention modules that
read a float (`attention_dropout`, `dropout`, ...) and call the functional form while training. Both
are zeroed here, in place (the model's config, and so what save_pretrained writes, is left as it is).
"""

from __future__ import annotations

from torch import nn

# Float attributes of attention modules that hold a dropout probability passed to the functional form.
_DROPOUT_ATTRIBUTES = ("attention_dropout", "attn_dropout", "dropout", "dropout_p", "attn_pdrop", "resid_pdrop")


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability in `model` to 0 (modules and attention floats); returns the model."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name in _DROPOUT_ATTRIBUTES:
            value = module.__dict__.get(name)
            if isinstance(value, float) and not isinstance(value, bool):
                setattr(module, name, 0.0)
    return model
