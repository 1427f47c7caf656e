"""TRL 0.x's `trl.extras.vllm_client` path; the client is tether.rollout.vllm_client."""

from ..rollout.vllm_client import VLLMClient  # noqa: F401
