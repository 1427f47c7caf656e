"""PPOTrainer's classic API on the tiny models: the README call verbatim and its stats, learning a
programmatic reward (full and LoRA policies), the reference in every form (copy, shared layers, the
adapter-disabled PEFT model), the KL machinery inside `step`, seq2seq, gradient accumulation == one
mini-batch, early stopping, and bad input rejected with a message.

Notation: b = batch, t = tokens; "response positions" are where a response token is predicted.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from tether import (
    AutoModelForCausalLMWithValueHead,
    AutoModelForSeq2SeqLMWithValueHead,
    PPOConfig,
    PPOTrainer,
    create_reference_model,
    respond_to_batch,
)
from tether.losses.kl import kl_penalty
from tether.models.forward import causal_token_log_probs


# ----- helpers ----------------------------------------------------------------------------------------------
def make_queries(tokenizer, n: int) -> list[torch.Tensor]:
    """n queries of different lengths, 1-D token ids."""
    texts = ["this movie was really", "the plot", "i did not expect the ending to be so", "great acting",
             "what a waste of", "the capital of france is", "two plus two", "hello world"]
    return [tokenizer.encode(texts[i % len(texts)], return_tensors="pt")[0] for i in range(n)]


def make_responses(n: int, seed: int = 0, vocab: int = 400) -> list[torch.Tensor]:
    """n fixed responses of lengths 3, 4, 5, ... (no special ids), the same for every trainer."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (3 + i % 5,), generator=g) for i in range(n)]


def scores_for(n: int) -> list[torch.Tensor]:
    return [torch.tensor(float(i % 3) - 1.0) for i in range(n)]


def value_model(path: str, seed: int = 0, **kwargs) -> AutoModelForCausalLMWithValueHead:
    torch.manual_seed(seed)  # the value head is initialised at random
    return AutoModelForCausalLMWithValueHead.from_pretrained(path, **kwargs)


def perturbed_copy(model: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> torch.nn.Module:
    """A frozen reference that differs from `model`: every weight plus Gaussian noise."""
    reference = create_reference_model(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(scale * torch.randn(param.shape, generator=g))
    return reference


def response_mask(queries: list[torch.Tensor], responses: list[torch.Tensor], width: int) -> torch.Tensor:
    """[b, t] True at the positions of response tokens in query+response rows."""
    mask = torch.zeros(len(queries), width, dtype=torch.bool)
    for i, (query, response) in enumerate(zip(queries, responses)):
        mask[i, len(query): len(query) + len(response)] = True
    return mask


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def count_optimizer_steps(optimizer: torch.optim.Optimizer) -> list[int]:
    """A list that grows by one at every real parameter update of `optimizer` (a torch optimizer)."""
    steps: list[int] = []
    optimizer.register_step_post_hook(lambda *_: steps.append(1))
    return steps


LORA_TARGETS = ["q_proj", "v_proj"]


def lora(targets=LORA_TARGETS, **overrides) -> LoraConfig:
    values = dict(r=8, lora_alpha=16, target_modules=list(targets), lora_dropout=0.0)
    values.update(overrides)
    return LoraConfig(**values)


CLASSIC_KEYS = [
    "objective/kl", "objective/kl_coef", "objective/entropy", "ppo/mean_scores", "ppo/mean_non_score_reward",
    "ppo/loss/policy", "ppo/loss/value", "ppo/loss/total", "ppo/policy/entropy", "ppo/policy/approxkl",
    "ppo/policy/policykl", "ppo/policy/clipfrac", "ppo/policy/advantages_mean", "ppo/returns/mean",
    "ppo/returns/var", "ppo/val/vpred", "ppo/val/error", "ppo/val/clipfrac", "ppo/val/mean", "ppo/val/var",
    "ppo/val/var_explained", "tokens/queries_len_mean", "tokens/responses_len_mean",
]
TIME_KEYS = ["time/ppo/forward_pass", "time/ppo/compute_rewards", "time/ppo/compute_advantages",
             "time/ppo/optimize_step", "time/ppo/calc_stats", "time/ppo/total"]


def assert_classic_stats(stats: dict) -> None:
    for key in CLASSIC_KEYS + TIME_KEYS:
        assert key in stats, key
        assert isinstance(stats[key], float) and math.isfinite(stats[key]), (key, stats[key])
    assert all(stats[k] >= 0 for k in TIME_KEYS)
    assert stats["time/ppo/total"] >= stats["time/ppo/optimize_step"]


# ----- 1. the classic call, verbatim ------------------------------------------------------------------------
def test_classic_usage_verbatim(tiny_decoder_dir, tokenizer):
    """TRL's README example before 1.0, line for line, on the tiny model."""
    path = tiny_decoder_dir
    # 1. load a pretrained model
    model = AutoModelForCausalLMWithValueHead.from_pretrained(path)
    model_ref = create_reference_model(model)
    # 2. initialize trainer
    ppo_trainer = PPOTrainer(PPOConfig(batch_size=1), model, model_ref, tokenizer)
    # 3. encode a query
    query_tensor = tokenizer.encode("this movie was really", return_tensors="pt")
    # 4. generate model response
    response_tensor = respond_to_batch(model, query_tensor)
    # 5. train model with ppo
    before = snapshot(model)
    stats = ppo_trainer.step([query_tensor[0]], [response_tensor[0]], [torch.tensor(1.0)])

    assert response_tensor.shape == (1, 20)
    assert_classic_stats(stats)
    assert stats["objective/kl"] == 0.0  # the reference is an exact copy and nothing moved yet
    assert stats["objective/kl_coef"] == 0.2 and stats["ppo/mean_scores"] == 1.0
    assert stats["tokens/queries_len_mean"] == query_tensor.shape[1]
    assert stats["tokens/responses_len_mean"] == 20
    assert stats["ppo/epochs_run"] == 4
    width = query_tensor.shape[1] + 20
    assert stats["objective/logprobs"].shape == stats["objective/ref_logprobs"].shape == (1, width)
    assert stats["ppo/policy/advantages"].shape == (20,)
    after = snapshot(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the policy moved
    assert all(torch.equal(p, before[n]) for n, p in model_ref.named_parameters())  # the reference did not

    logged = ppo_trainer.log_stats(stats, {"query": ["q"], "response": ["r"]}, [torch.tensor(1.0)])
    assert logged["env/reward_mean"] == 1.0 and logged["objective/kl"] == 0.0
    assert logged["objective/logprobs"].shape == (1, width)  # arrays go to trackers as histograms


def test_trainer_save_pretrained_round_trip(tmp_path, tiny_decoder_dir, tokenizer):
    trainer = PPOTrainer(PPOConfig(batch_size=2), value_model(tiny_decoder_dir), None, tokenizer)
    trainer.step(make_queries(tokenizer, 2), make_responses(2), scores_for(2))
    trainer.save_pretrained(str(tmp_path))
    files = set(os.listdir(tmp_path))
    assert {"model.safetensors", "value_head.safetensors", "tokenizer.json"} <= files
    reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path))
    ids = torch.tensor([[5, 17, 42, 99]])
    trainer.model.eval()
    with torch.no_grad():
        expected, got = trainer.model(input_ids=ids), reloaded(input_ids=ids)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(got[2], expected[2], rtol=0, atol=0)


# ----- 5. learning ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_ppo_raises_a_programmatic_reward(tiny_decoder_dir, tokenizer, peft):
    """Reward = share of response tokens in a fixed 1/8 slice of the vocabulary (about 0.125 at random)."""
    vocab = len(tokenizer)
    low, high = vocab // 2, vocab // 2 + vocab // 8
    # LoRA on the attention alone barely moves a random-init 2-layer model; adapting the head lets it learn.
    model = value_model(tiny_decoder_dir, peft_config=lora(LORA_TARGETS + ["lm_head"]) if peft else None)
    config = PPOConfig(batch_size=16, mini_batch_size=8, learning_rate=3e-3, init_kl_coef=0.01,
                       adap_kl_ctrl=False)
    trainer = PPOTrainer(config, model, None, tokenizer)
    assert (trainer.ref_model is None) == peft
    queries = make_queries(tokenizer, 16)
    means = []
    for _ in range(30):
        responses = trainer.generate(queries, return_prompt=False, batch_size=16, max_new_tokens=8,
                                     do_sample=True)
        scores = [((r >= low) & (r < high)).float().mean() for r in responses]
        stats = trainer.step(queries, responses, scores)
        assert stats["ppo/mean_scores"] == pytest.approx(float(torch.stack(scores).mean()), abs=1e-6)
        means.append(stats["ppo/mean_scores"])
    first, last = np.mean(means[:3]), np.mean(means[-3:])
    assert first < 0.3, means  # about 1/8 at the start
    assert last > first + 0.35 and last > 0.5, means  # measured: full 0.92-0.97, LoRA 0.62-0.86 over seeds


# ----- 3. reference models ----------------------------------------------------------------------------------
def test_shared_layers_stay_put_while_the_rest_trains(tiny_decoder_dir, tokenizer):
    model = value_model(tiny_decoder_dir)
    reference = create_reference_model(model, num_shared_layers=1)
    shared = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert shared == {n for n in shared if "embed_tokens" in n or ".layers.0." in n} and len(shared) == 10
    policy_before, reference_before = snapshot(model), snapshot(reference)
    config = PPOConfig(batch_size=4, mini_batch_size=2, learning_rate=1e-3)
    trainer = PPOTrainer(config, model, reference, tokenizer)
    trainer.step(make_queries(tokenizer, 4), make_responses(4), scores_for(4))
    policy_after, reference_after = snapshot(model), snapshot(reference)
    for name in policy_before:
        if name in shared:
            assert torch.equal(policy_after[name], policy_before[name]), name
            assert reference.get_parameter(name) is model.get_parameter(name), name
        else:
            assert torch.equal(reference_after[name], reference_before[name]), name
    unshared = [n for n in policy_before if n not in shared]
    changed = [n for n in unshared if not torch.equal(policy_after[n], policy_before[n])]
    assert len(changed) == len(unshared), set(unshared) - set(changed)  # every trainable tensor moved


def test_trainer_builds_its_own_reference(tiny_decoder_dir, tokenizer):
    model = value_model(tiny_decoder_dir)
    trainer = PPOTrainer(PPOConfig(batch_size=2), model, None, tokenizer, num_shared_layers=1)
    ref = trainer.ref_model
    assert ref is not None and ref is not model and not ref.training
    assert all(not p.requires_grad for p in ref.parameters())
    assert ref.get_parameter("pretrained_model.model.layers.0.mlp.up_proj.weight") is model.get_parameter(
        "pretrained_model.model.layers.0.mlp.up_proj.weight")
    assert ref.get_parameter("pretrained_model.model.layers.1.mlp.up_proj.weight") is not model.get_parameter(
        "pretrained_model.model.layers.1.mlp.up_proj.weight")
    # an optimizer over trainable parameters only: the shared ones are not in it
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert id(model.get_parameter("pretrained_model.model.layers.0.mlp.up_proj.weight")) not in in_optimizer
    with pytest.warns(UserWarning, match="num_shared_layers"):
        PPOTrainer(PPOConfig(batch_size=2), value_model(tiny_decoder_dir), create_reference_model(model),
                   tokenizer, num_shared_layers=1)


# ----- 6. PEFT: the reference is the base model -------------------------------------------------------------
def test_peft_reference_equals_the_base_model(tiny_decoder_dir, tokenizer):
    model = value_model(tiny_decoder_dir, peft_config=lora(init_lora_weights=False))  # acts from the start
    config = PPOConfig(batch_size=4, mini_batch_size=2, learning_rate=1e-2)
    trainer = PPOTrainer(config, model, None, tokenizer)
    assert trainer.ref_model is None
    base = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir).eval()
    queries, responses = make_queries(tokenizer, 4), make_responses(4)
    batch = trainer._batch(queries, responses, None)

    def check() -> None:
        with torch.no_grad():
            expected = causal_token_log_probs(base, batch)
            policy = causal_token_log_probs(trainer.model, batch)
        reference = trainer._reference_log_probs(batch)
        assert torch.equal(reference.rows, expected.rows)
        assert torch.equal(reference.positions, expected.positions)
        torch.testing.assert_close(reference.logps, expected.logps, rtol=0, atol=0)
        assert (policy.logps - expected.logps).abs().max() > 1e-3  # the adapter is on outside the reference

    trainer.model.eval()
    check()
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    for _ in range(2):
        trainer.step(queries, responses, scores_for(4))
    assert all(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if "lora_" in n)
    trainer.model.eval()
    check()
    base_weights = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir).state_dict()
    for name, param in model.pretrained_model.get_base_model().named_parameters():
        if "lora_" not in name:  # the base weights never train
            assert torch.equal(param, base_weights[name.replace(".base_layer", "")]), name


# ----- 7. the KL machinery inside step ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["kl", "abs", "mse", "full"])
def test_kl_is_zero_against_an_exact_copy(tiny_decoder_dir, tokenizer, kind):
    model = value_model(tiny_decoder_dir)
    trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2, kl_penalty=kind), model,
                         create_reference_model(model), tokenizer)
    stats = trainer.step(make_queries(tokenizer, 4), make_responses(4), scores_for(4))
    assert_classic_stats(stats)
    assert stats["objective/kl"] == 0.0 and stats["ppo/mean_non_score_reward"] == 0.0
    assert np.all(stats["objective/kl_dist"] == 0.0)


@pytest.mark.parametrize("kind", ["kl", "abs", "mse"])
def test_step_kl_is_the_per_token_estimate_summed_over_the_response(tiny_decoder_dir, tokenizer, kind):
    model = value_model(tiny_decoder_dir)
    queries, responses = make_queries(tokenizer, 4), make_responses(4)
    trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2, kl_penalty=kind, init_kl_coef=0.3,
                                   adap_kl_ctrl=False), model, perturbed_copy(model), tokenizer)
    stats = trainer.step(queries, responses, scores_for(4))
    logprobs = torch.from_numpy(stats["objective/logprobs"])
    ref_logprobs = torch.from_numpy(stats["objective/ref_logprobs"])
    mask = response_mask(queries, responses, logprobs.shape[1])
    assert torch.all(logprobs[~mask] == 0) and torch.all(logprobs[mask] < 0)  # at response tokens only
    per_row = (kl_penalty(logprobs, ref_logprobs, kind) * mask).sum(1)  # [b]
    np.testing.assert_allclose(stats["objective/kl_dist"], per_row.numpy(), rtol=1e-6, atol=1e-7)
    assert stats["objective/kl"] == pytest.approx(float(per_row.mean()), rel=1e-6)
    per_token_mean = (kl_penalty(logprobs, ref_logprobs, kind) * mask).sum() / mask.sum()  # TRL: per token
    assert stats["ppo/mean_non_score_reward"] == pytest.approx(-0.3 * float(per_token_mean), rel=1e-5)
    assert abs(stats["objective/kl"]) > 1e-3


def test_full_kl_matches_the_exact_kl_of_the_next_token_distributions(tiny_decoder_dir, tokenizer):
    model = value_model(tiny_decoder_dir)
    reference = perturbed_copy(model)
    queries, responses = make_queries(tokenizer, 4), make_responses(4)
    # the exact KL(pi || pi_ref), summed over the response positions, from the full logits
    expected = []
    model.eval()
    with torch.no_grad():
        for query, response in zip(queries, responses):
            ids = torch.cat([query, response])[None]
            logp = model(input_ids=ids)[0][0, len(query) - 1: -1].log_softmax(-1)  # predicting the response
            logq = reference(input_ids=ids)[0][0, len(query) - 1: -1].log_softmax(-1)
            expected.append(float((logp.exp() * (logp - logq)).sum()))
    config = PPOConfig(batch_size=4, mini_batch_size=2, kl_penalty="full")
    trainer = PPOTrainer(config, model, reference, tokenizer)
    stats = trainer.step(queries, responses, scores_for(4))
    np.testing.assert_allclose(stats["objective/kl_dist"], expected, rtol=1e-5)
    assert min(expected) > 1e-3


def test_adaptive_kl_coefficient_moves_toward_the_target(tiny_decoder_dir, tokenizer):
    queries, responses = make_queries(tokenizer, 4), make_responses(4)

    def run(target: float, reference_of) -> tuple[float, float, float]:
        model = value_model(tiny_decoder_dir)
        config = PPOConfig(batch_size=4, mini_batch_size=2, init_kl_coef=0.2, target=target, horizon=40,
                           kl_penalty="abs")
        trainer = PPOTrainer(config, model, reference_of(model), tokenizer)
        stats = trainer.step(queries, responses, scores_for(4))
        return stats["objective/kl"], stats["objective/kl_coef"], trainer.kl_ctl.value

    # KL = 0 below the target: beta shrinks by the clipped error, 20% * n / horizon
    kl, used, new = run(6.0, create_reference_model)
    assert kl == 0.0 and used == 0.2
    assert new == pytest.approx(0.2 * (1 - 0.2 * 4 / 40), rel=1e-12)
    # KL above a small target: beta grows
    kl, used, new = run(1e-3, perturbed_copy)
    assert kl > 1e-3 and used == 0.2
    assert new == pytest.approx(0.2 * (1 + 0.2 * 4 / 40), rel=1e-12)
    # in between, the error is not clipped: beta * (1 + (KL / target - 1) * n / horizon)
    kl, used, new = run(kl * 1.1, perturbed_copy)
    assert new == pytest.approx(0.2 * (1 + (1 / 1.1 - 1) * 4 / 40), rel=1e-5)
    assert new < 0.2


def test_fixed_kl_coefficient_stays(tiny_decoder_dir, tokenizer):
    model = value_model(tiny_decoder_dir)
    trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2, init_kl_coef=0.07, adap_kl_ctrl=False),
                         model, perturbed_copy(model), tokenizer)
    for _ in range(2):
        stats = trainer.step(make_queries(tokenizer, 4), make_responses(4), scores_for(4))
        assert stats["objective/kl_coef"] == 0.07 and stats["objective/kl"] != 0.0
    assert trainer.kl_ctl.value == 0.07


def test_score_clip(tiny_decoder_dir, tokenizer):
    model = value_model(tiny_decoder_dir)
    trainer = PPOTrainer(PPOConfig(batch_size=2, score_clip=0.5), model, None, tokenizer)
    scores = [torch.tensor(3.0), torch.tensor(-0.2)]
    stats = trainer.step(make_queries(tokenizer, 2), make_responses(2), scores)
    assert stats["ppo/mean_scores"] == pytest.approx((0.5 - 0.2) / 2)


# ----- early stopping and optimizer steps -------------------------------------------------------------------
@pytest.mark.parametrize("early_stopping", [False, True])
def test_early_stopping_on_a_tiny_target_kl(tiny_decoder_dir, tokenizer, early_stopping):
    model = value_model(tiny_decoder_dir)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    steps = count_optimizer_steps(optimizer)
    config = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=4, early_stopping=early_stopping,
                       target_kl=1e-9)
    trainer = PPOTrainer(config, model, None, tokenizer, optimizer=optimizer)
    stats = trainer.step(make_queries(tokenizer, 4), make_responses(4), scores_for(4))
    if early_stopping:
        # The first mini-batch sees the rollout's own policy (approx. KL 0); the second, after one update,
        # measures more than 1.5e-9, and its own update is the last: one epoch of four.
        assert len(steps) == 2 and stats["ppo/epochs_run"] == 1.0
    else:
        assert len(steps) == 8 and stats["ppo/epochs_run"] == 4


@pytest.mark.parametrize("mini, gas", [(4, 1), (2, 2), (1, 4), (2, 4)])
def test_one_optimizer_step_per_mini_batch_times_accumulation(tiny_decoder_dir, tokenizer, mini, gas):
    """TRL's meaning: an optimizer step every mini_batch_size * gradient_accumulation_steps samples."""
    model = value_model(tiny_decoder_dir)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    steps = count_optimizer_steps(optimizer)
    config = PPOConfig(batch_size=8, mini_batch_size=mini, gradient_accumulation_steps=gas, ppo_epochs=2)
    trainer = PPOTrainer(config, model, None, tokenizer, optimizer=optimizer)
    per_step = 2 * 8 // (mini * gas)  # epochs x optimizer steps per epoch
    for n in (1, 2):
        stats = trainer.step(make_queries(tokenizer, 8), make_responses(8), scores_for(8))
        assert len(steps) == per_step * n and stats["ppo/epochs_run"] == 2
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # nothing left over


def test_accumulation_is_per_trainer(tiny_decoder_dir, tokenizer):
    model = value_model(tiny_decoder_dir)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    steps = count_optimizer_steps(optimizer)
    config = PPOConfig(batch_size=8, mini_batch_size=2, gradient_accumulation_steps=2, ppo_epochs=1)
    trainer = PPOTrainer(config, model, None, tokenizer, optimizer=optimizer)
    PPOTrainer(PPOConfig(batch_size=2), value_model(tiny_decoder_dir), None, tokenizer)  # another, gas=1
    trainer.step(make_queries(tokenizer, 8), make_responses(8), scores_for(8))
    assert len(steps) == 2


def test_early_stopping_leaves_no_gradient_behind(tiny_decoder_dir, tokenizer):
    model = value_model(tiny_decoder_dir)
    config = PPOConfig(batch_size=8, mini_batch_size=4, gradient_accumulation_steps=2, ppo_epochs=2,
                       early_stopping=True, target_kl=1e-9, learning_rate=1e-3)
    trainer = PPOTrainer(config, model, None, tokenizer)
    trainer.step(make_queries(tokenizer, 8), make_responses(8), scores_for(8))
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_lr_scheduler_steps_once_per_ppo_step(tiny_decoder_dir, tokenizer):
    """As in TRL: the schedule counts PPO steps, not optimizer steps; stats report the step's learning rate."""
    model = value_model(tiny_decoder_dir)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    steps = count_optimizer_steps(optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.5 ** i)
    config = PPOConfig(batch_size=8, mini_batch_size=2, gradient_accumulation_steps=2, ppo_epochs=1)
    trainer = PPOTrainer(config, model, None, tokenizer, optimizer=optimizer, lr_scheduler=scheduler)
    first = trainer.step(make_queries(tokenizer, 8), make_responses(8), scores_for(8))
    second = trainer.step(make_queries(tokenizer, 8), make_responses(8), scores_for(8))
    assert len(steps) == 4 and scheduler.last_epoch == 2
    assert first["ppo/learning_rate"] == pytest.approx(1e-3) and second["ppo/learning_rate"] == pytest.approx(5e-4)


# ----- 10. gradient accumulation == one mini-batch ----------------------------------------------------------
def _one_step(path: str, tokenizer, gas: int) -> tuple[dict[str, torch.Tensor], dict]:
    model = value_model(path)
    # SGD: the update is linear in the gradient, so a scaled gradient cannot hide (Adam normalises it away)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    # one optimizer step per 4 samples either way: 4 at once, or 2 x 2 accumulated
    config = PPOConfig(batch_size=8, mini_batch_size=4 // gas, gradient_accumulation_steps=gas, ppo_epochs=1)
    trainer = PPOTrainer(config, model, None, tokenizer, optimizer=optimizer)
    torch.manual_seed(1)  # the same mini-batch order
    stats = trainer.step(make_queries(tokenizer, 8), make_responses(8), scores_for(8))
    return snapshot(model), stats


def test_gradient_accumulation_gives_the_same_update(tiny_decoder_dir, tokenizer):
    whole, _ = _one_step(tiny_decoder_dir, tokenizer, gas=1)
    split, _ = _one_step(tiny_decoder_dir, tokenizer, gas=2)
    initial = snapshot(value_model(tiny_decoder_dir))
    assert any((whole[n] - initial[n]).abs().max() > 1e-3 for n in whole)  # the step did move the model
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=0, atol=1e-6, msg=name)


def test_gradient_accumulation_reports_the_same_losses(tiny_decoder_dir, tokenizer):
    _, whole = _one_step(tiny_decoder_dir, tokenizer, gas=1)
    _, split = _one_step(tiny_decoder_dir, tokenizer, gas=2)
    for key in ("ppo/loss/policy", "ppo/loss/value", "ppo/loss/total"):
        assert split[key] == pytest.approx(whole[key], rel=1e-3), key


# ----- 4. seq2seq -------------------------------------------------------------------------------------------
def test_seq2seq_generate_and_step(tiny_seq2seq_dir, tokenizer):
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(tiny_seq2seq_dir)
    trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2), model, None, tokenizer)
    assert trainer.is_encoder_decoder and trainer.ref_model is not None
    queries = make_queries(tokenizer, 4)
    responses = trainer.generate(queries, max_new_tokens=6, do_sample=True)  # no prompt for seq2seq
    start = model.config.decoder_start_token_id
    assert all(len(r) >= 2 and r[0] == start for r in responses)
    assert all(len(r) == 7 or r[-1] == tokenizer.eos_token_id for r in responses)
    single = trainer.generate(queries[0], max_new_tokens=3, do_sample=True)  # [1, r], as model.generate gives
    assert single.shape[0] == 1 and single.dim() == 2 and single[0, 0] == start
    before = snapshot(model)
    stats = trainer.step(queries, responses, scores_for(4))
    assert_classic_stats(stats)
    assert stats["objective/kl"] == 0.0
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_seq2seq_full_kl(tiny_seq2seq_dir, tokenizer):
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(tiny_seq2seq_dir)
    reference = perturbed_copy(model)
    trainer = PPOTrainer(PPOConfig(batch_size=2, kl_penalty="full"), model, reference, tokenizer)
    queries = make_queries(tokenizer, 2)
    responses = trainer.generate(queries, max_new_tokens=4, do_sample=True)
    expected = []  # the exact KL at each label, the decoder reading [start, y_1, ..., y_n-1]
    model.eval()
    with torch.no_grad():
        for query, response in zip(queries, responses):
            inputs = dict(input_ids=query[None], decoder_input_ids=response[None, :-1])
            logp, logq = model(**inputs)[0][0].log_softmax(-1), reference(**inputs)[0][0].log_softmax(-1)
            expected.append(float((logp.exp() * (logp - logq)).sum()))
    stats = trainer.step(queries, responses, scores_for(2))
    np.testing.assert_allclose(stats["objective/kl_dist"], expected, rtol=1e-5)
    assert min(expected) > 1e-3


# ----- 9. bad input, clear messages -------------------------------------------------------------------------
@pytest.fixture()
def trainer2(tiny_decoder_dir, tokenizer):
    return PPOTrainer(PPOConfig(batch_size=2), value_model(tiny_decoder_dir), None, tokenizer)


def test_step_rejects_bad_input(trainer2, tokenizer):
    queries, responses, scores = make_queries(tokenizer, 2), make_responses(2), scores_for(2)
    before = snapshot(trainer2.model)
    with pytest.raises(ValueError, match="queries has 1 elements but config.batch_size is 2"):
        trainer2.step(queries[:1], responses, scores)
    with pytest.raises(ValueError, match="responses has 3 elements"):
        trainer2.step(queries, responses + responses[:1], scores)
    with pytest.raises(ValueError, match="scores has 1 elements"):
        trainer2.step(queries, responses, scores[:1])
    with pytest.raises(ValueError, match="scores must be a list"):
        trainer2.step(queries, responses, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"scores\[1\] has shape \(2,\); each score must be a scalar"):
        trainer2.step(queries, responses, [torch.tensor(1.0), torch.tensor([1.0, 2.0])])
    with pytest.raises(ValueError, match=r"scores\[0\] is nan; scores must be finite"):
        trainer2.step(queries, responses, [torch.tensor(float("nan")), torch.tensor(1.0)])
    with pytest.raises(ValueError, match=r"scores\[1\] is inf"):
        trainer2.step(queries, responses, [torch.tensor(1.0), torch.tensor(float("inf"))])
    with pytest.raises(ValueError, match=r"responses\[1\] must be a non-empty 1-D tensor"):
        trainer2.step(queries, [responses[0], torch.tensor([], dtype=torch.long)], scores)
    with pytest.raises(ValueError, match=r"queries\[0\] must be a non-empty 1-D tensor"):
        trainer2.step([queries[0][None], queries[1]], responses, scores)  # 2-D, as encode(..., "pt") gives
    with pytest.raises(ValueError, match=r"response_masks\[i\] must have the length"):
        trainer2.step(queries, responses, scores, response_masks=[torch.ones(1), torch.ones(1)])
    assert all(torch.equal(p, before[n]) for n, p in trainer2.model.named_parameters())  # nothing trained
    assert trainer2.current_step == 0


def test_trainer_rejects_bad_construction(tiny_decoder_dir, tiny_decoder, tokenizer):
    with pytest.raises(ValueError, match="needs a model with a value head"):
        PPOTrainer(PPOConfig(batch_size=1), tiny_decoder, None, tokenizer)
    with pytest.raises(ValueError, match="needs a model with a value head"):
        PPOTrainer(PPOConfig(batch_size=1), None, None, tokenizer)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        PPOTrainer(PPOConfig(batch_size=1), value_model(tiny_decoder_dir), None, None)


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=8, mini_batch_size=3), r"batch_size \(8\) must be a multiple of mini_batch_size \* "
                                             r"gradient_accumulation_steps \(3 \* 1 = 3\)"),
    (dict(batch_size=8, mini_batch_size=4, gradient_accumulation_steps=3), r"\(4 \* 3 = 12\)"),
    (dict(cliprange=-0.1), "cliprange must be >= 0"),
    (dict(log_with="mlflow"), "log_with must be"),
    (dict(tracker_kwargs="{not json"), "PPOConfig.tracker_kwargs must be a dict or a JSON object"),
    (dict(push_to_hub_if_best_kwargs={"private": True}), "needs a 'repo_id'"),
    (dict(kl_penalty="k9"), "kl_penalty must be one of"),
    (dict(batch_size=0), "batch_size must be at least 1"),
    (dict(ppo_epochs=0), "ppo_epochs must be at least 1"),
    (dict(lam=1.5), r"gamma and lam must lie in \[0, 1\]"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig(**kwargs)


def test_config_defaults():
    config = PPOConfig(batch_size=16)
    assert config.mini_batch_size == 16 and config.gradient_accumulation_steps == 1
    assert config.to_dict()["batch_size"] == 16
