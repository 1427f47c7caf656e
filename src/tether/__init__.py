"""tether: post-training for transformer language models, with TRL's names and call shapes.

Public names are imported on first use, so `import tether` (and the CLI's start) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "SFTConfig": "tether.trainers.sft",
    "SFTTrainer": "tether.trainers.sft",
    "RewardConfig": "tether.trainers.reward",
    "RewardTrainer": "tether.trainers.reward",
    "RewardModelScorer": "tether.rollout.rewards",
    "RewardFunctionError": "tether.rollout.rewards",
    "DPOConfig": "tether.trainers.dpo",
    "DPOTrainer": "tether.trainers.dpo",
    "ORPOConfig": "tether.trainers.orpo",
    "ORPOTrainer": "tether.trainers.orpo",
    "CPOConfig": "tether.trainers.cpo",
    "CPOTrainer": "tether.trainers.cpo",
    "KTOConfig": "tether.trainers.kto",
    "KTOTrainer": "tether.trainers.kto",
    "GRPOConfig": "tether.trainers.grpo",
    "GRPOTrainer": "tether.trainers.grpo",
    "RLOOConfig": "tether.trainers.rloo",
    "RLOOTrainer": "tether.trainers.rloo",
    "PPOConfig": "tether.trainers.ppo_config",
    "PPOTrainer": "tether.trainers.ppo",
    "AutoModelForCausalLMWithValueHead": "tether.models.value_head",
    "AutoModelForSeq2SeqLMWithValueHead": "tether.models.value_head",
    "respond_to_batch": "tether.rollout.generation",
    "create_reference_model": "tether.models.reference",
    "DatasetError": "tether.data.formats",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tether' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
