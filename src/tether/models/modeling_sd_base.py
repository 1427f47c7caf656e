"""TRL 0.7's `trl.models.modeling_sd_base` module path: the DDPO pipeline names, pointing at
`tether.models.diffusion` (which needs diffusers: `pip install "tether[diffusion]"`)."""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {name: "tether.models.diffusion" for name in (
    "DDPOPipelineOutput", "DDPOSchedulerOutput", "DDPOStableDiffusionPipeline", "DefaultDDPOStableDiffusionPipeline",
    "pipeline_step", "scheduler_step")}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
