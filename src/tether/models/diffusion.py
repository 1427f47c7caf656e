"""Stable Diffusion pipelines for DDPO: sampling that keeps each denoising step's latent and log-probability,
and re-scoring a stored step under the current weights (TRL 0.7's `trl.models.modeling_sd_base` names).

- `DDPOStableDiffusionPipeline`: the interface `DDPOTrainer` drives (sampling, `scheduler_step`, the parts,
  trainable layers, saving and accelerate checkpoint hooks).
- `DefaultDDPOStableDiffusionPipeline(model_id, use_lora=True)`: that interface over diffusers'
  `StableDiffusionPipeline` with a DDIM scheduler; with `use_lora`, a LoRA adapter on the UNet's attention
  projections (peft) is what trains, and what `save_pretrained` writes (`pytorch_lora_weights.safetensors`).
- `scheduler_step` / `pipeline_step`: one DDIM step with its log-probability, and the sampling loop.

The step's math is `tether.losses.ddpo`; here the scheduler's tables are looked up and the loop is run.
Shapes: b = images, c x h x w = one latent.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..import_utils import is_diffusers_available
from ..losses.ddpo import ddim_step_with_log_prob

DIFFUSERS_EXTRA = 'pip install "tether[diffusion]"'
if not is_diffusers_available():
    raise ImportError(f"DDPO (DDPOTrainer and the DDPO pipelines) needs diffusers, which is not installed: "
                      f"{DIFFUSERS_EXTRA} (or `pip install diffusers`).")

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' file name for a pipeline's LoRA layers
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the UNet's attention projections


@dataclass
class DDPOPipelineOutput:
    """What DDPO sampling returns: `images` (as `output_type` asks: [b, 3, H, W] in [0, 1] for "pt"),
    `latents` (the T + 1 latents x_T ... x_0, each [b, c, h, w]) and `log_probs` (T tensors [b], the
    log-probability of each step's draw)."""

    images: Any
    latents: list[torch.Tensor]
    log_probs: list[torch.Tensor]


@dataclass
class DDPOSchedulerOutput:
    """One denoising step: `latents` x_{t-1} [b, c, h, w] and its `log_probs` [b] under the step."""

    latents: torch.Tensor
    log_probs: torch.Tensor


class DDPOStableDiffusionPipeline:
    """The interface DDPOTrainer trains through: implement it to bring another pipeline or scheduler."""

    def __call__(self, *args: Any, **kwargs: Any) -> DDPOPipelineOutput:
        raise NotImplementedError

    def scheduler_step(self, *args: Any, **kwargs: Any) -> DDPOSchedulerOutput:
        raise NotImplementedError

    @property
    def unet(self) -> Any:
        raise NotImplementedError

    @property
    def vae(self) -> Any:
        raise NotImplementedError

    @property
    def tokenizer(self) -> Any:
        raise NotImplementedError

    @property
    def scheduler(self) -> Any:
        raise NotImplementedError

    @property
    def text_encoder(self) -> Any:
        raise NotImplementedError

    @property
    def autocast(self) -> Any:
        """A context-manager factory for the training passes, or None for the accelerator's autocast."""
        raise NotImplementedError

    def set_progress_bar_config(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError

    def save_pretrained(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError

    def get_trainable_layers(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        """accelerate's save-state pre-hook: write the trained layers."""
        raise NotImplementedError

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        """accelerate's load-state pre-hook: read the trained layers back."""
        raise NotImplementedError


def _x0_transform(scheduler: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """How the scheduler clips or thresholds the predicted x0 (DDIM's `thresholding` / `clip_sample`)."""
    if scheduler.config.thresholding:
        return scheduler._threshold_sample
    if scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        return lambda x0: x0.clamp(-limit, limit)
    return None


def scheduler_step(scheduler: Any, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
                   eta: float = 0.0, use_clipped_model_output: bool = False,
                   generator: torch.Generator | list[torch.Generator] | None = None,
                   prev_sample: torch.Tensor | None = None) -> DDPOSchedulerOutput:
    """One DDIM step of `scheduler` (a diffusers DDIMScheduler after `set_timesteps`) from `sample` x_t at
    `timestep` (an int, or [b] with each sample's own), with the log-probability of x_{t-1}: drawn, or the
    given `prev_sample` re-scored (`tether.losses.ddpo.ddim_step_with_log_prob`). eta must be > 0 for a
    log-probability (eta = 0 is deterministic DDIM).

    The previous timestep is t - num_train_timesteps // num_inference_steps, clamped at 0: the last step
    lands on abar_0 rather than abar = 1, as the DDPO reference implementation does, so that its variance
    stays positive whatever `set_alpha_to_one` says."""
    if scheduler.num_inference_steps is None:
        raise ValueError("The scheduler has no timesteps yet: call scheduler.set_timesteps(num_steps) first.")
    config = scheduler.config
    timestep = torch.as_tensor(timestep, device="cpu").long().reshape(-1)  # [b] or [1]
    prev_timestep = (timestep - config.num_train_timesteps // scheduler.num_inference_steps).clamp(
        0, config.num_train_timesteps - 1)
    alphas_cumprod = scheduler.alphas_cumprod.cpu()
    latents, log_probs = ddim_step_with_log_prob(
        model_output, sample, alphas_cumprod[timestep], alphas_cumprod[prev_timestep], eta,
        config.prediction_type, _x0_transform(scheduler), use_clipped_model_output, prev_sample, generator)
    return DDPOSchedulerOutput(latents, log_probs)


@torch.no_grad()
def pipeline_step(pipeline: Any, prompt: str | list[str] | None = None, height: int | None = None,
                  width: int | None = None, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                  negative_prompt: str | list[str] | None = None, num_images_per_prompt: int | None = 1,
                  eta: float = 0.0, generator: torch.Generator | list[torch.Generator] | None = None,
                  latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                  negative_prompt_embeds: torch.Tensor | None = None, output_type: str | None = "pil",
                  return_dict: bool = True, callback: Callable[[int, int, torch.Tensor], None] | None = None,
                  callback_steps: int = 1, cross_attention_kwargs: dict[str, Any] | None = None,
                  guidance_rescale: float = 0.0) -> DDPOPipelineOutput:
    """Sample images with a diffusers `StableDiffusionPipeline` (arguments as its `__call__`), keeping every
    latent and each step's log-probability: the trajectory DDPO trains on. Guidance as in Ho & Salimans
    (2022): eps = eps_uncond + guidance_scale * (eps_text - eps_uncond), when guidance_scale > 1."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    height = height or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    width = width or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    pipeline.check_inputs(prompt, height, width, callback_steps, negative_prompt, prompt_embeds,
                          negative_prompt_embeds)
    batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
    device = pipeline._execution_device
    guided = guidance_scale > 1.0
    lora_scale = (cross_attention_kwargs or {}).get("scale")
    prompt_embeds, negative_prompt_embeds = pipeline.encode_prompt(
        prompt, device, num_images_per_prompt, guided, negative_prompt, prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds, lora_scale=lora_scale)
    if guided:  # one UNet pass over [uncond; text]
        prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])  # [2b, tokens, d]
    pipeline.scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = pipeline.scheduler.timesteps
    latents = pipeline.prepare_latents(batch_size * num_images_per_prompt, pipeline.unet.config.in_channels,
                                       height, width, prompt_embeds.dtype, device, generator, latents)
    all_latents, all_log_probs = [latents], []
    with pipeline.progress_bar(total=num_inference_steps) as progress_bar:
        for i, t in enumerate(timesteps):
            model_input = torch.cat([latents] * 2) if guided else latents  # [2b or b, c, h, w]
            model_input = pipeline.scheduler.scale_model_input(model_input, t)
            noise_pred = pipeline.unet(model_input, t, encoder_hidden_states=prompt_embeds,
                                       cross_attention_kwargs=cross_attention_kwargs, return_dict=False)[0]
            if guided:
                noise_uncond, noise_text = noise_pred.chunk(2)
                noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
                if guidance_rescale > 0.0:  # Lin et al., 2023, sec. 3.4
                    noise_pred = rescale_noise_cfg(noise_pred, noise_text, guidance_rescale=guidance_rescale)
            step = scheduler_step(pipeline.scheduler, noise_pred, t, latents, eta, generator=generator)
            latents = step.latents
            all_latents.append(latents)
            all_log_probs.append(step.log_probs)
            progress_bar.update()
            if callback is not None and i % callback_steps == 0:
                callback(i, t, latents)
    if output_type == "latent":
        image, has_nsfw = latents, None
    else:
        image = pipeline.vae.decode(latents / pipeline.vae.config.scaling_factor, return_dict=False)[0]
        image, has_nsfw = pipeline.run_safety_checker(image, device, prompt_embeds.dtype)
    denormalize = [True] * image.shape[0] if has_nsfw is None else [not flagged for flagged in has_nsfw]
    image = pipeline.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize)
    if getattr(pipeline, "final_offload_hook", None) is not None:
        pipeline.final_offload_hook.offload()
    return DDPOPipelineOutput(image, all_latents, all_log_probs)


class DefaultDDPOStableDiffusionPipeline(DDPOStableDiffusionPipeline):
    """DDPO over diffusers' `StableDiffusionPipeline.from_pretrained(pretrained_model_name)` (a hub id or a
    local folder), its scheduler replaced by DDIM and its safety checker dropped. A model folder holding
    `pytorch_lora_weights.safetensors` (what `save_pretrained` writes with LoRA) loads that adapter, and
    training continues it."""

    def __init__(self, pretrained_model_name: str, *, pretrained_model_revision: str = "main",
                 use_lora: bool = True) -> None:
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        self.sd_pipeline = StableDiffusionPipeline.from_pretrained(pretrained_model_name,
                                                                   revision=pretrained_model_revision)
        self.use_lora = use_lora
        self.pretrained_model, self.pretrained_revision = pretrained_model_name, pretrained_model_revision
        if self._load_lora(pretrained_model_name, pretrained_model_revision):
            self.use_lora = True
        elif use_lora and not os.path.isdir(pretrained_model_name):
            warnings.warn(f"{pretrained_model_name} has no {LORA_WEIGHTS}: a new LoRA adapter will be trained.",
                          UserWarning, stacklevel=2)
        self.sd_pipeline.scheduler = DDIMScheduler.from_config(self.sd_pipeline.scheduler.config)
        self.sd_pipeline.safety_checker = None
        self.sd_pipeline.vae.requires_grad_(False)
        self.sd_pipeline.text_encoder.requires_grad_(False)
        self.sd_pipeline.unet.requires_grad_(not self.use_lora)

    def _load_lora(self, name: str, revision: str) -> bool:
        """Load the folder's (or hub repo's) LoRA layers into the UNet, if it has them."""
        if os.path.isdir(name) and not os.path.isfile(os.path.join(name, LORA_WEIGHTS)):
            return False
        try:
            self.sd_pipeline.load_lora_weights(name, weight_name=LORA_WEIGHTS, revision=revision)
        except (OSError, ValueError):  # no such file in the repo (or offline without it cached)
            return False
        return True

    def __call__(self, *args: Any, **kwargs: Any) -> DDPOPipelineOutput:
        return pipeline_step(self.sd_pipeline, *args, **kwargs)

    def scheduler_step(self, *args: Any, **kwargs: Any) -> DDPOSchedulerOutput:
        return scheduler_step(self.sd_pipeline.scheduler, *args, **kwargs)

    @property
    def unet(self) -> Any:
        return self.sd_pipeline.unet

    @property
    def vae(self) -> Any:
        return self.sd_pipeline.vae

    @property
    def tokenizer(self) -> Any:
        return self.sd_pipeline.tokenizer

    @property
    def scheduler(self) -> Any:
        return self.sd_pipeline.scheduler

    @property
    def text_encoder(self) -> Any:
        return self.sd_pipeline.text_encoder

    @property
    def autocast(self) -> Any:
        # LoRA weights train in fp32 beside the half-precision base; full training uses accelerate's autocast.
        return contextlib.nullcontext if self.use_lora else None

    def set_progress_bar_config(self, *args: Any, **kwargs: Any) -> None:
        self.sd_pipeline.set_progress_bar_config(*args, **kwargs)

    def _lora_state_dict(self, unet: Any) -> dict[str, torch.Tensor]:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))

    def save_pretrained(self, output_dir: str) -> None:
        """The pipeline with its base UNet, plus (with LoRA) the adapter as `pytorch_lora_weights.safetensors`,
        all safetensors; `DefaultDDPOStableDiffusionPipeline(output_dir)` loads both back."""
        unet = self.sd_pipeline.unet
        if self.use_lora and getattr(unet, "peft_config", None):
            self.sd_pipeline.save_lora_weights(save_directory=output_dir, unet_lora_layers=self._lora_state_dict(unet),
                                               safe_serialization=True)
            with _without_adapters(unet):  # the base weights, under their own names
                self.sd_pipeline.save_pretrained(output_dir, safe_serialization=True)
        else:
            self.sd_pipeline.save_pretrained(output_dir, safe_serialization=True)

    def get_trainable_layers(self) -> Any:
        """The UNet: with LoRA, its adapter (added now unless one was loaded) is what requires grad, in fp32."""
        unet = self.sd_pipeline.unet
        if not self.use_lora:
            return unet
        if not getattr(unet, "peft_config", None):
            from peft import LoraConfig

            unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.requires_grad_(True)
                param.data = param.data.float()  # trainable weights in fp32 (fp16 gradients would underflow)
        return unet

    def save_checkpoint(self, models: list, weights: list, output_dir: str) -> None:
        if len(models) != 1:
            raise ValueError(f"Expected the one trained UNet in the checkpoint, got {len(models)} models.")
        if self.use_lora and getattr(models[0], "peft_config", None):
            self.sd_pipeline.save_lora_weights(save_directory=output_dir,
                                               unet_lora_layers=self._lora_state_dict(models[0]),
                                               safe_serialization=True)
        elif not self.use_lora:
            models[0].save_pretrained(os.path.join(output_dir, "unet"), safe_serialization=True)
        else:
            raise ValueError(f"Cannot checkpoint {type(models[0]).__name__}: use_lora=True but it has no adapter.")

    def load_checkpoint(self, models: list, input_dir: str) -> None:
        from diffusers import UNet2DConditionModel

        if len(models) != 1:
            raise ValueError(f"Expected the one trained UNet in the checkpoint, got {len(models)} models.")
        if self.use_lora:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            state = load_file(os.path.join(input_dir, LORA_WEIGHTS))  # diffusers names: "unet.<module>.lora.up..."
            state = {k.removeprefix("unet."): v for k, v in state.items()}
            from diffusers.utils import convert_unet_state_dict_to_peft

            set_peft_model_state_dict(models[0], convert_unet_state_dict_to_peft(state))
        else:
            loaded = UNet2DConditionModel.from_pretrained(input_dir, subfolder="unet")
            models[0].load_state_dict(loaded.state_dict())


@contextlib.contextmanager
def _without_adapters(unet: Any):
    """Within the block, `unet.state_dict()` holds the base weights under the names a plain UNet has: each
    peft LoRA layer is swapped for its base layer, then put back (nothing is merged or copied)."""
    from peft.tuners.lora import LoraLayer

    swapped = []
    for name, module in list(unet.named_modules()):
        if isinstance(module, LoraLayer):
            parent_name, _, child = name.rpartition(".")
            parent = unet.get_submodule(parent_name) if parent_name else unet
            setattr(parent, child, module.get_base_layer())
            swapped.append((parent, child, module))
    try:
        yield
    finally:
        for parent, child, module in swapped:
            setattr(parent, child, module)
