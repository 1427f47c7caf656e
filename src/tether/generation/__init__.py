"""TRL 1.x's `trl.generation` path: the client of `tether vllm-serve` (tether.rollout.vllm_client)."""
