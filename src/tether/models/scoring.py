"""Scalar scores from sequence-classification (reward) models, read at each sequence's last real token.

transformers pools decoder classifiers at the last token that is not the pad id, which goes wrong
when pad and EOS share an id (GPT-2 style tokenizers) and the text ends with EOS. Here the score head's
per-position output is captured and read where the attention mask says the sequence ends, whatever
the padding side. Encoder classifiers (BERT style) pool internally and are used as they are.

Shapes: b = batch, t = tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from .forward import _final_hidden_states, accepts_argument, position_ids_from_mask, unwrap_model

_SCORE_HEAD_NAMES = ("score", "v_head")


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position with attention_mask 1 in each row: [b, t] -> [b]."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.to(positions.dtype)).argmax(-1)


def _score_head(model: nn.Module) -> nn.Module | None:
    inner = unwrap_model(model)
    for name in _SCORE_HEAD_NAMES:
        head = getattr(inner, name, None)
        if isinstance(head, nn.Module):
            return head
    return None


def sequence_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    label: int = 0) -> torch.Tensor:
    """One scalar per sequence, [b] (float32), differentiable. input_ids, attention_mask: [b, t].

    `label`: which output to read from a classifier with several (num_labels > 1); a reward model has one."""
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if accepts_argument(model, "position_ids"):
        inputs["position_ids"] = position_ids_from_mask(attention_mask)
    head = _score_head(model)
    if head is None:
        return model(**inputs).logits[:, label].float()  # [b, num_labels] -> [b]
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, _a, output: captured.append(output))
    try:
        model(**inputs, use_cache=False)
    finally:
        handle.remove()
    per_position = captured[-1][..., label]  # [b, t, num_labels] -> [b, t]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    return per_position[rows, last_token_index(attention_mask)].float()


def batch_sequence_scores(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`sequence_scores` for a collated batch: padded rows (attention_mask), or packed rows with
    `sequence_ids` [r, L] (-1 in padding), where each sequence's score is read at its last token: [n]."""
    if "sequence_ids" not in batch:
        return sequence_scores(model, batch["input_ids"], batch["attention_mask"])
    head = _score_head(model)
    if head is None:
        raise ValueError("Packed batches need a decoder reward model with a per-position score head.")
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, _a, output: captured.append(output))
    try:
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    finally:
        handle.remove()
    owners = batch["sequence_ids"].flatten()  # [r * L]
    real = owners >= 0
    num_sequences = int(owners.max()) + 1
    positions = torch.arange(owners.numel(), device=owners.device)
    last = torch.full((num_sequences,), -1, dtype=torch.long, device=owners.device)
    last = last.scatter_reduce(0, owners[real], positions[real], reduce="amax")  # flat index of each end
    return captured[-1][..., 0].flatten()[last].float()


def token_values(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The score head applied at every position, [b, t] (float32): a reward model used as a critic."""
    head = _score_head(model)
    if head is None:
        raise ValueError("A critic needs a decoder model with a per-position score head (e.g. a "
                         "LlamaForSequenceClassification reward model).")
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, _a, output: captured.append(output))
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              position_ids=position_ids_from_mask(batch["attention_mask"]), use_cache=False)
    finally:
        handle.remove()
    return captured[-1][..., 0].float()


@torch.no_grad()
def adapter_token_scores(model: nn.Module, adapter_name: str, score_head: nn.Module, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor | None = None, restore_adapter: str | None = None,
                         **kwargs: torch.Tensor) -> torch.Tensor:
    """The score head of a reward adapter at every position: [b, t, num_labels] float32, no gradient.

    `model` is a PEFT causal LM that also holds the reward adapter `adapter_name` (see
    `loading.load_reward_adapter`); that adapter computes the final hidden states (in eval mode), then
    `score_head` reads them, as the sequence classifier it was trained as would. Afterwards the adapter
    `restore_adapter` (default: the one active before) is active again, and training mode and every
    parameter's requires_grad are as they were (peft's `set_adapter` would make the reward adapter trainable).
    Positions are counted over real tokens, so left padding gives the scores of the unpadded sequence.
    """
    previous = model.active_adapter
    previous = restore_adapter or (previous[0] if isinstance(previous, (list, tuple)) else previous)
    trainable = [param.requires_grad for param in model.parameters()]
    was_training = model.training
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **kwargs}
    if "token_type_ids" in inputs and not accepts_argument(model, "token_type_ids"):
        inputs.pop("token_type_ids")  # tokenizers of some families return it; decoder LMs take none
    if "position_ids" not in inputs and accepts_argument(model, "position_ids"):
        inputs["position_ids"] = position_ids_from_mask(attention_mask)
    model.set_adapter(adapter_name)
    model.eval()
    try:
        hidden, _ = _final_hidden_states(model, inputs)  # [b, t, h]
        weight = next(score_head.parameters())
        return score_head(hidden.to(device=weight.device, dtype=weight.dtype)).float()  # [b, t, num_labels]
    finally:
        model.set_adapter(previous)
        for param, flag in zip(model.parameters(), trainable):
            param.requires_grad_(flag)
        model.train(was_training)
