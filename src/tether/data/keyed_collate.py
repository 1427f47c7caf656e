"""Collators for rows a user tokenized themselves, with TRL 0.7's column names.

- `RewardDataCollatorWithPadding`: rows with `input_ids_chosen`, `attention_mask_chosen`,
  `input_ids_rejected`, `attention_mask_rejected` (and optionally `margin`), as TRL 0.7's reward scripts
  build them, padded by the tokenizer.
- `DPODataCollatorWithPadding`: rows with `{prompt,chosen,rejected}_{input_ids,attention_mask,labels}`
  (and precomputed `*_logps`), prompts padded on the left so they end where the completion begins.

tether's trainers tokenize with their own collators (data/collate.py, data/preference.py); these serve
code that builds TRL-shaped batches itself. Shapes: b = batch, t = the longest row of a column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from .collate import pad_rows

_REWARD_KEYS = ("input_ids_chosen", "attention_mask_chosen", "input_ids_rejected", "attention_mask_rejected")


@dataclass
class RewardDataCollatorWithPadding:
    """Pads the chosen and the rejected sequences of a batch of pairs (each side to its own longest row,
    by `tokenizer.pad` with these padding settings).

    Returns input_ids_chosen, attention_mask_chosen, input_ids_rejected, attention_mask_rejected
    ([b, t] each), `return_loss=True` (so transformers' Trainer evaluates the loss), and `margin` [b]
    float when the rows have one.
    """

    tokenizer: PreTrainedTokenizerBase
    padding: bool | str = True
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def _pad_side(self, features: list[dict[str, Any]], side: str) -> Any:
        rows = [{"input_ids": f[f"input_ids_{side}"], "attention_mask": f[f"attention_mask_{side}"]}
                for f in features]
        return self.tokenizer.pad(rows, padding=self.padding, max_length=self.max_length,
                                  pad_to_multiple_of=self.pad_to_multiple_of, return_tensors=self.return_tensors)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        for i, feature in enumerate(features):
            missing = [key for key in _REWARD_KEYS if key not in feature]
            if missing:
                raise ValueError(f"RewardDataCollatorWithPadding: row {i} lacks {missing}; each row needs "
                                 f"{list(_REWARD_KEYS)} (tokenize chosen and rejected texts into them).")
        chosen, rejected = self._pad_side(features, "chosen"), self._pad_side(features, "rejected")
        batch: dict[str, Any] = {
            "input_ids_chosen": chosen["input_ids"],
            "attention_mask_chosen": chosen["attention_mask"],
            "input_ids_rejected": rejected["input_ids"],
            "attention_mask_rejected": rejected["attention_mask"],
            "return_loss": True,
        }
        if "margin" in features[0]:
            batch["margin"] = torch.tensor([f["margin"] for f in features], dtype=torch.float)
        return batch


@dataclass
class DPODataCollatorWithPadding:
    """Pads every `*_input_ids`, `*_attention_mask` and `*_labels` column to its longest row, as LongTensors
    [b, t]: input ids with `pad_token_id`, attention masks with 0, labels with `label_pad_token_id`.

    Decoder-only models (`is_encoder_decoder=False`): columns whose name contains "prompt" are padded on
    the left, the others on the right. Encoder-decoder models: everything on the right; prompt ids take
    the pad id, chosen/rejected/decoder columns the label pad id. `*_logps` columns become float tensors
    [b]; any other column stays a list.
    """

    pad_token_id: int | None = 0
    label_pad_token_id: int = -100
    is_encoder_decoder: bool | None = False

    def _padding_value(self, key: str) -> int:
        if key.endswith("_attention_mask"):
            return 0
        if self.is_encoder_decoder:
            if key.startswith("prompt") and key.endswith("_input_ids"):
                return self._pad_id()
            if key.startswith(("chosen", "rejected")) or "decoder" in key:
                return self.label_pad_token_id
            raise ValueError(f"DPODataCollatorWithPadding: unexpected column {key!r} for an encoder-decoder "
                             "model; expected prompt_*, chosen_*, rejected_* or *decoder* columns.")
        return self._pad_id() if key.endswith("_input_ids") else self.label_pad_token_id

    def _pad_id(self) -> int:
        if self.pad_token_id is None:
            raise ValueError("DPODataCollatorWithPadding: pad_token_id is None, so input ids cannot be padded. Fix: "
                             "set tokenizer.pad_token (e.g. tokenizer.pad_token = tokenizer.eos_token) and pass "
                             "pad_token_id=tokenizer.pad_token_id.")
        return self.pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        for key in features[0]:
            if key.endswith(("_input_ids", "_attention_mask", "_labels")):
                rows = [list(f[key]) for f in features]
                left = not self.is_encoder_decoder and "prompt" in key
                width = max(len(row) for row in rows)
                batch[key] = pad_rows(rows, self._padding_value(key), width, left, torch.long)  # [b, t]
            elif key.endswith("_logps"):  # reference log-probs computed beforehand, one per row
                batch[key] = torch.tensor([f[key] for f in features])
            else:
                batch[key] = [f[key] for f in features]
        return batch
