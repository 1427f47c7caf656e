"""TextHistory: one episode of a classic TextEnvironment (TRL 0.7), as text and tokens split into segments.

A segment is either the system's (the prompt and task, tool responses) or the model's (what it generated).
`tokens` [t] holds every segment's tokens in order and `token_masks` [t] is 1 at the model's tokens and 0 at
the system's: the mask that tells PPO which response tokens it may train (a tool's output never is).
`text_spans` / `token_spans` are each segment's [start, end) in `text` / `tokens`; `system_spans` whether
each segment is the system's. The first segment is the query; everything after it is the response.

Shapes: t = tokens of the whole history, q = query tokens, r = response tokens.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any

import torch


class TextHistory:
    """The segments of one episode: its text, its tokens and which of them the model produced.

    text: the first segment's text; tokens [q]: its token ids; system: whether it is the system's (the
    query always is, in TextEnvironment). `reward` is set by the environment at the end of `run`;
    `completed` / `truncated` by `complete`.
    """

    prompt_color = "black on grey85"
    system_color = "black on cyan3"
    model_color = "black on deep_sky_blue1"
    reward_color = "black on plum1"

    def __init__(self, text: str, tokens: torch.Tensor, system: bool = True) -> None:
        self.system_spans: list[bool] = []
        self.text_spans: list[tuple[int, int]] = []
        self.token_spans: list[tuple[int, int]] = []
        self.text = ""
        self.tokens = torch.zeros(0, dtype=torch.long, device=tokens.device)  # [t]
        self.token_masks = torch.zeros(0, dtype=torch.long, device=tokens.device)  # [t], 1 = model token
        self.completed = False
        self.truncated = False
        self.reward: Any = 0.0
        self.append_segment(text, tokens, system=system)

    def append_segment(self, text: str, tokens: torch.Tensor, system: bool = True) -> None:
        """Add a segment: its text and its token ids [s] (1-D), the system's or the model's."""
        if len(text) == 0 or len(tokens) == 0:
            raise ValueError(f"append_segment needs non-empty text and tokens, got {len(text)} characters and "
                             f"{len(tokens)} tokens.")
        if tokens.dim() != 1:
            raise ValueError(f"append_segment takes a 1-D tensor of token ids, got shape {tuple(tokens.shape)}.")
        tokens = tokens.to(device=self.tokens.device, dtype=torch.long)
        self.text_spans.append((len(self.text), len(self.text) + len(text)))
        self.text += text
        self.system_spans.append(system)
        self.token_spans.append((len(self.tokens), len(self.tokens) + len(tokens)))
        self.tokens = torch.cat([self.tokens, tokens])
        mask = torch.zeros_like(tokens) if system else torch.ones_like(tokens)
        self.token_masks = torch.cat([self.token_masks, mask])

    def complete(self, truncated: bool = False) -> None:
        """Mark the episode over (truncated: because it ran past the environment's max_length)."""
        self.completed = True
        self.truncated = truncated

    @property
    def last_text_segment(self) -> str:
        start, end = self.text_spans[-1]
        return self.text[start:end]

    def split_query_response_tokens(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(query [q], response [r], response mask [r]): the first segment, everything after it, and the
        mask of the latter (1 at model tokens): PPOTrainer.step's queries, responses and response_masks."""
        split = self.token_spans[0][1]
        return self.tokens[:split], self.tokens[split:], self.token_masks[split:]

    # ----- display (rich) -------------------------------------------------------------------------------------
    def text_view(self) -> Any:
        """The text as a rich `Text`, each segment coloured by its source (prompt, system, model), and the
        reward after it."""
        from rich.text import Text

        view = Text(self.text)
        for i, ((start, end), system) in enumerate(zip(self.text_spans, self.system_spans)):
            view.stylize(self._color(i, system), start, end)
        view.append(f"\n\nReward: {self.reward}", style=self.reward_color)
        return view

    def tokens_view(self, tokenizer: Any) -> Any:
        """The tokens as a rich `Text` (each token as the tokenizer spells it, space-separated), coloured like
        `text_view`."""
        from rich.text import Text

        view = Text()
        pieces = tokenizer.convert_ids_to_tokens(self.tokens.tolist())
        for i, ((start, end), system) in enumerate(zip(self.token_spans, self.system_spans)):
            for piece in pieces[start:end]:
                view.append(str(piece), style=self._color(i, system))
                view.append(" ")
        view.append(f"\n\nReward: {self.reward}", style=self.reward_color)
        return view

    def legend_view(self) -> Any:
        from rich.text import Text

        view = Text("\n\n(Colour Legend: ")
        for i, (name, color) in enumerate((("Prompt", self.prompt_color), ("System", self.system_color),
                                           ("Model", self.model_color), ("Reward", self.reward_color))):
            view.append("|" if i else "")
            view.append(name, style=color)
        view.append(")")
        return view

    def show_text(self, show_legend: bool = False) -> None:
        """Print the text, segments coloured by source (needs `rich`)."""
        self._print(self.text_view, show_legend)

    def show_tokens(self, tokenizer: Any, show_legend: bool = False) -> None:
        """Print the tokens, coloured by source (needs `rich`): tokenization surprises hidden in the text."""
        self._print(lambda: self.tokens_view(tokenizer), show_legend)

    def show_colour_legend(self) -> None:
        """Print which colour means which source (needs `rich`)."""
        self._print(None, True)

    def _color(self, segment: int, system: bool) -> str:
        if segment == 0:
            return self.prompt_color
        return self.system_color if system else self.model_color

    def _print(self, view: Any, show_legend: bool) -> None:
        if importlib.util.find_spec("rich") is None:
            warnings.warn("TextHistory.show_* need rich: pip install rich.", stacklevel=3)
            return
        from rich import print as rich_print

        if view is not None:
            rich_print(view())
        if show_legend:
            rich_print(self.legend_view())
