"""TRL 1.16's GRPOConfig / RLOOConfig options, written as a TRL user writes them, each shown to take effect:
every field accepted, the sampler's repetition penalty against transformers' generate, generation_kwargs,
num_generations_eval, log_completions, chat_template_kwargs, the differentiable entropy and the float32 LM
head, and the vLLM server path with its importance-sampling correction (a fake server sampler)."""

from __future__ import annotations

import json
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from tether import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from tether.data.collate import LanguageModelingCollator
from tether.models.forward import causal_token_log_probs
from tether.rollout.sampling import sample_groups, sampling_settings
from tether.rollout.vllm_generation import groups_from_token_lists

FIELDS = json.loads((Path(__file__).parent / "data" / "trl_1_16_config_fields.json").read_text())


def prompts_dataset(n: int = 8) -> Dataset:
    return Dataset.from_dict({"prompt": [f"the film number {i}" for i in range(n)]})


def config(cls, tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2,
                  max_completion_length=6, learning_rate=1e-3, max_steps=1, logging_steps=1, report_to=[],
                  use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True)
    values.update(overrides)
    return cls(**values)


def low_ids(completion_ids, **_):
    return [sum(i < 100 for i in c) / max(len(c), 1) for c in completion_ids]


def length_reward(completion_ids, **_):
    return [float(len(c)) for c in completion_ids]


@pytest.fixture()
def policy(tiny_decoder_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)


# ----- every field ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,cls", [("GRPOConfig", GRPOConfig), ("RLOOConfig", RLOOConfig)])
def test_every_trl_field_is_accepted_with_its_default(name, cls, tmp_path):
    fields = {k: v for k, v in FIELDS[name].items() if k not in ("max_completion_length",)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = cls(output_dir=str(tmp_path), use_cpu=True, report_to=[], **fields)
    for key, value in fields.items():
        if key not in ("generation_batch_size", "steps_per_generation", "pad_to_multiple_of"):  # derived
            assert getattr(args, key) == value, key


def test_inapplicable_field_warns_naming_why(tmp_path):
    with pytest.warns(UserWarning, match="max_tool_calling_iterations.*issue 16"):
        GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_tool_calling_iterations=3)


def test_generation_kwargs_unknown_key_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"num_beams"):
        GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], generation_kwargs={"num_beams": 4})
    assert sampling_settings({"max_tokens": 3, "do_sample": False}, temperature=0.7) == {
        "temperature": 0.0, "max_new_tokens": 3}


# ----- the sampler -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers_greedy(policy, penalty):
    """Greedy decoding with the penalty picks, at every step, what transformers' RepetitionPenaltyLogitsProcessor
    (z / p if z > 0 else z * p on every token seen in prompt + completion) picks; the log-probs stay the
    unpenalised policy's."""
    prompt = [5, 17, 17, 42, 9]
    ours = sample_groups(policy, [prompt], 1, 12, 0, [], temperature=0.0, repetition_penalty=penalty,
                         logprob_temperature=1.0)
    theirs = policy.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, repetition_penalty=penalty,
                             pad_token_id=0, eos_token_id=None)[0, len(prompt):]
    assert ours.completion_ids[0].tolist() == theirs.tolist()
    plain = sample_groups(policy, [prompt], 1, 12, 0, [], temperature=0.0)
    assert ours.completion_ids[0].tolist() != plain.completion_ids[0].tolist()  # the option changed the tokens
    full = torch.tensor([prompt + ours.completion_ids[0].tolist()])
    logps = policy(full).logits[0, len(prompt) - 1:-1].log_softmax(-1).gather(-1, full[0, len(prompt):, None])
    torch.testing.assert_close(ours.logps[0], logps.squeeze(-1), atol=1e-5, rtol=0)


def test_min_new_tokens_and_suppress_tokens(policy):
    first = sample_groups(policy, [[5, 6]], 1, 1, 0, [], temperature=0.0).completion_ids[0, 0].item()
    out = sample_groups(policy, [[5, 6]], 4, 6, 0, [first], temperature=1.0, min_new_tokens=3,
                        generator=torch.Generator().manual_seed(0))
    assert (out.completion_mask.sum(-1) >= 3).all()  # EOS (= the greedy token) banned for 3 steps
    banned = sample_groups(policy, [[5, 6]], 1, 1, 0, [], temperature=0.0, suppress_tokens=[first])
    assert banned.completion_ids[0, 0].item() != first


# ----- trainer-level options ---------------------------------------------------------------------------------------
def test_generation_kwargs_override_max_completion_length(policy, tokenizer, tmp_path):
    seen = []

    def spy(completion_ids, **_):
        seen.extend(len(c) for c in completion_ids)
        return [0.0] * len(completion_ids)

    args = config(GRPOConfig, tmp_path, max_completion_length=12, generation_kwargs={"max_new_tokens": 3})
    GRPOTrainer(policy, reward_funcs=spy, args=args, train_dataset=prompts_dataset(),
                processing_class=tokenizer).train()
    assert seen and max(seen) <= 3


@pytest.mark.parametrize("trainer_class,config_class", [(GRPOTrainer, GRPOConfig), (RLOOTrainer, RLOOConfig)])
def test_num_generations_eval_sets_the_eval_group_size(trainer_class, config_class, policy, tokenizer, tmp_path):
    calls = []

    def spy(prompts, completion_ids, **_):
        calls.append(list(prompts))
        return [float(len(c)) for c in completion_ids]

    args = config(config_class, tmp_path, num_generations_eval=3, per_device_eval_batch_size=6, beta=0.0)
    trainer = trainer_class(policy, reward_funcs=spy, args=args, train_dataset=prompts_dataset(),
                            eval_dataset=prompts_dataset(4), processing_class=tokenizer)
    trainer.evaluate()
    assert calls and all(len(c) == 6 for c in calls)  # 2 prompts x 3 completions per eval batch
    for prompts in calls:
        assert prompts[0] == prompts[1] == prompts[2] != prompts[3]


def test_log_completions_prints_a_table(policy, tokenizer, tmp_path, capsys):
    args = config(GRPOConfig, tmp_path, log_completions=True, num_completions_to_print=2, log_unique_prompts=True)
    GRPOTrainer(policy, reward_funcs=length_reward, args=args, train_dataset=prompts_dataset(),
                processing_class=tokenizer).train()
    out = capsys.readouterr().out
    assert "Step 1" in out and "| Prompt" in out and "length_reward" in out and "Advantage" in out
    first_table = out[out.index("| Prompt"):].split("Step ")[0].split("\n")
    assert len([row for row in first_table if row.startswith("| the film")]) == 2  # 2 of 4 distinct prompts


def test_reward_functions_log_extra_columns_and_metrics(policy, tokenizer, tmp_path, capsys):
    # TRL 1.x hands reward functions log_extra(column, values) and log_metric(name, value).
    def judged(completions, log_extra, log_metric, **_):
        lengths = [len(c) for c in completions]
        log_extra("verdict", ["long" if n > 3 else "short" for n in lengths])
        log_metric("judge/mean_length", sum(lengths) / len(lengths))
        return [float(n) for n in lengths]

    args = config(GRPOConfig, tmp_path, log_completions=True)
    trainer = GRPOTrainer(policy, reward_funcs=judged, args=args, train_dataset=prompts_dataset(),
                          processing_class=tokenizer)
    trainer.train()
    assert "verdict" in capsys.readouterr().out  # a column of the printed table
    rows = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert rows and all(row["verdict"] == ("long" if len(row["completion"]) > 3 else "short") for row in rows)
    logged = [entry["judge/mean_length"] for entry in trainer.state.log_history if "judge/mean_length" in entry]
    assert logged and logged[0] > 0


def test_chat_template_kwargs_reach_the_template(policy, tokenizer, tmp_path):
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}{{ marker | default('') }}{% endif %}")
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": "the film"}]] * 4})
    plain = GRPOTrainer(policy, reward_funcs=length_reward, args=config(GRPOConfig, tmp_path), train_dataset=ds,
                        processing_class=tokenizer)
    marked = GRPOTrainer(policy, reward_funcs=length_reward, train_dataset=ds, processing_class=tokenizer,
                         args=config(GRPOConfig, tmp_path, chat_template_kwargs={"marker": " the plot"}))
    a, b = plain.train_dataset[0]["prompt_input_ids"], marked.train_dataset[0]["prompt_input_ids"]
    assert b[: len(a)] == a and b[len(a):] == tokenizer(" the plot", add_special_tokens=False)["input_ids"]


# ----- forward variants ----------------------------------------------------------------------------------------------
def _batch(tokenizer):
    rows = [{"input_ids": [5, 6, 7, 8, 9], "loss_mask": [False, False, True, True, True]},
            {"input_ids": [10, 11, 12], "loss_mask": [False, True, True]}]
    return LanguageModelingCollator(tokenizer.pad_token_id)(rows)


def test_entropy_with_gradient_matches_full_logits(policy, tokenizer):
    """The chunked, checkpointed entropy equals -sum p log p of softmax(logits / T) and carries the gradient
    that autograd through the full logits gives."""
    batch = _batch(tokenizer)
    out = causal_token_log_probs(policy, batch, temperature=0.7, chunk_size=2, entropy_gradient=True)
    entropy = out.entropy
    logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[out.rows, out.positions - 1] / 0.7
    reference = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(entropy, reference, atol=1e-5, rtol=1e-5)
    head = policy.lm_head.weight
    ours = torch.autograd.grad(entropy.sum(), head)[0]
    theirs = torch.autograd.grad(reference.sum(), head)[0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    plain = causal_token_log_probs(policy, batch, 0.7)
    torch.testing.assert_close(out.logps, plain.logps)


def test_cast_lm_head_to_fp32(tiny_decoder_dir, tokenizer, tmp_path):
    """bf16 model: the head is float32 after construction and the log-probs are those of float32 logits."""
    model = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir, dtype=torch.bfloat16)
    model.config.tie_word_embeddings = False
    args = config(GRPOConfig, tmp_path, cast_lm_head_to_fp32=True, bf16=False)
    trainer = GRPOTrainer(model, reward_funcs=length_reward, args=args, train_dataset=prompts_dataset(),
                          processing_class=tokenizer)
    assert trainer.model.lm_head.weight.dtype == torch.float32
    assert trainer.model.model.embed_tokens.weight.dtype == torch.bfloat16
    grid = trainer._token_logps(trainer.model, [[5, 6]], torch.tensor([[7, 8]]), torch.ones(1, 2, dtype=torch.bool))
    hidden = trainer.model.model(input_ids=torch.tensor([[5, 6, 7, 8]])).last_hidden_state[0, 1:3].float()
    logits = hidden @ trainer.model.lm_head.weight.T
    expected = logits.log_softmax(-1).gather(-1, torch.tensor([[7], [8]])).squeeze(-1)
    torch.testing.assert_close(grid.logps_grid[0], expected, atol=1e-5, rtol=0)


# ----- vLLM server mode, with a fake server sampler ------------------------------------------------------------------
class FakeServerSampler:
    """Stands in for VLLMServerGroupSampler: fixed completions, and 'engine' log-probs 0.3 off the truth."""

    made: list = []

    def __init__(self, base_url, host, port, timeout):
        self.args = (base_url, host, port, timeout)
        self.synced = []
        FakeServerSampler.made.append(self)

    def sync(self, policy, step):
        self.synced.append(step)

    def __call__(self, prompts, num_generations, max_new_tokens, pad_token_id, eos_token_ids, temperature=1.0,
                 top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, generation_kwargs=None):
        completions = [[20 + i, 30, 40] for i in range(len(prompts) * num_generations)]
        engine = [[-1.0, -2.0, -3.0]] * len(completions)
        return groups_from_token_lists(completions, max_new_tokens, pad_token_id, eos_token_ids, engine)


def test_vllm_server_mode_uses_the_server_sampler_and_corrects_the_loss(policy, tokenizer, tmp_path, monkeypatch):
    module = types.ModuleType("tether.rollout.vllm_client")
    module.VLLMServerGroupSampler = FakeServerSampler
    monkeypatch.setitem(sys.modules, "tether.rollout.vllm_client", module)
    args = config(GRPOConfig, tmp_path, use_vllm=True, vllm_mode="server", vllm_server_port=9001,
                  vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=1e9)
    trainer = GRPOTrainer(policy, reward_funcs=length_reward, args=args, train_dataset=prompts_dataset(),
                          processing_class=tokenizer)  # no CUDA needed in server mode
    assert FakeServerSampler.made[-1].args == (None, "0.0.0.0", 9001, 240.0)
    rounds, generate = [], trainer._generate_round
    trainer._generate_round = lambda batch, training=True: rounds.append(generate(batch, training)) or rounds[-1]
    trainer.train()
    r = rounds[0]
    # per-token weights exp(log pi_trainer - log pi_engine) with the trainer's own log-probs
    expected = torch.exp(r.old_logps - torch.tensor([-1.0, -2.0, -3.0]))
    torch.testing.assert_close(r.sampler_weights, expected)
    assert any("sampling/importance_sampling_ratio/mean" in row for row in trainer.state.log_history)


@pytest.mark.parametrize("options", [
    {"loss_type": "cispo", "epsilon_high": 5.0},
    {"loss_type": "sapo"},
    {"loss_type": "luspo", "importance_sampling_level": "sequence"},
    {"loss_type": "vespo"},
    {"loss_type": "dapo", "delta": 1.5, "off_policy_mask_threshold": 0.5, "top_entropy_quantile": 0.6},
    {"loss_type": "grpo", "beta": 0.1, "use_bias_correction_kl": True, "multi_objective_aggregation":
     "normalize_then_sum"},
])
def test_loss_options_train(options, policy, tokenizer, tmp_path):
    """Each option group runs end to end through GRPOTrainer (the math is tested in test_grpo_loss_variants)."""
    before = [p.detach().clone() for p in policy.parameters()]
    args = config(GRPOConfig, tmp_path, **options)
    GRPOTrainer(policy, reward_funcs=[low_ids, length_reward], args=args, train_dataset=prompts_dataset(),
                processing_class=tokenizer).train()
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def test_adaptive_entropy_moves_the_coefficient(policy, tokenizer, tmp_path):
    """entropy_target above any entropy the tiny model has: each step the coefficient rises by the delta."""
    args = config(GRPOConfig, tmp_path, max_steps=3, use_adaptive_entropy=True, entropy_coef=0.01,
                  entropy_coef_delta=0.02, entropy_target=100.0)
    trainer = GRPOTrainer(policy, reward_funcs=length_reward, args=args, train_dataset=prompts_dataset(),
                          processing_class=tokenizer)
    trainer.train()
    assert trainer.entropy_control.coef == pytest.approx(0.07)
    logged = [row["entropy_coef"] for row in trainer.state.log_history if "entropy_coef" in row]
    assert logged[:2] == pytest.approx([0.01, 0.03])  # the coefficient in force during each step


def test_missing_reward_source_and_dataset_are_named(policy, tokenizer, tmp_path):
    # As TRL 1.x: reward_funcs is a keyword with a default, and leaving it (or the dataset) out says what is missing.
    with pytest.raises(ValueError, match="No reward source provided"):
        GRPOTrainer(policy, args=config(GRPOConfig, tmp_path), train_dataset=prompts_dataset(),
                    processing_class=tokenizer)
    with pytest.raises(ValueError, match="`train_dataset` is required"):
        GRPOTrainer(policy, reward_funcs=length_reward, args=config(GRPOConfig, tmp_path), processing_class=tokenizer)


def test_trl_names_of_the_entropy_and_off_policy_masks(policy, tokenizer, tmp_path):
    trainer = GRPOTrainer(policy, reward_funcs=length_reward, args=config(GRPOConfig, tmp_path),
                          train_dataset=prompts_dataset(), processing_class=tokenizer)
    entropies = torch.tensor([[0.1, 0.9, 0.5, 7.0], [0.3, 0.7, 0.2, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    # The 0.5 quantile of the 7 real entropies (0, .1, .2, .3, .5, .7, .9) is 0.3: tokens >= 0.3 are kept.
    expected = torch.tensor([[False, True, True, False], [True, True, False, False]])
    assert torch.equal(trainer.get_high_entropy_mask(entropies, mask, 0.5), expected)
    assert torch.equal(trainer.get_high_entropy_mask(entropies, mask, 0.0), mask.bool())
    # Drop a sequence only when its advantage is negative and its mean (sampler - current) log-prob gap > threshold.
    advantages = torch.tensor([[-1.0], [-1.0], [1.0]])
    current = torch.zeros(3, 2)
    sampler = torch.tensor([[0.5, 0.5], [0.1, 0.1], [0.9, 0.9]])
    keep = GRPOTrainer.get_off_policy_mask(advantages, current, sampler, torch.ones(3, 2), 0.2)
    assert keep.tolist() == [[0.0], [1.0], [1.0]]
