"""DDPO: RL fine-tuning of a text-to-image diffusion model on a reward of the final image (Black et al., 2023),
with TRL 0.7's API: `DDPOTrainer(config, reward_function, prompt_function, sd_pipeline, image_samples_hook)`.

One epoch (`step`) reads as the algorithm:
  1. sample:     prompts from `prompt_function`; images by the stochastic DDIM sampler, keeping every latent
                 x_T ... x_0 and each step's log-probability (models/diffusion.py)
  2. reward:     `reward_function(images, prompts, metadata)` per batch (in a thread pool with async rewards)
  3. advantages: rewards normalised over the batch, or per prompt (losses/ddpo.py)
  4. update:     per sample, a random `train_timestep_fraction` of its steps; each re-scored under the current
                 UNet (with guidance when `train_cfg`), DDPO_IS (clipped ratio) or DDPO_SF loss; one optimizer
                 step per `train_gradient_accumulation_steps` batches, all their timesteps summed
Shapes: b = samples, T = denoising steps, c x h x w = one latent.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Callable
from concurrent import futures
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration, set_seed

from ..distributed import destroy_process_group_at_exit
from ..losses.ddpo import DDPO_LOSSES, PerPromptStatTracker, batch_advantages
from ..losses.ppo import clipped_surrogate
from ..models.diffusion import DDPOStableDiffusionPipeline
from ..reports.runfiles import METRICS_FILE, SAMPLES_FILE, save_run_config, write_jsonl
from ..reports.trackers import log_to_trackers
from .checkpoints import atomic_directory, reporting_write_failures
from .ddpo_config import DDPOConfig
from .finite_guard import NonFiniteGuard, check_finite_weights

CHECKPOINT_PREFIX = "checkpoint_"  # accelerate's automatic naming, which TRL's resume_from expects
STATE_FILE = "ddpo_state.json"  # the epoch and global step a checkpoint was written after
IMAGES_DIR = "images"
IMAGES_PER_EPOCH = 4  # sample images kept for the report (first epoch and latest)
MODEL_CARD = """---
library_name: diffusers
tags:
- tether
- ddpo
- diffusers
- reinforcement-learning
- text-to-image
- stable-diffusion
---

# {model_name}

A text-to-image diffusion model fine-tuned with reinforcement learning (DDPO, Black et al., 2023) by tether's
`DDPOTrainer`, towards a reward computed on its images.
"""


def _result(value: Any) -> Any:
    """A reward function's result, or a future of one (TRL's async reward functions return futures)."""
    return value.result() if isinstance(value, futures.Future) else value


class DDPOTrainer:
    """Denoising Diffusion Policy Optimization for Stable Diffusion pipelines (`DDPOStableDiffusionPipeline`).

    reward_function(images [b, 3, H, W] in [0, 1], prompts, prompt_metadata) -> (rewards [b], reward_metadata);
    prompt_function() -> (prompt, prompt_metadata); image_samples_hook(prompt_image_data, global_step,
    tracker) gets, per sampling batch, [images, prompts, prompt_metadata, rewards, reward_metadata].
    """

    _tag_names = ["tether", "ddpo"]

    def __init__(self, config: DDPOConfig, reward_function: Callable[..., Any], prompt_function: Callable[[], Any],
                 sd_pipeline: DDPOStableDiffusionPipeline,
                 image_samples_hook: Callable[[Any, Any, Any], Any] | None = None) -> None:
        if not isinstance(config, DDPOConfig):
            raise ValueError(f"config must be a DDPOConfig, got {type(config).__name__}.")
        if not isinstance(sd_pipeline, DDPOStableDiffusionPipeline):
            raise ValueError("sd_pipeline must be a DDPOStableDiffusionPipeline, e.g. "
                             "DefaultDDPOStableDiffusionPipeline(model_id_or_path).")
        if image_samples_hook is None:
            warnings.warn("No image_samples_hook provided; no images will be logged to a tracker.", stacklevel=2)
        self.config, self.reward_fn, self.prompt_fn = config, reward_function, prompt_function
        self.image_samples_callback = image_samples_hook
        self.output_dir = config.output_dir or config.project_kwargs.get("project_dir") or config.logdir
        self.num_train_timesteps = config.num_train_timesteps
        # Gradients accumulate over every trained timestep of `train_gradient_accumulation_steps` batches.
        # sync_with_dataloader=False: there is no prepared dataloader here, and accelerate's gradient state is
        # process-wide, so a dataloader some earlier run left unfinished (an interrupted Trainer in a notebook)
        # would otherwise make every micro-step an optimizer step.
        self.accelerator = Accelerator(
            log_with=config.log_with, mixed_precision=config.mixed_precision,
            project_config=ProjectConfiguration(**config.project_kwargs),
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=config.train_gradient_accumulation_steps * self.num_train_timesteps,
                sync_with_dataloader=False),
            **config.accelerator_kwargs)
        destroy_process_group_at_exit(self.accelerator)
        ok, message = self._config_check()
        if not ok:
            raise ValueError(message)
        if config.log_with is not None and self.accelerator.is_main_process:
            self.accelerator.init_trackers(
                config.tracker_project_name, init_kwargs=config.tracker_kwargs,
                config={k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()})
        if image_samples_hook is not None and config.log_with is None:
            warnings.warn("image_samples_hook is set but log_with is None: the hook's tracker argument is None.",
                          stacklevel=2)
        set_seed(config.seed, device_specific=True)
        self.sd_pipeline = sd_pipeline
        sd_pipeline.set_progress_bar_config(position=1, disable=not self.accelerator.is_local_main_process,
                                            leave=False, desc="Timestep", dynamic_ncols=True)
        # The frozen parts only sample, so they run in the mixed-precision dtype; trained weights stay fp32.
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision, torch.float32)
        for part in (sd_pipeline.vae, sd_pipeline.text_encoder, sd_pipeline.unet):
            # (dtype only when it changes: diffusers warns at every cast, even a no-op one)
            part.to(self.accelerator.device, **({"dtype": dtype} if part.dtype != dtype else {}))
        trainable = sd_pipeline.get_trainable_layers()
        self.accelerator.register_save_state_pre_hook(self._save_model_hook)
        self.accelerator.register_load_state_pre_hook(self._load_model_hook)
        if config.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
        parameters = trainable if isinstance(trainable, list) else [p for p in trainable.parameters() if p.requires_grad]
        self.optimizer = self._setup_optimizer(parameters)
        with torch.no_grad():
            self.neg_prompt_embed = sd_pipeline.text_encoder(self._tokenize([config.negative_prompts or ""]))[0]
        self.stat_tracker = (PerPromptStatTracker(config.per_prompt_stat_tracking_buffer_size,
                                                  config.per_prompt_stat_tracking_min_count)
                             if config.per_prompt_stat_tracking else None)
        # LoRA trains fp32 weights beside a half-precision base without autocast; a full UNet needs it.
        self.autocast = sd_pipeline.autocast or self.accelerator.autocast
        # Training passes go through the prepared UNet (under DDP its forward is what all-reduces gradients).
        if isinstance(trainable, list):
            self.trainable_layers, self.optimizer = self.accelerator.prepare(trainable, self.optimizer)
            self.training_unet = sd_pipeline.unet
        else:
            self.training_unet, self.optimizer = self.accelerator.prepare(trainable, self.optimizer)
            self.trainable_layers = [p for p in self.training_unet.parameters() if p.requires_grad]
        # A step whose gradients are not finite is skipped (weights and optimizer state unchanged); several in a
        # row stop training, so a non-finite loss never reaches the weights, nor a checkpoint.
        self._optimizer_steps = 0
        self.nonfinite_guard = NonFiniteGuard(config.max_nonfinite_steps, lambda: self._optimizer_steps)
        self.nonfinite_guard.attach(self.optimizer)
        self.executor = (futures.ThreadPoolExecutor(max_workers=config.max_workers)
                         if config.async_reward_computation else None)
        self.first_epoch, self.global_step = 0, 0
        if config.resume_from:
            self._resume(config.resume_from)
        if self.accelerator.is_main_process:
            save_run_config(self.output_dir, "ddpo", config.to_dict())

    # ----- 1. sampling --------------------------------------------------------------------------------------
    def _tokenize(self, prompts: list[str]) -> torch.Tensor:
        tokenizer = self.sd_pipeline.tokenizer
        return tokenizer(prompts, return_tensors="pt", padding="max_length", truncation=True,
                         max_length=tokenizer.model_max_length).input_ids.to(self.accelerator.device)

    def _generate_samples(self, iterations: int, batch_size: int) -> tuple[list[dict[str, torch.Tensor]], list[list]]:
        """`iterations` batches of `batch_size` trajectories: (samples, prompt_image_pairs). Each sample dict
        holds prompt_ids, prompt_embeds, timesteps [b, T], latents and next_latents [b, T, c, h, w] (the latent
        before and after each step), log_probs [b, T], negative_prompt_embeds. With async rewards, each batch's
        reward is already submitted: its pair then ends with the future."""
        samples, prompt_image_pairs = [], []
        self.sd_pipeline.unet.eval()
        negative_embeds = self.neg_prompt_embed.repeat(batch_size, 1, 1)
        for _ in range(iterations):
            prompts, prompt_metadata = zip(*[self.prompt_fn() for _ in range(batch_size)])
            prompt_ids = self._tokenize(list(prompts))
            with torch.no_grad():
                prompt_embeds = self.sd_pipeline.text_encoder(prompt_ids)[0]
            with self.autocast():
                output = self.sd_pipeline(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds,
                                          num_inference_steps=self.config.sample_num_steps,
                                          guidance_scale=self.config.sample_guidance_scale,
                                          eta=self.config.sample_eta, output_type="pt")
            latents = torch.stack(output.latents, dim=1)  # [b, T + 1, c, h, w]
            samples.append({
                "prompt_ids": prompt_ids, "prompt_embeds": prompt_embeds,
                "timesteps": self.sd_pipeline.scheduler.timesteps.repeat(batch_size, 1),  # [b, T]
                "latents": latents[:, :-1], "next_latents": latents[:, 1:],
                "log_probs": torch.stack(output.log_probs, dim=1),  # [b, T]
                "negative_prompt_embeds": negative_embeds})
            pair = [output.images, prompts, prompt_metadata]
            if self.executor is not None:  # scored while the next batch samples
                pair.append(self.executor.submit(self.reward_fn, output.images, prompts, prompt_metadata))
            prompt_image_pairs.append(pair)
        return samples, prompt_image_pairs

    # ----- 2. rewards ---------------------------------------------------------------------------------------
    def compute_rewards(self, prompt_image_pairs: list[list], is_async: bool = False) -> tuple[tuple, tuple]:
        """(rewards, reward_metadata), one entry per batch: rewards [b] on the accelerator's device. With
        `is_async`, each pair's fourth item is the future of its reward (see `_generate_samples`)."""
        rewards, metadata = [], []
        for pair in prompt_image_pairs:
            images, prompts, prompt_metadata = pair[:3]
            if is_async and len(pair) > 3:
                reward, meta = _result(pair[3])
            else:
                reward, meta = self.reward_fn(images, prompts, prompt_metadata)
            reward = torch.as_tensor(_result(reward), dtype=torch.float32, device=self.accelerator.device).reshape(-1)
            if reward.numel() != len(prompts) or not torch.isfinite(reward).all():
                raise ValueError(f"reward_function must return one finite reward per image ({len(prompts)}), got "
                                 f"{reward.tolist()} for prompts {list(prompts)}.")
            rewards.append(reward)
            metadata.append(_result(meta))
        return tuple(rewards), tuple(metadata)

    # ----- one epoch ----------------------------------------------------------------------------------------
    def step(self, epoch: int, global_step: int) -> int:
        """Sample, score, compute advantages and train on one epoch's samples; returns the new global step."""
        config = self.config
        samples, prompt_image_data = self._generate_samples(config.sample_num_batches_per_epoch,
                                                            config.sample_batch_size)
        samples = {k: torch.cat([s[k] for s in samples]) for k in samples[0]}  # [n, ...], n = batches * b
        rewards, rewards_metadata = self.compute_rewards(prompt_image_data, is_async=self.executor is not None)
        for i, image_data in enumerate(prompt_image_data):
            del image_data[3:]  # the reward future, if any
            image_data.extend([rewards[i], rewards_metadata[i]])
        if self.image_samples_callback is not None:
            tracker = self.accelerator.trackers[0] if self.accelerator.trackers else None
            self.image_samples_callback(prompt_image_data, global_step, tracker)
        rewards = self.accelerator.gather(torch.cat(rewards)).cpu().numpy()  # [n * processes]
        epoch_logs = {"epoch": epoch, "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std())}
        if self.accelerator.is_main_process:
            log_to_trackers(self.accelerator, {**epoch_logs, "reward": rewards}, None, global_step)
        # 3. advantages: over every process's samples, then each process keeps its own rows
        if self.stat_tracker is not None:
            prompt_ids = self.accelerator.gather(samples["prompt_ids"]).cpu().numpy()
            prompts = self.sd_pipeline.tokenizer.batch_decode(prompt_ids, skip_special_tokens=True)
            advantages = self.stat_tracker.update(prompts, rewards)
        else:
            advantages = batch_advantages(rewards)
        samples["advantages"] = torch.as_tensor(advantages, dtype=torch.float32).reshape(
            self.accelerator.num_processes, -1)[self.accelerator.process_index].to(self.accelerator.device)
        del samples["prompt_ids"]
        # 4. update
        n, num_timesteps = samples["timesteps"].shape
        train_logs: dict[str, list[float]] = defaultdict(list)
        for inner_epoch in range(config.train_num_inner_epochs):
            order = torch.randperm(n, device=self.accelerator.device)
            samples = {k: v[order] for k, v in samples.items()}
            # Each sample trains on its own random subset of steps: the first num_train_timesteps of a permutation.
            steps = torch.stack([torch.randperm(num_timesteps, device=self.accelerator.device) for _ in range(n)])
            rows = torch.arange(n, device=self.accelerator.device)[:, None]
            for key in ("timesteps", "latents", "next_latents", "log_probs"):
                samples[key] = samples[key][rows, steps]  # [n, T, ...], steps shuffled per row
            batches = [{k: v[i:i + config.train_batch_size] for k, v in samples.items()}
                       for i in range(0, n, config.train_batch_size)]
            self.sd_pipeline.unet.train()
            global_step = self._train_batched_samples(inner_epoch, epoch, global_step, batches, train_logs)
            if not self.accelerator.sync_gradients:
                raise ValueError("The inner epoch ended between optimizer steps: the samples per epoch must be a "
                                 "multiple of train_batch_size * train_gradient_accumulation_steps.")
        epoch_logs.update({k: float(np.mean(v)) for k, v in train_logs.items()})
        self._write_epoch(epoch, global_step, epoch_logs, prompt_image_data)
        if epoch != 0 and epoch % config.save_freq == 0:
            self.save_state(epoch, global_step)
        return global_step

    def calculate_loss(self, latents: torch.Tensor, timesteps: torch.Tensor, next_latents: torch.Tensor,
                       log_probs: torch.Tensor, advantages: torch.Tensor, embeds: torch.Tensor,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, approx_kl, clipfrac) of one denoising step of a batch: latents, next_latents [b, c, h, w],
        timesteps, log_probs (at sampling), advantages [b]; embeds [2b, tokens, d] ([negative; prompt]) with
        train_cfg, else [b, tokens, d]."""
        config = self.config
        with self.autocast():
            if config.train_cfg:
                noise_pred = self.training_unet(torch.cat([latents] * 2), torch.cat([timesteps] * 2), embeds).sample
                noise_uncond, noise_text = noise_pred.chunk(2)
                noise_pred = noise_uncond + config.sample_guidance_scale * (noise_text - noise_uncond)
            else:
                noise_pred = self.training_unet(latents, timesteps, embeds).sample
            log_prob = self.sd_pipeline.scheduler_step(noise_pred, timesteps, latents, eta=config.sample_eta,
                                                       prev_sample=next_latents).log_probs  # [b]
        out = DDPO_LOSSES[config.train_loss_type](log_prob.float(), log_probs.float(), advantages,
                                                  config.train_clip_range, config.train_adv_clip_max)
        return out.loss, out.approx_kl, out.clipfrac

    def loss(self, advantages: torch.Tensor, clip_range: float, ratio: torch.Tensor) -> torch.Tensor:
        """TRL's clipped objective from the probability ratio: mean max(-A * r, -A * clip(r, 1 - eps, 1 + eps))."""
        return clipped_surrogate(ratio.log(), advantages, clip_range, clip_range)[0].mean()

    def _train_batched_samples(self, inner_epoch: int, epoch: int, global_step: int, batched_samples: list[dict],
                               epoch_logs: dict[str, list[float]] | None = None) -> int:
        """Train on the batches, each over its first num_train_timesteps (shuffled) steps; log each optimizer
        step's mean loss, approx_kl and clipfrac. Returns the new global step."""
        info: dict[str, list[torch.Tensor]] = defaultdict(list)
        for sample in batched_samples:
            embeds = (torch.cat([sample["negative_prompt_embeds"], sample["prompt_embeds"]]) if self.config.train_cfg
                      else sample["prompt_embeds"])
            for j in range(self.num_train_timesteps):
                with self.accelerator.accumulate(self.training_unet):
                    loss, approx_kl, clipfrac = self.calculate_loss(
                        sample["latents"][:, j], sample["timesteps"][:, j], sample["next_latents"][:, j],
                        sample["log_probs"][:, j], sample["advantages"], embeds)
                    info["approx_kl"].append(approx_kl)
                    info["clipfrac"].append(clipfrac)
                    info["loss"].append(loss.detach())
                    self.accelerator.backward(loss)
                    if self.accelerator.sync_gradients:
                        self.accelerator.clip_grad_norm_(self.trainable_layers, self.config.train_max_grad_norm)
                    self.optimizer.step()  # a no-op between accumulation boundaries; skipped if not finite
                    self.optimizer.zero_grad()
                if self.accelerator.sync_gradients:
                    self._optimizer_steps += 1
                    logs = self.accelerator.reduce({k: torch.stack(v).mean() for k, v in info.items()}, reduction="mean")
                    logs = {k: float(v) for k, v in logs.items()}
                    if epoch_logs is not None:
                        for key, value in logs.items():
                            epoch_logs[key].append(value)
                    if self.accelerator.is_main_process:
                        log_to_trackers(self.accelerator, {**logs, "epoch": epoch, "inner_epoch": inner_epoch}, None,
                                        global_step)
                    global_step += 1
                    info = defaultdict(list)
        return global_step

    def _config_check(self) -> tuple[bool, str]:
        """The batch sizes that depend on the process count (DDPOConfig checks the rest)."""
        config, processes = self.config, self.accelerator.num_processes
        samples_per_epoch = config.sample_batch_size * processes * config.sample_num_batches_per_epoch
        total_train_batch_size = config.train_batch_size * processes * config.train_gradient_accumulation_steps
        if samples_per_epoch % total_train_batch_size:
            return False, (f"DDPOConfig: the samples per epoch (sample_batch_size * processes * "
                           f"sample_num_batches_per_epoch = {samples_per_epoch}) must be a multiple of the samples "
                           f"per optimizer step (train_batch_size * processes * train_gradient_accumulation_steps "
                           f"= {total_train_batch_size}): lower train_gradient_accumulation_steps or sample more.")
        return True, ""

    def _setup_optimizer(self, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        config = self.config
        if config.train_use_8bit_adam:
            import bitsandbytes

            optimizer_class = bitsandbytes.optim.AdamW8bit
        else:
            optimizer_class = torch.optim.AdamW
        return optimizer_class(parameters, lr=config.train_learning_rate, eps=config.train_adam_epsilon,
                               betas=(config.train_adam_beta1, config.train_adam_beta2),
                               weight_decay=config.train_adam_weight_decay)

    # ----- the run: training, logs, checkpoints -------------------------------------------------------------
    def train(self, epochs: int | None = None) -> None:
        """Train until epoch `epochs` (default config.num_epochs), from the resumed epoch if any; then write the
        run's report (report.html with the reward curve and sample images)."""
        for epoch in range(self.first_epoch, self.config.num_epochs if epochs is None else epochs):
            self.global_step = self.step(epoch, self.global_step)
        if self.executor is not None:
            self.executor.shutdown(wait=True)
            self.executor = None
        if self.accelerator.is_main_process:
            from ..reports.page import write_report

            write_report(self.output_dir, title=f"DDPO: {self.config.exp_name}")

    def _write_epoch(self, epoch: int, global_step: int, logs: dict[str, float], prompt_image_data: list) -> None:
        """metrics.jsonl gets the epoch's means; samples.jsonl and images/ a few images of its last batch (the
        first epoch's and the latest epoch's PNG files are kept, for the report's before/after)."""
        if not self.accelerator.is_main_process:
            return
        from PIL import Image

        write_jsonl(os.path.join(self.output_dir, METRICS_FILE), [{"step": epoch + 1, "global_step": global_step,
                                                                    **logs}])
        images, prompts, _, rewards, _ = prompt_image_data[-1]
        folder = os.path.join(self.output_dir, IMAGES_DIR)
        os.makedirs(folder, exist_ok=True)
        epochs = {int(name.split("_")[1]) for name in os.listdir(folder) if name.startswith("epoch_")}
        keep = (f"epoch_{min(epochs | {epoch}):05d}_", f"epoch_{epoch:05d}_")  # the run's first epoch, and this one
        for name in os.listdir(folder):
            if not name.startswith(keep):
                os.remove(os.path.join(folder, name))
        rows = []
        for i in range(min(IMAGES_PER_EPOCH, len(prompts))):
            name = f"{IMAGES_DIR}/epoch_{epoch:05d}_{i}.png"
            pixels = (images[i].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(self.output_dir, name))
            rows.append({"step": epoch + 1, "prompt": prompts[i], "image": name, "reward": float(rewards[i])})
        write_jsonl(os.path.join(self.output_dir, SAMPLES_FILE), rows)

    def _checkpoint_root(self) -> str:
        return os.path.join(self.output_dir, "checkpoints")

    def save_state(self, epoch: int, global_step: int) -> str:
        """Checkpoint (trained layers as safetensors, optimizer, random states) into
        checkpoints/checkpoint_<epoch>, written whole or not at all; keeps the newest num_checkpoint_limit."""
        path = os.path.join(self._checkpoint_root(), f"{CHECKPOINT_PREFIX}{epoch}")
        check_finite_weights(self.sd_pipeline.unet, path)
        project = self.accelerator.project_configuration
        automatic, project.automatic_checkpoint_naming = project.automatic_checkpoint_naming, False
        try:  # our own names: checkpoint_<epoch>, so a resumed run knows its epoch
            with atomic_directory(path, writer=self.accelerator.is_main_process,
                                  barrier=self.accelerator.wait_for_everyone) as partial:
                self.accelerator.save_state(partial)
                if self.accelerator.is_main_process:
                    with open(os.path.join(partial, STATE_FILE), "w") as f:
                        json.dump({"epoch": epoch, "global_step": global_step}, f)
        finally:
            project.automatic_checkpoint_naming = automatic
        if self.accelerator.is_main_process:
            limit = self.config.project_kwargs.get("total_limit") or self.config.num_checkpoint_limit
            for old in self._checkpoints(self._checkpoint_root())[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    @staticmethod
    def _checkpoints(folder: str) -> list[str]:
        """Complete checkpoint_<N> folders of `folder`, oldest first."""
        if not os.path.isdir(folder):
            return []
        names = [n for n in os.listdir(folder) if n.startswith(CHECKPOINT_PREFIX) and n[len(CHECKPOINT_PREFIX):].isdigit()]
        return [os.path.join(folder, n) for n in sorted(names, key=lambda n: int(n[len(CHECKPOINT_PREFIX):]))]

    def _resume(self, resume_from: str) -> None:
        path = os.path.normpath(os.path.expanduser(resume_from))
        if not os.path.basename(path).startswith(CHECKPOINT_PREFIX):
            found = self._checkpoints(path) or self._checkpoints(os.path.join(path, "checkpoints"))
            if not found:
                raise ValueError(f"DDPOConfig.resume_from: no {CHECKPOINT_PREFIX}<N> folder in {path} (or its "
                                 "checkpoints/).")
            path = found[-1]
        self.accelerator.load_state(path)
        state_file = os.path.join(path, STATE_FILE)
        if os.path.isfile(state_file):
            with open(state_file) as f:
                state = json.load(f)
            self.first_epoch, self.global_step = state["epoch"] + 1, state["global_step"]
        else:  # a TRL checkpoint: its number is the epoch
            self.first_epoch = int(os.path.basename(path)[len(CHECKPOINT_PREFIX):]) + 1

    def _save_model_hook(self, models: list, weights: list, output_dir: str) -> None:
        self.sd_pipeline.save_checkpoint(models, weights, output_dir)
        weights.pop()  # saved above; accelerate must not save the model again

    def _load_model_hook(self, models: list, input_dir: str) -> None:
        self.sd_pipeline.load_checkpoint(models, input_dir)
        models.pop()  # loaded above

    # ----- the trained model ----------------------------------------------------------------------------------
    def create_model_card(self, path: str, model_name: str | None = "tether DDPO model") -> None:
        """Write `path`/README.md: a model card with the library and method tags."""
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "README.md"), "w", encoding="utf-8") as f:
            f.write(MODEL_CARD.format(model_name=model_name))

    def _save_pretrained(self, save_directory: str) -> None:
        check_finite_weights(self.sd_pipeline.unet, save_directory)  # before anything is written
        self.sd_pipeline.save_pretrained(save_directory)
        self.create_model_card(save_directory)

    def save_pretrained(self, save_directory: str) -> None:
        """The pipeline (and LoRA weights) as safetensors plus a model card, from the main process; non-finite
        weights are refused (NonFiniteTrainingError) before anything is written."""
        if self.accelerator.is_main_process:
            with reporting_write_failures(save_directory, self._checkpoint_root()):
                self._save_pretrained(save_directory)

    def push_to_hub(self, repo_id: str, *, commit_message: str = "Upload DDPO model", private: bool | None = None,
                    token: str | None = None, **kwargs: Any) -> Any:
        """Save to a temporary folder and upload it to the hub repository `repo_id` (created if needed)."""
        from huggingface_hub import create_repo, upload_folder

        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            return upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message, token=token,
                                 **kwargs)
