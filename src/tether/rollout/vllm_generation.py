"""Group sampling with vLLM on a GPU (`use_vllm=True`): a vLLM engine in the training process ("colocated"),
given the policy's current weights before each round.

vLLM samples `n` completions per prompt from one prefill (its prefix caching shares the prompt), so the
result has the same layout as `rollout.sampling.sample_groups`: rows [g * k, (g + 1) * k) answer prompt g.
Its log-probs are not used (vLLM reports them before or after its own logit processing depending on the
version): `logps` is None and the trainer computes what it needs with its own forward pass.

Requires `pip install vllm` on a CUDA machine. Shapes: n = prompts x k, c = completion tokens.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..models.forward import unwrap_model
from ..models.loading import is_peft_model
from .sampling import SampledGroups


def require_vllm() -> Any:
    """The vllm module, or an ImportError that says how to get it."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError("use_vllm=True needs vLLM, which is not installed. Fix: `pip install vllm` on a CUDA "
                          "machine, or leave use_vllm=False (tether's own batched sampler).") from error
    return vllm


def _load_weights(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Runs inside vLLM's worker: hand the policy's tensors to the model's own loader (it fuses q/k/v etc.)."""
    worker.model_runner.model.load_weights(weights=weights)


def policy_weights(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs under the plain transformers names vLLM loads: a PEFT model's adapters are merged
    into the base weights for the copy and unmerged after."""
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, nn.Module):  # DDP
        inner = inner.module
    if not is_peft_model(inner):
        return list(unwrap_model(inner).state_dict().items())
    inner.merge_adapter()
    try:
        weights = []
        for name, tensor in inner.state_dict().items():
            if "lora_" in name or "modules_to_save" in name:
                continue
            name = name.removeprefix("base_model.model.").replace(".base_layer", "")
            weights.append((name, tensor.detach().clone()))
        return weights
    finally:
        inner.unmerge_adapter()


class VLLMGroupSampler:
    """`sampler(policy, prompts, k, ...)` with sample_groups' signature, backed by a colocated vLLM engine."""

    def __init__(self, model_name_or_path: str, max_model_len: int, gpu_memory_utilization: float = 0.3,
                 seed: int = 0, dtype: str = "auto") -> None:
        vllm = require_vllm()
        # In-process engine: weights can be handed over as tensors, without serialising them to a worker.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self._vllm = vllm
        self.llm = vllm.LLM(model=model_name_or_path, gpu_memory_utilization=gpu_memory_utilization,
                            max_model_len=max_model_len, seed=seed, dtype=dtype, enable_prefix_caching=True)
        self.synced_step: int | None = None

    def sync(self, policy: nn.Module, step: int) -> None:
        """Copy the policy's weights into the engine, once per optimizer step."""
        if self.synced_step == step:
            return
        self.llm.collective_rpc(_load_weights, args=(list(policy_weights(policy)),))
        self.llm.reset_prefix_cache()  # cached prompt keys/values were computed with the old weights
        self.synced_step = step

    def __call__(self, prompts: Sequence[Sequence[int]], num_generations: int, max_new_tokens: int,
                 pad_token_id: int, eos_token_ids: Sequence[int], temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0) -> SampledGroups:
        params = self._vllm.SamplingParams(
            n=num_generations, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1, min_p=min_p,
            max_tokens=max_new_tokens, stop_token_ids=list(eos_token_ids))
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        completions = [list(sample.token_ids) for request in outputs for sample in request.outputs]  # n lists
        return groups_from_token_lists(completions, max_new_tokens, pad_token_id, eos_token_ids)


def groups_from_token_lists(completions: Sequence[Sequence[int]], max_new_tokens: int, pad_token_id: int,
                            eos_token_ids: Sequence[int]) -> SampledGroups:
    """n completions (token lists, each ending at its EOS or at max_new_tokens) -> SampledGroups with
    completion_ids [n, c] right-padded, its mask, no log-probs, and `truncated` where no EOS ended a row."""
    eos = set(eos_token_ids)
    cut = []
    for tokens in completions:
        tokens = list(tokens)[:max_new_tokens]
        end = next((i for i, t in enumerate(tokens) if t in eos), None)
        cut.append(tokens if end is None else tokens[: end + 1])
    width = max(1, max(len(t) for t in cut))
    ids = torch.full((len(cut), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(cut), width), dtype=torch.bool)
    for i, tokens in enumerate(cut):
        ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[i, : len(tokens)] = True
    truncated = torch.tensor([not t or t[-1] not in eos for t in cut])
    return SampledGroups(ids, mask, None, truncated)
