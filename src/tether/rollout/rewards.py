"""Rewards for online methods: trained reward models as scorers, and plain Python reward functions.

A reward function is any callable `f(prompts, completions, **columns) -> list[float]`, one number per
completion; extra dataset columns arrive as keyword lists aligned with the completions. As in TRL, it may
return None for a completion it does not score (that function then counts for nothing there), may be
`async def` (several run concurrently), and receives `trainer_state` when it takes that keyword or
**kwargs. A trained reward model becomes one through `RewardModelScorer`, which re-tokenizes text with its
own tokenizer, so it may differ from the policy's.

Reward functions are user code, and may be slow or hang (a stuck request, a sandbox that never returns). A call
still running after `warn_after` seconds (default 10) logs a warning naming the function and the time so far;
with a `timeout`, a call running longer is abandoned and training stops with `RewardFunctionTimeout`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import numbers
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data.tokenize import render_chat, with_eos
from ..models.loading import (
    ensure_pad_token,
    load_reward_model,
    load_tokenizer,
    model_init_kwargs,
    model_name,
    resolve_model_source,
)
from ..models.scoring import sequence_scores
from .reward_limits import DEFAULT_WARN_AFTER

RewardFunction = Callable[..., Sequence[float]]

logger = logging.getLogger(__name__)

# When a timeout ends a call of several concurrent async functions whose event loop no longer answers: the
# extra seconds granted, past the timeout, to the per-function timers that name the one that hangs.
_ASYNC_GRACE = 1.0


class RewardFunctionError(ValueError):
    """A reward function raised, or returned something other than one finite number per completion."""


class RewardFunctionTimeout(RewardFunctionError, TimeoutError):
    """A reward function did not return within the timeout; training stops (its rewards are not made up)."""


def reward_function_name(func: Any) -> str:
    return getattr(func, "__name__", None) or type(func).__name__


def _accepts(func: Any, name: str) -> bool:
    """Whether `func` can be called with the keyword `name` (a parameter of that name, or **kwargs)."""
    try:
        parameters = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # builtins and some callables have no signature: do not guess
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _timeout_error(names: Sequence[str], timeout: float, n: int) -> RewardFunctionTimeout:
    which = f"Reward function {names[0]!r}" if len(names) == 1 else f"Async reward functions {list(names)}"
    return RewardFunctionTimeout(
        f"{which} did not return within reward_timeout={timeout:g} s (one call on {n} completions). Training "
        "stops here rather than go on without its rewards. The call was abandoned, but Python cannot stop a "
        "thread, so it may still be running in the background until this process exits. Fix: make the function "
        "faster or find where it hangs (a network call without a timeout?), or raise reward_timeout (None: no "
        "limit).")


def _warn_slow(names: Sequence[str], started: float, n: int) -> None:
    which = f"Reward function {names[0]!r}" if len(names) == 1 else f"Reward functions {list(names)}"
    logger.warning("%s has been running for %.1f s on %d completions and has not returned yet; still waiting "
                   "(reward_timeout stops a call that hangs; reward_warn_after sets when this warning comes).",
                   which, time.monotonic() - started, n)


def _watched(call: Callable[[], Any], names: Sequence[str], n: int, timeout: float | None,
             warn_after: float | None) -> Any:
    """call()'s result, with a warning once it has run `warn_after` seconds and, with a `timeout`,
    RewardFunctionTimeout once it has run that long. Without a timeout the call runs in this thread (a timer
    thread only warns); with one it runs in a daemon worker thread, which is abandoned on timeout (Python
    cannot kill a thread). The worker keeps this thread's grad mode, as the call would have here."""
    started = time.monotonic()
    if timeout is None:
        timer = None
        if warn_after is not None:
            timer = threading.Timer(warn_after, _warn_slow, args=(names, started, n))
            timer.daemon = True
            timer.start()
        try:
            return call()
        finally:
            if timer is not None:
                timer.cancel()
    outcome: dict[str, Any] = {}
    grad_enabled = torch.is_grad_enabled()

    def run() -> None:
        try:
            with torch.set_grad_enabled(grad_enabled):
                outcome["value"] = call()
        except BaseException as error:  # noqa: BLE001 (handed to the waiting thread, which re-raises it)
            outcome["error"] = error

    worker = threading.Thread(target=run, name=f"reward:{names[0]}", daemon=True)
    worker.start()
    if warn_after is not None and warn_after < timeout:
        worker.join(warn_after)
        if worker.is_alive():
            _warn_slow(names, started, n)
    worker.join(max(0.0, timeout - (time.monotonic() - started)))
    if worker.is_alive():
        raise _timeout_error(names, timeout, n)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


async def _watched_async(awaitable: Awaitable, name: str, n: int, timeout: float | None,
                         warn_after: float | None) -> Any:
    """The awaitable's result, or a RewardFunctionTimeout after `timeout` seconds (the coroutine is then
    cancelled); a warning once it has run `warn_after` seconds."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    warning = loop.call_later(warn_after, _warn_slow, [name], started, n) if warn_after is not None else None
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except asyncio.TimeoutError:
        return _timeout_error([name], timeout, n)
    finally:
        if warning is not None:
            warning.cancel()


def _await_all(awaitables: list[Awaitable], names: Sequence[str] = (), n: int = 0, timeout: float | None = None,
               warn_after: float | None = None) -> list[Any]:
    """Results of the awaitables, run concurrently on an event loop (a fresh thread's when this thread
    already runs one, e.g. in a notebook); exceptions are returned in place of their results. Each gets the
    slow warning and the timeout of `_watched_async`; a coroutine that blocks the loop itself (a sync sleep
    inside `async def`) is caught by a timeout on the whole gather."""
    names = list(names) or [f"async#{i}" for i in range(len(awaitables))]

    async def gather() -> list[Any]:
        watched = [_watched_async(a, name, n, timeout, warn_after) for a, name in zip(awaitables, names)]
        return await asyncio.gather(*watched, return_exceptions=True)

    try:
        asyncio.get_running_loop()
        in_loop = True
    except RuntimeError:
        in_loop = False
    if timeout is not None:  # in a worker thread, so that a blocked event loop cannot block training
        try:
            return _watched(lambda: asyncio.run(gather()), names, n, timeout + _ASYNC_GRACE, None)
        except RewardFunctionTimeout:
            raise _timeout_error(names, timeout, n) from None
    if not in_loop:
        return asyncio.run(gather())
    results: list[Any] = []
    worker = threading.Thread(target=lambda: results.extend(asyncio.run(gather())))
    worker.start()
    worker.join()
    return results


def _invoke(func: RewardFunction, prompts: list[Any], completions: list[Any], columns: dict[str, list[Any]],
            context: dict[str, Any]) -> Any:
    """func's raw output (or a coroutine, for an async function, or the exception it raised). `context` holds
    what TRL hands reward functions besides the data (trainer_state, log_extra, log_metric): each is passed
    when given and when the function takes it (by name or **kwargs)."""
    extra = {key: value for key, value in context.items() if value is not None and _accepts(func, key)}
    try:
        return func(prompts=prompts, completions=completions, **columns, **extra)
    except Exception as error:  # noqa: BLE001 (named and re-raised by _check_values)
        return error


def _as_real(value: Any) -> Any:
    """A real scalar of any kind (numpy scalar, 0-d tensor or array) as a Python number; anything else as it is."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, numbers.Real):
        return float(value)
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # 0-d torch tensor / numpy array
        item = value.item()
        return float(item) if isinstance(item, numbers.Real) and not isinstance(item, bool) else value
    return value


def _check_values(func: RewardFunction, values: Any, n: int) -> torch.Tensor:
    """One function's output as [n] float32: finite numbers, and NaN where it returned None."""
    name = reward_function_name(func)
    if isinstance(values, Exception):  # re-raised with the function named, the original chained
        raise RewardFunctionError(f"Reward function {name!r} raised {type(values).__name__}: {values}") from values
    if hasattr(values, "tolist"):  # tensors and numpy arrays
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise RewardFunctionError(
            f"Reward function {name!r} returned {type(values).__name__}; it must return a list of "
            f"{n} floats, one per completion (None for one it does not score)."
        )
    if len(values) != n:
        raise RewardFunctionError(
            f"Reward function {name!r} returned {len(values)} values for {n} completions. "
            "Fix: return exactly one float per completion, in order."
        )
    values = [_as_real(v) for v in values]  # numpy scalars and 0-d tensors are numbers too
    for i, value in enumerate(values):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RewardFunctionError(
                f"Reward function {name!r} returned {value!r} for completion {i}; each reward must be a "
                "finite number, or None where the function does not apply (no NaN, inf or lists). Fix the "
                "function for that input."
            )
    return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)


def call_reward_functions(funcs: Sequence[RewardFunction], prompts: list[Any], completions: list[Any],
                          trainer_state: Any = None, log_extra: Callable[[str, list], None] | None = None,
                          log_metric: Callable[[str, float], None] | None = None,
                          reward_timeout: float | None = None, reward_warn_after: float | None = DEFAULT_WARN_AFTER,
                          **columns: list[Any]) -> torch.Tensor:
    """Call every function (async ones concurrently) and check their outputs: [k, n] float32, NaN where a
    function returned None. log_extra(column, values) adds a column to the logged completions, log_metric(name,
    value) a scalar to the logged metrics (TRL 1.x's reward-function hooks).

    A call still running after `reward_warn_after` seconds logs a warning naming the function (None: never);
    one running past `reward_timeout` seconds raises RewardFunctionTimeout (None: wait for ever). Sync functions
    run one after the other, each with its own limits."""
    context = {"trainer_state": trainer_state, "log_extra": log_extra, "log_metric": log_metric}
    n = len(completions)
    outputs: list[Any] = []
    try:
        for func in funcs:  # an async function returns its coroutine at once: awaited, concurrently, below
            outputs.append(_watched(lambda f=func: _invoke(f, prompts, completions, columns, context),
                                    [reward_function_name(func)], n, reward_timeout, reward_warn_after))
    except RewardFunctionTimeout:
        for out in outputs:  # coroutines that will never run now: closed, so Python does not warn about them
            if inspect.iscoroutine(out):
                out.close()
        raise
    pending = [i for i, out in enumerate(outputs) if inspect.isawaitable(out)]
    if pending:
        names = [reward_function_name(funcs[i]) for i in pending]
        results = _await_all([outputs[i] for i in pending], names, n, reward_timeout, reward_warn_after)
        for i, result in zip(pending, results):
            if isinstance(result, RewardFunctionTimeout):
                raise result
            outputs[i] = result
    return torch.stack([_check_values(f, out, n) for f, out in zip(funcs, outputs)])


def call_reward_function(func: RewardFunction, prompts: list[Any], completions: list[Any],
                         **columns: list[Any]) -> torch.Tensor:
    """Call `func` and check its output: [n] float32, one finite value (or NaN for None) per completion."""
    return call_reward_functions([func], prompts, completions, **columns)[0]


class RewardModelScorer:
    """Scores text with a trained reward model: batched, without gradients, in its own tokenization.

    `scorer(prompts, completions)` follows the reward-function signature; `scorer.score_texts(texts)`
    scores whole texts. Conversational prompts/completions are rendered with the reward tokenizer's
    chat template.

    A classifier with several labels (a sentiment or toxicity model) scores by one of them: `label` is
    its name in the model's `id2label` (e.g. "POSITIVE") or its index, and the score is that label's
    logit. Negate it with a reward weight of -1 to reward its absence (e.g. toxicity).
    """

    def __init__(self, model: PreTrainedModel | str, tokenizer: PreTrainedTokenizerBase | None = None,
                 batch_size: int = 32, max_length: int | None = None, label: str | int | None = None,
                 load_kwargs: dict[str, Any] | None = None) -> None:
        load_kwargs = load_kwargs or {}
        if isinstance(model, str):
            model = load_reward_model(model, **load_kwargs) if label is None else _load_classifier(model, **load_kwargs)
        self.model = model.eval()
        self.label = classifier_label_index(model, label)
        self.is_reward_model = label is None  # scored as RewardTrainer trained it (see score_texts)
        self.tokenizer = tokenizer or load_tokenizer(model_name(model),
                                                     trust_remote_code=load_kwargs.get("trust_remote_code", False))
        ensure_pad_token(self.tokenizer, self.model)
        self.batch_size = batch_size
        self.max_length = max_length
        suffix = "" if label is None else f"[{model.config.id2label.get(self.label, self.label)}]"
        self.__name__ = f"reward_model:{model_name(model)}{suffix}"

    @torch.no_grad()
    def score_texts(self, texts: Sequence[str]) -> list[float]:
        device = next(self.model.parameters()).device
        # A reward model reads texts as RewardTrainer tokenized its pairs: EOS appended (the score is read where the
        # model learned to give it; without it, at the last word), then cut to max_length. A classifier read by
        # one of its labels (a sentiment model) gets the texts as its tokenizer gives them.
        encoded = [self.tokenizer(t)["input_ids"] for t in texts]
        if self.is_reward_model:
            encoded = [with_eos(self.tokenizer, ids) for ids in encoded]
        encoded = [ids[:self.max_length] for ids in encoded]
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))  # similar lengths pad less
        scores = [0.0] * len(texts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            batch = self.tokenizer.pad({"input_ids": [encoded[i] for i in chunk]}, return_tensors="pt")
            values = sequence_scores(self.model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                     label=self.label)
            for i, value in zip(chunk, values.tolist()):
                scores[i] = value
        return scores

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **_columns: Any) -> list[float]:
        texts = []
        for prompt, completion in zip(prompts, completions):
            if isinstance(completion, list):
                texts.append(render_chat(self.tokenizer, list(prompt) + list(completion)))
            else:
                texts.append(prompt + completion)
        return self.score_texts(texts)


def _load_classifier(name_or_path: str, **kwargs: Any) -> PreTrainedModel:
    """A sequence classifier with all of its labels (a reward model is loaded with one)."""
    from transformers import AutoModelForSequenceClassification

    name_or_path = resolve_model_source(name_or_path, "reward model")
    return AutoModelForSequenceClassification.from_pretrained(name_or_path, **model_init_kwargs(kwargs))


def classifier_label_index(model: PreTrainedModel, label: str | int | None) -> int:
    """The output index of `label`: a name in `config.id2label` (matched case-insensitively if need be) or an
    index; 0 for a one-output reward model given no label. A classifier with several outputs needs a label:
    reading the first one silently would reward, say, NEGATIVE."""
    config = model.config
    num_labels = getattr(config, "num_labels", 1)
    names = {int(i): name for i, name in (getattr(config, "id2label", None) or {}).items()}
    if label is None:
        if num_labels != 1:
            raise ValueError(f"{model_name(model)} is a classifier with {num_labels} labels {sorted(names.values())}; "
                             "pass label= the one to score by, e.g. RewardModelScorer(path, label='POSITIVE').")
        return 0
    if isinstance(label, int) and not isinstance(label, bool):
        if not 0 <= label < num_labels:
            raise ValueError(f"label={label} is out of range for {model_name(model)}, which has {num_labels} labels.")
        return label
    matches = [i for i, name in names.items() if name == label] or [
        i for i, name in names.items() if str(name).lower() == str(label).lower()]
    if len(matches) != 1:
        raise ValueError(f"{model_name(model)} has no label {label!r}; its labels are {names}.")
    return matches[0]


class RewardFunctions:
    """Several rewards as one: callables, reward models, or paths to reward models, with weights.

    `score(prompts, completions, **columns)` -> (weighted sum [n], each function's values {name: [n]}).
    """

    def __init__(self, reward_funcs: Any, reward_weights: Sequence[float] | None = None,
                 reward_processing_classes: Sequence[Any] | None = None,
                 load_kwargs: dict[str, Any] | None = None) -> None:
        funcs = [] if reward_funcs is None else reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not funcs:
            raise ValueError("No reward source provided: pass reward_funcs (a callable, a reward model, a path to "
                             "one, or a list of them).")
        if reward_processing_classes is None or not isinstance(reward_processing_classes, (list, tuple)):
            # one tokenizer (or none) for every reward model, as TRL takes a single object too
            reward_processing_classes = [reward_processing_classes] * len(funcs)
        if len(reward_processing_classes) != len(funcs):
            raise ValueError(f"{len(reward_processing_classes)} reward_processing_classes for {len(funcs)} reward "
                             "functions; give one per reward function (None for plain functions) or a single one.")
        tokenizers = list(reward_processing_classes)
        self.funcs = [self._as_function(f, tok, load_kwargs or {}) for f, tok in zip(funcs, tokenizers)]
        self.weights = torch.tensor(list(reward_weights) if reward_weights is not None else [1.0] * len(funcs))
        if len(self.weights) != len(self.funcs):
            raise ValueError(f"{len(self.weights)} reward_weights for {len(self.funcs)} reward functions.")
        names = [reward_function_name(f) for f in self.funcs]
        # The same function twice keeps one entry per position in the per-function results (name, name_1, ...).
        self.names = [name if names[:i].count(name) == 0 else f"{name}_{names[:i].count(name)}"
                      for i, name in enumerate(names)]

    @staticmethod
    def _as_function(func: Any, tokenizer: Any, load_kwargs: dict[str, Any]) -> RewardFunction:
        if isinstance(func, (str, torch.nn.Module)):
            return RewardModelScorer(func, tokenizer, load_kwargs=load_kwargs)
        if not callable(func):
            raise ValueError(f"Reward {func!r} is neither callable nor a reward model or its path.")
        return func

    def score(self, prompts: list[Any], completions: list[Any], trainer_state: Any = None,
              log_extra: Callable[[str, list], None] | None = None,
              log_metric: Callable[[str, float], None] | None = None, reward_timeout: float | None = None,
              reward_warn_after: float | None = DEFAULT_WARN_AFTER, **columns: list[Any]) -> tuple[torch.Tensor, dict]:
        """(weighted sum [n], {name: values [n]}); a function's None (NaN) counts for nothing in the sum, as in
        TRL; a completion no function scored gets 0, with a warning naming it. reward_timeout / reward_warn_after:
        see `call_reward_functions`."""
        values = call_reward_functions(self.funcs, prompts, completions, trainer_state, log_extra, log_metric,
                                       reward_timeout, reward_warn_after, **columns)  # [k, n]
        unscored = torch.isnan(values).all(0).nonzero().flatten().tolist()
        if unscored:
            warnings.warn(f"No reward function scored completion(s) {unscored[:10]} (all returned None); their "
                          "reward is 0.", UserWarning, stacklevel=2)
        return (self.weights[:, None] * values).nansum(0), dict(zip(self.names, values))
