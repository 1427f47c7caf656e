"""The examples/ scripts in their --smoke mode (tiny local models, offline), run in-process through their
`main(argv)`, and the one library feature they need: scoring by one label of a multi-label classifier."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tether import RewardModelScorer
from tether.models.scoring import sequence_scores

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))  # the scripts import their shared helpers (_common, _smoke) by plain name

import adapters_rlhf  # noqa: E402
import detoxify_ppo  # noqa: E402
import dpo_qlora  # noqa: E402
import sentiment_ppo  # noqa: E402
import stack_llama  # noqa: E402


@pytest.fixture(autouse=True)
def restore_library_logging():
    """--smoke quiets transformers and datasets globally; put them back for the tests that run after."""
    import datasets
    import transformers

    verbosity = transformers.logging.get_verbosity()
    bars = datasets.utils.logging.is_progress_bar_enabled()
    hf_bars = transformers.utils.logging.is_progress_bar_enabled()
    yield
    transformers.logging.set_verbosity(verbosity)
    (datasets.enable_progress_bars if bars else datasets.disable_progress_bars)()
    (transformers.utils.logging.enable_progress_bar if hf_bars else transformers.utils.logging.disable_progress_bar)()


def results(output_dir: Path) -> dict:
    return json.loads((output_dir / "results.json").read_text())


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def safetensors_keys(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, weight in before.items() if not torch.equal(weight, after[name])]


# ----- sentiment -----------------------------------------------------------------------------------------------
def test_sentiment_smoke(tmp_path):
    assert sentiment_ppo.main(["--smoke", "--output_dir", str(tmp_path)]) == 0
    out = results(tmp_path)
    assert len(out["reward_mean"]) == 3 and all(abs(r) < 1e3 for r in out["reward_mean"])
    assert [row["step"] for row in metrics(tmp_path)] == [1, 2, 3]  # the classic loop logs each step
    for name in ("model.safetensors", "value_head.safetensors", "tokenizer.json", "report.html"):
        assert (tmp_path / name).is_file(), name
    # The classifier reads the text in its own tokenization (WordPiece), not the policy's (byte-level BPE).
    models = tmp_path / "smoke-models"
    text = "this movie was wonderful."
    policy_tok, classifier_tok = (AutoTokenizer.from_pretrained(models / m) for m in ("policy", "classifier"))
    assert policy_tok.tokenize(text) != classifier_tok.tokenize(text)
    assert classifier_tok.cls_token == "[CLS]" and policy_tok.cls_token is None
    # PPO moved the policy away from the model it started from.
    start, end = load_file(models / "policy" / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert changed(start, end)


# ----- adapters-only RLHF ---------------------------------------------------------------------------------------
def test_adapters_rlhf_smoke(tmp_path):
    assert adapters_rlhf.main(["--smoke", "--output_dir", str(tmp_path)]) == 0
    out = results(tmp_path)
    assert out["ref_model_is_none"]  # the reference is the adapter-disabled policy
    trainable = out["trainable_parameters"]
    assert all("lora_" in name or name.startswith("v_head.") for name in trainable), trainable
    assert any("lora_" in name for name in trainable) and any(name.startswith("v_head.") for name in trainable)
    # One copy of the base weights in memory: what is held is the base plus the trainable adapter and head.
    base = sum(w.numel() for w in load_file(tmp_path / "smoke-models" / "policy" / "model.safetensors").values())
    assert out["parameters_held"] == base + out["parameters_trainable"]
    # Only the adapter and the value head are saved.
    assert not (tmp_path / "model.safetensors").exists()
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "value_head.safetensors").is_file()
    keys = safetensors_keys(tmp_path / "adapter_model.safetensors")
    assert keys and all("lora_" in key for key in keys)
    assert len(out["reward_mean"]) == 3 and (tmp_path / "report.html").is_file()


# ----- detoxify -------------------------------------------------------------------------------------------------
def test_detoxify_smoke(tmp_path):
    assert detoxify_ppo.main(["--smoke", "--output_dir", str(tmp_path)]) == 0
    rows = metrics(tmp_path)
    assert len(rows) == 3
    toxic = [key for key in rows[0] if key.startswith("rewards/") and key.endswith("[hate]")]
    assert len(toxic) == 1, rows[0].keys()
    for row in rows:  # the reward is minus the classifier's toxic logit
        assert row["env/reward_mean"] == pytest.approx(-row[toxic[0]], abs=1e-5)
    for name in ("model.safetensors", "value_head.safetensors", "report.html"):
        assert (tmp_path / name).is_file(), name
    out = results(tmp_path)
    assert all(isinstance(v, float) for v in (out["eval_toxic_logit_before"], out["eval_toxic_logit_after"]))


# ----- stack-llama ----------------------------------------------------------------------------------------------
def test_stack_llama_smoke_with_a_critic_from_the_reward_model(tmp_path):
    assert stack_llama.main(["--smoke", "--output_dir", str(tmp_path), "--critic_from_reward_model"]) == 0
    out = results(tmp_path)
    reward_dir, critic_dir = tmp_path / "reward", tmp_path / "ppo" / "critic"
    assert out["critic"] == str(reward_dir)
    assert out["critic_initial_max_abs_diff"] == 0.0  # the critic started as the reward model, head included
    reward, critic = load_file(reward_dir / "model.safetensors"), load_file(critic_dir / "model.safetensors")
    assert set(critic) == set(reward)
    assert changed(reward, critic)  # ... and was trained by PPO, staying close to where it started
    head = critic["score.weight"] - reward["score.weight"]
    assert head.norm() < 0.5 * reward["score.weight"].norm()
    assert out["reward_accuracy"][1] >= 0.75, out["reward_accuracy"]  # response_j is learnt to beat response_k
    for stage in ("sft", "reward", "ppo"):
        assert (tmp_path / stage / "model.safetensors").is_file(), stage
    assert len(out["ppo_reward_mean"]) == 2


def test_stack_llama_smoke_with_adapters_and_a_value_head(tmp_path):
    """--use_peft: every stage trains LoRA, merged before the next stage reads it; PPO's values come from
    the policy's value head, its reference is the adapter-disabled policy."""
    assert stack_llama.main(["--smoke", "--output_dir", str(tmp_path), "--use_peft"]) == 0
    out = results(tmp_path)
    assert out["critic"] is None and out["ref_model_is_none"] and not (tmp_path / "ppo" / "critic").exists()
    for stage in ("sft", "reward"):
        assert (tmp_path / stage / "adapter_model.safetensors").is_file()
        assert (tmp_path / stage / "merged" / "model.safetensors").is_file()
        assert not any("lora" in key for key in safetensors_keys(tmp_path / stage / "merged" / "model.safetensors"))
    assert (tmp_path / "ppo" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "ppo" / "value_head.safetensors").is_file()


# ----- dpo-qlora ------------------------------------------------------------------------------------------------
def check_merged_model(output_dir: Path) -> None:
    merged = output_dir / "merged"
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    assert not any("lora" in key for key in safetensors_keys(merged / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert type(model).__name__ == "LlamaForCausalLM"
    # DPO changed the weights it was merged into (the SFT model).
    assert changed(load_file(output_dir / "sft" / "merged" / "model.safetensors"),
                   load_file(merged / "model.safetensors"))


def test_dpo_qlora_smoke_in_full_precision_on_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dpo_qlora.main(["--smoke", "--output_dir", str(tmp_path)]) == 0
    assert "full-precision LoRA: no GPU" in capsys.readouterr().out  # the printed note
    out = results(tmp_path)
    assert not out["load_in_4bit"] and not out["sft_trained_quantized"] and not out["dpo_trained_quantized"]
    assert out["dpo_ref_model_is_none"] and out["dpo_eval_accuracy"] >= 0.75, out
    check_merged_model(tmp_path)


def test_dpo_qlora_smoke_in_4_bits_on_cpu(tmp_path):
    """--load_in_4bit forces QLoRA, which bitsandbytes >= 0.48 runs on a CPU too; the merged model is still
    full precision."""
    pytest.importorskip("bitsandbytes")
    assert dpo_qlora.main(["--smoke", "--load_in_4bit", "--output_dir", str(tmp_path)]) == 0
    out = results(tmp_path)
    assert out["load_in_4bit"] and out["sft_trained_quantized"] and out["dpo_trained_quantized"]
    assert not out["merged_is_quantized"]
    check_merged_model(tmp_path)


def test_dpo_qlora_chooses_4_bits_only_with_bitsandbytes_and_a_gpu(monkeypatch):
    pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dpo_qlora.choose_4bit(None) == (False, "full-precision LoRA: no GPU; pass --load_in_4bit to quantize "
                                                  "anyway")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dpo_qlora.choose_4bit(None)[0] is True
    assert dpo_qlora.choose_4bit(False)[0] is False
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` fails as if absent
    four_bit, why = dpo_qlora.choose_4bit(None)
    assert not four_bit and "pip install bitsandbytes" in why
    assert dpo_qlora.choose_4bit(True)[0] is True  # asked for: loading then fails with the install hint


def test_examples_default_to_hub_models_and_datasets():
    """Without --smoke the scripts name the classic recipes' models and datasets."""
    assert (sentiment_ppo.parse_args([]).model_name, sentiment_ppo.parse_args([]).reward_model) == (
        "lvwerra/gpt2-imdb", "lvwerra/distilbert-imdb")
    assert adapters_rlhf.parse_args([]).dataset_name == "stanfordnlp/imdb"
    detox = detoxify_ppo.parse_args([])
    assert (detox.reward_model, detox.dataset_name, detox.toxic_label) == (
        "facebook/roberta-hate-speech-dynabench-r4-target", "allenai/real-toxicity-prompts", "hate")
    assert stack_llama.parse_args([]).dataset_name == dpo_qlora.parse_args([]).dataset_name == (
        "lvwerra/stack-exchange-paired")
    assert stack_llama.parse_args(["--stages", "reward,ppo"]).stages == ["reward", "ppo"]
    with pytest.raises(SystemExit):
        stack_llama.parse_args(["--stages", "rl"])


# ----- RewardModelScorer(label=...): one label of a multi-label classifier --------------------------------------
@pytest.fixture()
def two_label_classifier(tmp_path, tokenizer):
    """A tiny DistilBERT-style (pooled) and a Llama-style (per-position score head) classifier, labels
    NEGATIVE/POSITIVE, saved with their tokenizer."""
    from transformers import (
        DistilBertConfig,
        DistilBertForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
    )

    labels = {"id2label": {0: "NEGATIVE", 1: "POSITIVE"}, "label2id": {"NEGATIVE": 0, "POSITIVE": 1}}
    torch.manual_seed(0)
    encoder = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=len(tokenizer), dim=32, n_layers=1, n_heads=2, hidden_dim=64, pad_token_id=tokenizer.pad_token_id,
        **labels))
    decoder = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        pad_token_id=tokenizer.pad_token_id, **labels))
    for name, model in (("encoder", encoder), ("decoder", decoder)):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    return tmp_path


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_scorer_reads_the_named_label_of_a_classifier(two_label_classifier, tokenizer, kind):
    path = str(two_label_classifier / kind)
    texts = ["the film was great.", "a dull and boring plot that went on and on."]
    scorer = RewardModelScorer(path, label="POSITIVE", batch_size=1)
    assert scorer.model.config.num_labels == 2  # loaded with all of its labels
    expected = []
    for text in texts:
        ids = torch.tensor([tokenizer(text).input_ids])
        with torch.no_grad():
            expected.append(scorer.model(input_ids=ids).logits[0, 1].item())  # one row: no padding question
    assert scorer.score_texts(texts) == pytest.approx(expected, abs=1e-5)
    assert RewardModelScorer(scorer.model, tokenizer, label=1).score_texts(texts) == pytest.approx(expected, abs=1e-5)
    assert RewardModelScorer(scorer.model, tokenizer, label="positive").label == 1  # any case
    negative = RewardModelScorer(scorer.model, tokenizer, label="NEGATIVE").score_texts(texts)
    assert negative != pytest.approx(expected, abs=1e-3)
    assert scorer.__name__.endswith("[POSITIVE]")
    # Padded batches read each text at its own end, as one-text batches do.
    ids = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        padded = sequence_scores(scorer.model, ids["input_ids"], ids["attention_mask"], label=1)
    assert padded.tolist() == pytest.approx(expected, abs=1e-5)


def test_scorer_without_a_label_refuses_a_multi_label_classifier(two_label_classifier, tokenizer):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(two_label_classifier / "encoder")
    with pytest.raises(ValueError, match=r"2 labels.*pass label="):
        RewardModelScorer(model, tokenizer)
    with pytest.raises(ValueError, match="no label 'toxic'.*POSITIVE"):
        RewardModelScorer(model, tokenizer, label="toxic")
    with pytest.raises(ValueError, match="out of range"):
        RewardModelScorer(model, tokenizer, label=2)
