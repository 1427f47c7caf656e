"""`trainer.evaluate(eval_dataset=raw)` as TRL users call it (issue 12, item 5): a raw dataset is prepared
the way training data is (once per dataset object), compute_metrics runs and its keys are logged."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from datasets import Dataset

from tether import DPOConfig, DPOTrainer, SFTTrainer

sys.path.insert(0, os.path.dirname(__file__))
from test_sft import config as sft_config  # noqa: E402

TEXTS = ["the film was great and the cast was fine.", "a dull plot and a long ending.", "i loved the music.",
         "the acting felt flat."]


def test_sft_evaluates_a_raw_dataset_with_compute_metrics(tiny_decoder_dir, tokenizer, tmp_path):
    seen = []

    def metrics(prediction):
        seen.append(prediction.predictions.shape)
        return {"rows_seen": float(prediction.predictions.shape[0])}

    trainer = SFTTrainer(tiny_decoder_dir, args=sft_config(tmp_path, per_device_eval_batch_size=2),
                         train_dataset=Dataset.from_dict({"text": TEXTS}), processing_class=tokenizer,
                         compute_metrics=metrics)
    raw = Dataset.from_dict({"text": TEXTS[:3]})
    first = trainer.evaluate(eval_dataset=raw)
    assert first["eval_rows_seen"] == 3.0 and np.isfinite(first["eval_loss"]) and len(seen) == 1
    again = trainer.evaluate(eval_dataset=raw)  # prepared once, the same loss
    assert again["eval_loss"] == pytest.approx(first["eval_loss"])
    both = trainer.evaluate(eval_dataset={"a": raw, "b": Dataset.from_dict({"text": TEXTS[3:]})})
    assert "eval_a_loss" in both and "eval_b_loss" in both
    with pytest.raises(Exception, match="text"):
        trainer.evaluate(eval_dataset=Dataset.from_dict({"body": TEXTS}))  # validated like training data


def test_dpo_evaluates_a_raw_preference_dataset(tiny_decoder_dir, tokenizer, tmp_path):
    pairs = Dataset.from_list([{"prompt": "the film", "chosen": " was great.", "rejected": " was dull."}] * 4)
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                     max_steps=1, report_to="none", save_strategy="no", max_length=64, max_prompt_length=32)
    trainer = DPOTrainer(tiny_decoder_dir, args=args, train_dataset=pairs, processing_class=tokenizer)
    out = trainer.evaluate(eval_dataset=pairs)
    assert out["eval_loss"] == pytest.approx(np.log(2), abs=1e-4)  # policy == reference: -log sigmoid(0)
    args.precompute_ref_log_probs = True
    precomputed = DPOTrainer(tiny_decoder_dir, args=args, train_dataset=pairs, processing_class=tokenizer)
    with pytest.raises(ValueError, match="released the reference"):
        precomputed.evaluate(eval_dataset=pairs)
