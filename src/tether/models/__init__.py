"""Loading models and tokenizers, and running them for per-token log-probs.

Also TRL 0.7's `trl.models` names, imported on first use so that `import tether.models.<module>` stays
light. The DDPO pipeline names need diffusers (`pip install "tether[diffusion]"`): without it, using one
raises an ImportError saying so.
"""

from __future__ import annotations

from typing import Any

from .._lazy import lazy_exports

_EXPORTS = {
    "AutoModelForCausalLMWithValueHead": "tether.models.value_head",
    "AutoModelForSeq2SeqLMWithValueHead": "tether.models.value_head",
    "PreTrainedModelWrapper": "tether.models.value_head",
    "create_reference_model": "tether.models.reference",
    "setup_chat_format": "tether.data.chat_format",
    "is_diffusers_available": "tether.import_utils",
    "DDPOPipelineOutput": "tether.models.diffusion",
    "DDPOSchedulerOutput": "tether.models.diffusion",
    "DDPOStableDiffusionPipeline": "tether.models.diffusion",
    "DefaultDDPOStableDiffusionPipeline": "tether.models.diffusion",
}

__all__ = sorted([*_EXPORTS, "SUPPORTED_ARCHITECTURES"])

_lazy_getattr, _lazy_dir = lazy_exports(__name__, _EXPORTS, globals())


def __getattr__(name: str) -> Any:
    if name == "SUPPORTED_ARCHITECTURES":  # the value-head classes, as TRL lists them
        from .value_head import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead

        return (AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead)
    return _lazy_getattr(name)


def __dir__() -> list[str]:
    return sorted({*_lazy_dir(), "SUPPORTED_ARCHITECTURES"})
