"""TRL 1.16's DPO/KTO/CPO/ORPO options, called as a TRL user calls them, against losses computed in the test
from full logits (log_softmax over the vocabulary, one row at a time) and the papers' formulas:
loss_type lists with loss_weights, f_divergence_type, ld_alpha, use_weighting (WPO), pad_token,
KTO's apo_zero_unpaired, CPO's hinge/ipo/alphapo/alpha, generate_during_eval and padding_value on CPO/ORPO."""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from tether import (
    CPOConfig,
    CPOTrainer,
    DPOConfig,
    DPOTrainer,
    KTOConfig,
    KTOTrainer,
    ORPOConfig,
    ORPOTrainer,
)
from tether.demo.corpus import preference_pairs

COMMON = dict(per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=1, logging_steps=1,
              report_to="none", save_strategy="no", disable_tqdm=True, seed=0, dataloader_pin_memory=False,
              padding_free=False, learning_rate=1e-3)


def pairs(n: int = 8, seed: int = 0) -> Dataset:
    return Dataset.from_list(preference_pairs(n, seed=seed))


def perturbed_policy(path: str, seed: int = 1, scale: float = 0.05):
    """The tiny model with noise on every weight, so policy and reference differ (log-ratios are not 0)."""
    model = AutoModelForCausalLM.from_pretrained(path)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def plain_token_logps(model, batch) -> list[list[tuple[float, float]]]:
    """Per sequence (row), its completion tokens in order: (log p(token), log sum_v p(v)^2), from full logits."""
    out = []
    with torch.no_grad():
        for row in range(batch["input_ids"].shape[0]):
            ids = batch["input_ids"][row:row + 1]
            logits = model(input_ids=ids, attention_mask=batch["attention_mask"][row:row + 1]).logits[0].double()
            log_dist = logits.log_softmax(-1)  # [t, v]
            tokens = []
            for j in range(1, ids.shape[1]):
                if batch["loss_mask"][row, j]:
                    lp = log_dist[j - 1]
                    tokens.append((lp[ids[0, j]].item(), torch.logsumexp(2 * lp, -1).item()))
            out.append(tokens)
    return out


def one_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def trainer_loss(trainer, batch) -> float:
    trainer.model.eval()  # dropout is off anyway; no training side effects
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch).item()


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def dpo_trainer(tmp_path, tiny_decoder_dir, scale: float = 0.05, **options):
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), **{**COMMON, **options})
    return DPOTrainer(model=perturbed_policy(tiny_decoder_dir, scale=scale), ref_model=tiny_decoder_dir, args=args,
                      train_dataset=pairs())


def sums(tokens):
    return [sum(lp for lp, _ in seq) for seq in tokens]


# ----- loss_type as a list (MPO) -----------------------------------------------------------------------------
def test_loss_type_is_stored_as_a_list_and_weights_are_checked(tmp_path):
    assert DPOConfig(output_dir=str(tmp_path), loss_type="ipo").loss_type == ["ipo"]
    assert DPOConfig(output_dir=str(tmp_path), loss_type=["sigmoid", "sft"], loss_weights=[0.8, 1]).loss_weights == [
        0.8, 1.0]
    with pytest.raises(ValueError, match="loss_weights"):
        DPOConfig(output_dir=str(tmp_path), loss_type=["sigmoid", "sft"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="Unknown loss_type 'mpo'"):
        DPOConfig(output_dir=str(tmp_path), loss_type=["sigmoid", "mpo"])
    with pytest.raises(ValueError, match="f_divergence_type"):
        DPOConfig(output_dir=str(tmp_path), loss_type=["sigmoid", "nca_pair"], f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="use_weighting"):
        DPOConfig(output_dir=str(tmp_path), loss_type="aot", use_weighting=True)


def test_mpo_loss_list_matches_the_weighted_sum_from_full_logits(tmp_path, tiny_decoder_dir):
    trainer = dpo_trainer(tmp_path, tiny_decoder_dir, loss_type=["sigmoid", "sft", "ipo"], loss_weights=[0.8, 1.0, 0.2],
                          beta=0.3)
    batch = one_batch(trainer)
    policy, ref = plain_token_logps(trainer.model, batch), plain_token_logps(trainer.ref_model, batch)
    b = len(policy) // 2
    p, r, n = sums(policy), sums(ref), [len(seq) for seq in policy]
    expected = []
    for k in range(b):
        r_w, r_l = p[k] - r[k], p[b + k] - r[b + k]
        sigmoid = -log_sigmoid(0.3 * (r_w - r_l))
        ipo = (r_w / n[k] - r_l / n[b + k] - 1 / (2 * 0.3)) ** 2
        expected.append(0.8 * sigmoid + 0.2 * ipo)
    sft = -sum(p[:b]) / sum(n[:b])  # token-mean NLL of the chosen completions
    assert trainer_loss(trainer, batch) == pytest.approx(sum(expected) / b + 1.0 * sft, rel=1e-5)


def test_dpo_with_a_loss_list_trains_and_its_loss_falls(tmp_path, tiny_decoder_dir):
    args = DPOConfig(output_dir=str(tmp_path / "run"), **{**COMMON, "max_steps": 12, "learning_rate": 5e-3},
                     loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
    trainer = DPOTrainer(tiny_decoder_dir, args=args, train_dataset=pairs(8))
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses


# ----- f_divergence_type ---------------------------------------------------------------------------------------
F_SCORES = {  # psi(r) = f'(e^r) - f'(1), from f of the f-DPO paper (Table 1)
    "forward_kl": lambda r, a: 1 - math.exp(-r),
    "js_divergence": lambda r, a: math.log(2 * math.exp(r) / (1 + math.exp(r))),
    "alpha_divergence": lambda r, a: (1 - math.exp(r) ** -a) / a,
}


@pytest.mark.parametrize("divergence", sorted(F_SCORES))
def test_f_divergence_type_scores_the_log_ratios(tmp_path, tiny_decoder_dir, divergence):
    # a small perturbation: e^-r magnifies the float32 rounding of summed log-probs when |r| is large
    trainer = dpo_trainer(tmp_path, tiny_decoder_dir, scale=0.01, f_divergence_type=divergence,
                          f_alpha_divergence_coef=0.3, beta=0.5)
    batch = one_batch(trainer)
    p, r = sums(plain_token_logps(trainer.model, batch)), sums(plain_token_logps(trainer.ref_model, batch))
    b = len(p) // 2
    assert max(abs(p[i] - r[i]) for i in range(2 * b)) > 0.05  # the scores are not all near 0
    psi = [F_SCORES[divergence](p[i] - r[i], 0.3) for i in range(2 * b)]
    expected = sum(-log_sigmoid(0.5 * (psi[k] - psi[b + k])) for k in range(b)) / b
    assert trainer_loss(trainer, batch) == pytest.approx(expected, rel=1e-5)


def test_dpo_with_an_f_divergence_trains_and_its_loss_falls(tmp_path, tiny_decoder_dir):
    args = DPOConfig(output_dir=str(tmp_path / "run"), **{**COMMON, "max_steps": 12, "learning_rate": 5e-3},
                     f_divergence_type="js_divergence")
    trainer = DPOTrainer(tiny_decoder_dir, args=args, train_dataset=pairs(8))
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy = reference: every score is 0
    assert sum(losses[-3:]) / 3 < losses[0] - 0.02, losses


# ----- ld_alpha (LD-DPO) and use_weighting (WPO) -----------------------------------------------------------------
def test_ld_alpha_weights_the_excess_tokens_of_the_longer_completion(tmp_path, tiny_decoder_dir):
    alpha = 0.3
    trainer = dpo_trainer(tmp_path, tiny_decoder_dir, ld_alpha=alpha, loss_type=["sigmoid", "sft"])
    batch = one_batch(trainer)
    policy, ref = plain_token_logps(trainer.model, batch), plain_token_logps(trainer.ref_model, batch)
    b = len(policy) // 2

    def ld(seqs, k):  # LD-DPO sums of pair k: full weight up to the shorter length, alpha beyond
        public = min(len(seqs[k]), len(seqs[b + k]))
        return [sum(lp * (1.0 if j < public else alpha) for j, (lp, _) in enumerate(seqs[i]))
                for i in (k, b + k)]

    assert any(len(policy[k]) != len(policy[b + k]) for k in range(b))  # the weighting has something to do
    expected = 0.0
    for k in range(b):
        (pw, pl), (rw, rl) = ld(policy, k), ld(ref, k)
        expected += -log_sigmoid(0.1 * ((pw - rw) - (pl - rl))) / b
    nll = -sum(sums(policy)[:b]) / sum(len(s) for s in policy[:b])  # sft: on the plain sums
    assert trainer_loss(trainer, batch) == pytest.approx(expected + nll, rel=1e-5)


def test_use_weighting_multiplies_each_pair_by_its_wpo_weight(tmp_path, tiny_decoder_dir):
    trainer = dpo_trainer(tmp_path, tiny_decoder_dir, use_weighting=True, beta=0.5)
    batch = one_batch(trainer)
    policy, ref = plain_token_logps(trainer.model, batch), plain_token_logps(trainer.ref_model, batch)
    b = len(policy) // 2
    p, r = sums(policy), sums(ref)
    # WPO: w(y) = exp(mean_t [log p(y_t) - log sum_v p(v)^2]), pair weight w(y_w) * w(y_l)
    w = [math.exp(sum(lp - lsq for lp, lsq in seq) / len(seq)) for seq in policy]
    expected = sum(w[k] * w[b + k] * -log_sigmoid(0.5 * ((p[k] - r[k]) - (p[b + k] - r[b + k])))
                   for k in range(b)) / b
    assert trainer_loss(trainer, batch) == pytest.approx(expected, rel=1e-5)
    unweighted = sum(-log_sigmoid(0.5 * ((p[k] - r[k]) - (p[b + k] - r[b + k]))) for k in range(b)) / b
    assert abs(expected - unweighted) > 0.05 * unweighted  # the weights matter here


def test_use_weighting_with_packed_rows_gives_the_padded_loss(tmp_path, tiny_decoder_dir):
    padded = dpo_trainer(tmp_path, tiny_decoder_dir, use_weighting=True, ld_alpha=0.5)
    packed = dpo_trainer(tmp_path, tiny_decoder_dir, use_weighting=True, ld_alpha=0.5, padding_free=True)
    batch_padded, batch_packed = one_batch(padded), one_batch(packed)
    assert "position_ids" in batch_packed
    assert trainer_loss(packed, batch_packed) == pytest.approx(trainer_loss(padded, batch_padded), rel=1e-5)


# ----- pad_token -----------------------------------------------------------------------------------------------
def test_pad_token_becomes_the_tokenizers_pad_token_before_preparation(tmp_path, tiny_decoder_dir, tokenizer):
    token = tokenizer.convert_ids_to_tokens(5)
    args = DPOConfig(output_dir=str(tmp_path / "run"), **COMMON, pad_token=token)
    trainer = DPOTrainer(tiny_decoder_dir, args=args, train_dataset=pairs(8), processing_class=tokenizer)
    assert trainer.processing_class.pad_token == token and trainer.processing_class.pad_token_id == 5
    assert trainer.model.config.pad_token_id == 5
    batch = one_batch(trainer)
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 5).all() and (batch["attention_mask"] == 0).any()
    with pytest.raises(ValueError, match="pad_token"):
        DPOTrainer(tiny_decoder_dir, args=DPOConfig(output_dir=str(tmp_path / "bad"), **COMMON,
                                                    pad_token="<not-a-token>"), train_dataset=pairs(8))


# ----- KTO loss_type -------------------------------------------------------------------------------------------
def test_kto_apo_zero_unpaired_loss_from_full_logits(tmp_path, tiny_decoder_dir):
    args = KTOConfig(output_dir=str(tmp_path / "kto"), **COMMON, loss_type="apo_zero_unpaired", beta=0.5,
                     desirable_weight=1.5, undesirable_weight=0.5)
    trainer = KTOTrainer(model=perturbed_policy(tiny_decoder_dir), ref_model=tiny_decoder_dir, args=args,
                         train_dataset=pairs(8))
    batch = one_batch(trainer)
    b = batch["label"].shape[0]
    matched = {k: v[:b] for k, v in batch.items() if k != "label"}
    p, r = sums(plain_token_logps(trainer.model, matched)), sums(plain_token_logps(trainer.ref_model, matched))
    expected = [1.5 * (1 - 1 / (1 + math.exp(-0.5 * (p[i] - r[i])))) if batch["label"][i]
                else 0.5 / (1 + math.exp(-0.5 * (p[i] - r[i]))) for i in range(b)]
    assert batch["label"].any() and not batch["label"].all()
    assert trainer_loss(trainer, batch) == pytest.approx(sum(expected) / b, rel=1e-5)
    with pytest.raises(ValueError, match="loss_type"):
        KTOConfig(output_dir=str(tmp_path), loss_type="bco")
    KTOConfig(output_dir=str(tmp_path), loss_type="apo_zero_unpaired", per_device_train_batch_size=1)  # no KL term


# ----- CPO: hinge, ipo, alphapo, alpha ---------------------------------------------------------------------------
def cpo_expected(policy, loss_type, beta, alpha=0.0, gamma=0.5, cpo_alpha=1.0):
    b = len(policy) // 2
    p, n = sums(policy), [len(s) for s in policy]
    x = [p[i] / n[i] for i in range(2 * b)] if loss_type in ("ipo", "simpo") else p
    if alpha:
        x = [(1 - math.exp(v) ** -alpha) / alpha for v in x]  # AlphaPO's reward of the probability e^v
    per_pair = []
    for k in range(b):
        h = x[k] - x[b + k]
        per_pair.append({"hinge": max(0.0, 1 - beta * h), "ipo": (h - 1 / (2 * beta)) ** 2,
                         "sigmoid": -log_sigmoid(beta * h), "simpo": -log_sigmoid(beta * h - gamma)}[loss_type])
    return sum(per_pair) / b + cpo_alpha * -sum(p[:b]) / sum(n[:b])


@pytest.mark.parametrize(("loss_type", "alpha"), [("hinge", 0.0), ("ipo", 0.0), ("sigmoid", 0.2), ("hinge", 0.1),
                                                  ("alphapo", 0.25)])
def test_cpo_loss_types_and_alphapo_rewards(tmp_path, tiny_decoder_dir, loss_type, alpha):
    args = CPOConfig(output_dir=str(tmp_path / "cpo"), **COMMON, loss_type=loss_type, alpha=alpha, beta=0.4)
    trainer = CPOTrainer(perturbed_policy(tiny_decoder_dir), args=args, train_dataset=pairs(8))
    if loss_type == "alphapo":  # TRL's shorthand: SimPO without the NLL term
        assert args.loss_type == "simpo" and args.cpo_alpha == 0.0
    batch = one_batch(trainer)
    policy = plain_token_logps(trainer.model, batch)
    expected = cpo_expected(policy, args.loss_type, 0.4, alpha, cpo_alpha=args.cpo_alpha)
    assert trainer_loss(trainer, batch) == pytest.approx(expected, rel=1e-5)


def test_cpo_hinge_with_label_smoothing_warns_and_trains_without_it(tmp_path):
    with pytest.warns(UserWarning, match="label_smoothing"):
        CPOConfig(output_dir=str(tmp_path), loss_type="hinge", label_smoothing=0.1)


# ----- generate_during_eval, padding_value, is_encoder_decoder on CPO and ORPO ------------------------------------
@pytest.mark.parametrize(("trainer_class", "config_class"), [(CPOTrainer, CPOConfig), (ORPOTrainer, ORPOConfig)])
def test_cpo_orpo_generate_during_eval_and_padding_value(tmp_path, tiny_decoder_dir, tokenizer, trainer_class,
                                                         config_class):
    args = config_class(output_dir=str(tmp_path / "run"), **COMMON, generate_during_eval=True, padding_value=7,
                        is_encoder_decoder=False, max_completion_length=5)
    trainer = trainer_class(tiny_decoder_dir, args=args, train_dataset=pairs(8), eval_dataset=pairs(8, seed=1),
                            processing_class=tokenizer)
    batch = one_batch(trainer)
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 7).all() and (batch["attention_mask"] == 0).any()
    trainer.evaluate()
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["split"] for r in rows} == {"eval"}
    assert all("reference_completion" not in r for r in rows)  # no reference model in CPO/ORPO
    prompt = next(iter(trainer.eval_dataset))
    prompt_ids = prompt["chosen_input_ids"][: prompt["prompt_length"]]
    out = trainer.model.generate(torch.tensor([prompt_ids]), max_new_tokens=5, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)[0, len(prompt_ids):]
    assert rows[0]["completion"] == tokenizer.decode(out, skip_special_tokens=True)
    with pytest.raises(ValueError, match="is_encoder_decoder"):
        trainer_class(tiny_decoder_dir, args=config_class(output_dir=str(tmp_path / "x"), **COMMON,
                                                          is_encoder_decoder=True), train_dataset=pairs(8))


@pytest.mark.parametrize("multiple", [8, 13])
def test_pad_to_multiple_of_rounds_the_batch_width(tmp_path, tiny_decoder_dir, multiple):
    # As TRL: every batch is padded up to a multiple of pad_to_multiple_of; the loss is unchanged (padding is masked).
    plain = dpo_trainer(tmp_path, tiny_decoder_dir)
    rounded = dpo_trainer(tmp_path, tiny_decoder_dir, pad_to_multiple_of=multiple)
    batch, padded = one_batch(plain), one_batch(rounded)
    width = batch["input_ids"].shape[1]
    assert padded["input_ids"].shape[1] == -(-width // multiple) * multiple
    assert torch.equal(padded["input_ids"][:, :width], batch["input_ids"])
    assert trainer_loss(rounded, padded) == pytest.approx(trainer_loss(plain, batch), abs=1e-6)
    kto = KTOTrainer(model=perturbed_policy(tiny_decoder_dir), ref_model=tiny_decoder_dir, train_dataset=pairs(),
                     args=KTOConfig(output_dir=str(tmp_path / "kto"), pad_to_multiple_of=multiple,
                                    **{k: v for k, v in COMMON.items() if k != "padding_free"}))
    assert one_batch(kto)["input_ids"].shape[-1] % multiple == 0


def test_precomputed_reference_log_probs_for_a_dict_of_eval_sets(tmp_path, tiny_decoder_dir):
    # Each named eval set gets its reference log-probs before training; its eval loss equals the live reference's.
    eval_sets = {"a": pairs(4, seed=1), "b": pairs(4, seed=2)}
    losses = {}
    for precompute in (True, False):
        args = DPOConfig(output_dir=str(tmp_path / f"p{precompute}"), precompute_ref_log_probs=precompute,
                         **{**COMMON, "per_device_eval_batch_size": 2})
        trainer = DPOTrainer(model=perturbed_policy(tiny_decoder_dir), ref_model=tiny_decoder_dir, args=args,
                             train_dataset=pairs(), eval_dataset=eval_sets)
        metrics = trainer.evaluate()
        losses[precompute] = (metrics["eval_a_loss"], metrics["eval_b_loss"])
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)


def test_a_peft_policy_stays_a_live_reference_after_precomputing(tmp_path, tiny_decoder_dir):
    # With log-probs precomputed the reference copy is gone, but a PEFT policy with its adapter disabled still
    # computes as the reference (generate_during_eval's reference samples, new eval sets).
    from peft import LoraConfig

    args = DPOConfig(output_dir=str(tmp_path / "peft"), precompute_ref_log_probs=True, **COMMON)
    trainer = DPOTrainer(model=tiny_decoder_dir, args=args, train_dataset=pairs(),
                         peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert trainer.ref_model is None and trainer._live_reference(trainer.model) is not None
    full = DPOTrainer(model=tiny_decoder_dir, args=DPOConfig(output_dir=str(tmp_path / "full"),
                                                             precompute_ref_log_probs=True, **COMMON),
                      train_dataset=pairs())
    assert full._live_reference(full.model) is None  # a full-weight policy's starting weights are gone
