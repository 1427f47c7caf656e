"""TRL 0.7.11's examples/scripts/ddpo.py under tether, rewritten only by tests/trl_examples/harness.py (trl -> tether
in imports; the hub's CLIP model -> a tiny local CLIP): its Stable Diffusion model is a tiny pipeline built from
configs, passed with its own --pretrained_model flag, and its aesthetic-scorer weights a local folder passed with
--hf_hub_aesthetic_model_id (the script falls back to reading model_id/filename when the hub has no such file).

As written, the script moves its scorer to CUDA unconditionally, so on this CPU machine it stops there (checked);
the replay (harness.ENVIRONMENT_PATCHES) drops that `.cuda()` and trains two epochs with its own logging hook
on TensorBoard, saving a checkpoint, up to its last line, `trainer.push_to_hub`, which offline cannot upload.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers", reason='DDPO needs diffusers: pip install -e ".[diffusion]" (part of .[dev])')

from trl_examples.harness import prepare, run_script  # noqa: E402
from trl_examples.standins import Standins  # noqa: E402

SCRIPT = "scripts/ddpo.py"
AESTHETIC_FOLDER = "aesthetic"  # relative, so that hf_hub_download takes it for a repo id and falls back to the folder


class DiffusionStandins(Standins):
    """The stand-ins of the DDPO example: a tiny SD pipeline, a tiny CLIP with 768-wide image embeddings (what the
    script's aesthetic MLP takes) and that MLP's weights."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self._builders.update({"tiny-sd": self._tiny_sd, "clip-aesthetic": self._clip,
                               "ddpo-aesthetic": self._aesthetic_mlp})

    def _tiny_sd(self, folder: Path) -> None:
        from tether.demo.tiny_diffusion import build_tiny_sd_pipeline

        build_tiny_sd_pipeline(folder / "pipeline")

    def _clip(self, folder: Path) -> None:
        """openai/clip-vit-large-patch14's interface (CLIPModel + CLIPProcessor, 768-d projections) at toy width,
        reading the tiny pipeline's 32x32 images."""
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

        from tether.demo.tiny_diffusion import tiny_clip_tokenizer

        tokenizer = tiny_clip_tokenizer()
        config = CLIPConfig(
            text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=16),
            vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                               num_hidden_layers=1, num_attention_heads=2),
            projection_dim=768)
        CLIPModel(config).save_pretrained(folder)
        image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)

    def _aesthetic_mlp(self, folder: Path) -> None:
        """trl-lib/ddpo-aesthetic-predictor's aesthetic-model.pth: the state dict of the script's MLP (768 -> 1),
        saved with torch.save because that is the file the script reads (with torch.load)."""
        widths = [768, 1024, 128, 64, 16, 1]
        layers = [0, 2, 4, 6, 7]  # the Linear layers' indices in the script's nn.Sequential (Dropouts between)
        state = {}
        for index, (n_in, n_out) in zip(layers, zip(widths, widths[1:])):
            linear = torch.nn.Linear(n_in, n_out)
            state[f"layers.{index}.weight"], state[f"layers.{index}.bias"] = linear.weight, linear.bias
        torch.save({k: v.detach() for k, v in state.items()}, folder / "aesthetic-model.pth")


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> DiffusionStandins:
    return DiffusionStandins(tmp_path_factory.mktemp("ddpo-standins"))


def _run(standins: DiffusionStandins, tmp_path: Path, replay: bool):
    source = prepare(standins, SCRIPT, ("openai/clip-vit-large-patch14",), replay=replay)
    cwd = tmp_path / "run"
    cwd.mkdir(parents=True)
    os.symlink(standins.path("ddpo-aesthetic"), cwd / AESTHETIC_FOLDER)
    args = ["--pretrained_model", str(Path(standins.path("tiny-sd")) / "pipeline"),
            "--hf_hub_aesthetic_model_id", AESTHETIC_FOLDER,
            "--num_epochs", 2, "--sample_num_steps", 3, "--sample_batch_size", 2, "--train_batch_size", 1,
            "--sample_num_batches_per_epoch", 2, "--train_gradient_accumulation_steps", 1,
            "--per_prompt_stat_tracking", True, "--per_prompt_stat_tracking_buffer_size", 32,
            "--mixed_precision", "no", "--log_with", "tensorboard", "--tracker_project_name", "stable_diffusion_training"]
    return run_script(source, "ddpo.py", [str(a) for a in args], cwd, tmp_path / "hf-home", dump=("ddpo_config",),
                      timeout=600)


@pytest.mark.slow  # the replay below covers the same lines and more
def test_scripts_ddpo_stops_at_cuda(standins, tmp_path):
    """Everything up to the scorer runs (the pipeline loads with LoRA, the CLIP stand-in and the MLP weights
    load); then `scorer.cuda()` needs a GPU."""
    run = _run(standins, tmp_path, replay=False)
    run.check_stops_at("scorer = scorer.cuda()", "CUDA")


def test_replay_scripts_ddpo(standins, tmp_path):
    run = _run(standins, tmp_path, replay=True)
    run.check_stops_at("trainer.push_to_hub(", "OfflineModeIsEnabled")  # nothing can be uploaded; training is done
    save = run.cwd / "save"
    checkpoint = save / "checkpoints" / "checkpoint_1"  # the script's project_dir; epoch 1 is saved
    assert (checkpoint / "pytorch_lora_weights.safetensors").is_file(), sorted(p.name for p in save.rglob("*"))
    assert [line for line in (save / "metrics.jsonl").read_text().splitlines() if line]  # two epochs logged
    assert len((save / "metrics.jsonl").read_text().splitlines()) == 2
    events = list((run.cwd / "logs").rglob("events.out.tfevents.*"))
    assert events, "the script's image hook and the trainer log to TensorBoard under ./logs"
    assert max(e.stat().st_size for e in events) > 1000  # scalars and the images of image_outputs_logger
