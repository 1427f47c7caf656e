"""TRL 1.x's public data collators, with its constructors and batch keys, built on tether's collation
(`LanguageModelingCollator`, `pad_rows`): TRL code that builds them, calls them, or passes them to a trainer
as `data_collator` runs unchanged.

- `DataCollatorForLanguageModeling` (trl.trainer.sft_trainer): rows of `input_ids` (+ `labels`, -100 where a
  token does not count) -> input_ids, labels, attention_mask [b, t]; padding-free: one row [1, N] with
  position_ids and the varlen-kernel keys. TRL 0.x code that builds transformers' collator of this name
  (`DataCollatorForLanguageModeling(tokenizer, mlm=False)`) gets transformers' collator.
- `DataCollatorForPreference` (trl.trainer.dpo_trainer): rows of `prompt_ids`, `chosen_ids`, `rejected_ids`
  -> input_ids, attention_mask, completion_mask [2b, t], chosen rows first.
- `RewardDataCollatorForPreference` (trl.trainer.reward_trainer's `DataCollatorForPreference`): rows of
  `chosen_ids`, `rejected_ids` (+ `margin`) -> input_ids, attention_mask [2b, t] (+ margin [b]).

Each also reads the rows tether's trainers prepare (`loss_mask`, `{chosen,rejected}_input_ids`/`_loss_mask`),
so a tether trainer given one trains as with its own collator.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from transformers import PreTrainedTokenizerBase

from .collate import IGNORE_INDEX, LanguageModelingCollator, _as_list, pad_rows, resolve_pad_to_multiple_of
from .preference import check_truncation_mode

_SIDES = ("chosen", "rejected")


def _positions_from_lengths(seq_lengths: list[int]) -> list[int]:
    """Position ids of a row packed from sequences of these lengths (each restarts at 0)."""
    return [p for length in seq_lengths for p in range(length)]


class DataCollatorForLanguageModeling(LanguageModelingCollator):
    """TRL 1.x's causal LM collator: pads `input_ids` with `pad_token_id` and `labels` (default: the input ids)
    with -100, on the right, to the longest row rounded up to `pad_to_multiple_of`.

    Returns input_ids, labels and attention_mask [b, t] (with `return_position_ids`, position_ids too); with
    `padding_free`, the whole batch as one row [1, N]: input_ids, labels (-100 at each sequence's first token),
    position_ids, cu_seq_lens_q/k [n + 1] int32, max_length_q/k and seq_idx [1, N] int32. Rows packed by TRL
    (`seq_lengths`) or by tether (`position_ids`) keep their sequence boundaries. Rows carrying tether's
    `loss_mask` get labels from it, and the batch keeps `loss_mask` [b, t] for tether's losses.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # TRL 0.x code builds transformers' collator under this name: DataCollatorForLanguageModeling(tokenizer, mlm=...)
        first = args[0] if args else kwargs.get("tokenizer")
        if "tokenizer" in kwargs or "mlm" in kwargs or isinstance(first, PreTrainedTokenizerBase):
            return transformers.DataCollatorForLanguageModeling(*args, **kwargs)
        return super().__new__(cls)

    def __init__(self, pad_token_id: int, padding_free: bool = False, return_position_ids: bool = False,
                 pad_to_multiple_of: int | None = None, return_tensors: str = "pt") -> None:
        if return_tensors != "pt":
            raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' (torch tensors) is supported, as in TRL.")
        super().__init__(pad_token_id, pad_to_multiple_of=resolve_pad_to_multiple_of(pad_to_multiple_of), flatten=padding_free)
        self.padding_free, self.return_position_ids, self.return_tensors = padding_free, return_position_ids, "pt"

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        rows, labels = [], []
        for example in examples:
            ids = _as_list(example["input_ids"])
            row: dict[str, Any] = {"input_ids": ids}
            if "loss_mask" in example:
                mask = _as_list(example["loss_mask"])
                label = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
            else:
                label = _as_list(example["labels"]) if "labels" in example else list(ids)
                mask = [value != IGNORE_INDEX for value in label]
            row["loss_mask"] = mask
            if "position_ids" in example:
                row["position_ids"] = _as_list(example["position_ids"])
            elif "seq_lengths" in example:
                row["position_ids"] = _positions_from_lengths(_as_list(example["seq_lengths"]))
            rows.append(row)
            labels.append(label)
        batch = super().__call__(rows)  # input_ids, loss_mask, and attention_mask or position_ids
        width = batch["input_ids"].shape[1]
        if self.padding_free:
            labels = [sum(labels, [])]
        out = {"input_ids": batch["input_ids"], "labels": pad_rows(labels, IGNORE_INDEX, width)}  # [b, t]
        if self.padding_free:
            positions = batch["position_ids"]  # [1, N]
            out["labels"][positions == 0] = IGNORE_INDEX  # nothing predicts a sequence's first token
            out["position_ids"] = positions
            starts = (positions[0] == 0).nonzero().flatten()
            cu_seq_lens = torch.cat([starts, torch.tensor([width])]).to(torch.int32)  # [n + 1]
            out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = cu_seq_lens
            out["max_length_q"] = out["max_length_k"] = int(cu_seq_lens.diff().max())
            out["seq_idx"] = torch.repeat_interleave(torch.arange(len(cu_seq_lens) - 1, dtype=torch.int32),
                                                     cu_seq_lens.diff())[None]  # [1, N]
        else:
            if "position_ids" in batch:
                out["position_ids"] = batch["position_ids"]
            elif self.return_position_ids:
                out["position_ids"] = pad_rows([range(len(r["input_ids"])) for r in rows], 0, width)
            out["attention_mask"] = (batch["attention_mask"] if "attention_mask" in batch  # packed rows have none
                                     else pad_rows([[1] * len(r["input_ids"]) for r in rows], 0, width))
        if any("loss_mask" in example for example in examples):
            out["loss_mask"] = batch["loss_mask"]
        return out


def _preference_sequences(example: dict[str, Any]) -> list[tuple[list[int], list[int]]]:
    """[(ids, completion mask)] for the chosen then the rejected side of one row: TRL's `prompt_ids` +
    `{side}_ids`, or tether's prepared `{side}_input_ids` with `{side}_loss_mask`."""
    if "chosen_loss_mask" in example:
        return [(_as_list(example[f"{side}_input_ids"]), [int(m) for m in example[f"{side}_loss_mask"]])
                for side in _SIDES]
    prompt = _as_list(example.get("prompt_ids") or [])
    return [(prompt + _as_list(example[f"{side}_ids"]), [0] * len(prompt) + [1] * len(example[f"{side}_ids"]))
            for side in _SIDES]


def _paired_batch(sequences: list[tuple[list[int], list[int]]], pad_token_id: int, pad_to_multiple_of: int | None
                  ) -> tuple[dict[str, torch.Tensor], int]:
    """(tether's batch of the sequences, its width) from `LanguageModelingCollator`."""
    collate = LanguageModelingCollator(pad_token_id, pad_to_multiple_of=pad_to_multiple_of)
    batch = collate([{"input_ids": ids, "loss_mask": [bool(m) for m in mask]} for ids, mask in sequences])
    return batch, batch["input_ids"].shape[1]


class DataCollatorForPreference:
    """TRL 1.x's DPO collator: for each row, prompt + chosen and prompt + rejected, each cut to `max_length`
    tokens ("keep_start": the first ones; "keep_end": the last ones), padded on the right.

    Returns input_ids, attention_mask, completion_mask [2b, t] (the b chosen rows, then the b rejected ones),
    and ref_chosen_logps / ref_rejected_logps [b] when the rows have them.
    """

    def __init__(self, pad_token_id: int, max_length: int | None = None, truncation_mode: str = "keep_start",
                 pad_to_multiple_of: int | None = None, return_tensors: str = "pt") -> None:
        check_truncation_mode(truncation_mode)
        self.pad_token_id, self.max_length, self.truncation_mode = pad_token_id, max_length, truncation_mode
        self.pad_to_multiple_of, self.return_tensors = resolve_pad_to_multiple_of(pad_to_multiple_of), return_tensors

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pairs = [_preference_sequences(example) for example in examples]
        sequences = [pair[k] for k in range(2) for pair in pairs]  # chosen rows first
        if self.max_length is not None:
            cut = slice(None, self.max_length) if self.truncation_mode == "keep_start" else slice(-self.max_length, None)
            sequences = [(ids[cut], mask[cut]) for ids, mask in sequences]
        batch, width = _paired_batch(sequences, self.pad_token_id, self.pad_to_multiple_of)
        out = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
               "completion_mask": pad_rows([mask for _, mask in sequences], 0, width)}  # [2b, t]
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                out[key] = torch.tensor([example[key] for example in examples])
        return out


class RewardDataCollatorForPreference:
    """TRL 1.x's reward collator (trl.trainer.reward_trainer.DataCollatorForPreference): the chosen then the
    rejected sequences, padded on the right to one width (rounded up to `pad_to_multiple_of`).

    Returns input_ids, attention_mask [2b, t], and margin [b] when the rows have one.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, return_tensors: str = "pt") -> None:
        self.pad_token_id, self.pad_to_multiple_of = pad_token_id, resolve_pad_to_multiple_of(pad_to_multiple_of)
        self.return_tensors = return_tensors

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pairs = [_preference_sequences(example) for example in examples]
        batch, _ = _paired_batch([pair[k] for k in range(2) for pair in pairs], self.pad_token_id,
                                 self.pad_to_multiple_of)
        out = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if "margin" in examples[0]:
            out["margin"] = torch.tensor([example["margin"] for example in examples], dtype=torch.float)
        return out
