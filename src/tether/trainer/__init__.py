"""TRL 0.7's `trl.trainer` names, pointing at tether's implementations (imported on first use).

    from tether.trainer import PPOConfig, PPOTrainer, RunningMoments, ConstantLengthDataset

The trainers themselves live in `tether.trainers` (one file per method); `tether.trainer.utils` holds
the names of TRL's `trl/trainer/utils.py`. DDPOTrainer needs diffusers (`pip install "tether[diffusion]"`).
"""

from __future__ import annotations

from .._lazy import lazy_exports
from ..experimental.judges import _EXPORTS as _JUDGES

_EXPORTS = {
    "AdaptiveKLController": "tether.losses.kl",
    "FixedKLController": "tether.losses.kl",
    "BaseTrainer": "tether.trainer.base",
    "ConstantLengthDataset": "tether.data.constant_length",
    "DataCollatorForCompletionOnlyLM": "tether.data.collate",
    "DPOTrainer": "tether.trainers.dpo",
    "IterativeSFTTrainer": "tether.trainers.iterative_sft",
    "ModelConfig": "tether.models.config",
    "PPOConfig": "tether.trainers.ppo_config",
    "PPOTrainer": "tether.trainers.ppo",
    "RewardConfig": "tether.trainers.reward",
    "RewardTrainer": "tether.trainers.reward",
    "compute_accuracy": "tether.trainers.reward",
    "RunningMoments": "tether.ops.stats",
    "SFTTrainer": "tether.trainers.sft",
    "disable_dropout_in_model": "tether.models.dropout:disable_dropout",
    "peft_module_casting_to_bf16": "tether.models.adapter_dtypes",
    "is_diffusers_available": "tether.import_utils",
    "BEMACallback": "tether.callbacks",
    "LogCompletionsCallback": "tether.callbacks",
    "RichProgressCallback": "tether.callbacks",
    "SyncRefModelCallback": "tether.callbacks",
    "WeaveCallback": "tether.callbacks",
    "OnlineDPOConfig": "tether.trainers.online_dpo",
    "OnlineDPOTrainer": "tether.trainers.online_dpo",
    **_JUDGES,
    "DistillationConfig": "tether.trainers.gkd_config",
    "DistillationTrainer": "tether.trainers.gkd",
    "DDPOConfig": "tether.trainers.ddpo_config",
    "DDPOTrainer": "tether.trainers.ddpo",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
