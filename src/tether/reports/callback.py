"""The `transformers.Trainer` side of run reports: a callback that records every log to metrics.jsonl,
and at the end of training writes a few sample generations and the report.

It is one more callback next to those `report_to` adds (TensorBoard, W&B, ...), and changes none of them.
"""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .page import write_report
from .runfiles import METRICS_FILE, SAMPLES_FILE, save_run_config, write_jsonl

# Methods whose trainers write samples.jsonl themselves while training (rollouts, with their rewards); for
# the others this callback writes greedy completions of a few train prompts at the end.
WRITE_THEIR_OWN_SAMPLES = frozenset({"grpo", "rloo", "ppo", "onlinedpo"})
TEXT_PREFIX_TOKENS = 8  # plain text has no prompt: this many of its first tokens stand in for one
ROWS_SEARCHED = 64  # rows of the train set searched for distinct prompts


def prompt_ids(row: dict[str, Any]) -> list[int] | None:
    """The prompt token ids of one prepared (tokenized) training row, whatever its method, or None.

    Prompt-only rows have `prompt_input_ids`; unpaired (KTO) rows `prompt_ids`; preference rows the first
    `prompt_length` ids of `chosen_input_ids`; seq2seq rows their encoder `input_ids`. Language modeling rows
    give the tokens before the first trained one (the prompt of prompt-completion data), or, when every token
    trains (plain text), the first few tokens of their (first packed) sequence, so the report still shows
    what the model writes.
    """
    row = {k: v.tolist() if hasattr(v, "tolist") else v for k, v in row.items()}  # tensor rows (streams) too
    if "prompt_input_ids" in row:
        return list(row["prompt_input_ids"])
    if "prompt_ids" in row:
        return list(row["prompt_ids"])
    if "chosen_input_ids" in row:
        return list(row["chosen_input_ids"][: row["prompt_length"]])
    if "labels" in row and row["labels"] != row.get("input_ids"):  # seq2seq: labels are the decoder's targets
        return list(row["input_ids"])
    if "input_ids" not in row:
        return None
    ids, positions, mask = list(row["input_ids"]), row.get("position_ids"), row.get("loss_mask")
    length = next((i for i in range(1, len(ids)) if positions[i] == 0), len(ids)) if positions else len(ids)
    start = next((i for i in range(length) if mask[i]), length) if mask else 0
    if start > 1:
        return ids[:start]
    return ids[: min(TEXT_PREFIX_TOKENS, max(1, length // 2))]


def _first_rows(dataset: Any, n: int) -> list[dict[str, Any]]:
    # A torch IterableDataset may define __len__ (ConstantLengthDataset does) but is never indexed.
    indexable = not isinstance(dataset, torch.utils.data.IterableDataset)
    if indexable and hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        return [dataset[i] for i in range(min(n, len(dataset)))]
    return list(itertools.islice(iter(dataset), n))


def generate_samples(model: nn.Module | None, tokenizer: Any, dataset: Any, num_samples: int = 4,
                     max_new_tokens: int = 48) -> list[dict[str, str]]:
    """Greedy completions of the first `num_samples` distinct prompts of a prepared train set, as
    {"prompt", "completion"} texts; [] for models that do not generate (reward models) or data without
    prompts. Run it on every process: under ZeRO-3 each one must take part in the forward passes."""
    if model is None or tokenizer is None or dataset is None:
        return []
    can_generate = getattr(model, "can_generate", None)
    if not callable(can_generate) or not can_generate():
        return []
    prompts: list[list[int]] = []
    for row in _first_rows(dataset, ROWS_SEARCHED):
        ids = prompt_ids(row)
        if ids and ids not in prompts:
            prompts.append(ids)
        if len(prompts) == num_samples:
            break
    if not prompts:
        return []
    from ..rollout.generation import generate_responses

    device = next(model.parameters()).device
    try:
        completions = generate_responses(model, [torch.tensor(ids, device=device) for ids in prompts],
                                         tokenizer.pad_token_id, batch_size=len(prompts),
                                         max_new_tokens=max_new_tokens, do_sample=False)
    except Exception as error:  # the run has trained and saved its metrics: a sample failure must not lose it
        warnings.warn(f"Could not generate sample completions for the report ({type(error).__name__}: {error}); "
                      "the report has none.", UserWarning, stacklevel=2)
        return []
    return [{"prompt": tokenizer.decode(ids, skip_special_tokens=True),
             "completion": tokenizer.decode(completion, skip_special_tokens=True)}
            for ids, completion in zip(prompts, completions)]


class RunReportCallback(TrainerCallback):
    """Writes into `output_dir`, from the main process:
    - `run_config.json` when training starts (the method, which decides the report's curves, and the args);
    - `metrics.jsonl`: every log, train and eval, one JSON object per line with its `step` (a new trainer
      starts a new file; a run resumed from a checkpoint starts it with the checkpoint's log history);
    - when training ends, `samples.jsonl` (greedy completions of a few train prompts; not for the methods
      of `WRITE_THEIR_OWN_SAMPLES`) and the report (`report.html`, `plots/`), rebuilt after every later log
      (e.g. a final `evaluate()`).
    """

    def __init__(self, method: str | None = None, num_samples: int = 4, max_new_tokens: int = 48) -> None:
        self.method = method
        self.num_samples = num_samples
        self.max_new_tokens = max_new_tokens
        self._new_file = True
        self._trained = False

    def _record(self, output_dir: str, rows: list[dict[str, Any]]) -> None:
        write_jsonl(Path(output_dir) / METRICS_FILE, rows, append=not self._new_file)
        self._new_file = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._trained = False
        if not state.is_world_process_zero:
            return
        save_run_config(args.output_dir, self.method, args.to_dict())
        if state.global_step > 0:  # resumed: the file then reads as one uninterrupted run
            self._record(args.output_dir, state.log_history)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        # Trainer.log appends the row ({**logs, "step"}) to log_history just before this call; that row is
        # the record, as `logs` is shared with the other callbacks (the progress printer pops total_flos).
        self._record(args.output_dir, [state.log_history[-1] if state.log_history else {**logs,
                                                                                        "step": state.global_step}])
        if self._trained:
            write_report(args.output_dir)

    def on_train_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                     processing_class: Any = None, train_dataloader: Any = None, **kwargs: Any) -> None:
        own_samples = self.method not in WRITE_THEIR_OWN_SAMPLES
        samples = generate_samples(model, processing_class, getattr(train_dataloader, "dataset", None),
                                   self.num_samples, self.max_new_tokens) if own_samples else []
        if state.is_world_process_zero:
            if own_samples:
                write_jsonl(Path(args.output_dir) / SAMPLES_FILE, [{"step": state.global_step, **s} for s in samples],
                            append=False)
            write_report(args.output_dir)
        self._trained = True
