"""The console table of `log_completions`: prompts, completions, each reward function's value and the
advantage of recent completions, printed at logging steps (TRL prints it with rich; plain text here)."""

from __future__ import annotations

import json
import random
from typing import Any

_CELL = 60  # characters of a prompt or completion shown per cell


def _text(value: Any) -> str:
    """A prompt or completion as one line: plain text, or the messages' contents (role: content)."""
    if isinstance(value, list):
        value = " | ".join(f"{m.get('role', '?')}: {m.get('content', '')}" if isinstance(m, dict) else json.dumps(m)
                           for m in value)
    text = str(value).replace("\n", "\\n")
    return text if len(text) <= _CELL else text[: _CELL - 3] + "..."


def completions_table(rows: list[dict[str, Any]], step: int, num_rows: int | None = None,
                      unique_prompts: bool = False) -> str:
    """rows: {"prompt", "completion", <reward name>: float, ..., "advantage"} -> a text table titled with the
    step. unique_prompts keeps the first row of each distinct prompt; num_rows draws that many rows at random
    (seeded by the step, kept in order; None: all)."""
    if unique_prompts:
        seen: set[str] = set()
        rows = [r for r in rows if not (str(r["prompt"]) in seen or seen.add(str(r["prompt"])))]
    if num_rows is not None and num_rows < len(rows):
        chosen = sorted(random.Random(step).sample(range(len(rows)), num_rows))
        rows = [rows[i] for i in chosen]
    if not rows:
        return f"Step {step}: no completions"
    columns = list(rows[0])
    cells = [[f"{r.get(c):.2f}" if isinstance(r.get(c), float) else _text(r.get(c, "")) for c in columns]
             for r in rows]
    header = [c.capitalize() if c in ("prompt", "completion", "advantage") else c for c in columns]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(header)]

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"

    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    return "\n".join([f"Step {step}", rule, line(header), rule, *(line(r) for r in cells), rule])
