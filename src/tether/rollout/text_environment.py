"""TextEnvironment: TRL 0.7's classic loop of a model calling tools, for PPOTrainer.step.

Each query becomes `prompt + query`, the first (system) segment of a `TextHistory`. Then, for at most
`max_turns` turns, over every episode still running:

    1. generate: the model continues each history (batched, tether's sampler), stopping at `<call>` or
       `<submit>`; its tokens become a model segment
    2. end check: an episode ends when the model did not call a tool (no `<request>...<call>`), submitted
       (`<submit>`), produced the EOS token, or when the history passed `max_length` tokens (truncated)
    3. tool call: `<request><ToolName>query<call>` in the model's segment -> the tool's answer (through
       `rollout.tools.call_tool`: errors become text, a hung tool is abandoned after `tool_timeout`, the
       answer is cut to `max_tool_response` characters) + `<response>`, appended as a system segment

Last, `reward_fn(last segments, **run kwargs)` gives each episode its reward. `run` returns, per episode,
the query tokens (the first segment), the response tokens (everything after it: model and tool tokens) and
the response mask (1 at model tokens): PPOTrainer.step(queries, responses, rewards, masks) trains the
model's own tokens only.

Tools are user code: a dict name -> callable (str -> str), or a list of callables named by their class name
(TRL 0.7 did so: the hub tools' class names, e.g. `SimpleCalculatorTool`, are the names its example prompts
use), or their __name__ for plain functions.

Differences from TRL 0.7.11, each a fix: `max_length` works (0.7.11 measured the length of an int and
raised); an unknown tool name answers "Unknown tool X." (0.7.11 meant to, but answered with a KeyError);
tool responses are tokenized without special tokens (a BOS-adding tokenizer put a BOS in the middle of
the history); the EOS check looks at the text after the query only (an EOS string in a few-shot prompt
ended every episode at once); tool calls are contained by call_tool (timeout, error text).

Shapes: q = query tokens, r = response tokens.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..models.forward import unwrap_model
from .generation import generate_responses
from .text_history import TextHistory
from .tools import CALL, REQUEST, RESPONSE, SUBMIT, call_tool, parse_classic_call, tool_name, truncate_text

_UNSET = object()


class TextEnvironment:
    """The classic tool-use environment (TRL 0.7.11's signature; see the module docstring).

    model: the policy (e.g. AutoModelForCausalLMWithValueHead), decoder-only; tokenizer: its tokenizer;
    tools: dict name -> callable, or a list of callables; reward_fn(texts, **kwargs) -> one reward per
    episode (user code; texts are the episodes' last segments); prompt: text put before every query
    (usually few-shot examples of the call syntax); max_turns: model turns per episode (>= 1);
    max_tool_response: characters of a tool's answer kept; max_length: tokens an episode may reach before it
    is ended as truncated (None: no limit); generation_kwargs: generate() arguments per turn (do_sample,
    top_k, top_p, max_new_tokens, eos_token_id, pad_token_id, ...). tool_timeout: seconds a tool call may take
    (None: no limit). `max_tool_reponse` is TRL 0.7.11's spelling of max_tool_response.
    """

    def __init__(self, model: Any = None, tokenizer: Any = None,
                 tools: Mapping[str, Callable[[str], Any]] | Sequence[Callable[[str], Any]] | None = None,
                 reward_fn: Callable[..., Sequence[Any]] | None = None, prompt: str | None = None,
                 max_turns: int = 4, max_tool_response: int = 100, max_length: int | None = None,
                 generation_kwargs: dict[str, Any] | None = None, *, tool_timeout: float | None = 10.0,
                 max_tool_reponse: Any = _UNSET) -> None:
        if max_tool_reponse is not _UNSET:
            warnings.warn("TextEnvironment(max_tool_reponse=...) is TRL 0.7.11's misspelling; pass "
                          "max_tool_response= instead.", FutureWarning, stacklevel=2)
            max_tool_response = max_tool_reponse
        _check_arguments(model, tokenizer, reward_fn, max_turns, max_tool_response, max_length)
        self.model = model
        self.tokenizer = tokenizer
        self.prompt = prompt or ""
        self.tools = resolve_tools(tools)
        self.reward_fn = reward_fn
        self.max_length = max_length
        self.request_token, self.call_token, self.response_token, self.submit_token = REQUEST, CALL, RESPONSE, SUBMIT
        self.max_turns = max_turns
        self.max_tool_response = max_tool_response
        self.tool_timeout = tool_timeout
        self.generation_kwargs = dict(generation_kwargs or {})
        self.is_encoder_decoder = False  # checked in _check_arguments: the history must continue the query
        self.current_device = next(model.parameters()).device

    # ----- the episode loop ----------------------------------------------------------------------------------
    def run(self, queries: Sequence[str], **rewards_kwargs: Any
            ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[Any], list[TextHistory]]:
        """Run one episode per query (a list of str); returns (queries [q] each, responses [r] each, masks [r]
        each, rewards, histories). `rewards_kwargs` (e.g. answers=...) go to reward_fn."""
        if isinstance(queries, str) or not queries:
            raise ValueError("TextEnvironment.run takes a non-empty list of query strings.")
        texts = [self.prompt + query for query in queries]
        histories = [TextHistory(text, self._tokenize(text, special_tokens=True), system=True) for text in texts]
        turns = 0
        while any(not history.completed for history in histories) and turns < self.max_turns:
            histories = self.generate(histories)  # 1. the model's turn
            histories = self.tasks_end_check(histories)  # 2. who is done
            histories = [self.step(history) for history in histories]  # 3. tool calls
            histories = self.tasks_end_check(histories, model_turn=False)
            turns += 1
        self.compute_reward(histories, **rewards_kwargs)
        queries_t, responses, masks = (list(x) for x in zip(*(h.split_query_response_tokens() for h in histories)))
        return queries_t, responses, masks, [history.reward for history in histories], histories

    def step(self, history: TextHistory) -> TextHistory:
        """Answer the tool call that ended the history's last model segment (if the episode goes on)."""
        truncated, ended = self.task_end_check(history)
        if ended:
            history.complete(truncated=truncated)
        if history.completed:
            return history
        response = self._answer(history.last_text_segment)
        text = response + self.response_token
        history.append_segment(text, self._tokenize(text, special_tokens=False), system=True)
        return history

    def _answer(self, segment: str) -> str:
        tool, query = self.parse_tool_call(segment)
        if tool is None or query is None:
            answer = f"Unknown tool call: {segment}"
        elif tool not in self.tools:
            answer = f"Unknown tool {tool}."
        else:
            answer = call_tool(self.tools[tool], query, timeout=self.tool_timeout, max_chars=None).text
        return truncate_text(answer, self.max_tool_response)[0]

    def parse_tool_call(self, text: str) -> tuple[str | None, str | None]:
        """(tool name, query) of the first `<request><name>query<call>` in text, or (None, None) (see
        `rollout.tools.parse_classic_call`)."""
        return parse_classic_call(text, self.request_token, self.call_token)

    def compute_reward(self, histories: list[TextHistory], **reward_kwargs: Any) -> list[TextHistory]:
        """Set each history's reward: reward_fn(last text segments, **reward_kwargs), one per history."""
        rewards = list(self.reward_fn([history.last_text_segment for history in histories], **reward_kwargs))
        if len(rewards) != len(histories):
            raise ValueError(f"reward_fn returned {len(rewards)} rewards for {len(histories)} episodes; it must "
                             "return one per text it is given.")
        for history, reward in zip(histories, rewards):
            history.reward = reward
        return histories

    # ----- ends of episodes ------------------------------------------------------------------------------------
    def tasks_end_check(self, histories: list[TextHistory], model_turn: bool = True) -> list[TextHistory]:
        """Complete every running history whose episode is over (see task_end_check)."""
        for history in histories:
            if not history.completed:
                truncated, ended = self.task_end_check(history, model_turn=model_turn)
                if ended:
                    history.complete(truncated=truncated)
        return histories

    def task_end_check(self, history: TextHistory, model_turn: bool = True) -> tuple[bool, bool]:
        """(truncated, ended): ended past max_length tokens (truncated), at an EOS after the query, at
        `<submit>`, or, right after the model's turn, when that turn called no tool."""
        if history.completed:
            return False, False
        if self.max_length is not None and len(history.tokens) > self.max_length:
            return True, True
        eos = getattr(self.tokenizer, "eos_token", None)
        if eos and eos in history.text[history.text_spans[0][1]:]:
            return False, True
        last = history.last_text_segment
        if self.submit_token in last:
            return False, True
        called = self.request_token in last and self.call_token in last
        return False, model_turn and not called

    # ----- generation ------------------------------------------------------------------------------------------
    def generate(self, histories: list[TextHistory]) -> list[TextHistory]:
        """One model turn for every running history, batched; appended as model segments."""
        active = [i for i, history in enumerate(histories) if not history.completed]
        responses = self._generate_batched([histories[i].tokens for i in active])
        texts = self.tokenizer.batch_decode([response.tolist() for response in responses])
        for i, text, response in zip(active, texts, responses):
            histories[i].append_segment(text, response, system=False)
        return histories

    def _generate_batched(self, query_tensors: list[torch.Tensor], batch_size: int = 16,
                          pad_to_multiple_of: int | None = None) -> list[torch.Tensor]:
        """Responses [r] to the histories' tokens [t], each ending at `<call>`/`<submit>` (kept), at an EOS
        or at max_new_tokens. pad_to_multiple_of is accepted for TRL's signature; tether's sampler pads
        nothing it does not need."""
        kwargs = dict(self.generation_kwargs)
        pad = kwargs.pop("pad_token_id", None)
        pad = self.tokenizer.pad_token_id if pad is None else pad
        pad = self.tokenizer.eos_token_id if pad is None else pad
        return generate_responses(unwrap_model(self.model), query_tensors, pad, batch_size,
                                  stop_strings=[self.call_token, self.submit_token], tokenizer=self.tokenizer,
                                  **kwargs)

    def _tokenize(self, text: str, special_tokens: bool) -> torch.Tensor:
        ids = self.tokenizer(text, add_special_tokens=special_tokens, return_tensors="pt").input_ids[0]  # [s]
        return ids.to(self.current_device)


def resolve_tools(tools: Any) -> dict[str, Callable[[str], Any]]:
    """TextEnvironment's tools as a dict name -> callable, checked; see the module docstring for names."""
    if tools is None or isinstance(tools, (str, bytes)):
        raise ValueError("TextEnvironment needs tools: a dict {'ToolName': callable} or a list of callables "
                         "(named by their class name), e.g. tools={'Calculator': tether.rollout.tools.Calculator()}.")
    if isinstance(tools, Mapping):
        named = list(tools.items())
    else:
        named = [(tool_name(tool), tool) for tool in tools]
    resolved: dict[str, Callable[[str], Any]] = {}
    for name, tool in named:
        if not isinstance(name, str) or not name or any(c in name for c in "<>"):
            raise ValueError(f"tools: {name!r} is not a usable tool name (a non-empty string without '<' or '>', "
                             "as the model writes it in <request><Name>).")
        if not callable(tool):
            raise ValueError(f"tools[{name!r}] is a {type(tool).__name__}, not callable: give a function str -> str "
                             "or an object with __call__.")
        if name in resolved:
            raise ValueError(f"tools: two tools are named {name!r}; pass a dict to name them apart.")
        resolved[name] = tool
    if not resolved:
        raise ValueError("tools is empty: give at least one tool.")
    return resolved


def _check_arguments(model: Any, tokenizer: Any, reward_fn: Any, max_turns: int, max_tool_response: int,
                     max_length: int | None) -> None:
    if model is None or tokenizer is None:
        raise ValueError("TextEnvironment needs model= and tokenizer=.")
    if getattr(getattr(unwrap_model(model), "config", None), "is_encoder_decoder", False):
        raise ValueError("TextEnvironment needs a decoder-only model: each turn continues the history's tokens.")
    if not callable(reward_fn):
        raise ValueError("reward_fn must be callable: reward_fn(texts, **run_kwargs) -> one reward per text.")
    if not isinstance(max_turns, int) or max_turns < 1:
        raise ValueError(f"max_turns must be an int >= 1 (model turns per episode), got {max_turns!r}.")
    if not isinstance(max_tool_response, int) or max_tool_response < 1:
        raise ValueError(f"max_tool_response must be an int >= 1 (characters of a tool answer kept), got "
                         f"{max_tool_response!r}.")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be None or an int >= 1 (tokens per episode), got {max_length!r}.")
