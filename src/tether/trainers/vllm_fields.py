"""The vLLM fields every sampling method's config shares (GRPO, RLOO, Online DPO, Distillation), named and defaulted
as TRL's, and their check. The engines that read them: rollout/vllm_generation.py (colocate) and
rollout/vllm_client.py (server)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class VLLMFields:
    """Generation with vLLM instead of tether's own sampler."""

    use_vllm: bool = field(default=False, metadata={
        "help": "Generate with vLLM: an engine in the training process (vllm_mode='colocate', CUDA GPU, "
                "`pip install vllm`) or a vLLM server (vllm_mode='server')."})
    vllm_mode: str = field(default="colocate", metadata={"help": "'colocate' or 'server' (see use_vllm)."})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={
        "help": "Share of GPU memory the colocated vLLM engine may take for its weights and KV cache."})
    vllm_tensor_parallel_size: int = field(default=1, metadata={
        "help": "GPUs the colocated vLLM engine shards the model over."})
    vllm_max_model_length: int | None = field(default=None, metadata={
        "help": "Context length of the colocated vLLM engine (default: the longest prompt plus completion the "
                "method allows, or the model's when prompts are not cut)."})
    vllm_enable_sleep_mode: bool = field(default=False, metadata={
        "help": "Offload the colocated engine's weights and free its KV cache between rounds."})
    vllm_model_impl: str = field(default="vllm", metadata={
        "help": "The colocated engine's model implementation: 'vllm' or 'transformers'."})
    vllm_structured_outputs_regex: str | None = field(default=None, metadata={
        "help": "With use_vllm: every completion matches this regular expression (vLLM structured outputs)."})
    vllm_server_base_url: str | None = field(default=None, metadata={
        "help": "vllm_mode='server': the server's URL, e.g. 'http://localhost:8000' (overrides host and port)."})
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "vllm_mode='server': the server's host."})
    vllm_server_port: int = field(default=8000, metadata={"help": "vllm_mode='server': the server's port."})
    vllm_server_timeout: float = field(default=240.0, metadata={
        "help": "vllm_mode='server': seconds to wait for the server to come up before a ConnectionError."})
    vllm_group_port: int = field(default=51216, metadata={
        "help": "vllm_mode='server': port of the weight-update communicator."})


def check_vllm_fields(config: Any) -> None:
    """A ValueError naming the field for a vLLM setting with no meaning."""
    name = type(config).__name__
    if config.vllm_mode not in ("colocate", "server"):
        raise ValueError(f"{name}.vllm_mode must be 'colocate' or 'server', got {config.vllm_mode!r}.")
    if config.vllm_model_impl not in ("vllm", "transformers"):
        raise ValueError(f"{name}.vllm_model_impl must be 'vllm' or 'transformers', got {config.vllm_model_impl!r}.")
    if config.vllm_tensor_parallel_size < 1:
        raise ValueError(f"{name}.vllm_tensor_parallel_size must be at least 1, got {config.vllm_tensor_parallel_size}.")
