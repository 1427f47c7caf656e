"""Which optional packages and accelerators are present (TRL 0.7's `trl.import_utils` names).

Package checks look the package up (`importlib.util.find_spec`) or read its installed version
(`importlib.metadata`), never import it: asking whether diffusers is there must not cost diffusers'
import time. Version comparisons use `packaging.version` (TRL compared version strings as text).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from functools import cache

from packaging.version import Version


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken or half-installed package
        return False


@cache
def _version(distribution: str) -> Version | None:
    try:
        return Version(importlib.metadata.version(distribution))
    except importlib.metadata.PackageNotFoundError:
        return None


def is_peft_available() -> bool:
    return _installed("peft")


def is_unsloth_available() -> bool:
    return _installed("unsloth")


def is_diffusers_available() -> bool:
    return _installed("diffusers")


def is_bitsandbytes_available() -> bool:
    """Whether bitsandbytes is installed. Unlike TRL 0.7 this does not also require CUDA: the
    bitsandbytes versions tether supports (>= 0.45) run 4-bit and 8-bit layers on the CPU too."""
    return _installed("bitsandbytes")


def is_torchvision_available() -> bool:
    return _installed("torchvision")


def is_rich_available() -> bool:
    return _installed("rich")


def is_wandb_available() -> bool:
    return _installed("wandb")


def is_accelerate_greater_20_0() -> bool:
    """accelerate >= 0.20.0 installed."""
    version = _version("accelerate")
    return version is not None and version >= Version("0.20.0")


def is_transformers_greater_than(version: str) -> bool:
    """The installed transformers is strictly newer than `version` (e.g. "4.36.0")."""
    installed = _version("transformers")
    return installed is not None and installed > Version(version)


def is_torch_greater_2_0() -> bool:
    """torch >= 2.0 installed."""
    version = _version("torch")
    return version is not None and version >= Version("2.0")


def is_xpu_available() -> bool:
    """An Intel XPU is usable through torch (torch.xpu, built into torch >= 2.4)."""
    import torch

    xpu = getattr(torch, "xpu", None)
    try:
        return xpu is not None and bool(xpu.is_available())
    except RuntimeError:
        return False


def is_npu_available() -> bool:
    """torch_npu is installed and an Ascend NPU is usable. Only this check imports a package (torch_npu,
    through accelerate), and only when it is installed: torch.npu exists once torch_npu is imported."""
    if not _installed("torch_npu"):
        return False
    from accelerate.utils import is_npu_available as accelerate_npu_available

    return bool(accelerate_npu_available())
