"""OnlineDPOTrainer: the loss is DPO's (or IPO's) formula on pairs ranked by reward or by a judge, the policy learns
the demo's sentiment task, runs repeat and resume exactly, and bad inputs fail before training."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoModelForCausalLM

from test_kill_resume import COMMON, assert_equal_weights, noisy_length_reward, prompts
from test_reproducibility import disturb_random_streams
from test_resume import DROPOUT, KillAfterStep, Killed
from tether import BasePairwiseJudge, OnlineDPOConfig, OnlineDPOTrainer
from tether.data.formats import DatasetError
from tether.demo.corpus import generate_reviews, positivity_score, review_prompts
from tether.demo.tiny import tiny_llama_config
from tether.reports.callback import RunReportCallback
from tether.rollout.sampling import SampledGroups
from tether.trainers.checkpoints import latest_checkpoint
from tether.trainers.online import ROUND_FILE, Round


def config(tmp_path, **overrides) -> OnlineDPOConfig:
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=3, max_new_tokens=6,
                  learning_rate=1e-3, max_steps=2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                  seed=0, disable_tqdm=True)
    values.update(overrides)
    return OnlineDPOConfig(**values)


def length_reward(completions, **_):
    return [float(len(c)) for c in completions]


@pytest.fixture()
def policy(tiny_decoder_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)


def trainer_for(policy, tokenizer, tmp_path, reward_funcs=length_reward, n: int = 12, **overrides):
    trainer = OnlineDPOTrainer(policy, reward_funcs=reward_funcs, args=config(tmp_path, **overrides),
                               train_dataset=prompts(n), processing_class=tokenizer)
    trainer.remove_callback(RunReportCallback)  # its plots cost seconds a run and are not what is tested here
    return trainer


# ----- the loss on a hand-built round ------------------------------------------------------------------------
@torch.no_grad()
def summed_logps(model, prompt: list[int], completion: list[int]) -> float:
    """log pi(completion | prompt) from the full logits of one unpadded row: the reference the trainer must match."""
    ids = torch.tensor([prompt + completion])
    logps = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)  # [t - 1, v]: position i predicts i + 1
    targets = ids[0, 1:]
    return float(logps.gather(-1, targets[:, None]).squeeze(-1)[len(prompt) - 1:].sum())


def dpo_reference(loss_type: str, beta: float, pc, pr, rc, rr) -> torch.Tensor:
    """DPO, eq. 7 of Rafailov et al. (2023): -log sigmoid(beta h); IPO, eq. 17 of Azar et al. (2023), on summed
    log-probs as TRL's Online DPO: (h - 1 / (2 beta))^2; h = (pc - rc) - (pr - rr); the mean over pairs."""
    h = (torch.tensor(pc) - torch.tensor(rc)) - (torch.tensor(pr) - torch.tensor(rr))
    losses = -F.logsigmoid(beta * h) if loss_type == "sigmoid" else (h - 1 / (2 * beta)) ** 2
    return losses.mean()


PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]  # one per pair


def hand_round(trainer, rewards: list[float]) -> Round:
    """3 pairs (rows 2i, 2i + 1 answer PROMPTS[i]) of completions of 1-4 tokens, reference log-probs made up."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([4, 2, 3, 4, 1, 3])
    ids = torch.randint(20, 300, (6, 4), generator=g)
    mask = torch.arange(4)[None, :] < lengths[:, None]  # [6, 4]
    ids = ids.masked_fill(~mask, trainer.processing_class.pad_token_id)
    ref = -torch.rand(6, 4, generator=g) * 6 * mask  # [6, 4], 0 outside the completions
    rewards = torch.tensor(rewards)
    return Round(rewards, [p for p in PROMPTS for _ in range(2)], ids, mask, None, ref,
                 trainer.compute_advantages(rewards, None), [1.0], 6.0)


@pytest.mark.parametrize("loss_type,beta,max_length", [("sigmoid", 0.3, None), ("ipo", 0.5, None),
                                                       ("sigmoid", 0.2, 6)])
def test_loss_is_the_dpo_formula_on_pairs_ranked_by_reward(loss_type, beta, max_length, policy, tokenizer,
                                                          tmp_path):
    # temperature 0.5 samples; the loss must still use the policy's own distribution (TRL's Online DPO does).
    trainer = trainer_for(policy, tokenizer, tmp_path, loss_type=loss_type, beta=beta, max_length=max_length,
                          temperature=0.5)
    # pair 0: the second has the higher reward; pair 1: a tie, so the first (TRL: first >= second); pair 2: the first
    round_ = hand_round(trainer, [0.1, 0.7, 0.5, 0.5, 2.0, -1.0])
    trainer._round = round_
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, {"slice": 0})

    chosen, rejected = [1, 2, 4], [0, 3, 5]
    assert round_.advantages.tolist() == [-1, 1, 1, -1, 1, -1]
    seqs = [ids[m].tolist() for ids, m in zip(round_.completion_ids, round_.completion_mask)]
    # max_length: the prompt keeps its last max_length - len(completion) tokens (at least one) in the log-prob pass
    cut = [p if max_length is None else p[-max(max_length - len(s), 1):] for p, s in zip(round_.prompt_ids, seqs)]
    logps = [summed_logps(trainer.model, p, s) for p, s in zip(cut, seqs)]
    ref = round_.ref_logps.sum(-1).tolist()
    expected = dpo_reference(loss_type, beta, [logps[i] for i in chosen], [logps[i] for i in rejected],
                             [ref[i] for i in chosen], [ref[i] for i in rejected])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)

    # TRL's metrics: implicit rewards beta * (log pi - log pi_ref), their margins, and the scores' margin
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    margins = [beta * ((logps[c] - ref[c]) - (logps[r] - ref[r])) for c, r in zip(chosen, rejected)]
    assert metrics["rewards/margins"] == pytest.approx(sum(margins) / 3, rel=1e-4, abs=1e-6)
    assert metrics["rewards/accuracies"] == pytest.approx(sum(m > 0 for m in margins) / 3)
    assert metrics["objective/scores_margin"] == pytest.approx((0.6 + 0.0 + 3.0) / 3, rel=1e-6)
    assert metrics["logps/chosen"] == pytest.approx(sum(logps[i] for i in chosen) / 3, rel=1e-4)
    assert metrics["objective/kl"] == pytest.approx(sum(a - b for a, b in zip(logps, ref)) / 6, rel=1e-4, abs=1e-5)


def test_a_step_trains_on_per_device_train_batch_size_pairs(policy, tokenizer, tmp_path):
    """TRL's unit: per_device_train_batch_size counts prompts; each gets two completions from the policy."""
    calls = []

    def spy(prompts, completions, **_):
        calls.append(list(prompts))
        return [float(len(c)) for c in completions]

    trainer = trainer_for(policy, tokenizer, tmp_path, reward_funcs=[spy, length_reward], max_steps=1,
                          reward_weights=[1.0, 0.0])
    assert trainer.reward_funcs == [spy, length_reward] and trainer.reward_weights.tolist() == [1.0, 0.0]
    trainer.train()
    assert len(calls) == 1 and len(calls[0]) == 6
    assert calls[0][0::2] == calls[0][1::2] and len(set(calls[0])) == 3  # 3 prompts, each twice in a row
    assert trainer._round.completion_ids.shape[0] == 6


def test_gradient_accumulation_matches_one_big_batch(tiny_decoder_dir, tokenizer, tmp_path):
    """4 pairs in one micro-batch, or 2 micro-batches of 2 pairs: one round of the same 4 prompts and the same update
    (plain SGD, whose step shows the gradient's scale, which Adam's first step would hide)."""
    runs = []
    for pairs, accumulation in ((4, 1), (2, 2)):
        trainer = OnlineDPOTrainer(tiny_decoder_dir, reward_funcs=length_reward, processing_class=tokenizer,
                                   args=config(tmp_path / str(accumulation), per_device_train_batch_size=pairs,
                                               gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd",
                                               learning_rate=0.5), train_dataset=prompts(12))
        trainer.remove_callback(RunReportCallback)
        trainer.train()
        runs.append(trainer)
    assert runs[0].state.log_history[0]["loss"] == pytest.approx(runs[1].state.log_history[0]["loss"], rel=1e-5)
    for (name, a), b in zip(runs[0].model.state_dict().items(), runs[1].model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    start = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir).state_dict()
    assert not torch.equal(runs[0].model.state_dict()["lm_head.weight"], start["lm_head.weight"])


# ----- judges ------------------------------------------------------------------------------------------------
class LongerIsBetter(BasePairwiseJudge):
    """A TRL-shaped pairwise judge: the longer text wins (ties: the first)."""

    def __init__(self):
        self.calls = []

    def judge(self, prompts, completions, shuffle_order=True):
        self.calls.append((list(prompts), [list(pair) for pair in completions]))
        return [int(len(b) > len(a)) for a, b in completions]


def shorter_is_better(prompt, a, b):
    """A plain callable judge: the shorter text wins (ties: the second)."""
    return 0 if len(a) < len(b) else 1


@pytest.mark.parametrize("kind", ["judge-object", "callable"])
def test_a_judge_picks_the_chosen_completion(kind, policy, tokenizer, tmp_path):
    judge = LongerIsBetter() if kind == "judge-object" else shorter_is_better
    trainer = OnlineDPOTrainer(policy, judge=judge, args=config(tmp_path, max_new_tokens=8, beta=0.3),
                               train_dataset=prompts(12), processing_class=tokenizer)
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    round_ = trainer._round = trainer._generate_round(batch)
    trainer_calls = list(getattr(judge, "calls", []))
    texts = tokenizer.batch_decode([ids[m] for ids, m in zip(round_.completion_ids, round_.completion_mask)],
                                   skip_special_tokens=True)
    pick = [judge.judge([""], [[a, b]])[0] if hasattr(judge, "judge") else judge("", a, b)
            for a, b in zip(texts[0::2], texts[1::2])]
    chosen = [2 * i + p for i, p in enumerate(pick)]
    rejected = [2 * i + 1 - p for i, p in enumerate(pick)]
    assert [2 * i + int(round_.advantages[2 * i] < 0) for i in range(3)] == chosen
    if isinstance(judge, LongerIsBetter):  # prompts once per pair, pairs as (first, second)
        [(prompts_seen, pairs)] = trainer_calls
        assert prompts_seen == batch["prompt"] and pairs == [[a, b] for a, b in zip(texts[0::2], texts[1::2])]

    loss = trainer.compute_loss(trainer.model, {"slice": 0})
    logps = [summed_logps(trainer.model, p, ids[m].tolist())
             for p, ids, m in zip(round_.prompt_ids, round_.completion_ids, round_.completion_mask)]
    ref = round_.ref_logps.sum(-1).tolist()
    expected = dpo_reference("sigmoid", 0.3, [logps[i] for i in chosen], [logps[i] for i in rejected],
                             [ref[i] for i in chosen], [ref[i] for i in rejected])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert "objective/scores" not in trainer._metrics["train"]  # a judge gives picks, not scores


def test_an_undecided_judge_and_bad_verdicts(policy, tokenizer, tmp_path):
    from tether.rollout.judges import PairwiseJudgeReward

    # -1 (undecided): the second completion is chosen, as TRL's trainer reads any answer but 0
    assert PairwiseJudgeReward(lambda p, a, b: -1)(["x", "x"], ["a", "b"]) == [0.0, 1.0]
    # conversational prompts and completions reach the judge as "Role: content" text
    seen = []
    PairwiseJudgeReward(lambda p, a, b: seen.append((p, a, b)) or 0)(
        [[{"role": "user", "content": "hi"}]] * 2, [[{"role": "assistant", "content": "a"}],
                                                   [{"role": "assistant", "content": "b"}]])
    assert seen == [("User: hi\n\n", "Assistant: a\n\n", "Assistant: b\n\n")]
    trainer = OnlineDPOTrainer(policy, judge=lambda p, a, b: 2, args=config(tmp_path, max_steps=1),
                               train_dataset=prompts(12), processing_class=tokenizer)
    with pytest.raises(ValueError, match="returned 2 for pair 0"):
        trainer.train()


def test_trl_module_paths_and_all_true_judge():
    from tether.experimental.judges import AllTrueJudge, BaseBinaryJudge
    from tether.experimental.online_dpo import OnlineDPOConfig as Config116
    from tether.experimental.online_dpo.online_dpo_trainer import OnlineDPOTrainer as Trainer116
    from tether.trainer.judges import BasePairwiseJudge as Judge0x
    from tether.trainer.online_dpo_config import OnlineDPOConfig as Config0x
    from tether.trainer.online_dpo_trainer import OnlineDPOTrainer as Trainer0x

    assert Config116 is Config0x is OnlineDPOConfig and Trainer116 is Trainer0x is OnlineDPOTrainer
    assert Judge0x is BasePairwiseJudge

    class Fixed(BaseBinaryJudge):
        def __init__(self, answers):
            self.answers = answers

        def judge(self, prompts, completions, gold_completions=None, shuffle_order=True):
            return self.answers

    # 1 only where every judge says 1; -1 (undecided) wherever any judge is; else 0 (CGPO's mixture of judges)
    assert AllTrueJudge([Fixed([1, 1, 0, -1, 1]), Fixed([1, 0, 0, 1, -1])]).judge(["p"] * 5, ["c"] * 5) == \
        [1, 0, 0, -1, -1]
    with pytest.raises(ValueError, match="1, 0 or -1"):
        AllTrueJudge([Fixed([2])]).judge(["p"], ["c"])


# ----- options ------------------------------------------------------------------------------------------------
def test_missing_eos_penalty_lowers_completions_without_eos(policy, tokenizer, tmp_path):
    trainer = trainer_for(policy, tokenizer, tmp_path, reward_funcs=lambda completions, **_: [0.5] * len(completions),
                          missing_eos_penalty=2.0)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = torch.tensor([[30, 31, eos], [30, 31, 32], [40, eos, pad], [41, 42, 43]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    sampled = SampledGroups(ids, mask, None, torch.tensor([False, True, False, True]))
    batch = {"prompt": ["a", "b"], "prompt_input_ids": [[5], [6]]}
    _, _, rewards, _ = trainer._score(batch, sampled, 2)
    assert rewards.tolist() == [0.5, -1.5, 0.5, -1.5]
    assert trainer.compute_advantages(rewards, None).tolist() == [1, -1, 1, -1]  # the ended one wins each pair


def test_beta_list_gives_one_beta_per_epoch(policy, tokenizer, tmp_path):
    # 6 prompts, 3 a step: 2 steps an epoch; the last beta holds after the list ends
    trainer = trainer_for(policy, tokenizer, tmp_path, n=6, beta=[0.5, 0.25], max_steps=6, max_new_tokens=3)
    trainer.train()
    assert [row["beta"] for row in trainer.state.log_history if "beta" in row] == [0.5, 0.5, 0.25, 0.25, 0.25, 0.25]
    assert config(tmp_path, beta=[0.2]).beta == 0.2  # a one-element list is that number, as TRL


def test_ref_model_given_is_the_reference(policy, tiny_decoder_dir, tokenizer, tmp_path):
    other = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)
    with torch.no_grad():
        other.lm_head.weight.mul_(3.0)
    trainer = OnlineDPOTrainer(policy, ref_model=other, reward_funcs=length_reward, args=config(tmp_path),
                               train_dataset=prompts(12), processing_class=tokenizer)
    assert trainer.ref_model is other
    trainer.model.train()
    round_ = trainer._generate_round(next(iter(trainer.get_train_dataloader())))
    p, ids, m = round_.prompt_ids[0], round_.completion_ids[0], round_.completion_mask[0]
    assert round_.ref_logps[0].sum().item() == pytest.approx(summed_logps(other, p, ids[m].tolist()), rel=1e-5)


def test_vllm_server_mode_samples_the_pairs_on_the_server(tiny_decoder_dir, tokenizer, tmp_path):
    from tether.rollout.vllm_server import GenerationServer, TransformersBackend

    backend = TransformersBackend(tiny_decoder_dir, dtype="float32", device="cpu")
    asked, generate = [], backend.generate
    backend.generate = lambda prompts_, request: asked.append((prompts_, request)) or generate(prompts_, request)
    server = GenerationServer(backend, "127.0.0.1", 0)
    thread = server.start_in_thread()
    try:
        args = config(tmp_path, use_vllm=True, vllm_mode="server", vllm_server_base_url=server.url,
                      vllm_server_timeout=5, max_steps=1, temperature=0.7)
        trainer = OnlineDPOTrainer(tiny_decoder_dir, reward_funcs=length_reward, args=args, train_dataset=prompts(12),
                                   processing_class=tokenizer)
        trainer.remove_callback(RunReportCallback)
        trainer.train()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    [(sent, request)] = asked
    assert sent == trainer._round.prompt_ids[0::2] and len(sent) == 3  # 3 prompts, a pair each
    assert (request.n, request.max_tokens, request.temperature) == (2, 6, 0.7)


# TRL 1.16's OnlineDPOConfig fields that are not TrainingArguments' (and the three defaults it changes), with
# TRL's defaults (read from trl.experimental.online_dpo.OnlineDPOConfig 1.16.0).
TRL_1_16_FIELDS = {
    "learning_rate": 5e-07, "logging_steps": 10, "remove_unused_columns": False, "reward_model_path": None,
    "max_new_tokens": 64, "max_length": 512, "temperature": 0.9, "top_p": 1.0, "top_k": 0, "min_p": None,
    "repetition_penalty": 1.0, "generation_kwargs": None, "cache_implementation": None, "missing_eos_penalty": None,
    "beta": 0.1, "loss_type": "sigmoid", "disable_dropout": True, "use_vllm": False, "vllm_model_impl": "vllm",
    "vllm_structured_outputs_regex": None, "vllm_gpu_memory_utilization": 0.55, "vllm_mode": "colocate",
    "vllm_server_base_url": None, "vllm_server_host": "0.0.0.0", "vllm_server_port": 8000,
    "vllm_server_timeout": 240.0, "vllm_group_port": 51216, "vllm_tensor_parallel_size": 1,
    "vllm_enable_sleep_mode": False, "ds3_gather_for_generation": True, "model_init_kwargs": None,
    "trust_remote_code": False, "reward_weights": None,
}


def test_every_trl_1_16_field_is_taken_with_trls_default(tmp_path):
    defaults = OnlineDPOConfig(output_dir=str(tmp_path))
    assert {name: getattr(defaults, name) for name in TRL_1_16_FIELDS} == TRL_1_16_FIELDS
    OnlineDPOConfig(output_dir=str(tmp_path), **{**TRL_1_16_FIELDS, "beta": [0.1]})  # each one as a keyword


# ----- learning: the demo's sentiment task ----------------------------------------------------------------------
def test_sample_positivity_rises_on_the_demo_sentiment_task(tokenizer, tmp_path):
    """A tiny Llama warmed up on the demo's reviews for 60 steps writes positive, negative and neutral endings; ranked
    by the demo's positivity score, Online DPO must make its sampled endings clearly more positive."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer)))
    texts = [r["text"] + tokenizer.eos_token for r in generate_reviews(2000, seed=3)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        batch = tokenizer([texts[i] for i in torch.randint(len(texts), (32,), generator=g).tolist()],
                          return_tensors="pt", padding=True)
        model(**batch, labels=batch.input_ids.masked_fill(batch.attention_mask == 0, -100)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def positivity(completions, **_):
        return [positivity_score(c) for c in completions]

    args = config(tmp_path, per_device_train_batch_size=16, max_new_tokens=12, learning_rate=2e-3, beta=0.1,
                  max_steps=20, logging_steps=1)
    trainer = OnlineDPOTrainer(model, reward_funcs=positivity, args=args,
                               train_dataset=Dataset.from_dict({"prompt": review_prompts() * 20}),
                               processing_class=tokenizer)
    trainer.remove_callback(RunReportCallback)
    trainer.train()
    # The mean positivity of each step's 32 sampled endings: step 1 samples the warmed-up model itself.
    scores = [row["objective/scores"] for row in trainer.state.log_history if "objective/scores" in row]
    assert len(scores) == 20 and abs(scores[0]) < 0.2, scores  # about as many negative endings as positive
    assert sum(scores[-5:]) / 5 > scores[0] + 0.5, scores


# ----- same seed, kill and resume -------------------------------------------------------------------------------
# 6 prompts, 2 a step (4 completions): 3 steps an epoch, so 4 steps cross an epoch and beta's list changes there.
ODPO = dict(COMMON, per_device_train_batch_size=2, max_new_tokens=5, max_prompt_length=16, disable_dropout=False,
            beta=[0.1, 0.05])
# A round trained twice (num_iterations=2): checkpoint-3 falls inside the round of steps 3-4.
VARIANTS = {"plain": {}, "iterations": dict(max_steps=5, save_steps=3, num_iterations=2)}


def make_trainer(model_dir, tokenizer, out, variant="plain", callbacks=None, **overrides):
    args = OnlineDPOConfig(output_dir=out, **{**ODPO, **VARIANTS[variant], **overrides})
    trainer = OnlineDPOTrainer(model_dir, reward_funcs=noisy_length_reward, args=args, train_dataset=prompts(6),
                               processing_class=tokenizer, callbacks=callbacks)
    trainer.remove_callback(RunReportCallback)  # its plots cost seconds a run and are not what is tested here
    return trainer


@pytest.fixture(scope="module")
def uninterrupted(tiny_decoder_dir, tokenizer_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    runs = {}

    def get(variant):
        if variant not in runs:
            runs[variant] = make_trainer(tiny_decoder_dir, AutoTokenizer.from_pretrained(tokenizer_dir),
                                         str(tmp_path_factory.mktemp(variant)), variant)
            runs[variant].train()
        return runs[variant]

    return get


def test_same_seed_same_weights(uninterrupted, tiny_decoder_dir, tokenizer, tmp_path):
    """Dropout on, rewards drawing from python's and numpy's streams, the global streams disturbed in between."""
    first = uninterrupted("plain")
    disturb_random_streams()
    second = make_trainer(tiny_decoder_dir, tokenizer, str(tmp_path / "again"))
    second.train()
    start = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir, **DROPOUT).state_dict()
    assert all(not torch.equal(v, start[k]) for k, v in second.model.state_dict().items())  # it trained
    assert_equal_weights(first.model, second.model)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_killed_run_resumes_to_the_uninterrupted_weights(variant, uninterrupted, tiny_decoder_dir, tokenizer,
                                                         tmp_path):
    out = str(tmp_path / "run")
    step = {**ODPO, **VARIANTS[variant]}["save_steps"] + 1
    with pytest.raises(Killed):
        make_trainer(tiny_decoder_dir, tokenizer, out, variant, [KillAfterStep(step)]).train()
    checkpoint = os.path.join(out, f"checkpoint-{step - 1}")
    assert latest_checkpoint(out) == checkpoint
    assert os.path.isfile(os.path.join(checkpoint, ROUND_FILE.format(0))) == (variant == "iterations")
    resumed = make_trainer(tiny_decoder_dir, tokenizer, out, variant)
    resumed.train(resume_from_checkpoint=True)
    full = uninterrupted(variant)
    assert resumed.state.global_step == full.state.global_step
    assert_equal_weights(resumed.model, full.model)
    logged = [[(h["loss"], h["beta"]) for h in t.state.log_history if "loss" in h] for t in (resumed, full)]
    assert logged[0] == logged[1]


# ----- bad inputs, before training -------------------------------------------------------------------------------
def test_bad_inputs_fail_before_training(policy, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="needs something to rank each pair"):
        OnlineDPOTrainer(policy, args=config(tmp_path), train_dataset=prompts(4), processing_class=tokenizer)
    for beta in (-0.1, 0.0, [], [0.1, -1.0]):
        with pytest.raises(ValueError, match="beta must be a number > 0"):
            config(tmp_path, beta=beta)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        config(tmp_path, loss_type="hinge")
    with pytest.raises(ValueError, match="missing_eos_penalty must be >= 0"):
        config(tmp_path, missing_eos_penalty=-1.0)
    with pytest.raises(ValueError, match="mask_truncated_completions"):
        config(tmp_path, mask_truncated_completions=True)
    with pytest.raises(ValueError, match="a judge gives none"):
        OnlineDPOTrainer(policy, judge=shorter_is_better, args=config(tmp_path, missing_eos_penalty=1.0),
                         train_dataset=prompts(4), processing_class=tokenizer)
    with pytest.raises(TypeError, match="pass judge=... and args=... by keyword"):  # TRL 1.0's positional order
        OnlineDPOTrainer(policy, None, None, LongerIsBetter(), train_dataset=prompts(4), processing_class=tokenizer)
    with pytest.raises(TypeError, match="pass judge=... and args=... by keyword"):  # TRL 0.x's
        OnlineDPOTrainer(policy, None, length_reward, None, config(tmp_path), train_dataset=prompts(4))
    with pytest.raises(DatasetError, match="prompt"):
        OnlineDPOTrainer(policy, reward_funcs=length_reward, args=config(tmp_path), processing_class=tokenizer,
                         train_dataset=Dataset.from_dict({"prompt": ["the film", ""]}))
    # both a judge and reward_funcs: the judge ranks the pairs (TRL 1.0), with a warning
    with pytest.warns(UserWarning, match="the judge ranks the pairs"):
        trainer = OnlineDPOTrainer(policy, reward_funcs=length_reward, judge=shorter_is_better, args=config(tmp_path),
                                   train_dataset=prompts(4), processing_class=tokenizer)
    assert trainer.rewards.names == ["shorter_is_better"]


# ----- command line ----------------------------------------------------------------------------------------------
def test_cli_online_dpo(tiny_decoder_dir, tmp_path, monkeypatch):
    from tether.cli import main, parse_command_args

    (tmp_path / "my_rank.py").write_text(
        "def short(completion_ids, **_):\n    return [-float(len(c)) for c in completion_ids]\n\n"
        "def first(prompt, a, b):\n    return 0\n")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(f'{{"prompt": "the film {i}"}}\n' for i in range(8)))
    monkeypatch.chdir(tmp_path)
    # The run's report pages are tested in test_report; here their ~30 plots would cost most of the test's time.
    monkeypatch.setattr("tether.reports.page.matplotlib_available", lambda: False)
    common = ["--model_name_or_path", tiny_decoder_dir, "--dataset_name", str(data), "--output_dir", str(tmp_path / "o"),
              "--use_cpu"]
    script, config = parse_command_args("online-dpo", [*common, "--reward_funcs", "my_rank:short", "--beta", "0.3",
                                                       "0.1", "--ref_model_name_or_path", tiny_decoder_dir])
    kwargs = script.trainer_kwargs("CAUSAL_LM")
    assert kwargs["reward_funcs"][0].__name__ == "short" and kwargs["ref_model"] == tiny_decoder_dir
    assert config.beta == [0.3, 0.1] and config.per_device_train_batch_size == 8  # TRL's default, counting prompts

    # a whole run, ranked by a judge from a file
    assert main(["online-dpo", *common, "--judge", "my_rank.py:first", "--loss_type", "ipo", "--max_steps", "2",
                 "--per_device_train_batch_size", "2", "--max_new_tokens", "4", "--report_to", "none",
                 "--save_strategy", "no", "--logging_steps", "1"]) == 0
    assert (tmp_path / "o" / "model.safetensors").is_file()
    rows = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/margins" in row for row in rows) and not any("objective/scores" in row for row in rows)
    with pytest.raises(SystemExit, match="no function 'nope'"):
        parse_command_args("online-dpo", [*common, "--judge", "my_rank.py:nope"])[0].trainer_kwargs("CAUSAL_LM")
