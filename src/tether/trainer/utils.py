"""TRL 0.7's `trl.trainer.utils` names, pointing at tether's implementations (imported on first use).

    from tether.trainer.utils import RunningMoments, get_peft_config, DataCollatorForCompletionOnlyLM

`PerPromptStatTracker` is DDPO's per-prompt reward normaliser (tether.losses.ddpo).
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "AdaptiveKLController": "tether.losses.kl",
    "FixedKLController": "tether.losses.kl",
    "ConstantLengthDataset": "tether.data.constant_length",
    "DataCollatorForCompletionOnlyLM": "tether.data.collate",
    "DPODataCollatorWithPadding": "tether.data.keyed_collate",
    "RewardDataCollatorWithPadding": "tether.data.keyed_collate",
    "RunningMoments": "tether.ops.stats",
    "PerPromptStatTracker": "tether.losses.ddpo",
    "get_global_statistics": "tether.ops.stats",
    "compute_accuracy": "tether.trainers.reward",
    "disable_dropout_in_model": "tether.models.dropout:disable_dropout",
    "exact_div": "tether.ops.tensors",
    "pad_to_length": "tether.ops.tensors",
    "get_kbit_device_map": "tether.models.config",
    "get_peft_config": "tether.models.config",
    "get_quantization_config": "tether.models.config",
    # transformers' NEFTune hook (noise on the embeddings' output); TrainingArguments.neftune_noise_alpha
    # switches it on in every tether trainer.
    "neftune_post_forward_hook": "transformers.integrations.neftune",
    "peft_module_casting_to_bf16": "tether.models.adapter_dtypes",
    "trl_sanitze_kwargs_for_tagging": "tether.trainers.hub_tags:merge_hub_tags",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
