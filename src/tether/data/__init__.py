"""Dataset formats, tokenization with loss masks, and collation, shared by every trainer."""

from .collate import LanguageModelingCollator, Seq2SeqCollator, collate_columns, pack_best_fit_decreasing
from .formats import DatasetError, DatasetFormat, DatasetType, detect_format
from .load import load_any_dataset
from .prepare import prepare_language_modeling, prepare_prompts, prepare_seq2seq

__all__ = [
    "DatasetError", "DatasetFormat", "DatasetType", "LanguageModelingCollator", "Seq2SeqCollator", "collate_columns",
    "detect_format", "load_any_dataset", "pack_best_fit_decreasing", "prepare_language_modeling",
    "prepare_prompts", "prepare_seq2seq",
]
