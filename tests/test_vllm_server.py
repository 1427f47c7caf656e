"""`tether vllm-serve` (transformers backend) and its clients: VLLMServerGroupSampler and TRL's VLLMClient API.

The server runs in a thread of the test process, on a free port, over the tiny decoder of the fixtures; the
references are tether's own sampler on the same model and seed, and greedy decoding written out here."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch
from safetensors.torch import save
from transformers import AutoModelForCausalLM

from tether.rollout.sampling import sample_groups
from tether.rollout.vllm_client import ServerError, VLLMClient, VLLMServerGroupSampler
from tether.rollout.vllm_server import GenerationServer, ServeArguments, TransformersBackend, build_backend

PROMPTS = [[5, 17, 42, 8], [9, 3], [30, 31, 32, 33, 34, 35]]
PAD, EOS = 0, 1


@pytest.fixture()
def server(tiny_decoder_dir):
    backend = TransformersBackend(tiny_decoder_dir, dtype="float32", device="cpu")
    server = GenerationServer(backend, "127.0.0.1", 0)
    thread = server.start_in_thread()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _perturbed(model_dir: str, seed: int = 1) -> torch.nn.Module:
    """The tiny decoder with every weight moved by noise: a different greedy continuation."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model


def _greedy(model: torch.nn.Module, prompt: list[int], steps: int, penalty: float = 1.0) -> list[int]:
    """Greedy decoding without a cache, one full forward per token, with a CTRL-style repetition penalty
    (Keskar et al., 2019): a seen token's logit is divided by `penalty` if positive, multiplied if not."""
    sequence = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([sequence])).logits[0, -1]
        seen = torch.tensor(sorted(set(sequence)))
        logits[seen] = torch.where(logits[seen] > 0, logits[seen] / penalty, logits[seen] * penalty)
        sequence.append(int(logits.argmax()))
        if sequence[-1] == EOS:
            break
    return sequence[len(prompt):]


def _post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_groups_equal_sample_groups_on_the_same_model_and_seed(server, tiny_decoder_dir):
    sampler = VLLMServerGroupSampler(base_url=server.url, timeout=5)
    options = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.02)
    got = sampler(PROMPTS, 3, 12, PAD, [EOS], **options, generation_kwargs={"seed": 11})
    model = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)
    want = sample_groups(model, PROMPTS, 3, 12, PAD, [EOS], **options, generator=torch.Generator().manual_seed(11))
    width = want.completion_ids.shape[1]
    assert got.completion_ids.shape == (9, width)
    assert torch.equal(got.completion_ids, want.completion_ids)
    assert torch.equal(got.completion_mask, want.completion_mask)
    assert torch.equal(got.truncated, want.truncated)
    assert got.logps is None  # the trainer computes its own; the server's come as sampler_logps
    torch.testing.assert_close(got.sampler_logps, want.logps, atol=1e-6, rtol=0)
    # The seed reaches the sampler: another seed draws other tokens.
    other = sampler(PROMPTS, 3, 12, PAD, [EOS], **options, generation_kwargs={"seed": 12})
    assert not torch.equal(other.completion_ids[:, :4], got.completion_ids[:, :4])


def test_logprobs_are_the_sampled_tokens_under_the_tempered_policy(server, tiny_decoder_dir):
    client = VLLMClient(base_url=server.url)
    out = client.generate(PROMPTS[:1], n=2, temperature=0.7, max_tokens=5, generation_kwargs={"seed": 3})
    model = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)
    for completion, logprobs, token_ids in zip(out["completion_ids"], out["logprobs"], out["logprob_token_ids"]):
        assert [ids[0] for ids in token_ids] == completion
        sequence = torch.tensor([PROMPTS[0] + completion])
        with torch.no_grad():
            logits = model(sequence).logits[0, len(PROMPTS[0]) - 1: -1] / 0.7  # [c, v]
        want = logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor([lp[0] for lp in logprobs]), want, atol=1e-5, rtol=0)


def test_sync_sends_the_policy_so_greedy_outputs_follow_it(server, tiny_decoder_dir):
    sampler = VLLMServerGroupSampler(base_url=server.url, timeout=5, chunk_bytes=20_000)  # several chunks
    policy = _perturbed(tiny_decoder_dir)
    want = [_greedy(policy, p, 6) for p in PROMPTS]
    before = sampler(PROMPTS, 1, 6, PAD, [EOS], top_k=1)
    assert [row[m].tolist() for row, m in zip(before.completion_ids, before.completion_mask)] != want

    sampler.sync(policy, step=1)
    sampler.sync(policy, step=1)  # once per optimizer step
    assert sampler.client.get_server_info()["weight_updates"] > 1  # the model went in chunks
    updates = sampler.client.get_server_info()["weight_updates"]
    sampler.sync(policy, step=1)
    assert sampler.client.get_server_info()["weight_updates"] == updates
    after = sampler(PROMPTS, 2, 6, PAD, [EOS], top_k=1)  # top_k=1: greedy at any temperature
    assert [row[m].tolist() for row, m in zip(after.completion_ids, after.completion_mask)] == [
        w for w in want for _ in range(2)]


def test_a_peft_policy_is_sent_with_its_adapter_merged(server, tiny_decoder_dir):
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_decoder_dir),
                            LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    want = [_greedy(policy, p, 6) for p in PROMPTS]
    with policy.disable_adapter():
        base = [_greedy(policy, p, 6) for p in PROMPTS]
    assert base != want  # the adapter changes the greedy text
    sampler = VLLMServerGroupSampler(base_url=server.url, timeout=5)
    sampler.sync(policy, step=0)
    got = sampler(PROMPTS, 1, 6, PAD, [EOS], temperature=0.0)
    assert [row[m].tolist() for row, m in zip(got.completion_ids, got.completion_mask)] == want
    with policy.disable_adapter():  # the adapter was unmerged after the copy: the base weights are intact
        assert [_greedy(policy, p, 6) for p in PROMPTS] == base


def test_repetition_penalty_matches_greedy_decoding_written_out(server, tiny_decoder_dir):
    client = VLLMClient(base_url=server.url)
    model = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)
    out = client.generate(PROMPTS, temperature=0.0, repetition_penalty=3.0, max_tokens=8,
                          generation_kwargs={"stop_token_ids": [EOS]})
    assert out["completion_ids"] == [_greedy(model, p, 8, penalty=3.0) for p in PROMPTS]
    assert out["completion_ids"] != [_greedy(model, p, 8) for p in PROMPTS]  # the penalty changed something


def test_trl_client_api(server, tiny_decoder_dir, tokenizer):
    client = VLLMClient(host="127.0.0.1", server_port=server.server_address[1], connection_timeout=5)
    client.init_communicator(device="cpu")
    assert client.get_world_size() == 1
    out = client.generate(["hello world", "two plus two"], n=3, max_tokens=4)
    assert out["prompt_ids"] == [tokenizer("hello world")["input_ids"], tokenizer("two plus two")["input_ids"]]
    assert len(out["completion_ids"]) == 6 and all(1 <= len(c) <= 4 for c in out["completion_ids"])
    assert [len(lp) for lp in out["logprobs"]] == [len(c) for c in out["completion_ids"]]

    # vLLM's min_tokens: no stop token before that many tokens (here the greedy first token is made a stop).
    first = client.generate([PROMPTS[0]], temperature=0.0, max_tokens=1)["completion_ids"][0][0]
    stop_at_first = {"stop_token_ids": [first], "ignore_eos": True}
    assert client.generate([PROMPTS[0]], temperature=0.0, max_tokens=6,
                           generation_kwargs=stop_at_first)["completion_ids"] == [[first]]
    longer = client.generate([PROMPTS[0]], temperature=0.0, max_tokens=6,
                             generation_kwargs={**stop_at_first, "min_tokens": 3})["completion_ids"][0]
    assert len(longer) >= 3 and first not in longer[:3]

    policy = _perturbed(tiny_decoder_dir, seed=2)
    with client.weight_update():
        for name, parameter in policy.named_parameters():
            client.update_named_param(name, parameter.data)
        assert client.get_server_info()["weight_updates"] == 0  # buffered until the block ends
    greedy = client.generate(PROMPTS, max_tokens=5, temperature=0.0, generation_kwargs={"stop_token_ids": [EOS]})
    assert greedy["completion_ids"] == [_greedy(policy, p, 5) for p in PROMPTS]

    base = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)
    client.update_model_params(base)
    client.reset_prefix_cache()
    greedy = client.generate(PROMPTS, max_tokens=5, temperature=0.0, generation_kwargs={"stop_token_ids": [EOS]})
    assert greedy["completion_ids"] == [_greedy(base, p, 5) for p in PROMPTS]
    client.close_communicator()


def test_health_timeout_names_the_command_and_url():
    url = f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=r"tether vllm-serve.*" + url.replace(".", r"\.")):
        VLLMServerGroupSampler(base_url=url, timeout=0.6)
    assert 0.6 <= time.monotonic() - started < 5


@pytest.mark.parametrize("body, field", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (json.dumps({"n": 2}).encode(), "'prompts' is required"),
    (json.dumps({"prompts": [[1, 2]], "n": 0}).encode(), "'n' must be >= 1"),
    (json.dumps({"prompts": [[1, 2]], "top_p": 0}).encode(), "'top_p' must be in (0, 1]"),
    (json.dumps({"prompts": [[1, 2]], "temperature": "hot"}).encode(), "'temperature' must be a number"),
    (json.dumps({"prompts": [[1, 10**6]]}).encode(), "'prompts'[0] has a token id outside [0, "),
    (json.dumps({"prompts": [[]]}).encode(), "'prompts'[0] must be a non-empty list"),
    (json.dumps({"prompts": [[1]], "beams": 4}).encode(), "Unknown field(s) ['beams']"),
    (json.dumps({"prompts": [[1]], "generation_kwargs": {"presence_penalty": 1.0}}).encode(),
     "does not support ['presence_penalty']"),
    (json.dumps({"prompts": [[1]], "generation_kwargs": {"min_tokens": -1}}).encode(), "'min_tokens' must be"),
    (json.dumps({"prompts": [[1]], "logprobs": 5}).encode(), "sampled token's log-prob only"),
])
def test_bad_generate_requests_get_a_clear_400(server, body, field):
    status, answer = _post(f"{server.url}/generate", body)
    assert status == 400
    assert field in answer["error"]


def test_bad_weight_updates_and_routes(server, tiny_decoder_dir):
    url = server.url
    status, answer = _post(f"{url}/update_weights", save({"model.not_a_layer.weight": torch.zeros(2)}),
                           "application/octet-stream")
    assert status == 400 and "model.not_a_layer.weight" in answer["error"]
    status, answer = _post(f"{url}/update_weights", save({"lm_head.weight": torch.zeros(3, 3)}),
                           "application/octet-stream")
    assert status == 400 and "lm_head.weight: (3, 3)" in answer["error"]
    status, answer = _post(f"{url}/update_weights", b"\x80\x03pickle?", "application/octet-stream")
    assert status == 400 and "safetensors" in answer["error"]
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"{url}/nothing_here")
    assert missing.value.code == 404 and "/generate" in json.loads(missing.value.read())["error"]
    with pytest.raises(urllib.error.HTTPError) as wrong_method:
        urllib.request.urlopen(f"{url}/generate")
    assert wrong_method.value.code == 405
    # A 404 with a body on a kept-alive connection: the body is consumed, so the next request still parses.
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    connection.request("POST", "/nowhere", body=b'{"prompts": [[1]]}', headers={"Content-Type": "application/json"})
    first = connection.getresponse()
    assert first.status == 404 and "error" in json.loads(first.read())
    connection.request("GET", "/health")
    assert connection.getresponse().status == 200
    connection.close()
    # The refused update changed nothing, and the server still answers.
    assert server.weight_updates == 0
    client = VLLMClient(base_url=url)
    with pytest.raises(ServerError, match="'max_tokens' must be >= 1"):
        client.generate([[5, 6]], max_tokens=0)
    assert len(client.generate([[5, 6]], max_tokens=2)["completion_ids"]) == 1


@pytest.mark.slow  # ~20 s: a new interpreter imports torch and transformers, then loads the model
def test_cli_serves_a_model(tiny_decoder_dir, tmp_path):
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "tether.cli", "vllm-serve", "--model", tiny_decoder_dir, "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32", "--tensor_parallel_size", "2"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        client = VLLMClient(base_url=f"http://127.0.0.1:{port}", connection_timeout=60)
        sampler = VLLMServerGroupSampler(base_url=client.base_url, timeout=1)
        got = sampler(PROMPTS, 2, 5, PAD, [EOS], top_k=1)
        model = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)
        assert [row[m].tolist() for row, m in zip(got.completion_ids, got.completion_mask)] == [
            _greedy(model, p, 5) for p in PROMPTS for _ in range(2)]
        assert client.get_server_info()["backend"] == "transformers"
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()
    output = (tmp_path / "server.log").read_text()
    assert "vLLM is not installed: serving with the transformers backend" in output
    assert "ignores --tensor_parallel_size" in output


def test_cli_takes_trl_flags_and_a_yaml_config(tmp_path, monkeypatch):
    from tether.cli import main

    seen = []
    monkeypatch.setattr("tether.rollout.vllm_server.serve", seen.append)
    config = tmp_path / "serve.yaml"
    config.write_text("model: some/model\nport: 9001\ngpu_memory_utilization: 0.5\n")
    assert main(["vllm-serve", "--config", str(config), "--port", "9002", "--tensor-parallel-size", "4",
                 "--enable_prefix_caching", "true", "--trust_remote_code"]) == 0
    args = seen[0]
    assert (args.model, args.port, args.gpu_memory_utilization, args.tensor_parallel_size) == ("some/model", 9002, 0.5, 4)
    assert args.enable_prefix_caching is True and args.trust_remote_code is True and args.host == "0.0.0.0"
    config.write_text("model: m\nprot: 1\n")
    with pytest.raises(SystemExit):
        main(["vllm-serve", "--config", str(config)])


def test_cli_rejects_bad_options(capsys):
    from tether.cli import main

    with pytest.raises(SystemExit):
        main(["vllm-serve", "--backend", "transformers"])
    assert "missing --model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["vllm-serve", "--model", "m", "--data_parallel_size", "2"])
    assert "--data_parallel_size 2" in capsys.readouterr().err


def test_default_backend_without_vllm_is_transformers_with_a_notice(tiny_decoder_dir, caplog, monkeypatch):
    monkeypatch.setattr("tether.rollout.vllm_server.vllm_available", lambda: False)
    with caplog.at_level("WARNING", logger="tether.vllm_serve"):
        backend = build_backend(ServeArguments(model=tiny_decoder_dir, tensor_parallel_size=2, device="cpu"))
    assert backend.name == "transformers"
    assert "vLLM is not installed: serving with the transformers backend" in caplog.text
    assert "ignores --tensor_parallel_size" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="tether.vllm_serve"):
        build_backend(ServeArguments(model=tiny_decoder_dir, backend="transformers", device="cpu"))
    assert caplog.text == ""
    monkeypatch.setattr("tether.rollout.vllm_server.vllm_available", lambda: True)
    with pytest.raises(ImportError, match="pip install vllm"):  # chosen by default when importable
        build_backend(ServeArguments(model=tiny_decoder_dir))


def _rank_worker(rank: int, init_port: int, base_url: str, out_dir: str) -> None:
    """One of 2 training processes: rank 0 gets prompts 0-1, rank 1 prompt 2; both sync, then sample."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{init_port}", rank=rank, world_size=2)
    try:
        sampler = VLLMServerGroupSampler(base_url=base_url, timeout=30)
        assert (sampler.client is None) == (rank == 1)  # only rank 0 talks to the server
        from tether.demo.tiny import tiny_llama_config

        torch.manual_seed(3)
        policy = AutoModelForCausalLM.from_config(tiny_llama_config(int(os.environ["TEST_VOCAB"])))
        sampler.sync(policy, step=4)
        mine = PROMPTS[:2] if rank == 0 else PROMPTS[2:]
        got = sampler(mine, 2, 6, PAD, [EOS], generation_kwargs={"seed": 5})
        torch.save({"ids": got.completion_ids, "mask": got.completion_mask}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # ~15-25 s: two new interpreters import torch and transformers
def test_two_processes_get_their_slices_of_one_request(server, tiny_decoder_dir, tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    monkeypatch.setenv("TEST_VOCAB", str(server.backend.vocab_size))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.spawn(_rank_worker, args=(_free_port(), server.url, str(tmp_path)), nprocs=2, join=True)
    assert server.weight_updates == 1  # rank 0 sent the weights once; rank 1 sent nothing
    # One process asking for all the prompts at once with the same seed: the same tokens, split by rank.
    whole = VLLMServerGroupSampler(base_url=server.url)(PROMPTS, 2, 6, PAD, [EOS], generation_kwargs={"seed": 5})
    rows = [row[m].tolist() for row, m in zip(whole.completion_ids, whole.completion_mask)]
    for rank, span in ((0, slice(0, 4)), (1, slice(4, 6))):
        part = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert [row[m].tolist() for row, m in zip(part["ids"], part["mask"])] == rows[span]


def test_vllm_backend_calls_the_engine_as_documented(monkeypatch):
    """vLLM cannot be installed here: a stand-in module with vLLM's documented signatures (LLM, SamplingParams,
    RequestOutput.outputs[i].token_ids / .logprobs, collective_rpc, reset_prefix_cache) checks the plumbing."""
    import importlib
    import types
    from types import SimpleNamespace

    from tether.rollout.vllm_server import RequestError, VLLMBackend

    calls: dict = {}
    sampling_fields = {"n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens",
                       "stop_token_ids", "ignore_eos", "seed", "logprobs", "presence_penalty", "structured_outputs"}

    def sampling_params(**options):
        unknown = set(options) - sampling_fields
        if unknown:
            raise TypeError(f"unexpected keyword argument {sorted(unknown)[0]!r}")
        calls["params"] = options
        return options

    class LLM:
        def __init__(self, **options):
            calls["llm"] = options
            self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(get_vocab_size=lambda: 50))
            module, _, name = options["worker_extension_cls"].rpartition(".")
            extension = getattr(importlib.import_module(module), name)
            self.worker = type("Worker", (extension,), {})()
            self.worker.model_runner = SimpleNamespace(model=SimpleNamespace(
                load_weights=lambda weights: calls.setdefault("loaded", []).extend(weights)))

        def generate(self, prompts, params, use_tqdm=True):
            calls["prompts"] = prompts
            sample = SimpleNamespace(token_ids=[3, 4], logprobs=[
                {3: SimpleNamespace(logprob=-0.5), 7: SimpleNamespace(logprob=-0.1)}, {4: SimpleNamespace(logprob=-1.0)}])
            return [SimpleNamespace(outputs=[sample] * params["n"]) for _ in prompts]

        def collective_rpc(self, method, args=()):
            return [getattr(self.worker, method)(*args)]

        def reset_prefix_cache(self):
            calls["reset"] = True

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = LLM, sampling_params
    fake.sampling_params = SimpleNamespace(StructuredOutputsParams=lambda regex: {"regex": regex})
    monkeypatch.setitem(sys.modules, "vllm", fake)

    backend = VLLMBackend("some/model", tensor_parallel_size=2, enable_prefix_caching=True, seed=7,
                          speculative_config='{"method": "ngram"}')
    assert calls["llm"]["tensor_parallel_size"] == 2 and calls["llm"]["enable_prefix_caching"] is True
    assert calls["llm"]["speculative_config"] == {"method": "ngram"} and backend.vocab_size == 50
    server = GenerationServer(backend, "127.0.0.1", 0)
    server.start_in_thread()
    try:
        status, out = _post(f"{server.url}/generate", json.dumps({
            "prompts": [[1, 2], [3]], "n": 2, "top_k": 0, "structured_outputs_regex": "[ab]+",
            "generation_kwargs": {"seed": 9, "stop_token_ids": [1], "presence_penalty": 0.5}}).encode())
        assert status == 200
        assert calls["prompts"] == [{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [3]}]
        assert calls["params"]["top_k"] == -1 and calls["params"]["seed"] == 9
        assert calls["params"]["stop_token_ids"] == [1] and calls["params"]["presence_penalty"] == 0.5
        assert calls["params"]["structured_outputs"] == {"regex": "[ab]+"} and calls["params"]["logprobs"] == 0
        assert out["completion_ids"] == [[3, 4]] * 4
        assert out["logprobs"][0] == [[-0.1, -0.5], [-1.0]] and out["logprob_token_ids"][0] == [[7, 3], [4]]
        status, out = _post(f"{server.url}/generate", json.dumps(
            {"prompts": [[1]], "generation_kwargs": {"best_of": 3}}).encode())
        assert status == 400 and "vLLM refused the sampling parameters" in out["error"]

        client = VLLMClient(base_url=server.url)
        weights = {"model.layer.weight": torch.arange(6.0).reshape(2, 3), "lm_head.weight": torch.ones(2)}
        client.update_named_params(list(weights.items()))
        client.reset_prefix_cache()
        assert {name: tensor.tolist() for name, tensor in calls["loaded"]} == {
            name: tensor.tolist() for name, tensor in weights.items()}
        assert calls["reset"] is True
        with pytest.raises(RequestError):
            backend.load_weights(b"not safetensors")
    finally:
        server.shutdown()
        server.server_close()


def test_the_transformers_backend_names_a_missing_local_model(tmp_path):
    from tether.rollout.vllm_server import TransformersBackend

    with pytest.raises(FileNotFoundError, match="no such local folder"):
        TransformersBackend(str(tmp_path / "no-such-model"))
