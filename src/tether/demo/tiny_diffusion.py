"""A tiny Stable-Diffusion-shaped pipeline built from configs, offline: for the DDPO demo, tests and the
TRL example replay (nothing is downloaded).

The parts are Stable Diffusion's (`UNet2DConditionModel`, `AutoencoderKL`, a CLIP text encoder and a CLIP BPE
tokenizer, a DDIM scheduler with SD's noise schedule) at toy width: about 250k parameters, 8x8x4 latents
decoded to 32x32 RGB images. `build_tiny_sd_pipeline(folder)` saves it with `save_pretrained` (safetensors), so
`DefaultDDPOStableDiffusionPipeline(folder)` and `StableDiffusionPipeline.from_pretrained(folder)` load it
as they would a hub id. Needs diffusers (`pip install "tether[diffusion]"`).
"""

from __future__ import annotations

import json
import os
import string
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

# Stable Diffusion v1's scheduler settings (scaled-linear betas, no x0 clipping, timesteps 1, 21, ... for 50 steps).
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)
MAX_PROMPT_TOKENS = 16  # the text encoder's positions; prompts here are one or two words
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
DECODER_GAIN = 1e-3  # see linear_decoder
# Prompts of the demo and tests (TRL's example script draws from a list of animals like these).
PROMPTS = ("cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird")


def tiny_clip_tokenizer():
    """A CLIP tokenizer over single characters (no merges): each lowercase letter or digit, and its
    end-of-word form `x</w>`, as CLIP's BPE spells them; prompts pad to `MAX_PROMPT_TOKENS`."""
    from transformers import CLIPTokenizer

    symbols = list(string.ascii_lowercase + string.digits + ".,!?'-")
    vocab = {token: i for i, token in enumerate([*symbols, *(s + "</w>" for s in symbols), BOS, EOS])}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_PROMPT_TOKENS)


def tiny_sd_components(seed: int = 0) -> dict:
    """The pipeline's parts, weights drawn from `seed` (torch's default generator is left as it was)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            norm_num_groups=8, sample_size=32)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=MAX_PROMPT_TOKENS,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    linear_decoder(vae)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=DDIMScheduler(**SD_SCHEDULER))


def linear_decoder(vae, gain: float = DECODER_GAIN) -> None:
    """Make a random VAE's decoder (nearly) linear in the latent, in place: each residual branch and the
    mid-block attention output zeroed (so those blocks are identities), the remaining biases zeroed, and the
    input scaled by `gain` in post_quant_conv so that the activations reaching the last GroupNorm are far
    below its eps (1e-6), where it scales instead of normalising. An image's contrast and texture then follow
    its latent's magnitude and texture. A random decoder instead paints about the same texture over any
    latent, and the JPEG size of its images barely depends on what the UNet does."""
    from diffusers.models.resnet import ResnetBlock2D

    decoder = vae.decoder
    with torch.no_grad():
        for name, module in decoder.named_modules():
            if isinstance(module, ResnetBlock2D):
                module.conv2.weight.zero_()
                module.conv2.bias.zero_()
                if module.conv_shortcut is not None:
                    module.conv_shortcut.bias.zero_()
            elif name.endswith("to_out.0") or (name.endswith(".conv") and "upsamplers" in name):
                if name.endswith("to_out.0"):
                    module.weight.zero_()
                module.bias.zero_()
        decoder.conv_in.bias.zero_()
        channels = vae.config.latent_channels
        vae.post_quant_conv.weight.copy_(gain * torch.eye(channels).view(channels, channels, 1, 1))
        vae.post_quant_conv.bias.zero_()


def synthetic_latents(n: int, generator: torch.Generator) -> torch.Tensor:
    """[n, 4, 8, 8] latents of made-up "images": a smooth field (2x2 noise, bilinearly upsampled) of random
    contrast plus fine-grained noise of random strength. Decoded, they range from flat to noisy, so their JPEG
    sizes spread widely (about 0.75 to 1.3 kB): a distribution DDPO can shift either way."""
    contrast = torch.rand(n, 1, 1, 1, generator=generator) * 1.5 + 0.1
    texture = torch.rand(n, 1, 1, 1, generator=generator) * contrast
    smooth = F.interpolate(torch.randn(n, 4, 2, 2, generator=generator), size=8, mode="bilinear",
                           align_corners=False)
    return contrast * smooth + texture * torch.randn(n, 4, 8, 8, generator=generator)


def pretrain_denoiser(components: dict, steps: int, seed: int = 0, batch_size: int = 32,
                      learning_rate: float = 2e-3) -> list[float]:
    """Train the UNet for `steps` steps as a denoiser (DDPM's noise-prediction loss, Ho et al., 2020, eq. 14)
    of `synthetic_latents`, conditioned on the embeddings of a few prompts, in place; returns the losses.
    A random UNet's samples are all alike (latents ~10x too large, whatever the noise); a pre-trained one
    samples the varied distribution above, which is where RL fine-tuning starts from in the paper too."""
    from diffusers import DDPMScheduler

    unet, tokenizer, text_encoder = components["unet"], components["tokenizer"], components["text_encoder"]
    noising = DDPMScheduler.from_config(components["scheduler"].config)
    generator = torch.Generator().manual_seed(seed)
    ids = tokenizer(list(PROMPTS), padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        embeddings = text_encoder(ids)[0]  # [prompts, tokens, d]
    optimizer = torch.optim.AdamW(unet.parameters(), lr=learning_rate)
    losses = []
    unet.train()
    for _ in range(steps):
        x0 = synthetic_latents(batch_size, generator)  # [b, 4, 8, 8]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, noising.config.num_train_timesteps, (batch_size,), generator=generator)
        context = embeddings[torch.randint(0, len(PROMPTS), (batch_size,), generator=generator)]
        loss = F.mse_loss(unet(noising.add_noise(x0, noise, t), t, context).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    unet.eval()
    return losses


def build_tiny_sd_pipeline(folder: str | os.PathLike, seed: int = 0, pretrain_steps: int = 0) -> str:
    """Save a tiny StableDiffusionPipeline into `folder` (once: a folder already holding one is kept) and
    return its path; with `pretrain_steps`, its UNet is first trained that long on `synthetic_latents` (about
    0.1 s a step on one CPU thread). The safety checker and feature extractor are left out, as DDPO drops
    them anyway."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return str(folder)
    components = tiny_sd_components(seed)
    if pretrain_steps:
        pretrain_denoiser(components, pretrain_steps, seed)
    pipeline = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed, so an interrupted build never leaves a half-saved pipeline.
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}-") as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)
        index = Path(staging) / "model_index.json"
        index.write_text(json.dumps({**json.loads(index.read_text()), "_tether_tiny": True}, indent=2))
        os.replace(staging, folder)
        os.makedirs(staging)  # TemporaryDirectory removes it on exit
    return str(folder)


def parameter_count(pipeline) -> int:
    """Parameters of the UNet, VAE and text encoder together."""
    return sum(p.numel() for m in (pipeline.unet, pipeline.vae, pipeline.text_encoder) for p in m.parameters())
