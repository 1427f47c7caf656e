"""Group sampling with vLLM on a GPU (`use_vllm=True`): a vLLM engine in the training process ("colocated"),
given the policy's current weights before each round.

vLLM samples `n` completions per prompt from one prefill (its prefix caching shares the prompt), so the
result has the same layout as `rollout.sampling.sample_groups`: rows [g * k, (g + 1) * k) answer prompt g.
vLLM's log-probs of the sampled tokens (after its logit processing: "processed_logprobs") come back as
`sampler_logps`, the input of the truncated importance-sampling correction; `logps` stays None (they are
not the trainer's numbers) and the trainer computes what it needs with its own forward pass.

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
    """`sampler(prompts, k, ...)` with sample_groups' signature, backed by a colocated vLLM engine.

    tensor_parallel_size, max_model_len, gpu_memory_utilization, enable_sleep_mode (offload the engine
    between rounds), model_impl ("vllm" or "transformers") and structured_outputs_regex (every completion
    matches the regex) are vLLM's engine and sampling settings of the same meaning (TRL's vllm_* fields)."""

    def __init__(self, model_name_or_path: str, max_model_len: int | None, gpu_memory_utilization: float = 0.3,
                 seed: int = 0, dtype: str = "auto", tensor_parallel_size: int = 1, enable_sleep_mode: bool = False,
                 model_impl: str = "vllm", structured_outputs_regex: str | None = None,
                 trust_remote_code: bool = False) -> None:
        vllm = require_vllm()
        # In-process engine: weights can be handed over as tensors, without serialising them to a worker.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self._vllm = vllm
        self.llm = vllm.LLM(model=model_name_or_path, gpu_memory_utilization=gpu_memory_utilization,
                            max_model_len=max_model_len, seed=seed, dtype=dtype, enable_prefix_caching=True,
                            tensor_parallel_size=tensor_parallel_size, enable_sleep_mode=enable_sleep_mode,
                            model_impl=model_impl, trust_remote_code=trust_remote_code,
                            # log-probs after temperature and processors: the distribution tokens came from
                            logprobs_mode="processed_logprobs")
        self.sleep_mode = enable_sleep_mode
        self.structured_outputs_regex = structured_outputs_regex
        self.synced_step: int | None = None

    def sync(self, policy: nn.Module, step: int) -> None:
        """Copy the policy's weights into the engine, once per optimizer step."""
        if self.synced_step == step:
            return
        if self.sleep_mode:
            self.llm.wake_up()
        self.llm.collective_rpc(_load_weights, args=(list(policy_weights(policy)),))
        self.llm.reset_prefix_cache()  # cached prompt keys/values were computed with the old weights
        self.synced_step = step

    def _structured_outputs(self) -> dict[str, Any]:
        if self.structured_outputs_regex is None:
            return {}
        sampling_params = getattr(self._vllm, "sampling_params", None)
        if hasattr(sampling_params, "StructuredOutputsParams"):  # vLLM >= 0.11
            return {"structured_outputs": sampling_params.StructuredOutputsParams(regex=self.structured_outputs_regex)}
        return {"guided_decoding": sampling_params.GuidedDecodingParams(regex=self.structured_outputs_regex)}

    def __call__(self, prompts: Sequence[Sequence[int]], num_generations: int, max_new_tokens: int,
                 pad_token_id: int, eos_token_ids: Sequence[int], temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float | None = 0.0, repetition_penalty: float = 1.0,
                 generation_kwargs: dict[str, Any] | None = None) -> SampledGroups:
        """generation_kwargs: extra vLLM SamplingParams (they override the named settings, as in TRL)."""
        if self.sleep_mode:
            self.llm.wake_up()
        params = dict(n=num_generations, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1,
                      min_p=min_p or 0.0, repetition_penalty=repetition_penalty, max_tokens=max_new_tokens,
                      stop_token_ids=list(eos_token_ids), logprobs=0, **self._structured_outputs())
        params.update(generation_kwargs or {})
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.llm.generate(requests, self._vllm.SamplingParams(**params), use_tqdm=False)
        if self.sleep_mode:
            self.llm.sleep(level=1)  # weights to CPU, KV cache freed, until the next round
        samples = [sample for request in outputs for sample in request.outputs]  # n
        completions = [list(sample.token_ids) for sample in samples]
        logprobs = [sampled_token_logprobs(sample) for sample in samples]
        return groups_from_token_lists(completions, max_new_tokens, pad_token_id, eos_token_ids, logprobs)


def vllm_sampler(args: Any, model_source: str, max_model_len: int | None) -> Any:
    """The vLLM sampler a config's `vllm_*` fields ask for (trainers/vllm_fields.py): a client of a vLLM server
    (vllm_mode='server': the server generates, so this process needs no GPU) or an engine in this process
    ('colocate', CUDA only) loading `model_source` with context length `max_model_len` (None: the model's)."""
    if args.vllm_mode == "server":
        from .vllm_client import VLLMServerGroupSampler  # only server mode needs the HTTP client

        return VLLMServerGroupSampler(base_url=args.vllm_server_base_url, host=args.vllm_server_host,
                                      port=args.vllm_server_port, timeout=args.vllm_server_timeout)
    if not torch.cuda.is_available():
        raise ValueError("use_vllm=True with vllm_mode='colocate' needs a CUDA GPU; on this machine leave "
                         "use_vllm=False, or run a vLLM server and set vllm_mode='server'.")
    return VLLMGroupSampler(model_source, max_model_len, args.vllm_gpu_memory_utilization, args.seed,
                            tensor_parallel_size=args.vllm_tensor_parallel_size,
                            enable_sleep_mode=args.vllm_enable_sleep_mode, model_impl=args.vllm_model_impl,
                            structured_outputs_regex=args.vllm_structured_outputs_regex,
                            trust_remote_code=args.trust_remote_code)


def sampled_token_logprobs(sample: Any) -> list[float]:
    """vLLM's log-prob of each token it sampled (a CompletionOutput asked for logprobs=0: per position a
    mapping token id -> Logprob); NaN where none was reported."""
    entries = getattr(sample, "logprobs", None) or []
    values = []
    for i, token in enumerate(sample.token_ids):
        entry = entries[i] if i < len(entries) else None
        found = entry.get(token) if entry is not None and hasattr(entry, "get") else None
        values.append(float(getattr(found, "logprob", found)) if found is not None else float("nan"))
    return values


def groups_from_token_lists(completions: Sequence[Sequence[int]], max_new_tokens: int, pad_token_id: int,
                            eos_token_ids: Sequence[int],
                            sampler_logprobs: Sequence[Sequence[float]] | None = None) -> SampledGroups:
    """n completions (token lists, each ending at its EOS or at max_new_tokens) -> SampledGroups with
    completion_ids [n, c] right-padded, its mask, no trainer log-probs, `truncated` where no EOS ended a row,
    and the engine's per-token log-probs (lists aligned with the completions) as sampler_logps [n, c]."""
    eos = set(eos_token_ids)
    cut = []
    for tokens in completions:
        tokens = list(tokens)[:max_new_tokens]
        end = next((i for i, t in enumerate(tokens) if t in eos), None)
        cut.append(tokens if end is None else tokens[: end + 1])
    width = max(1, max(len(t) for t in cut))
    ids = torch.full((len(cut), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(cut), width), dtype=torch.bool)
    sampler_logps = torch.zeros((len(cut), width), dtype=torch.float32) if sampler_logprobs is not None else None
    for i, tokens in enumerate(cut):
        ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[i, : len(tokens)] = True
        if sampler_logps is not None:
            values = list(sampler_logprobs[i])[: len(tokens)]
            values += [float("nan")] * (len(tokens) - len(values))
            sampler_logps[i, : len(tokens)] = torch.tensor(values, dtype=torch.float32)
    truncated = torch.tensor([not t or t[-1] not in eos for t in cut])
    return SampledGroups(ids, mask, None, truncated, sampler_logps)
