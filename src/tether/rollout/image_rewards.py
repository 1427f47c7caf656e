"""Offline image rewards for DDPO: JPEG compressibility and incompressibility (Black et al., 2023, sec. 5.1),
the paper's rewards that need no model. Each is a DDPO reward function:
`reward(images [b, 3, H, W] in [0, 1], prompts, metadata) -> (rewards [b] as a float tensor, {})`.

The file size is that of the image saved as JPEG at quality 95 (the paper's setting), in kilobytes
(1 kB = 1000 bytes). A smooth, flat image compresses well; noise and fine texture do not. Needs Pillow
(installed with diffusers: `pip install "tether[diffusion]"`).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

JPEG_QUALITY = 95


def to_uint8_images(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """[b, 3, H, W] floats in [0, 1] (a tensor or array; PIL images pass through np.asarray) -> [b, H, W, 3]
    uint8, rounded, as the pixels an image file would hold."""
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().numpy()
    array = np.asarray(images, dtype=np.float32)
    if array.ndim == 3:
        array = array[None]
    if array.shape[1] in (1, 3) and array.shape[-1] not in (1, 3):  # channels first -> last
        array = array.transpose(0, 2, 3, 1)
    return (array.clip(0, 1) * 255).round().astype(np.uint8)


def jpeg_sizes_kb(images: torch.Tensor | np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    """The JPEG file size of each image at `quality`, in kB: [b]."""
    from PIL import Image

    sizes = []
    for pixels in to_uint8_images(images):
        buffer = io.BytesIO()
        Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(
            buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return np.asarray(sizes, dtype=np.float64)


def jpeg_compressibility(images: torch.Tensor | np.ndarray, prompts: Sequence[str] = (), metadata: Any = None,
                         ) -> tuple[torch.Tensor, dict]:
    """Reward = -(JPEG size in kB): higher for images that compress better."""
    return torch.as_tensor(-jpeg_sizes_kb(images), dtype=torch.float32), {}


def jpeg_incompressibility(images: torch.Tensor | np.ndarray, prompts: Sequence[str] = (), metadata: Any = None,
                           ) -> tuple[torch.Tensor, dict]:
    """Reward = JPEG size in kB: higher for images that compress worse (more detail, or noise)."""
    return torch.as_tensor(jpeg_sizes_kb(images), dtype=torch.float32), {}
