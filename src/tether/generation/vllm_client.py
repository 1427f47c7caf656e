"""TRL 1.x's `trl.generation.vllm_client` path; the client is tether.rollout.vllm_client."""

from ..rollout.vllm_client import VLLMClient  # noqa: F401
