"""Tags for the model card a trainer pushes to the Hub (`push_to_hub(tags=...)`)."""

from __future__ import annotations

from typing import Any


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
