"""PPO as TRL 0.7.11's users call it and see it: every PPOConfig field (old names, the command line of
examples/scripts/ppo.py), `generate()` with the classic keywords, score scaling, ratio_threshold, early
stopping per epoch, the stats TRL reported (computed here from their definitions), tracker logging,
dropout, seeding, push-if-best and unused-column removal."""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, HfArgumentParser, LlamaConfig

from tether import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
from tether.ops.stats import masked_var

sys.path.insert(0, os.path.dirname(__file__))
from test_ppo import make_queries, make_responses, scores_for, snapshot, value_model  # noqa: E402


# ----- the config ---------------------------------------------------------------------------------------
def test_every_trl_0_7_11_field_is_accepted():
    config = PPOConfig(
        exp_name="x", seed=1, log_with=None, task_name="t", model_name="m", query_dataset="q",
        reward_model="sentiment-analysis:r", remove_unused_columns=False, tracker_kwargs={"wandb": {"entity": "e"}},
        accelerator_kwargs={}, project_kwargs={"logging_dir": "logs"}, tracker_project_name="p",
        push_to_hub_if_best_kwargs={}, steps=640, learning_rate=1e-5, adap_kl_ctrl=False, init_kl_coef=0.1,
        kl_penalty="abs", target=3, horizon=100, gamma=0.99, lam=0.9, cliprange=0.1, cliprange_value=0.1,
        vf_coef=0.2, batch_size=32, mini_batch_size=8, gradient_accumulation_steps=2, ppo_epochs=2,
        max_grad_norm=1.0, optimize_device_cache=False, early_stopping=True, target_kl=0.5, compare_steps=2,
        ratio_threshold=5.0, use_score_scaling=True, use_score_norm=True, score_clip=3.0, whiten_rewards=True,
        gradient_checkpointing=False, dataset_num_proc=2,
    )
    assert config.backward_batch_size == 16 and config.total_ppo_epochs == 20 and config.train_steps == 20
    assert config.to_dict()["tracker_kwargs/wandb/entity"] == "e"  # flattened, as trackers show it


def test_old_field_names_move_over_with_a_warning():
    with pytest.warns(FutureWarning, match="forward_batch_size"):
        config = PPOConfig(batch_size=8, forward_batch_size=2)
    assert config.mini_batch_size == 2
    with pytest.warns(FutureWarning, match="optimize_cuda_cache"):
        assert PPOConfig(batch_size=8, optimize_cuda_cache=True).optimize_device_cache is True


def test_steps_set_the_train_loop_length_unless_total_steps_does():
    assert PPOConfig(steps=20000, batch_size=128).train_steps == 157  # ceil(20000 / 128)
    assert PPOConfig(steps=20000, batch_size=128, total_steps=3).train_steps == 3


@dataclasses.dataclass
class ScriptArguments:  # the dataclass of examples/scripts/ppo.py, parsed beside PPOConfig
    use_seq2seq: bool = False
    use_peft: bool = False
    lora_r: int | None = 16


def test_parsed_from_a_command_line_as_the_classic_script_does():
    parser = HfArgumentParser((ScriptArguments, PPOConfig))
    args, config = parser.parse_args_into_dataclasses([
        "--use_peft", "--model_name", "local/model", "--log_with", "tensorboard", "--batch_size", "16",
        "--mini_batch_size", "4", "--gradient_accumulation_steps", "2", "--tracker_kwargs",
        '{"tensorboard": {"flush_secs": 1}}', "--steps", "64", "--use_score_scaling", "--ratio_threshold", "3",
        "--early_stopping", "--target_kl", "0.1", "--query_dataset", "local/imdb"])
    assert args.use_peft and config.model_name == "local/model" and config.log_with == "tensorboard"
    assert config.tracker_kwargs == {"tensorboard": {"flush_secs": 1}} and config.backward_batch_size == 8
    assert config.total_ppo_epochs == 4 and config.use_score_scaling and config.ratio_threshold == 3.0


# ----- generate ----------------------------------------------------------------------------------------
CLASSIC_GENERATION = {"min_length": -1, "top_k": 0.0, "top_p": 1.0, "do_sample": True}


@pytest.fixture()
def trainer(tiny_decoder_dir, tokenizer):
    return PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2), value_model(tiny_decoder_dir), None, tokenizer)


def test_generate_takes_the_classic_keywords(trainer, tokenizer):
    queries = make_queries(tokenizer, 4)
    responses = trainer.generate(queries, return_prompt=False, pad_token_id=tokenizer.eos_token_id,
                                 max_new_tokens=6, **CLASSIC_GENERATION)
    assert len(responses) == 4 and all(1 <= len(r) <= 6 for r in responses)
    assert all(r[-1] == tokenizer.eos_token_id or len(r) == 6 for r in responses)  # ends at EOS or the limit
    with_prompt = trainer.generate(queries, pad_token_id=tokenizer.eos_token_id, max_new_tokens=6,
                                   **CLASSIC_GENERATION)
    assert all(torch.equal(r[: len(q)], q) for q, r in zip(queries, with_prompt))


def test_generate_one_query_gives_a_batch_of_one_like_model_generate(trainer, tokenizer):
    query = make_queries(tokenizer, 1)[0]
    response = trainer.generate(query, pad_token_id=tokenizer.eos_token_id, max_new_tokens=5, **CLASSIC_GENERATION)
    assert response.dim() == 2 and response.shape[0] == 1
    assert torch.equal(response[0, : len(query)], query)  # the prompt comes back, as model.generate returns it
    assert len(response.squeeze()) - len(query) <= 5
    with pytest.raises(ValueError, match="1-D tensor"):
        trainer.generate(query[None], max_new_tokens=5)


def test_generate_length_sampler_batch_size_and_padding(trainer, tokenizer):
    queries = make_queries(tokenizer, 4)
    lengths = iter([3, 5])
    padded = trainer.generate(queries, length_sampler=lambda: next(lengths), batch_size=2, return_prompt=False,
                              remove_padding=False, max_new_tokens=99, pad_token_id=tokenizer.pad_token_id,
                              do_sample=True, top_k=0.0)
    assert len(padded) == 4
    assert max(len(r) for r in padded[:2]) <= 3 and max(len(r) for r in padded[2:]) <= 5  # one length per batch
    assert len({len(r) for r in padded[:2]}) == 1 and len({len(r) for r in padded[2:]}) == 1  # padded in a batch


def test_generate_ref_response_samples_the_reference_too(trainer, tokenizer):
    queries = make_queries(tokenizer, 2)
    responses, reference = trainer.generate(queries, return_prompt=False, generate_ref_response=True,
                                            max_new_tokens=4, pad_token_id=tokenizer.eos_token_id,
                                            **CLASSIC_GENERATION)
    assert len(responses) == len(reference) == 2
    torch.manual_seed(0)
    greedy = trainer.generate(queries, return_prompt=False, max_new_tokens=4, do_sample=False)
    torch.manual_seed(0)
    _, greedy_reference = trainer.generate(queries, return_prompt=False, max_new_tokens=4, do_sample=False,
                                           generate_ref_response=True)
    # the reference starts as a copy of the policy: same greedy answers
    assert all(torch.equal(a, b) for a, b in zip(greedy, greedy_reference))


# ----- the step ----------------------------------------------------------------------------------------
def test_score_scaling_divides_by_the_running_std(tiny_decoder_dir, tokenizer):
    scores = [torch.tensor(v) for v in (1.0, 2.0, 4.0, 9.0)]
    s = torch.tensor([1.0, 2.0, 4.0, 9.0])
    for norm, expected in ((False, s / s.std()), (True, (s - s.mean()) / s.std())):
        config = PPOConfig(batch_size=4, mini_batch_size=4, ppo_epochs=1, use_score_scaling=True, use_score_norm=norm)
        trainer = PPOTrainer(config, value_model(tiny_decoder_dir), None, tokenizer)
        stats = trainer.step(make_queries(tokenizer, 4), make_responses(4), scores)
        assert stats["ppo/mean_scores"] == pytest.approx(float(expected.mean()), abs=1e-6)
        assert stats["ppo/std_scores"] == pytest.approx(float(expected.std()), rel=1e-5)
    # a second batch: the running std is that of all 8 scores seen
    second = [torch.tensor(v) for v in (0.0, 0.0, 3.0, 3.0)]
    stats = trainer.step(make_queries(tokenizer, 4), make_responses(4), second)
    everything = torch.tensor([1.0, 2.0, 4.0, 9.0, 0.0, 0.0, 3.0, 3.0])
    expected = (torch.tensor([0.0, 0.0, 3.0, 3.0]) - everything.mean()) / everything.std()
    assert stats["ppo/mean_scores"] == pytest.approx(float(expected.mean()), abs=1e-5)


def test_ratio_threshold_skips_the_mini_batch(tiny_decoder_dir, tokenizer):
    model = value_model(tiny_decoder_dir)
    before = snapshot(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    config = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=1, ratio_threshold=0.5)  # every ratio is 1 > 0.5
    trainer = PPOTrainer(config, model, None, tokenizer, optimizer=optimizer)
    with pytest.warns(UserWarning, match="ratio_threshold"):
        trainer.step(make_queries(tokenizer, 4), make_responses(4), scores_for(4))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing moved


@pytest.mark.parametrize("target_kl, epochs", [(1e-12, 1), (1e9, 3)])
def test_early_stopping_checks_each_epochs_policy_kl(tiny_decoder_dir, tokenizer, target_kl, epochs):
    config = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=3, early_stopping=True, target_kl=target_kl,
                       learning_rate=1e-2)
    trainer = PPOTrainer(config, value_model(tiny_decoder_dir), None, tokenizer)
    stats = trainer.step(make_queries(tokenizer, 4), make_responses(4), scores_for(4))
    assert stats["ppo/epochs_run"] == epochs


def test_stats_follow_their_definitions(tiny_decoder_dir, tokenizer, monkeypatch):
    import tether.trainers.ppo as ppo_module

    seen = {}
    real_gae = ppo_module.gae

    def recording_gae(rewards, values, mask, gamma, lam):
        advantages, returns = real_gae(rewards, values, mask, gamma, lam)
        seen.update(values=values, returns=returns, mask=mask.bool())
        return advantages, returns

    monkeypatch.setattr(ppo_module, "gae", recording_gae)
    queries, responses = make_queries(tokenizer, 4), make_responses(4)
    trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=1), value_model(tiny_decoder_dir),
                         None, tokenizer)
    stats = trainer.step(queries, responses, scores_for(4))
    values, returns, mask = seen["values"], seen["returns"], seen["mask"]
    r, v = returns[mask].double().numpy(), values[mask].double().numpy()
    assert stats["ppo/val/var_explained"] == pytest.approx(1 - np.var(r - v, ddof=1) / np.var(r, ddof=1), rel=1e-4)
    assert stats["ppo/returns/var"] == pytest.approx(float(masked_var(returns, mask)), rel=1e-5)
    query_lengths, response_lengths = [len(q) for q in queries], [len(x) for x in responses]
    np.testing.assert_array_equal(stats["tokens/queries_dist"], query_lengths)
    np.testing.assert_array_equal(stats["tokens/responses_dist"], response_lengths)
    assert stats["tokens/queries_len_std"] == pytest.approx(np.std(query_lengths, ddof=1), rel=1e-6)
    assert stats["tokens/responses_len_std"] == pytest.approx(np.std(response_lengths, ddof=1), rel=1e-6)
    # every response token's ratio, for each of the two mini-batches of the one epoch
    assert stats["ppo/policy/ratio"].shape == (int(mask.sum()),)


def dropout_model(tokenizer, path) -> AutoModelForCausalLMWithValueHead:
    """A tiny Llama whose attention drops half its weights while training."""
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.5,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, attn_implementation="eager").save_pretrained(path)
    return AutoModelForCausalLMWithValueHead.from_pretrained(str(path), attn_implementation="eager")


def test_the_first_mini_batch_ratio_is_one_with_dropout(tokenizer, tmp_path):
    model = dropout_model(tokenizer, tmp_path / "dropout")
    trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=4, ppo_epochs=1), model, None, tokenizer)
    stats = trainer.step(make_queries(tokenizer, 4), make_responses(4), scores_for(4))
    np.testing.assert_allclose(stats["ppo/policy/ratio"], 1.0, atol=1e-5)  # old and new pass agree
    assert stats["ppo/policy/clipfrac"] == 0.0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dropout")
    assert reloaded.config.attention_dropout == 0.5  # the saved config keeps the user's dropout


def test_same_seed_same_run(tiny_decoder_dir, tokenizer):
    """PPOConfig.seed fixes everything from the value head's initial weights to the sampled responses."""
    def run(prior_seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(prior_seed)  # whatever the script drew before
        model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir)
        trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2, seed=7, learning_rate=1e-3), model, None,
                             tokenizer)
        queries = make_queries(tokenizer, 4)
        responses = trainer.generate(queries, return_prompt=False, max_new_tokens=5, **CLASSIC_GENERATION)
        trainer.step(queries, responses, scores_for(4))
        return snapshot(model)

    first, second = run(0), run(123)
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0, msg=name)


def test_a_separate_critic_is_clipped_with_the_policy(tiny_decoder_dir, tokenizer, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    critic = AutoModelForSequenceClassification.from_pretrained(tiny_decoder_dir, num_labels=1)
    config = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=1, max_grad_norm=0.5)
    trainer = PPOTrainer(config, value_model(tiny_decoder_dir), None, tokenizer, critic=critic)
    clipped = []
    real = trainer.accelerator.clip_grad_norm_
    monkeypatch.setattr(trainer.accelerator, "clip_grad_norm_",
                        lambda params, norm: clipped.append(list(params)) or real(clipped[-1], norm))
    trainer.step(make_queries(tokenizer, 4), make_responses(4), scores_for(4))
    critic_ids = {id(p) for p in trainer.critic.parameters() if p.requires_grad}
    assert len(clipped) == 2 and all(critic_ids <= {id(p) for p in group} for group in clipped)


def test_push_to_hub_when_the_score_is_the_best_so_far(tiny_decoder_dir, tokenizer, monkeypatch):
    config = PPOConfig(batch_size=2, mini_batch_size=2, ppo_epochs=1, push_to_hub_if_best_kwargs={"repo_id": "me/x"})
    trainer = PPOTrainer(config, value_model(tiny_decoder_dir), None, tokenizer)
    pushed = []
    monkeypatch.setattr(trainer, "push_to_hub", lambda **kwargs: pushed.append((trainer.current_step, kwargs)))
    for mean in (1.0, 0.0, 2.0, 2.0):
        trainer.step(make_queries(tokenizer, 2), make_responses(2), [torch.tensor(mean)] * 2)
    assert pushed == [(0, {"repo_id": "me/x"}), (2, {"repo_id": "me/x"})]


def test_unused_dataset_columns_are_dropped_as_trl_did(tiny_decoder_dir, tokenizer):
    rows = Dataset.from_dict({"input_ids": [[5, 6], [7, 8]], "query": ["a", "b"], "review": ["x", "y"],
                              "label": [0, 1]})
    for remove, columns in ((True, {"input_ids", "query", "label"}), (False, {"input_ids", "query", "label", "review"})):
        config = PPOConfig(batch_size=2, mini_batch_size=2, remove_unused_columns=remove)
        trainer = PPOTrainer(config, value_model(tiny_decoder_dir), None, tokenizer, dataset=rows,
                             data_collator=lambda data: {key: [d[key] for d in data] for key in data[0]})
        assert set(next(iter(trainer.dataloader))) == columns


# ----- logging -----------------------------------------------------------------------------------------
def test_log_stats_writes_scalars_histograms_and_the_game_log_to_tensorboard(tiny_decoder_dir, tokenizer, tmp_path,
                                                                              capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = PPOConfig(batch_size=2, mini_batch_size=2, log_with="tensorboard", tracker_project_name="run",
                       project_kwargs={"logging_dir": str(tmp_path)})
    trainer = PPOTrainer(config, value_model(tiny_decoder_dir), None, tokenizer)
    stats = trainer.step(make_queries(tokenizer, 2), make_responses(2), scores_for(2))
    batch = {"query": ["q one", "q two"], "response": ["r one", "r two"]}
    trainer.log_stats(stats, batch, [torch.tensor(0.5), torch.tensor(1.5)])
    assert capsys.readouterr().out == ""  # nothing printed
    trainer.accelerator.end_training()
    events = EventAccumulator(str(tmp_path / "run"), size_guidance={"histograms": 0, "tensors": 0}).Reload()
    assert events.Scalars("env/reward_mean")[0].value == pytest.approx(1.0)
    assert "objective/kl" in events.Tags()["scalars"]
    assert {"objective/kl_dist", "env/reward_dist", "ppo/policy/ratio"} <= set(events.Tags()["histograms"])
    game_log = events.Tensors("game_log/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "q two" in game_log and "r two" in game_log and "1.5" in game_log
    with pytest.raises(ValueError, match="columns_to_log"):
        trainer.log_stats(stats, {"text": ["a", "b"]}, [torch.tensor(0.0)] * 2)


def test_log_stats_sends_histograms_and_a_table_to_wandb(tiny_decoder_dir, tokenizer, tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = PPOConfig(batch_size=2, mini_batch_size=2, log_with="wandb", tracker_project_name="run",
                       tracker_kwargs={"wandb": {"name": "classic"}})
    trainer = PPOTrainer(config, value_model(tiny_decoder_dir), None, tokenizer)
    logged = []
    run = trainer.accelerator.get_tracker("wandb", unwrap=True)
    monkeypatch.setattr(run, "log", lambda row, step=None: logged.append((row, step)))
    stats = trainer.step(make_queries(tokenizer, 2), make_responses(2), scores_for(2))
    trainer.log_stats(stats, {"query": ["q1", "q2"], "response": ["r1", "r2"]}, [torch.tensor(0.5)] * 2)
    trainer.accelerator.end_training()
    (row, step), = logged
    assert step == 1 and row["env/reward_mean"] == pytest.approx(0.5)
    assert isinstance(row["objective/kl_dist"], wandb.Histogram)
    assert isinstance(row["game_log"], wandb.Table) and row["game_log"].columns == ["query", "response", "reward"]
    assert run.name == "classic"  # tracker_kwargs reach wandb.init


def test_a_fresh_value_head_is_drawn_from_the_config_seed_and_a_trained_one_is_kept(tiny_decoder_dir, tokenizer,
                                                                                      tmp_path):
    def head(seed: int, path: str = tiny_decoder_dir) -> torch.Tensor:
        model = AutoModelForCausalLMWithValueHead.from_pretrained(path)
        PPOTrainer(PPOConfig(batch_size=2, seed=seed), model, None, tokenizer)
        return model.v_head.summary.weight.detach().clone()

    assert torch.equal(head(1), head(1)) and not torch.equal(head(1), head(2))  # each seed its own start
    trained = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir)
    with torch.no_grad():
        trained.v_head.summary.weight.fill_(0.25)
    trained.save_pretrained(tmp_path / "trained")
    assert torch.all(head(1, str(tmp_path / "trained")) == 0.25)  # a saved head is never re-drawn
    by_hand = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir)
    with torch.no_grad():
        by_hand.v_head.summary.weight.fill_(-0.5)  # e.g. copied from another run
    PPOTrainer(PPOConfig(batch_size=2, seed=1), by_hand, None, tokenizer)
    assert torch.all(by_hand.v_head.summary.weight == -0.5)  # nor one the user set
