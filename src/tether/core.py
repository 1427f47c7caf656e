"""TRL 0.7's `trl.core` names, each pointing at tether's one implementation (this module holds none).

    from tether.core import LengthSampler, logprobs_from_logits, masked_whiten, respond_to_batch

Where a name behaves differently from TRL 0.7 on purpose, its home says so: log-probs and entropies are
float32 (ops/logprobs.py); masked_whiten writes 0 at masked-out entries and masked_mean/var never let
masked-out nan/inf reach the result (ops/stats.py); pad_to_size refuses to cut (ops/tensors.py).
"""

from .ops.dicts import (
    WANDB_PADDING,
    add_suffix,
    average_torch_dicts,
    convert_to_scalar,
    flatten_dict,
    stack_dicts,
    stats_to_np,
)
from .ops.logprobs import entropy_from_logits, logprobs_from_logits
from .ops.rng import randn_tensor, set_seed
from .ops.stats import masked_mean, masked_var, masked_whiten, whiten
from .ops.tensors import clip_by_value, pad_to_size
from .rollout.generation import respond_to_batch
from .rollout.lengths import LengthSampler
from .trainers.device_cache import PPODecorators

__all__ = [
    "WANDB_PADDING", "LengthSampler", "PPODecorators", "add_suffix", "average_torch_dicts", "clip_by_value",
    "convert_to_scalar", "entropy_from_logits", "flatten_dict", "logprobs_from_logits", "masked_mean",
    "masked_var", "masked_whiten", "pad_to_size", "randn_tensor", "respond_to_batch", "set_seed", "stack_dicts",
    "stats_to_np", "whiten",
]
