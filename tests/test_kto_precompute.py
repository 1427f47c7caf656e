"""KTOTrainer with precompute_ref_log_probs=True (TRL 1.16's behaviour): the mismatched (KL) completions
fixed when the data are prepared, the reference log-probs of both pairs computed once before training,
the same losses as a live reference on the same pairs, and the errors for streams and late eval sets."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from tether import KTOConfig, KTOTrainer
from tether.data.preference import UnpairedCollator, prepare_unpaired
from tether.demo.corpus import preference_pairs
from tether.demo.tiny import tiny_llama_config

BATCH = 4


def config(tmp_path, **overrides) -> KTOConfig:
    values = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH,
        learning_rate=1e-3, max_steps=1, logging_steps=1, report_to="none", save_strategy="no",
        disable_tqdm=True, seed=0, dataloader_pin_memory=False, beta=0.3,
    )
    values.update(overrides)
    return KTOConfig(**values)


def unpaired(n: int, seed: int = 0) -> Dataset:
    """n rows (prompt, completion, label): pairs' chosen and rejected completions, alternating labels, so
    the lengths differ from row to row (padding matters)."""
    rows = preference_pairs(n, seed=seed)
    return Dataset.from_dict({"prompt": [r["prompt"] for r in rows],
                              "completion": [r["chosen"] if i % 2 else r["rejected"] for i, r in enumerate(rows)],
                              "label": [bool(i % 2) for i in range(n)]})


def other_policy(tokenizer) -> AutoModelForCausalLM:
    """A policy that differs from the tiny decoder (seed 0), so log-ratios and the KL estimate are not 0."""
    torch.manual_seed(1)
    return AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer)), attn_implementation="sdpa")


@torch.no_grad()
def summed_log_prob(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """log p(completion | prompt) from one unpadded forward pass: the sum over completion tokens of the
    log-softmax of the logits at the position before each."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    logits = model(input_ids=ids).logits[0].float()  # [t, v]
    log_probs = torch.log_softmax(logits[:-1], dim=-1)  # position j predicts token j + 1
    targets = ids[0, 1:]
    start = len(prompt_ids) - 1  # the first completion token is predicted at the last prompt position
    return float(log_probs[start:].gather(1, targets[start:, None]).sum())


def rotated(n: int, chunk: int) -> list[int]:
    """Index of the row whose completion row i is paired with: i - 1 within its run of `chunk` rows, the
    first row of a run taking the run's last."""
    source = []
    for start in range(0, n, chunk):
        run = list(range(start, min(start + chunk, n)))
        source += run[-1:] + run[:-1]
    return source


# ----- the data side ---------------------------------------------------------------------------------
def test_fixed_kl_completions_rotate_within_runs_of_the_batch_size(tokenizer):
    data = Dataset.from_dict({"prompt": ["the film", "the music", "the plot", "the cast", "the end"],
                              "completion": [" was great.", " was bad.", " was fun.", " was dull.", " was sad."],
                              "label": [True, False, True, False, True]})
    rows = prepare_unpaired(data, tokenizer, kl_chunk_size=3)
    # runs [0, 1, 2] and [3, 4]: row i takes the completion of row i - 1 in its run, the first one the last's
    assert rows["KL_completion_ids"] == [rows["completion_ids"][j] for j in (2, 0, 1, 4, 3)]
    batch = UnpairedCollator(tokenizer.pad_token_id)(list(rows)[:3])
    whole = [tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert whole[3:] == ["the film was fun.<eos>", "the music was great.<eos>", "the plot was bad.<eos>"]
    # without the column, the collator keeps pairing within the batch (prompt i, completion i + 1)
    assert "KL_completion_ids" not in prepare_unpaired(data, tokenizer).column_names


def test_collator_carries_reference_log_probs(tokenizer):
    rows = [{"prompt_ids": [5, 6], "completion_ids": [7], "label": True, "ref_logps": -1.5, "ref_KL_logps": -2.0},
            {"prompt_ids": [8], "completion_ids": [9, 10], "label": False, "ref_logps": -3.0, "ref_KL_logps": -4.5}]
    batch = UnpairedCollator(tokenizer.pad_token_id)(rows)
    assert batch["ref_logps"].dtype == torch.float32
    assert batch["ref_logps"].tolist() == [-1.5, -3.0] and batch["ref_KL_logps"].tolist() == [-2.0, -4.5]


# ----- the precomputation pass -----------------------------------------------------------------------
def test_precomputed_reference_log_probs_equal_a_reference_forward_pass(tmp_path, tiny_decoder, tokenizer):
    """ref_logps and ref_KL_logps are the reference's log-probs of each row's own pair and of its fixed
    mismatched pair, computed in batches of precompute_ref_batch_size (3 here: 10 rows -> 4 passes of
    2 x 3, 2 x 3, 2 x 3, 2 x 1 sequences), after which no reference model is held."""
    calls = []
    tiny_decoder.get_input_embeddings().register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    trainer = KTOTrainer(other_policy(tokenizer), tiny_decoder, args=config(
        tmp_path, precompute_ref_log_probs=True, precompute_ref_batch_size=3), train_dataset=unpaired(10),
        processing_class=tokenizer)
    assert calls == [6, 6, 6, 2]
    assert trainer.ref_model is None
    rows = trainer.train_dataset
    source = rotated(len(rows), BATCH)
    expected = [summed_log_prob(tiny_decoder, r["prompt_ids"], r["completion_ids"]) for r in rows]
    expected_kl = [summed_log_prob(tiny_decoder, r["prompt_ids"], rows[j]["completion_ids"])
                   for r, j in zip(rows, source)]
    assert rows["ref_logps"] == pytest.approx(expected, rel=1e-6)
    assert rows["ref_KL_logps"] == pytest.approx(expected_kl, rel=1e-6)
    assert min(abs(a - b) for a, b in zip(expected, expected_kl)) > 1e-3  # the two columns are different pairs


def test_apo_zero_unpaired_precomputes_only_the_matched_pairs(tmp_path, tiny_decoder, tokenizer):
    trainer = KTOTrainer(other_policy(tokenizer), tiny_decoder, args=config(
        tmp_path, loss_type="apo_zero_unpaired", precompute_ref_log_probs=True), train_dataset=unpaired(6),
        processing_class=tokenizer)
    rows = trainer.train_dataset
    assert "ref_KL_logps" not in rows.column_names and "KL_completion_ids" not in rows.column_names
    expected = [summed_log_prob(tiny_decoder, r["prompt_ids"], r["completion_ids"]) for r in rows]
    assert rows["ref_logps"] == pytest.approx(expected, rel=1e-6)


# ----- the loss --------------------------------------------------------------------------------------
def test_kl_term_and_loss_use_the_fixed_mismatched_completions(tmp_path, tiny_decoder, tokenizer):
    """On the first batch of prepared rows: z0 = max(0, mean_i [log pi(y'_i | x_i) - log pi_ref(y'_i | x_i)])
    over the fixed mismatched completions y'_i, and the KTO loss (eq. 7 of arXiv 2402.01306) with
    r_i = log pi(y_i | x_i) - log pi_ref(y_i | x_i): desirable 1 - sigma(beta (r - z0)), undesirable
    1 - sigma(beta (z0 - r)), averaged."""
    policy = other_policy(tokenizer)
    trainer = KTOTrainer(policy, tiny_decoder, args=config(tmp_path, precompute_ref_log_probs=True),
                         train_dataset=unpaired(8), processing_class=tokenizer)
    rows = [trainer.train_dataset[i] for i in range(BATCH)]
    source = rotated(BATCH, BATCH)  # [3, 0, 1, 2]
    mismatched = [summed_log_prob(policy, r["prompt_ids"], rows[j]["completion_ids"])
                  - summed_log_prob(tiny_decoder, r["prompt_ids"], rows[j]["completion_ids"])
                  for r, j in zip(rows, source)]
    z0 = max(0.0, sum(mismatched) / BATCH)
    beta, losses = 0.3, []
    for r in rows:
        log_ratio = (summed_log_prob(policy, r["prompt_ids"], r["completion_ids"])
                     - summed_log_prob(tiny_decoder, r["prompt_ids"], r["completion_ids"]))
        margin = log_ratio - z0 if r["label"] else z0 - log_ratio
        losses.append(1 - 1 / (1 + math.exp(-beta * margin)))
    policy.train()  # no dropout in the tiny decoder; the metrics go to 'train'
    loss = trainer.compute_loss(policy, trainer._prepare_inputs(trainer.data_collator(rows)))
    assert z0 > 0.05  # not clamped: the check below sees the mismatched pairs
    # The log-probs are sums of ~150 nats in float32 (rounding ~1e-5 each); other pairs would be > 1e-2 away.
    assert trainer._metrics["train"]["kl"][-1] == pytest.approx(z0, abs=5e-5)
    assert float(loss.detach()) == pytest.approx(sum(losses) / BATCH, abs=5e-6)


def test_first_step_with_precompute_equals_a_live_reference_on_the_same_pairs(tmp_path, tiny_decoder_dir,
                                                                                tokenizer):
    """Precomputed reference log-probs and a live reference (kl_completions='fixed': the same mismatched
    pairs) give the same first batch, loss and KL estimate; per-batch pairs give another KL estimate."""
    def first_step(**options):
        ref = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)
        trainer = KTOTrainer(other_policy(tokenizer), ref, args=config(tmp_path, **options),
                             train_dataset=unpaired(12), processing_class=tokenizer)
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        return batch, float(loss.detach()), trainer._metrics["train"]["kl"][-1]

    pre_batch, pre_loss, pre_kl = first_step(precompute_ref_log_probs=True)
    live_batch, live_loss, live_kl = first_step(kl_completions="fixed")
    assert "ref_logps" in pre_batch and "ref_logps" not in live_batch
    assert torch.equal(pre_batch["input_ids"], live_batch["input_ids"])
    assert pre_kl > 0.05
    assert pre_kl == pytest.approx(live_kl, abs=1e-5)
    assert pre_loss == pytest.approx(live_loss, abs=1e-6)
    _, _, batch_kl = first_step(kl_completions="batch")
    assert abs(batch_kl - pre_kl) > 1e-3

    # and through Trainer.train: the first logged loss of both runs
    def logged_loss(**options):
        trainer = KTOTrainer(other_policy(tokenizer), AutoModelForCausalLM.from_pretrained(tiny_decoder_dir),
                             args=config(tmp_path, **options), train_dataset=unpaired(12), processing_class=tokenizer)
        trainer.train()
        return trainer.state.log_history[0]["loss"], trainer.state.log_history[0]["kl"]

    assert logged_loss(precompute_ref_log_probs=True) == pytest.approx(logged_loss(kl_completions="fixed"), abs=1e-6)


# ----- options and errors ----------------------------------------------------------------------------
def test_kl_completions_options(tmp_path):
    assert config(tmp_path, precompute_ref_log_probs=True).fixed_kl_completions
    assert not config(tmp_path).fixed_kl_completions
    assert config(tmp_path, kl_completions="fixed").fixed_kl_completions
    assert not config(tmp_path, loss_type="apo_zero_unpaired", precompute_ref_log_probs=True).fixed_kl_completions
    with pytest.raises(ValueError, match="kl_completions='fixed'"):
        config(tmp_path, precompute_ref_log_probs=True, kl_completions="batch")
    with pytest.raises(ValueError, match="kl_completions must be"):
        config(tmp_path, kl_completions="random")


def test_precompute_refuses_streams(tmp_path, tiny_decoder_dir):
    stream = unpaired(8).to_iterable_dataset()
    args = config(tmp_path, precompute_ref_log_probs=True)
    for given in ({"train_dataset": stream}, {"train_dataset": unpaired(8), "eval_dataset": stream},
                  {"train_dataset": unpaired(8), "eval_dataset": {"held_out": stream}}):
        with pytest.raises(ValueError, match="precompute_ref_log_probs.*not supported with IterableDataset"):
            KTOTrainer(tiny_decoder_dir, args=args, **given)
    trainer = KTOTrainer(tiny_decoder_dir, args=args, train_dataset=unpaired(8))
    with pytest.raises(ValueError, match="precompute_ref_log_probs.*not supported with IterableDataset"):
        trainer.evaluate(eval_dataset=stream)


def test_new_eval_set_is_scored_before_training_and_refused_after(tmp_path, tiny_decoder_dir):
    """The policy is its own reference until its first step: a new eval set is scored then; afterwards the
    reference is gone. Eval sets given at construction keep their log-probs."""
    args = config(tmp_path, precompute_ref_log_probs=True)
    trainer = KTOTrainer(tiny_decoder_dir, args=args, train_dataset=unpaired(8),
                         eval_dataset={"a": unpaired(4, seed=1), "b": unpaired(4, seed=2)})
    held_out = unpaired(4, seed=3)
    before = trainer.evaluate(eval_dataset=held_out)
    assert before["eval_loss"] == pytest.approx(0.5, abs=1e-6)  # policy == reference: every loss 1 - sigma(0)
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_a_loss"] != 0.5 and math.isfinite(after["eval_b_loss"])
    for new in (held_out, unpaired(4, seed=4)):  # each evaluate(dataset) scores it again, as TRL does
        with pytest.raises(ValueError, match="Cannot compute reference log-probs for a dataset passed to"):
            trainer.evaluate(eval_dataset=new)


def test_new_eval_set_is_refused_when_the_given_reference_was_released(tmp_path, tiny_decoder, tokenizer):
    trainer = KTOTrainer(other_policy(tokenizer), tiny_decoder, args=config(tmp_path, precompute_ref_log_probs=True),
                         train_dataset=unpaired(8), processing_class=tokenizer)
    # before any step too: the policy is not the reference that was given
    with pytest.raises(ValueError, match="Cannot compute reference log-probs for a dataset passed to"):
        trainer.evaluate(eval_dataset=unpaired(4, seed=1))


def test_peft_policy_scores_a_new_eval_set_after_training(tmp_path, tiny_decoder_dir, tokenizer):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = KTOTrainer(AutoModelForCausalLM.from_pretrained(tiny_decoder_dir),
                         args=config(tmp_path, precompute_ref_log_probs=True, learning_rate=5e-2),
                         train_dataset=unpaired(8), processing_class=tokenizer, peft_config=lora)
    trainer.train()
    held_out = unpaired(4, seed=1)
    scored = trainer._prepare_eval_one(held_out, "eval")
    base = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)  # the adapter-disabled policy
    expected = [summed_log_prob(base, r["prompt_ids"], r["completion_ids"]) for r in scored]
    assert scored["ref_logps"] == pytest.approx(expected, rel=1e-6)
    trained = summed_log_prob(trainer.model.eval(), scored[0]["prompt_ids"], scored[0]["completion_ids"])
    assert abs(trained - expected[0]) > 1e-3  # the trained policy (adapter on) is not what scored them
