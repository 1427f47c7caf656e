"""Tags that say which library and method trained a model, for its model card and the Hub.

A trainer tags its model once (`tag_model`, through transformers' `PreTrainedModel.add_model_tags`): the tags
then ride on `model.model_tags`, which `Trainer.push_to_hub` and `PreTrainedModel.push_to_hub` copy into the
model card's metadata. `card_tags` gives the tag list for a model card written locally (`create_model_card`).
"""

from __future__ import annotations

from typing import Any

LIBRARY_TAG = "tether"

# Trainer class name -> its method tag. The names follow TRL's, so a model card reads the same ("sft", "dpo",
# "reward-trainer", ...); the library tag is tether's. A subclass inherits its nearest base's tag.
METHOD_TAGS = {
    "SFTTrainer": "sft",
    "IterativeSFTTrainer": "iterative-sft",
    "RewardTrainer": "reward-trainer",
    "DPOTrainer": "dpo",
    "KTOTrainer": "kto",
    "ORPOTrainer": "orpo",
    "CPOTrainer": "cpo",
    "GRPOTrainer": "grpo",
    "RLOOTrainer": "rloo",
    "PPOTrainer": "ppo",
    "OnlineDPOTrainer": "online-dpo",
    "GKDTrainer": "gkd",
    "DistillationTrainer": "distillation",
}


def trainer_tags(trainer_class: type) -> list[str]:
    """["tether", <method tag>] for a trainer class, plus any `_tag_names` a subclass declares (the class
    attribute TRL's trainers use; code written for TRL may set it on its own subclass, e.g.
    `_tag_names = ["trl", "my-method"]`). The method tag comes from the nearest class in the MRO that is
    listed in METHOD_TAGS; a class outside it gets the library tag only. No duplicates, order kept."""
    tags = [LIBRARY_TAG]
    method = next((METHOD_TAGS[c.__name__] for c in trainer_class.__mro__ if c.__name__ in METHOD_TAGS), None)
    if method is not None:
        tags.append(method)
    for tag in getattr(trainer_class, "_tag_names", None) or []:
        if tag not in tags:
            tags.append(tag)
    return tags


def _taggable(model: Any) -> Any:
    """The object whose `add_model_tags` to call: the model itself (a PreTrainedModel, or a PeftModel, which
    forwards the call to its base model), else the language model inside a value-head wrapper."""
    for candidate in (model, getattr(model, "pretrained_model", None)):
        if candidate is not None and callable(getattr(candidate, "add_model_tags", None)):
            return candidate
    return None


def tag_model(model: Any, tags: list[str]) -> None:
    """Add `tags` to `model.model_tags` (kept in order, no duplicates). A model that cannot carry tags (a
    plain nn.Module) is left as it is: tags are metadata, never a reason to fail."""
    target = _taggable(model)
    if target is not None:
        target.add_model_tags(list(tags))


def model_tags(model: Any) -> list[str]:
    """The tags `model` carries (see tag_model); [] when none."""
    target = _taggable(model)
    return list(getattr(target, "model_tags", None) or []) if target is not None else []


def card_tags(model: Any, tag_names: list[str], tags: str | list[str] | None = None) -> list[str]:
    """Tags for a model card: the caller's `tags` (one string or a list) first, then the trainer's
    `tag_names` and the tags the model already carries; "unsloth" for a model patched by unsloth (its config
    has `unsloth_version`), as TRL does. No duplicates."""
    out: list[str] = [tags] if isinstance(tags, str) else list(tags or [])
    extra = [*tag_names, *model_tags(model)]
    if getattr(getattr(model, "config", None), "unsloth_version", None) is not None:
        extra.append("unsloth")
    for tag in extra:
        if tag not in out:
            out.append(tag)
    return out


def merge_hub_tags(model: Any, tag_names: list[str], kwargs: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """`kwargs` for `push_to_hub` with the trainer's `tag_names` added to its `tags` (TRL's
    `trl_sanitze_kwargs_for_tagging`).

    The user's tags (a list or one string) are kept and the trainer's added; a model patched by unsloth
    (its config has `unsloth_version`) is also tagged "unsloth". Returns a new dict (neither `kwargs` nor
    `tag_names` is modified), or None when kwargs is None.
    """
    tags = list(tag_names)
    if getattr(getattr(model, "config", None), "unsloth_version", None) is not None and "unsloth" not in tags:
        tags.append("unsloth")
    if kwargs is None:
        return None
    out = dict(kwargs)
    user_tags = out.get("tags")
    if user_tags is None:
        out["tags"] = tags
    elif isinstance(user_tags, str):
        out["tags"] = [*tags, user_tags]
    else:
        out["tags"] = [*user_tags, *(t for t in tags if t not in user_tags)]
    return out
