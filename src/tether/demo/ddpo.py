"""`tether demo --method ddpo`: RL for a diffusion model on a laptop CPU, offline (Black et al., 2023).

    setup:    a tiny Stable-Diffusion-shaped pipeline built from configs (demo/tiny_diffusion.py), its UNet
              pre-trained for a few hundred steps as a denoiser of made-up latents that decode to images
              from flat to noisy, saved under base-sd/
    before:   images sampled from fixed noise and their reward, JPEG incompressibility (the paper's offline
              reward: the JPEG file size in kB; more detail and contrast compress worse)
    DDPO:     DDPOTrainer with a LoRA adapter on the UNet, in ddpo/ (metrics.jsonl, sample images, checkpoint)
    after:    the same fixed noise through the trained pipeline, saved to ddpo-sd/ and loaded back

The report (report.html) embeds the reward curve and the first and last epochs' images; story.json holds the
numbers. The full demo takes a couple of minutes on 2 CPU cores; --quick about half a minute. Needs diffusers
(`pip install "tether[diffusion]"`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RULE = "=" * 78
STORY_FILE = "story.json"
EVAL_SEED = 1234  # the fixed noise of the before/after images


@dataclass(frozen=True)
class DDPODemoSizes:
    pretrain_steps: int
    num_epochs: int
    sample_num_steps: int
    sample_batch_size: int
    sample_num_batches_per_epoch: int
    train_batch_size: int
    eval_images: int


FULL = DDPODemoSizes(pretrain_steps=300, num_epochs=20, sample_num_steps=10, sample_batch_size=8,
                     sample_num_batches_per_epoch=2, train_batch_size=4, eval_images=32)
QUICK = DDPODemoSizes(pretrain_steps=30, num_epochs=2, sample_num_steps=4, sample_batch_size=4,
                      sample_num_batches_per_epoch=1, train_batch_size=2, eval_images=8)


def demo_config(output_dir: str | os.PathLike, sizes: DDPODemoSizes, seed: int = 0) -> Any:
    """The DDPOConfig of the demo. LoRA's learning rate and clip range are larger than TRL's defaults (3e-4, 1e-4,
    tuned for Stable Diffusion over hundreds of epochs of 256 images): here 20 epochs of 16 images must show it."""
    from ..trainers.ddpo_config import DDPOConfig

    return DDPOConfig(
        num_epochs=sizes.num_epochs, sample_num_steps=sizes.sample_num_steps, sample_batch_size=sizes.sample_batch_size,
        sample_num_batches_per_epoch=sizes.sample_num_batches_per_epoch, train_batch_size=sizes.train_batch_size,
        train_learning_rate=1e-2, train_clip_range=1e-2, sample_guidance_scale=1.0, train_cfg=False,
        mixed_precision="no", save_freq=max(sizes.num_epochs - 1, 1), num_checkpoint_limit=1, seed=seed,
        output_dir=os.path.join(output_dir, "ddpo"), exp_name="tether-demo-ddpo", log_with=None)


def _evaluate(pipeline: Any, sizes: DDPODemoSizes, prompts: tuple[str, ...], folder: Path, step: int) -> float:
    """The mean JPEG size in kB of `eval_images` images from the fixed noise of EVAL_SEED, recorded in `folder`."""
    import torch

    from ..rollout.image_rewards import jpeg_sizes_kb

    names = [prompts[i % len(prompts)] for i in range(sizes.eval_images)]
    output = pipeline(prompt=names, num_inference_steps=sizes.sample_num_steps, guidance_scale=1.0, eta=1.0,
                      output_type="pt", generator=torch.Generator().manual_seed(EVAL_SEED))
    _record_eval(folder, step, output.images, names)
    return float(jpeg_sizes_kb(output.images).mean())


def _record_eval(folder: Path, step: int, images: Any, prompts: list[str]) -> None:
    """The fixed-noise images as a run of their own for the report: a metrics row (mean reward) at `step` and a
    few images in samples.jsonl; before.png / after.png hold 8 of them side by side."""
    import numpy as np
    from PIL import Image

    from ..reports.runfiles import METRICS_FILE, SAMPLES_FILE, save_run_config, write_jsonl
    from ..rollout.image_rewards import jpeg_sizes_kb

    (folder / "images").mkdir(parents=True, exist_ok=True)
    sizes = jpeg_sizes_kb(images)
    pixels = [(im.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8) for im in images]
    rows = []
    for i in range(4):
        name = f"images/step_{step}_{i}.png"
        Image.fromarray(pixels[i]).save(folder / name)
        rows.append({"step": step, "prompt": prompts[i], "image": name, "reward": float(sizes[i])})
    write_jsonl(folder / SAMPLES_FILE, rows)
    write_jsonl(folder / METRICS_FILE, [{"step": step, "reward_mean": float(sizes.mean()),
                                         "reward_std": float(sizes.std())}])
    save_run_config(folder, "ddpo", {"eval_seed": EVAL_SEED, "images": len(pixels)})
    row = np.concatenate(pixels[:8], axis=1)
    Image.fromarray(row).resize((row.shape[1] * 3, row.shape[0] * 3), Image.NEAREST).save(
        folder.parent / ("before.png" if step == 0 else "after.png"))


def run_ddpo_demo(output_dir: str | os.PathLike = "./tether-demo-ddpo", quick: bool = False, seed: int = 0,
                  num_threads: int | None = 1) -> dict[str, Any]:
    """Build, evaluate, train with DDPO, evaluate again, report; returns the story (also in story.json)."""
    import torch

    from ..models.diffusion import DefaultDDPOStableDiffusionPipeline
    from ..reports.page import write_report
    from ..reports.runfiles import METRICS_FILE, read_jsonl
    from ..rollout.image_rewards import jpeg_incompressibility
    from ..trainers.ddpo import DDPOTrainer
    from .tiny_diffusion import PROMPTS, build_tiny_sd_pipeline

    start, output_dir, sizes = time.perf_counter(), Path(output_dir), QUICK if quick else FULL
    threads = torch.get_num_threads()
    if num_threads is not None and "OMP_NUM_THREADS" not in os.environ:  # tiny convolutions: one thread is faster
        torch.set_num_threads(num_threads)
    try:
        _quiet()
        output_dir.mkdir(parents=True, exist_ok=True)
        print(f"\n{RULE}\nSetup: a tiny Stable Diffusion pipeline, its UNet pre-trained {sizes.pretrain_steps} steps "
              f"as a denoiser\n{RULE}", flush=True)
        base = build_tiny_sd_pipeline(output_dir / "base-sd", seed=seed, pretrain_steps=sizes.pretrain_steps)
        pipeline = DefaultDDPOStableDiffusionPipeline(base, use_lora=True)
        pipeline.set_progress_bar_config(disable=True)
        evaluation = output_dir / "eval"
        for previous in ("eval", "ddpo", "ddpo-sd"):  # a rerun starts over (the built base-sd/ is kept)
            shutil.rmtree(output_dir / previous, ignore_errors=True)
        before = _evaluate(pipeline, sizes, PROMPTS, evaluation, step=0)
        print(f"Reward (JPEG size, kB) of {sizes.eval_images} images from fixed noise, before DDPO: {before:.3f}")

        print(f"\n{RULE}\nDDPO: {sizes.num_epochs} epochs of {sizes.sample_batch_size * sizes.sample_num_batches_per_epoch}"
              f" images, LoRA on the UNet, reward = JPEG incompressibility\n{RULE}", flush=True)
        config = demo_config(output_dir, sizes, seed)
        draws = iter(range(1 << 30))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no image_samples_hook: the report shows the images instead
            trainer = DDPOTrainer(config, jpeg_incompressibility,
                                  lambda: (PROMPTS[next(draws) % len(PROMPTS)], {}), pipeline)
        pipeline.set_progress_bar_config(disable=True)
        trainer.train()
        rows = read_jsonl(Path(config.output_dir) / METRICS_FILE)[-sizes.num_epochs:]
        for row in rows:
            print(f"  epoch {row['step']:3d}  reward {row['reward_mean']:.3f} +- {row['reward_std']:.3f}  "
                  f"approx_kl {row.get('approx_kl', 0):.2e}  clipfrac {row.get('clipfrac', 0):.2f}", flush=True)
        trained = output_dir / "ddpo-sd"
        trainer.save_pretrained(str(trained))  # the base weights and the LoRA adapter, as safetensors
        reloaded = DefaultDDPOStableDiffusionPipeline(str(trained), use_lora=True)
        reloaded.set_progress_bar_config(disable=True)
        after = _evaluate(reloaded, sizes, PROMPTS, evaluation, step=sizes.num_epochs)
        story = {"reward_before": before, "reward_after": after, "epochs": [r["reward_mean"] for r in rows],
                 "sizes": asdict(sizes), "quick": quick, "seconds": time.perf_counter() - start}
        notes = [f"DDPO on a tiny Stable Diffusion pipeline (LoRA on its UNet), reward = JPEG incompressibility "
                 f"(file size in kB at quality 95): {before:.3f} -> {after:.3f} kB on {sizes.eval_images} images "
                 f"from the same fixed noise (before.png, after.png).",
                 f"Training reward per epoch: {rows[0]['reward_mean']:.3f} (first) -> {rows[-1]['reward_mean']:.3f} "
                 f"(last). The table shows the first and last epochs' images."]
        report = write_report(output_dir, title="tether demo: DDPO", notes=notes, runs=[
            ("DDPO training (reward per epoch; images of the first and last epochs)", config.output_dir),
            ("The same fixed noise before and after DDPO", evaluation)])
        with open(output_dir / STORY_FILE, "w", encoding="utf-8") as f:
            json.dump(story, f, indent=2)
    finally:
        torch.set_num_threads(threads)
    print(f"\n{RULE}\nSummary{' (--quick)' if quick else ''}: {story['seconds']:.0f} s, everything under "
          f"{output_dir}\n{RULE}")
    print(f"  JPEG incompressibility of the same {sizes.eval_images} noises: {before:.3f} kB before DDPO -> "
          f"{after:.3f} kB after ({after - before:+.3f})")
    print(f"  trained pipeline (LoRA): {trained}  -> DefaultDDPOStableDiffusionPipeline('{trained}')")
    print(f"  report (reward curve, images before and after): {report.path}")
    return story


def _quiet() -> None:
    """Drop the weight-loading bars and diffusers' notices (the LoRA loader's note about the text encoder)."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
