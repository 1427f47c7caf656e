"""Offline fixtures: a tokenizer trained here and tiny models built from configs, saved to disk so
loading by path is exercised. No hub access."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, T5Config, T5ForConditionalGeneration

from tether.demo.corpus import generate_reviews
from tether.demo.tiny import tiny_llama_config, train_tokenizer


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tiny models of the tests multiply tiny matrices, which run several times faster on one thread
    than split over several (and much faster when the machine is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


EXTRA_TEXT = [
    "the capital of france is paris.", "two plus two is four.", "hello world", "question: answer:",
    "user assistant system", "0 1 2 3 4 5 6 7 8 9",
]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    texts = [r["text"] for r in generate_reviews(600, seed=1)] + EXTRA_TEXT * 20
    tokenizer = train_tokenizer(texts, vocab_size=400)
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture()
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_decoder_dir(tmp_path_factory, tokenizer_dir):
    """A 2-layer Llama-style decoder saved with its tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer)), attn_implementation="sdpa")
    path = tmp_path_factory.mktemp("tiny-decoder")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture()
def tiny_decoder(tiny_decoder_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)


@pytest.fixture(scope="session")
def tiny_seq2seq_dir(tmp_path_factory, tokenizer_dir):
    """A 1+1-layer T5-style encoder-decoder saved with its tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=1, num_decoder_layers=1,
        num_heads=4, dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    model = T5ForConditionalGeneration(config)
    path = tmp_path_factory.mktemp("tiny-seq2seq")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def standins(tmp_path_factory):
    """Local stand-ins for the hub models and datasets TRL 0.7.11's example scripts load (trl_examples/)."""
    from trl_examples.standins import Standins

    return Standins(tmp_path_factory.mktemp("trl-standins"))


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory):
    """An empty HF_HOME for the example scripts' runs."""
    return tmp_path_factory.mktemp("hf-home")
