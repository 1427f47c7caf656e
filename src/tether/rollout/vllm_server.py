"""`tether vllm-serve`: a generation server for online training in "server" mode (`use_vllm=True,
vllm_mode="server"`), the counterpart of TRL's `trl vllm-serve`.

The trainer runs on some devices, the server on others; each round the trainer sends the policy's weights
and asks for `n` completions per prompt. The server speaks plain HTTP + JSON (standard library only, no web
framework), on these endpoints:

    GET  /health              200 {"status": "ok"} once the model is loaded
    GET  /info                {"model", "backend", "world_size", "vocab_size", "weight_updates"}
    POST /generate            JSON: {"prompts": [[ids...]] or ["text"...], "n", "temperature", "top_p", "top_k",
                              "min_p", "repetition_penalty", "max_tokens", "stop_token_ids", "ignore_eos", "seed",
                              "logprobs", "generation_kwargs": {...}} ->
                              {"prompt_ids", "completion_ids" (n per prompt, prompt-major), "logprobs",
                               "logprob_token_ids"}
    POST /update_weights      body: a safetensors file (bytes) of some or all of the model's tensors -> {"updated"}
    POST /reset_prefix_cache  {"success": true}

Every error is JSON, `{"error": "..."}`, with a 4xx status for a bad request (it names the field and what is
allowed) and 500 for a failure of the server itself.

Weights travel over HTTP as safetensors bytes (never pickle), the whole model or in chunks. TRL streams them
with NCCL from the trainer's GPU to vLLM's workers, which needs both sides on CUDA and a reachable NCCL port
(`vllm_group_port`); HTTP works between any two machines, CPU ones included, at the cost of a host copy. The
NCCL path can be added behind the same client later; until then `vllm_group_port` is accepted and unused.

Two backends answer the same calls:
- "vllm": a `vllm.LLM` engine (GPU; `pip install vllm`). Weights reach its workers through a worker extension
  (`TetherWorkerExtension`) that loads the safetensors bytes with the model's own `load_weights`.
- "transformers": the model loaded with transformers and sampled with tether's sampler
  (`rollout.sampling.sample_groups`): no vLLM needed, so it runs on CPU; same seed -> same tokens as the
  trainer's own sampler. Its log-probs are the sampler's: softmax(logits / T) before top-k/top-p/min-p and
  the repetition penalty, the numbers the trainer computes (vLLM's are after them: "processed").
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

import torch

logger = logging.getLogger("tether.vllm_serve")

# Request fields that map one-to-one to sampling parameters (vLLM's SamplingParams names). `generation_kwargs`
# entries with these names override them, as in TRL's client; its other entries are backend-specific extras.
SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens",
                   "stop_token_ids", "ignore_eos", "seed", "logprobs")
GENERATE_FIELDS = frozenset(("prompts", "generation_kwargs", "structured_outputs_regex", *SAMPLING_FIELDS))


class RequestError(ValueError):
    """A request the server refuses; `status` is the HTTP status it answers with (4xx)."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = int(status)


@dataclass
class SamplingRequest:
    """The sampling parameters of one /generate call, validated. `extra` holds the generation_kwargs entries
    that are not one of the named fields (passed to vLLM's SamplingParams by the vllm backend)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k filter
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = 0  # None: none; 0: the sampled token's; k > 0: also the top k (vllm backend)
    structured_outputs_regex: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _number(values: dict[str, Any], name: str, kind: type, check: Any, rule: str) -> Any:
    value = values[name]
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise RequestError(f"'{name}' must be {'a number' if kind is float else 'an integer'}, got {value!r}.")
    if not check(value):
        raise RequestError(f"'{name}' must be {rule}, got {value!r}.")
    return kind(value)


def parse_generate_request(body: Any, vocab_size: int) -> tuple[list[list[int]] | list[str], SamplingRequest]:
    """A /generate JSON body -> (prompts: token id lists or texts, SamplingRequest). Raises RequestError naming
    the field at fault."""
    if not isinstance(body, dict):
        raise RequestError(f"The body must be a JSON object, got {type(body).__name__}.")
    unknown = sorted(set(body) - GENERATE_FIELDS)
    if unknown:
        raise RequestError(f"Unknown field(s) {unknown}; /generate takes {sorted(GENERATE_FIELDS)} (other sampling "
                           "parameters go inside 'generation_kwargs').")
    extra = body.get("generation_kwargs") or {}
    if not isinstance(extra, dict):
        raise RequestError(f"'generation_kwargs' must be an object, got {type(extra).__name__}.")
    values = {**{k: v for k, v in body.items() if k in SAMPLING_FIELDS},
              **{k: v for k, v in extra.items() if k in SAMPLING_FIELDS}}
    request = SamplingRequest(extra={k: v for k, v in extra.items() if k not in SAMPLING_FIELDS},
                              structured_outputs_regex=body.get("structured_outputs_regex"))
    checks = {
        "n": (int, lambda v: v >= 1, ">= 1"),
        "max_tokens": (int, lambda v: v >= 1, ">= 1"),
        "temperature": (float, lambda v: v >= 0, ">= 0 (0 is greedy decoding)"),
        "top_p": (float, lambda v: 0 < v <= 1, "in (0, 1]"),
        "top_k": (int, lambda v: v >= -1, "-1, 0 (both: no top-k filter) or a positive integer"),
        "min_p": (float, lambda v: 0 <= v <= 1, "in [0, 1]"),
        "repetition_penalty": (float, lambda v: v > 0, "> 0 (1.0: no penalty)"),
    }
    for name, (kind, check, rule) in checks.items():
        if values.get(name) is not None:
            setattr(request, name, _number(values, name, kind, check, rule))
    if values.get("seed") is not None:
        request.seed = _number(values, "seed", int, lambda v: v >= 0, ">= 0")
    if "logprobs" in values:
        request.logprobs = None if values["logprobs"] is None else _number(
            values, "logprobs", int, lambda v: v >= 0, "null, 0 (the sampled token's) or a positive top-k")
    if "ignore_eos" in values:
        if not isinstance(values["ignore_eos"], bool):
            raise RequestError(f"'ignore_eos' must be true or false, got {values['ignore_eos']!r}.")
        request.ignore_eos = values["ignore_eos"]
    stops = values.get("stop_token_ids") or []
    if not isinstance(stops, list) or not all(_is_token(t, vocab_size) for t in stops):
        raise RequestError(f"'stop_token_ids' must be a list of token ids in [0, {vocab_size}), got {stops!r}.")
    request.stop_token_ids = [int(t) for t in stops]
    return _parse_prompts(body.get("prompts"), vocab_size), request


def _is_token(value: Any, vocab_size: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab_size


def _parse_prompts(prompts: Any, vocab_size: int) -> list[list[int]] | list[str]:
    if not isinstance(prompts, list) or not prompts:
        raise RequestError("'prompts' is required: a non-empty list of token id lists (or of strings).")
    if all(isinstance(p, str) for p in prompts):
        return prompts
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, list) or not prompt:
            raise RequestError(f"'prompts'[{i}] must be a non-empty list of token ids (or every prompt a string), "
                               f"got {str(prompt)[:80]}.")
        if not all(_is_token(t, vocab_size) for t in prompt):
            raise RequestError(f"'prompts'[{i}] has a token id outside [0, {vocab_size}) or that is not an integer.")
    return prompts


@dataclass
class Generation:
    """The answer of a backend: n completions per prompt, prompt-major. logprobs[i][t] are the log-probs of
    the tokens logprob_token_ids[i][t] at step t of completion i (the sampled token, plus the top-k when asked
    for), most likely first; both None where they were not asked for."""

    completion_ids: list[list[int]]
    logprobs: list[list[list[float]]] | None = None
    logprob_token_ids: list[list[list[int]]] | None = None


class GenerationBackend(Protocol):
    """What the server needs from an engine."""

    name: str
    model_name: str
    vocab_size: int
    world_size: int

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]: ...
    def generate(self, prompts: list[list[int]], request: SamplingRequest) -> Generation: ...
    def load_weights(self, payload: bytes) -> int: ...
    def reset_prefix_cache(self) -> None: ...


def load_safetensors_bytes(payload: bytes) -> dict[str, torch.Tensor]:
    """safetensors bytes -> {name: tensor}; anything else is a RequestError (no pickle is ever read)."""
    from safetensors.torch import load

    try:
        return load(payload)
    except Exception as error:  # safetensors raises its own error types for a malformed header
        raise RequestError(f"The body of /update_weights must be a safetensors file ({error}).") from error


class TransformersBackend:
    """The model loaded with transformers, sampled with tether's group sampler (CPU or one GPU)."""

    name = "transformers"
    world_size = 1

    def __init__(self, model: str, dtype: str = "auto", device: str | None = None, trust_remote_code: bool = False,
                 revision: str | None = None, seed: int = 0, max_model_len: int | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..models.loading import resolve_model_source
        from .generation import eos_token_ids

        model = resolve_model_source(model, "model")  # a missing local folder named as such, not as a bad repo id
        kwargs: dict[str, Any] = {"dtype": dtype if dtype in ("auto", None) else _torch_dtype(dtype),
                                  "trust_remote_code": trust_remote_code, "revision": revision}
        self.model = AutoModelForCausalLM.from_pretrained(model, **kwargs)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code,
                                                           revision=revision)
        except (OSError, ValueError):  # a folder with weights only: token id prompts still work
            self.tokenizer = None
        tokenizer_eos = getattr(self.tokenizer, "eos_token_id", None)
        self.eos_ids = sorted({*eos_token_ids(self.model), *([tokenizer_eos] if tokenizer_eos is not None else [])})
        self.pad_id = next((i for i in (getattr(self.tokenizer, "pad_token_id", None),
                                        self.model.config.pad_token_id, *self.eos_ids) if i is not None), 0)
        self.model_name = model
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.max_model_len = max_model_len
        # Requests without a seed draw from this stream, so a server started with the same --seed replays.
        self.generator = torch.Generator(self.device).manual_seed(seed)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        if self.tokenizer is None:
            raise RequestError("This model folder has no tokenizer, so prompts must be token id lists.")
        return [list(ids) for ids in self.tokenizer(list(texts))["input_ids"]]

    def generate(self, prompts: list[list[int]], request: SamplingRequest) -> Generation:
        from .sampling import sample_groups

        unsupported = sorted(set(request.extra) - {"min_tokens"})
        if unsupported or request.structured_outputs_regex is not None:
            names = unsupported + (["structured_outputs_regex"] if request.structured_outputs_regex else [])
            raise RequestError(f"The transformers backend does not support {names}; it takes "
                               f"{list(SAMPLING_FIELDS)} and generation_kwargs 'min_tokens'. Start the server with "
                               "--backend vllm for vLLM's other sampling parameters.")
        min_tokens = request.extra.get("min_tokens", 0)
        if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
            raise RequestError(f"'min_tokens' must be an integer >= 0, got {min_tokens!r}.")
        if request.logprobs:
            raise RequestError("The transformers backend reports the sampled token's log-prob only: use 'logprobs' "
                               "0 (or null), or --backend vllm for the top-k.")
        if self.max_model_len is not None and max(len(p) for p in prompts) + request.max_tokens > self.max_model_len:
            raise RequestError(f"The longest prompt plus 'max_tokens' exceeds --max_model_len {self.max_model_len}.")
        stops = sorted(set(request.stop_token_ids) | (set() if request.ignore_eos else set(self.eos_ids)))
        generator = (torch.Generator(self.device).manual_seed(request.seed) if request.seed is not None
                     else self.generator)
        top_k = request.top_k if request.top_k > 0 else 0
        groups = sample_groups(self.model, prompts, request.n, request.max_tokens, self.pad_id, stops,
                               request.temperature, top_k, request.top_p, request.min_p, generator=generator,
                               repetition_penalty=request.repetition_penalty, min_new_tokens=min_tokens)
        lengths = groups.completion_mask.sum(-1).tolist()  # [n]
        ids = [row[:length] for row, length in zip(groups.completion_ids.tolist(), lengths)]
        if request.logprobs is None:
            return Generation(ids)
        logps = [[[lp] for lp in row[:length]] for row, length in zip(groups.logps.tolist(), lengths)]
        return Generation(ids, logps, [[[t] for t in row] for row in ids])

    def load_weights(self, payload: bytes) -> int:
        weights = load_safetensors_bytes(payload)
        state = self.model.state_dict()
        unknown = sorted(set(weights) - set(state))
        if unknown:
            more = " ..." if len(unknown) > 5 else ""
            raise RequestError(f"Unknown weight name(s) {unknown[:5]}{more}: this model's tensors are named like "
                               f"{list(state)[:3]} (plain transformers names; PEFT adapters must be merged first, as "
                               "tether's client does).")
        wrong = [f"{n}: {tuple(t.shape)} vs {tuple(state[n].shape)}" for n, t in weights.items()
                 if t.shape != state[n].shape]
        if wrong:
            raise RequestError(f"Shape mismatch (sent vs model): {wrong[:5]}.")
        with torch.no_grad():
            for name, tensor in weights.items():
                state[name].copy_(tensor)  # in place: tied weights stay tied; casts to the model's dtype
        return len(weights)

    def reset_prefix_cache(self) -> None:
        """Nothing is cached between requests here."""


def _torch_dtype(name: str) -> torch.dtype:
    aliases = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    dtype = getattr(torch, aliases.get(name, name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"--dtype {name!r} is not a torch dtype; use auto, float32, bfloat16 or float16.")
    return dtype


class TetherWorkerExtension:
    """Mixed into each vLLM worker (`LLM(worker_extension_cls=...)`): loads the weights a trainer sent.

    Bytes cross vLLM's process boundary (whatever its executor serialises them with), and every tensor-parallel
    worker hands the full tensors to the model's `load_weights`, which shards and fuses them (q/k/v) itself."""

    def tether_load_weights(self, payload: bytes) -> int:
        from safetensors.torch import load

        weights = load(payload)
        # `model_runner` is an attribute of the vLLM worker this class is mixed into.
        self.model_runner.model.load_weights(weights=list(weights.items()))
        return len(weights)


class VLLMBackend:
    """A `vllm.LLM` engine (GPU). Written against vLLM's documented offline API (LLM, SamplingParams,
    collective_rpc, reset_prefix_cache); not exercised by the CPU test suite."""

    name = "vllm"

    def __init__(self, model: str, revision: str | None = None, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, dtype: str = "auto", max_model_len: int | None = None,
                 enable_prefix_caching: bool | None = None, enforce_eager: bool | None = False,
                 kv_cache_dtype: str = "auto", trust_remote_code: bool = False, vllm_model_impl: str = "vllm",
                 distributed_executor_backend: str | None = None, speculative_config: str | None = None,
                 seed: int = 0) -> None:
        from .vllm_generation import require_vllm

        self._vllm = require_vllm()
        options: dict[str, Any] = dict(
            model=model, revision=revision, tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization, dtype=dtype, max_model_len=max_model_len,
            enforce_eager=bool(enforce_eager), kv_cache_dtype=kv_cache_dtype, trust_remote_code=trust_remote_code,
            model_impl=vllm_model_impl, seed=seed,
            # Reported log-probs after temperature and logit processors: the distribution tokens came from, as
            # the trainer's truncated importance-sampling correction expects (TRL serves with the same mode).
            logprobs_mode="processed_logprobs",
            worker_extension_cls=f"{__name__}.{TetherWorkerExtension.__name__}")
        if enable_prefix_caching is not None:
            options["enable_prefix_caching"] = enable_prefix_caching
        if distributed_executor_backend is not None:
            options["distributed_executor_backend"] = distributed_executor_backend
        if speculative_config is not None:
            options["speculative_config"] = json.loads(speculative_config)
        self.llm = self._vllm.LLM(**options)
        self.model_name = model
        self.world_size = tensor_parallel_size
        engine = self.llm.llm_engine
        model_config = getattr(engine, "model_config", None) or engine.vllm_config.model_config  # V0 / V1 engines
        self.vocab_size = int(model_config.get_vocab_size())

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        tokenizer = self.llm.get_tokenizer()
        return [list(tokenizer(text)["input_ids"]) for text in texts]

    def generate(self, prompts: list[list[int]], request: SamplingRequest) -> Generation:
        options: dict[str, Any] = dict(
            n=request.n, temperature=request.temperature, top_p=request.top_p,
            top_k=request.top_k if request.top_k > 0 else -1,  # -1 disables top-k in every vLLM version
            min_p=request.min_p, repetition_penalty=request.repetition_penalty, max_tokens=request.max_tokens,
            stop_token_ids=request.stop_token_ids, ignore_eos=request.ignore_eos, seed=request.seed,
            logprobs=request.logprobs, **request.extra)
        if request.structured_outputs_regex is not None:
            options.update(self._regex_option(request.structured_outputs_regex))
        try:
            params = self._vllm.SamplingParams(**options)
        except (TypeError, ValueError) as error:  # an unknown or out-of-range generation_kwargs entry
            raise RequestError(f"vLLM refused the sampling parameters: {error}") from error
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        samples = [sample for output in outputs for sample in output.outputs]  # prompt-major, n each
        ids = [list(sample.token_ids) for sample in samples]
        if request.logprobs is None:
            return Generation(ids)
        logprobs, token_ids = [], []
        for sample in samples:
            steps = [sorted(step.items(), key=lambda item: -item[1].logprob) for step in sample.logprobs or []]
            logprobs.append([[item.logprob for _, item in step] for step in steps])
            token_ids.append([[token for token, _ in step] for step in steps])
        return Generation(ids, logprobs, token_ids)

    def _regex_option(self, regex: str) -> dict[str, Any]:
        """Regex-constrained decoding: `structured_outputs` in recent vLLM, `guided_decoding` before."""
        params = self._vllm.sampling_params
        if hasattr(params, "StructuredOutputsParams"):
            return {"structured_outputs": params.StructuredOutputsParams(regex=regex)}
        return {"guided_decoding": params.GuidedDecodingParams(regex=regex)}

    def load_weights(self, payload: bytes) -> int:
        load_safetensors_bytes(payload)  # validate here: a malformed body is the client's error, not a worker crash
        return int(self.llm.collective_rpc("tether_load_weights", args=(payload,))[0])

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()


# ----- HTTP ------------------------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    server: GenerationServer
    protocol_version = "HTTP/1.1"  # keep-alive: a trainer sends many requests

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        routes = self.server.routes
        try:
            body = self._read_body() if method == "POST" else b""  # read first: the connection is kept alive
            if path not in routes:
                raise RequestError(f"No endpoint {path}; endpoints: {sorted(routes)}.", HTTPStatus.NOT_FOUND)
            allowed, handler = routes[path]
            if method != allowed:
                raise RequestError(f"{path} takes {allowed}, not {method}.", HTTPStatus.METHOD_NOT_ALLOWED)
            self._reply(HTTPStatus.OK, handler(body))
        except RequestError as error:
            self._reply(error.status, {"error": str(error)})
        except Exception as error:  # the server stays up; the client sees what failed
            logger.exception("%s %s failed", method, path)
            self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(error).__name__}: {error}"})

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True  # where this body ends is unknown, so nothing after it can be read
            raise RequestError("A POST needs a Content-Length header.", HTTPStatus.LENGTH_REQUIRED)
        return self.rfile.read(int(length))

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        logger.debug("%s - %s", self.address_string(), format % args)


def _json(body: bytes) -> Any:
    try:
        return json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(f"The body is not valid JSON ({error}).") from error


class GenerationServer(ThreadingHTTPServer):
    """The HTTP server over one backend. Requests are served on threads, but the backend runs one call at a
    time (a lock): a weight update never interleaves with a generation."""

    daemon_threads = True

    def __init__(self, backend: GenerationBackend, host: str = "0.0.0.0", port: int = 8000) -> None:
        self.backend = backend
        self.lock = threading.Lock()
        self.weight_updates = 0
        self.routes = {
            "/health": ("GET", lambda _: {"status": "ok"}),
            "/info": ("GET", lambda _: self.info()),
            "/generate": ("POST", self.generate),
            "/update_weights": ("POST", self.update_weights),
            "/reset_prefix_cache": ("POST", self.reset_prefix_cache),
        }
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"

    def info(self) -> dict[str, Any]:
        b = self.backend
        return {"model": b.model_name, "backend": b.name, "world_size": b.world_size, "vocab_size": b.vocab_size,
                "weight_updates": self.weight_updates}

    def generate(self, body: bytes) -> dict[str, Any]:
        prompts, request = parse_generate_request(_json(body), self.backend.vocab_size)
        with self.lock:
            if isinstance(prompts[0], str):
                prompts = self.backend.tokenize(prompts)
            result = self.backend.generate(prompts, request)
        return {"prompt_ids": prompts, "completion_ids": result.completion_ids, "logprobs": result.logprobs,
                "logprob_token_ids": result.logprob_token_ids}

    def update_weights(self, body: bytes) -> dict[str, Any]:
        if not body:
            raise RequestError("/update_weights needs a body: the tensors as a safetensors file.")
        with self.lock:
            updated = self.backend.load_weights(body)
            self.weight_updates += 1
        return {"updated": updated}

    def reset_prefix_cache(self, _: bytes) -> dict[str, Any]:
        with self.lock:
            self.backend.reset_prefix_cache()
        return {"success": True}

    def start_in_thread(self) -> threading.Thread:
        """Serve on a daemon thread (tests, notebooks); `shutdown()` stops it."""
        # A short poll interval: shutdown() waits for the loop to notice, up to this long.
        thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, name="tether-vllm-serve",
                                  daemon=True)
        thread.start()
        return thread


# ----- the command -----------------------------------------------------------------------------------------
@dataclass
class ServeArguments:
    """`tether vllm-serve` options: TRL's `trl vllm-serve` names, plus --backend, --seed and --device."""

    model: str | None = field(default=None, metadata={
        "help": "Model to serve: a local folder or a hub id (required)."})
    backend: str | None = field(default=None, metadata={
        "help": "vllm (a vLLM engine, GPU) or transformers (tether's sampler, CPU or GPU). Default: vllm if it "
                "is installed, else transformers.", "choices": ["vllm", "transformers"]})
    revision: str | None = field(default=None, metadata={"help": "Model revision (branch, tag or commit)."})
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM tensor-parallel workers (GPUs)."})
    data_parallel_size: int = field(default=1, metadata={
        "help": "Accepted for TRL's flag; only 1 is supported (one engine per server)."})
    host: str = field(default="0.0.0.0", metadata={
        "help": "Address to listen on (0.0.0.0: every interface, as TRL; the endpoints have no authentication, "
                "so use 127.0.0.1 unless trainers on other machines must reach it)."})
    port: int = field(default=8000, metadata={"help": "Port to listen on."})
    gpu_memory_utilization: float = field(default=0.9, metadata={
        "help": "Share of GPU memory vLLM may take for weights, activations and KV cache."})
    dtype: str = field(default="auto", metadata={
        "help": "Weights' dtype: auto (the checkpoint's), float32, bfloat16, float16."})
    max_model_len: int | None = field(default=None, metadata={
        "help": "Longest prompt + completion served (vLLM sizes its KV cache by it; the transformers backend "
                "refuses longer requests)."})
    enable_prefix_caching: bool | None = field(default=None, metadata={
        "help": "vLLM prefix caching (default: vLLM's choice)."})
    enforce_eager: bool | None = field(default=False, metadata={"help": "vLLM: no CUDA graphs."})
    kv_cache_dtype: str = field(default="auto", metadata={"help": "vLLM KV cache dtype."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Run the model repository's own code (needed by some custom architectures; a security risk)."})
    log_level: str = field(default="info", metadata={
        "help": "Server log level.", "choices": ["critical", "error", "warning", "info", "debug", "trace"]})
    vllm_model_impl: str = field(default="vllm", metadata={
        "help": "vLLM's model implementation: vllm or transformers.", "choices": ["vllm", "transformers"]})
    distributed_executor_backend: str | None = field(default=None, metadata={
        "help": "vLLM executor (ray: tensor-parallel workers across nodes)."})
    speculative_config: str | None = field(default=None, metadata={
        "help": "vLLM speculative decoding config, as JSON."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampling stream of requests that give no seed."})
    device: str | None = field(default=None, metadata={
        "help": "transformers backend: the device (default: cuda if available, else cpu)."})

    # Options that only configure a vLLM engine, with their defaults (the transformers backend warns on others).
    VLLM_ONLY = {"tensor_parallel_size": 1, "gpu_memory_utilization": 0.9, "enable_prefix_caching": None,
                 "enforce_eager": False, "kv_cache_dtype": "auto", "vllm_model_impl": "vllm",
                 "distributed_executor_backend": None, "speculative_config": None}

    def __post_init__(self) -> None:
        if self.data_parallel_size != 1:
            raise ValueError(f"--data_parallel_size {self.data_parallel_size}: tether vllm-serve runs one engine "
                             "per server; use --tensor_parallel_size for several GPUs, or start one server per GPU "
                             "group.")
        if self.speculative_config is not None:
            try:
                json.loads(self.speculative_config)
            except json.JSONDecodeError as error:
                raise ValueError(f"--speculative_config must be JSON ({error}).") from error


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def build_backend(args: ServeArguments) -> GenerationBackend:
    """The backend `args` asks for (vllm when installed, else transformers, with a notice)."""
    backend = args.backend
    if backend is None:
        backend = "vllm" if vllm_available() else "transformers"
        if backend == "transformers":
            logger.warning("vLLM is not installed: serving with the transformers backend (tether's sampler). "
                           "`pip install vllm` on a CUDA machine for the vllm backend; --backend transformers "
                           "silences this notice.")
    if backend == "vllm":
        return VLLMBackend(args.model, args.revision, args.tensor_parallel_size, args.gpu_memory_utilization,
                           args.dtype, args.max_model_len, args.enable_prefix_caching, args.enforce_eager,
                           args.kv_cache_dtype, args.trust_remote_code, args.vllm_model_impl,
                           args.distributed_executor_backend, args.speculative_config, args.seed)
    ignored = [f"--{k}" for k, default in ServeArguments.VLLM_ONLY.items() if getattr(args, k) != default]
    if ignored:
        logger.warning("The transformers backend ignores %s (vLLM engine options).", ", ".join(ignored))
    return TransformersBackend(args.model, args.dtype, args.device, args.trust_remote_code, args.revision, args.seed,
                               args.max_model_len)


def serve(args: ServeArguments) -> None:
    """Load the model and serve until interrupted."""
    level = "DEBUG" if args.log_level == "trace" else args.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(level)
    server = GenerationServer(build_backend(args), args.host, args.port)
    logger.info("Serving %s (%s backend) on http://%s:%d", args.model, server.backend.name, args.host,
                server.server_address[1])
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
