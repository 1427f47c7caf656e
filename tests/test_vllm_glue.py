"""use_vllm=True: the glue between the online trainer and a vLLM engine. vLLM itself needs a CUDA GPU and is
not installable here, so a small stand-in module plays the engine: it records what it is given (sampling
settings, weights) and returns token lists; what is tested is tether's side of the contract."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from tether import GRPOConfig, GRPOTrainer
from tether.rollout.vllm_generation import groups_from_token_lists, policy_weights


def test_groups_from_token_lists_cuts_at_eos_and_pads():
    groups = groups_from_token_lists([[5, 6, 1, 7], [5, 6, 7, 8, 9], [1], []], max_new_tokens=4, pad_token_id=0,
                                     eos_token_ids=[1])
    assert groups.completion_ids.tolist() == [[5, 6, 1, 0], [5, 6, 7, 8], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert groups.completion_mask.sum(-1).tolist() == [3, 4, 1, 0]
    assert groups.truncated.tolist() == [False, True, False, True]
    assert groups.logps is None


def test_policy_weights_merge_peft_adapters_under_base_names(tiny_decoder_dir):
    from peft import LoraConfig, get_peft_model

    plain = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)
    assert dict(policy_weights(plain)).keys() == plain.state_dict().keys()
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_decoder_dir),
                                LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    weights = dict(policy_weights(peft_model))
    merged = peft_model.merge_and_unload().state_dict()  # the reference: merged for good
    assert weights.keys() == merged.keys()
    for name, tensor in merged.items():
        torch.testing.assert_close(weights[name], tensor)


class FakeEngine:
    """Stands in for vllm.LLM: greedy-free, deterministic token lists; records weights and settings."""

    instances: list[FakeEngine] = []

    def __init__(self, **kwargs):
        self.kwargs, self.loaded, self.params = kwargs, [], []
        FakeEngine.instances.append(self)
        worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(model=types.SimpleNamespace(
            load_weights=lambda weights: self.loaded.append({k: v.clone() for k, v in weights}))))
        self.worker = worker

    def collective_rpc(self, method, args=()):
        return [method(self.worker, *args)]

    def reset_prefix_cache(self):
        return True

    def generate(self, requests, params, use_tqdm=False):
        self.params.append(params)
        outputs = []
        for r, request in enumerate(requests):
            samples = [types.SimpleNamespace(token_ids=[(r * 7 + j * 3 + t) % 50 + 10 for t in range(2 + j)] + [1])
                       for j in range(params.n)]
            outputs.append(types.SimpleNamespace(prompt_token_ids=request["prompt_token_ids"], outputs=samples))
        return outputs


@pytest.fixture()
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = FakeEngine
    module.SamplingParams = lambda **kwargs: types.SimpleNamespace(**kwargs)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    FakeEngine.instances.clear()
    return module


def test_grpo_with_vllm_syncs_weights_each_step_and_recomputes_old_logps(fake_vllm, tiny_decoder_dir, tokenizer,
                                                                         tmp_path):
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=6, max_steps=4, num_iterations=2, learning_rate=1e-2, top_k=0,
                      use_vllm=True, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = GRPOTrainer(tiny_decoder_dir, reward_funcs=lambda completion_ids, **_: [len(c) for c in completion_ids],
                          args=args, train_dataset=Dataset.from_dict({"prompt": [f"the film {i}" for i in range(8)]}),
                          processing_class=tokenizer)
    engine = FakeEngine.instances[-1]
    assert engine.kwargs["model"] == tiny_decoder_dir
    snapshots, generate = [], trainer._generate_round

    def spy(batch, training=True):
        snapshots.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
        round_ = generate(batch, training)
        expected = trainer._token_logps(trainer.model, round_.prompt_ids, round_.completion_ids,
                                        round_.completion_mask).logps_grid.detach()
        torch.testing.assert_close(round_.old_logps, expected)  # no log-probs from vLLM: the policy's own
        return round_

    trainer._generate_round = spy
    trainer.train()
    assert len(engine.loaded) == len(snapshots) == 2  # one round per two updates, weights pushed before each
    for pushed, policy in zip(engine.loaded, snapshots):
        assert pushed.keys() == policy.keys()
        for name in policy:
            torch.testing.assert_close(pushed[name], policy[name])
    assert not torch.equal(engine.loaded[0]["lm_head.weight"], engine.loaded[1]["lm_head.weight"])
    params = engine.params[0]
    assert (params.n, params.max_tokens, params.top_k, params.temperature) == (2, 6, -1, 1.0)
    assert tokenizer.eos_token_id in params.stop_token_ids
    assert trainer._round.completion_mask.sum(-1).tolist() == [3, 4, 3, 4]  # each sample cut after its EOS (id 1)


def test_use_vllm_needs_a_gpu(fake_vllm, monkeypatch, tiny_decoder_dir, tokenizer, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2, use_vllm=True,
                      report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        GRPOTrainer(tiny_decoder_dir, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                    train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}), processing_class=tokenizer)
