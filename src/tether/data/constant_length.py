"""Fixed-length rows from a stream of texts, for packed training on data read one example at a time.

Texts are read into a buffer of about `seq_length * num_of_sequences` tokens (estimated from their length in
characters), tokenized together, joined end to end with the EOS token after each, and cut into rows of exactly
`seq_length` tokens. Unlike tether's best-fit packing (data/collate.py), which needs the whole dataset and keeps
every sequence whole and on its own, rows here cut texts at row boundaries and a row's texts attend to each
other; in exchange it works on streams of any size (TRL's `ConstantLengthDataset`).
"""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset
from transformers import PreTrainedTokenizerBase

from .formats import DatasetError
from .tokenize import example_formatter
from .validate import RowCheck

logger = logging.getLogger(__name__)


class ConstantLengthDataset(IterableDataset):
    """Iterable of {"input_ids": [seq_length] long, "labels": [seq_length] long} (labels == input_ids).

    tokenizer: tokenizes the texts. dataset: any iterable of examples (a `datasets.Dataset`, a streaming
    `datasets.IterableDataset`, a list of dicts). dataset_text_field: the column holding the text, or
    formatting_func: example -> text (a batch-style function, batch -> list of texts, works too).
    infinite: start over at the end of the dataset instead of stopping (train with max_steps).
    seq_length: tokens per row. num_of_sequences, chars_per_token: the buffer holds about
    seq_length * num_of_sequences * chars_per_token characters of text. eos_token_id: the separator when the
    tokenizer has no EOS token. shuffle: shuffle the rows of each buffer. append_concat_token: put the
    separator after each text. add_special_tokens: let the tokenizer add its special tokens to each text.
    what: the split named by the error a text that is not a string raises (its row is its position in the data).

    The tokens left over after the last full row of a buffer start the next buffer, so only the final,
    partial row of the dataset is dropped. `len()` is the number of examples of `dataset` (TRL's
    convention), not the number of rows, and is undefined for a dataset without a length.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        dataset: Any,
        dataset_text_field: str | None = None,
        formatting_func: Callable | None = None,
        infinite: bool = False,
        seq_length: int = 1024,
        num_of_sequences: int = 1024,
        chars_per_token: float = 3.6,
        eos_token_id: int = 0,
        shuffle: bool = True,
        append_concat_token: bool = True,
        add_special_tokens: bool = True,
        what: str | None = None,
    ) -> None:
        if formatting_func is None and dataset_text_field is None:
            raise ValueError("ConstantLengthDataset needs dataset_text_field (the text column) or formatting_func "
                             "(example -> text).")
        for name, value in (("seq_length", seq_length), ("num_of_sequences", num_of_sequences),
                            ("chars_per_token", chars_per_token)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}.")
        if tokenizer.eos_token_id is None:
            warnings.warn(f"The tokenizer has no EOS token; texts are separated by eos_token_id={eos_token_id}. "
                          "Fix: pass the right eos_token_id if that is not the end-of-text token.",
                          UserWarning, stacklevel=2)
        self.tokenizer = tokenizer
        self.dataset = dataset
        self.dataset_text_field = dataset_text_field
        self.formatting_func = formatting_func
        self.infinite = infinite
        self.seq_length = seq_length
        self.max_buffer_size = seq_length * chars_per_token * num_of_sequences  # in characters
        self.concat_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else eos_token_id
        self.shuffle = shuffle
        self.append_concat_token = append_concat_token
        self.add_special_tokens = add_special_tokens
        self.what = what
        self.current_size = 0  # rows yielded so far, over all iterations

    def __len__(self) -> int:
        return len(self.dataset)

    def _texts(self) -> Iterator[str]:
        """The dataset's texts, in order; over and over if `infinite`."""
        to_text: Callable[[dict[str, Any]], str] | None = None
        while True:
            count = 0
            check = RowCheck(self.what, stream=not hasattr(self.dataset, "__len__"))
            for example in self.dataset:
                if to_text is None:
                    to_text = self._formatter(example)
                text = to_text(example)
                if not isinstance(text, str):  # a None would otherwise end the data early, silently
                    check.text(example, count, self.dataset_text_field, conversational=False)
                count += 1
                yield text
            if not self.infinite:
                return
            if count == 0:
                raise DatasetError("ConstantLengthDataset(infinite=True) got an empty dataset; it would loop "
                                   "forever.")
            logger.info("ConstantLengthDataset: the dataset reached its end; starting over.")

    def _formatter(self, example: dict[str, Any]) -> Callable[[dict[str, Any]], str]:
        if self.formatting_func is not None:
            return example_formatter(self.formatting_func, example)
        field = self.dataset_text_field
        if field not in example:
            raise DatasetError(f"The examples have no {field!r} field (they have {sorted(example)}). Fix: set "
                               "dataset_text_field to the text column, or pass formatting_func.")
        return lambda row: row[field]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        texts = self._texts()
        carry: list[int] = []  # tokens after the last full row of the previous buffer
        yielded = 0
        exhausted = False
        while not exhausted:
            buffer, chars = [], 0
            while chars < self.max_buffer_size:
                text = next(texts, None)
                if text is None:
                    exhausted = True
                    break
                buffer.append(text)
                chars += len(text)
            if not buffer:
                break
            stream = carry
            tokenized = self.tokenizer(buffer, add_special_tokens=self.add_special_tokens, truncation=False)
            for ids in tokenized["input_ids"]:
                stream.extend(ids)
                if self.append_concat_token:
                    stream.append(self.concat_token_id)
            full = len(stream) // self.seq_length * self.seq_length
            rows = [stream[i:i + self.seq_length] for i in range(0, full, self.seq_length)]
            carry = stream[full:]
            if self.shuffle:
                random.shuffle(rows)  # the global RNG, so set_seed makes the order reproducible
            for row in rows:
                self.current_size += 1
                yielded += 1
                ids = torch.tensor(row, dtype=torch.long)
                yield {"input_ids": ids, "labels": ids.clone()}
        if yielded == 0:
            warnings.warn(f"ConstantLengthDataset yielded no row: the dataset has fewer than seq_length="
                          f"{self.seq_length} tokens in all. Fix: lower seq_length or add data.",
                          UserWarning, stacklevel=2)
