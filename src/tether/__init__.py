"""tether: post-training for transformer language models, with TRL's names and call shapes.

Public names are imported on first use, so `import tether` (and the CLI's start) stays light.
`_EXPORTS` maps each name to the module that defines it ("module" or "module:attribute"). TRL's module
paths (`tether.core`, `tether.trainer`, `tether.models`, `tether.import_utils`, `tether.extras`) hold
names pointing at the same implementations.
"""

from __future__ import annotations

from ._lazy import lazy_exports
from .experimental.judges import _EXPORTS as _JUDGES  # the judge names: one table, three paths

__version__ = "0.1.0"

_EXPORTS = {
    "SFTConfig": "tether.trainers.sft",
    "SFTTrainer": "tether.trainers.sft",
    "RewardConfig": "tether.trainers.reward",
    "RewardTrainer": "tether.trainers.reward",
    "RewardModelScorer": "tether.rollout.rewards",
    "RewardFunctionError": "tether.rollout.rewards",
    "RewardFunctionTimeout": "tether.rollout.rewards",
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
    "OnlineDPOConfig": "tether.trainers.online_dpo",
    "OnlineDPOTrainer": "tether.trainers.online_dpo",
    **_JUDGES,
    "PPOConfig": "tether.trainers.ppo_config",
    "PPOTrainer": "tether.trainers.ppo",
    "GKDConfig": "tether.trainers.gkd_config",
    "GKDTrainer": "tether.trainers.gkd",
    "DistillationConfig": "tether.trainers.gkd_config",
    "DistillationTrainer": "tether.trainers.gkd",
    "AutoModelForCausalLMWithValueHead": "tether.models.value_head",
    "AutoModelForSeq2SeqLMWithValueHead": "tether.models.value_head",
    "respond_to_batch": "tether.rollout.generation",
    "create_reference_model": "tether.models.reference",
    "DatasetError": "tether.data.formats",
    # TRL 0.7.11's top-level names (trl/__init__.py)
    "TextEnvironment": "tether.rollout.text_environment",
    "TextHistory": "tether.rollout.text_history",
    # DDPO: the trainer and pipelines need diffusers (pip install "tether[diffusion]"); the config does not.
    "DDPOConfig": "tether.trainers.ddpo_config",
    "DDPOTrainer": "tether.trainers.ddpo",
    "DDPOPipelineOutput": "tether.models.diffusion",
    "DDPOSchedulerOutput": "tether.models.diffusion",
    "DDPOStableDiffusionPipeline": "tether.models.diffusion",
    "DefaultDDPOStableDiffusionPipeline": "tether.models.diffusion",
    "ModelConfig": "tether.models.config",
    "get_peft_config": "tether.models.config",
    "get_quantization_config": "tether.models.config",
    "get_kbit_device_map": "tether.models.config",
    "setup_chat_format": "tether.data.chat_format",
    "clone_chat_template": "tether.data.chat_format",
    "set_seed": "tether.ops.rng",
    "PreTrainedModelWrapper": "tether.models.value_head",
    "IterativeSFTTrainer": "tether.trainers.iterative_sft",
    "BestOfNSampler": "tether.rollout.best_of_n",
    "DataCollatorForCompletionOnlyLM": "tether.data.collate",
    "is_bitsandbytes_available": "tether.import_utils",
    "is_diffusers_available": "tether.import_utils",
    "is_npu_available": "tether.import_utils",
    "is_peft_available": "tether.import_utils",
    "is_wandb_available": "tether.import_utils",
    "is_xpu_available": "tether.import_utils",
    # TRL 1.x's script utilities and callbacks
    "ScriptArguments": "tether.scripts.arguments",
    "DatasetMixtureConfig": "tether.scripts.arguments",
    "TrlParser": "tether.scripts.parser",
    "get_dataset": "tether.scripts.mixture",
    "init_zero_verbose": "tether.scripts.parser",
    "BEMACallback": "tether.callbacks",
    "LogCompletionsCallback": "tether.callbacks",
    "RichProgressCallback": "tether.callbacks",
    "SyncRefModelCallback": "tether.callbacks",
    "WeaveCallback": "tether.callbacks",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
