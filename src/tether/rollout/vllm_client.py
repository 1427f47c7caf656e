"""The trainer's side of `tether vllm-serve` (see rollout/vllm_server.py for the endpoints).

- `VLLMServerGroupSampler`: what GRPO/RLOO use with `use_vllm=True, vllm_mode="server"`; `sync(policy, step)`
  then `sampler(prompts, k, ...)` with `sample_groups`' signature, returning `SampledGroups`.
- `VLLMClient`: TRL's client class (`generate`, `update_named_param`, `update_model_params`, `weight_update`,
  `reset_prefix_cache`, `check_server`, `init_communicator`, `close_communicator`) over the same HTTP calls, so
  code that drives TRL's client directly runs against tether's server.

Weights are sent as safetensors bytes over HTTP, in chunks of at most `chunk_bytes` (TRL uses NCCL; see
vllm_server.py for why). With several training processes, only rank 0 talks to the server, as in TRL: every
rank's prompts are gathered to rank 0, which makes one request for all of them, and the completions are
broadcast back, each rank keeping its own slice. Only the standard library is used for HTTP.

Shapes: p = prompts, k = generations per prompt, n = p * k, c = completion tokens.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from .sampling import SampledGroups
from .vllm_generation import groups_from_token_lists, policy_weights

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 256 * 2**20  # per /update_weights request: bounds the server's and the client's extra memory
_SERVE_HINT = "Start it with `tether vllm-serve --model MODEL` (same model as the trainer's) and check host/port."


class ServerError(RuntimeError):
    """The server answered with an error; the message is its own (it names the field at fault)."""


class VLLMClient:
    """A client of `tether vllm-serve` with TRL's `VLLMClient` constructor and methods.

    `base_url` (e.g. "http://10.0.0.2:8000") wins over `host` + `server_port`. `connection_timeout`: seconds
    to wait for the server's health endpoint before a ConnectionError. `group_port` is accepted for TRL's
    signature and unused: weights travel over HTTP, not an NCCL group.
    """

    def __init__(self, base_url: str | None = None, host: str = "0.0.0.0", server_port: int = 8000,
                 group_port: int = 51216, connection_timeout: float = 0.0,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        if base_url is not None:
            parsed = urlparse(base_url if "://" in base_url else f"http://{base_url}")
            self.base_url = f"{parsed.scheme}://{parsed.netloc}{parsed.path.rstrip('/')}"
            self.host = parsed.hostname
        else:
            self.host, self.server_port = host, server_port
            self.base_url = f"http://{host}:{server_port}"
        self.group_port = group_port  # unused (HTTP weight transfer), kept for TRL's attribute
        self.chunk_bytes = chunk_bytes
        self._pending: list[tuple[str, torch.Tensor]] | None = None  # tensors buffered inside weight_update()
        self.check_server(connection_timeout)

    # ----- HTTP ------------------------------------------------------------------------------------------
    def _request(self, path: str, body: bytes | None = None, content_type: str = "application/json",
                 timeout: float | None = None) -> Any:
        request = urllib.request.Request(f"{self.base_url}{path}", data=body,
                                         method="GET" if body is None else "POST",
                                         headers={"Content-Type": content_type} if body is not None else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")
            with contextlib.suppress(json.JSONDecodeError):
                detail = json.loads(detail).get("error", detail)
            raise ServerError(f"{self.base_url}{path} answered {error.code}: {detail}") from None

    def _post_json(self, path: str, payload: dict[str, Any]) -> Any:
        return self._request(path, json.dumps(payload).encode())

    def check_server(self, total_timeout: float = 0.0, retry_interval: float = 2.0) -> None:
        """Wait until GET /health answers 200, retrying every `retry_interval` s for up to `total_timeout` s;
        then a ConnectionError naming the URL and how to start the server."""
        deadline = time.monotonic() + total_timeout
        while True:
            try:
                self._request("/health", timeout=max(1.0, retry_interval))
                return
            except (OSError, ServerError) as error:  # refused, unreachable, or up but not answering 200 yet
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ConnectionError(f"No tether vllm-serve server answered at {self.base_url}/health within "
                                          f"{total_timeout:g} s ({error}). {_SERVE_HINT}") from None
                logger.info("Waiting for the generation server at %s ...", self.base_url)
                time.sleep(min(retry_interval, remaining))

    def get_server_info(self) -> dict[str, Any]:
        """{"model", "backend", "world_size", "vocab_size", "weight_updates"} of the server."""
        return self._request("/info")

    def get_world_size(self) -> int:
        """The server's number of workers (its tensor-parallel size)."""
        return int(self.get_server_info()["world_size"])

    # ----- generation ------------------------------------------------------------------------------------
    def generate(self, prompts: list[str] | list[list[int]], features: list[Any] | None = None, n: int = 1,
                 repetition_penalty: float = 1.0,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 max_tokens: int = 16, logprobs: int | None = 0, structured_outputs_regex: str | None = None,
                 generation_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
        """n completions per prompt (texts are tokenized by the server). Returns {"prompt_ids": p lists,
        "completion_ids": n * p lists (prompt-major), "logprobs": [n * p][c][m] or None, "logprob_token_ids":
        same shape}. `generation_kwargs` entries override the named parameters (e.g. "seed",
        "stop_token_ids"); other entries are vLLM sampling parameters (vllm backend). `features` (TRL's
        multimodal image features) are not supported: prompts are text or token ids."""
        if features is not None and any(f is not None for f in features):
            raise ValueError("features: tether vllm-serve serves text-only models; multimodal prompts (images) "
                             "are not supported. Pass features=None.")
        payload: dict[str, Any] = {
            "prompts": [p if isinstance(p, str) else [int(t) for t in p] for p in prompts], "n": n,
            "repetition_penalty": repetition_penalty, "temperature": temperature, "top_p": top_p, "top_k": top_k,
            "min_p": min_p, "max_tokens": max_tokens, "logprobs": logprobs,
            "generation_kwargs": dict(generation_kwargs or {})}
        if structured_outputs_regex is not None:
            payload["structured_outputs_regex"] = structured_outputs_regex
        return self._post_json("/generate", payload)

    # ----- weights ---------------------------------------------------------------------------------------
    def send_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Send (name, tensor) pairs as safetensors chunks of at most ~chunk_bytes; returns the tensor count."""
        from safetensors.torch import save

        sent, chunk, size = 0, {}, 0

        def flush() -> None:
            nonlocal chunk, size
            if chunk:
                self._request("/update_weights", save(chunk), "application/octet-stream")
            chunk, size = {}, 0

        for name, tensor in named_tensors:
            # safetensors wants contiguous CPU tensors that do not share storage (tied weights do): a copy each.
            tensor = tensor.detach().to("cpu", copy=True).contiguous()
            nbytes = tensor.numel() * tensor.element_size()
            if chunk and size + nbytes > self.chunk_bytes:
                flush()
            chunk[name], size, sent = tensor, size + nbytes, sent + 1
        flush()
        return sent

    @contextlib.contextmanager
    def weight_update(self) -> Iterator[None]:
        """Group `update_named_param` calls: they are buffered and sent together (in chunks) on exit, then the
        prefix cache is reset once."""
        self._pending = []
        try:
            yield
            self.send_weights(self._pending)
            self.reset_prefix_cache()
        finally:
            self._pending = None

    def update_named_param(self, name: str, weights: torch.Tensor) -> None:
        """Replace one tensor of the served model (its transformers name)."""
        self.update_named_params([(name, weights)])

    def update_named_params(self, metadata_or_pairs: Any,
                            named_params: Iterable[tuple[str, torch.Tensor]] | None = None) -> None:
        """Replace several tensors: `(pairs)` or TRL 1.x's `(metadata, pairs)` (the metadata is not needed)."""
        pairs = list(metadata_or_pairs if named_params is None else named_params)
        if self._pending is not None:
            self._pending.extend(pairs)
        else:
            self.send_weights(pairs)

    def update_model_params(self, model: nn.Module) -> None:
        """Send every weight of `model` (PEFT adapters merged in, under the plain transformers names)."""
        self.update_named_params(policy_weights(model))

    def reset_prefix_cache(self) -> None:
        """Drop the server's cached prompt keys/values (computed with the old weights)."""
        self._post_json("/reset_prefix_cache", {})

    def init_communicator(self, device: torch.device | str | int = 0) -> None:
        """Nothing to set up: weights go over HTTP, not an NCCL group (kept for TRL's call sequence)."""

    def close_communicator(self) -> None:
        """Nothing to close (see init_communicator)."""


def _distributed() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class VLLMServerGroupSampler:
    """`sync(policy, step)` + `sampler(prompts, k, ...)` -> SampledGroups, generating on a `tether vllm-serve`
    server. Only rank 0 connects and sends; see the module docstring for several processes."""

    def __init__(self, base_url: str | None = None, host: str = "0.0.0.0", port: int = 8000, timeout: float = 240.0,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.rank, _ = _distributed()
        self.client = (VLLMClient(base_url, host, port, connection_timeout=timeout, chunk_bytes=chunk_bytes)
                       if self.rank == 0 else None)
        self.synced_step: int | None = None

    def sync(self, policy: nn.Module, step: int) -> None:
        """Send the policy's weights once per optimizer step (rank 0; the others already hold the same weights),
        then reset the server's prefix cache."""
        if self.synced_step == step:
            return
        if _distributed()[0] == 0:
            self.client.send_weights(policy_weights(policy))
            self.client.reset_prefix_cache()
        self.synced_step = step

    def __call__(self, prompts: Sequence[Sequence[int]], num_generations: int, max_new_tokens: int,
                 pad_token_id: int, eos_token_ids: Sequence[int], temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 generation_kwargs: dict[str, Any] | None = None) -> SampledGroups:
        """`num_generations` completions for each of this process's prompts, rows [g * k, (g + 1) * k) for
        prompt g, cut at the first of `eos_token_ids`; `logps` is None (the trainer computes its own) and
        `sampler_logps` [n, c] holds the server's log-probs of the sampled tokens (vLLM: processed ones).
        `generation_kwargs` go to the server as extra sampling parameters (e.g. {"seed": 0})."""
        rank, world = _distributed()
        mine = [[int(t) for t in p] for p in prompts]
        every = [mine]
        if world > 1:
            every = [None] * world
            torch.distributed.all_gather_object(every, mine)
        outcome: list[Any] = [None]
        if rank == 0:
            try:
                answer = self.client.generate(
                    [p for rank_prompts in every for p in rank_prompts], n=num_generations,
                    repetition_penalty=repetition_penalty, temperature=temperature, top_p=top_p, top_k=top_k or 0,
                    min_p=min_p or 0.0, max_tokens=max_new_tokens, logprobs=0,
                    generation_kwargs={"stop_token_ids": list(eos_token_ids), **(generation_kwargs or {})})
                outcome = [(answer["completion_ids"], _sampled_logprobs(answer))]  # n_all lists each
            except Exception as error:  # every rank must leave the broadcast below, then all raise
                outcome = [error if world == 1 else f"{type(error).__name__}: {error}"]
        if world > 1:
            torch.distributed.broadcast_object_list(outcome, src=0)
        if isinstance(outcome[0], Exception):
            raise outcome[0]
        if isinstance(outcome[0], str):
            raise ServerError(f"Generation on rank 0 failed: {outcome[0]}")
        start = sum(len(rank_prompts) for rank_prompts in every[:rank]) * num_generations
        mine_slice = slice(start, start + len(mine) * num_generations)  # this rank's n completions
        completions, logprobs = outcome[0]
        return groups_from_token_lists(completions[mine_slice], max_new_tokens, pad_token_id, eos_token_ids,
                                       sampler_logprobs=None if logprobs is None else logprobs[mine_slice])


def _sampled_logprobs(answer: dict[str, Any]) -> list[list[float]] | None:
    """The server's log-prob of each sampled token, per completion (NaN where it gave none)."""
    if answer.get("logprobs") is None:
        return None
    rows = []
    for tokens, steps, step_ids in zip(answer["completion_ids"], answer["logprobs"], answer["logprob_token_ids"]):
        rows.append([step[ids.index(token)] if token in ids and step[ids.index(token)] is not None else float("nan")
                     for token, step, ids in zip(tokens, steps, step_ids)])
    return rows
