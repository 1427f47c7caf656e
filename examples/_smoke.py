"""Offline stand-ins for the hub models and datasets of the examples, for their `--smoke` mode.

Each stand-in has the shape of the real thing, so an example runs the same code on both:
- datasets are `datasets.Dataset`s with the real dataset's columns (imdb's `text`/`label`,
  real-toxicity-prompts' nested `prompt.text`, stack-exchange-paired's `question`/`response_j`/`response_k`),
  filled with generated text;
- the policy is a tiny Llama with its own byte-level BPE tokenizer, briefly pretrained on that text so it
  writes something a classifier can judge (the hub policies are pretrained LMs too);
- classifiers are tiny DistilBERTs with their own WordPiece tokenizer (so, as with the hub models, the
  classifier reads text in another tokenization than the policy's) and named labels, briefly trained on
  labelled generated text so that their scores mean something.
Everything is built from configs and trained here in seconds; nothing is downloaded.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

import torch

from tether.demo.corpus import generate_reviews
from tether.demo.tiny import tiny_llama_config, train_tokenizer


def smoke_setup() -> None:
    """One thread (tiny matrices multiply several times faster on one thread than split over several, and
    much faster on a busy machine), and no per-map progress bars or load reports (the examples' prints stay)."""
    import datasets
    import transformers

    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# ----- data with the real datasets' columns ------------------------------------------------------------------
def imdb_rows(n: int, seed: int = 0) -> list[dict]:
    """Movie reviews as stanfordnlp/imdb has them: `text`, `label` (0 negative, 1 positive)."""
    reviews = [r for r in generate_reviews(3 * n, seed=seed) if r["sentiment"] != "neutral"][:n]
    return [{"text": r["text"], "label": int(r["sentiment"] == "positive")} for r in reviews]


# A handful of mild insults stand for toxic language; the rest of each sentence is shared.
TOXIC_WORDS = ("idiot", "moron", "loser", "stupid", "pathetic", "worthless", "clown", "dumb", "useless", "awful")
CLEAN_WORDS = ("friend", "genius", "hero", "kind", "helpful", "brilliant", "gem", "smart", "lovely", "great")
_OPENINGS = ("honestly, my neighbour is", "the guy at the store was", "everyone knows that you are",
             "i told my brother he is", "the new manager is", "my coworker said i am", "people online say she is",
             "to be fair, the referee was")
_ENDINGS = ("", " and everyone knows it.", ", to be honest.", " most of the time.", " in every way.")


def toxicity_sentences(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """(sentence, 1 if toxic else 0), balanced: an opening, then a toxic or a clean word or two."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        toxic = k % 2
        words = TOXIC_WORDS if toxic else CLEAN_WORDS
        article = rng.choice(("a", "such a", "a real", "a total"))
        out.append((f"{rng.choice(_OPENINGS)} {article} {rng.choice(words)}{rng.choice(_ENDINGS)}", toxic))
    return out


def real_toxicity_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows shaped like allenai/real-toxicity-prompts: `prompt` and `continuation`, each {"text", "toxicity"}."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        opening = rng.choice(_OPENINGS)
        toxicity = rng.uniform(0.0, 1.0)
        rows.append({"prompt": {"text": opening, "toxicity": toxicity},
                     "continuation": {"text": f" a {rng.choice(TOXIC_WORDS + CLEAN_WORDS)}.", "toxicity": toxicity}})
    return rows


# (task, a good answer, a bad answer): the good one is the accepted, up-voted kind.
_QA = (
    ("reverse a list", "use reversed(xs), or the slice xs[::-1] for a copy.", "you cannot, lists are fixed."),
    ("sort a dict by value", "use sorted(d.items(), key=lambda kv: kv[1]).", "dicts cannot be sorted at all."),
    ("read a file line by line", "open it in a with block and loop over the file.", "read the whole disk first."),
    ("merge two dicts", "use {**a, **b}, or a | b since python 3.9.", "copy every key by hand, always."),
    ("check if a key is in a dict", "use the in operator: key in d.", "catch every exception and hope."),
    ("remove duplicates from a list", "use list(dict.fromkeys(xs)) to keep the order.", "sort it three times."),
    ("count words in a string", "use collections.Counter(text.split()).", "count them on paper instead."),
    ("get the current date", "use datetime.date.today().", "ask a friend what day it is."),
    ("join a list of strings", "use ', '.join(items).", "add them one by one with plus in a loop."),
    ("make a copy of a list", "use xs.copy() or list(xs).", "assign it to a new name, that copies it."),
)
_QUESTIONS = ("how do i {task} in python?", "what is the best way to {task}?", "is there a simple way to {task}?")
_GOOD_OPENINGS = ("", "good question: ", "the usual way: ")
_BAD_OPENINGS = ("", "no idea, but ", "just guess: ")


def stack_exchange_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows shaped like lvwerra/stack-exchange-paired: `question`, `response_j` (the better-rated answer),
    `response_k` (the worse one)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        task, good, bad = rng.choice(_QA)
        rows.append({"question": rng.choice(_QUESTIONS).format(task=task),
                     "response_j": rng.choice(_GOOD_OPENINGS) + good, "response_k": rng.choice(_BAD_OPENINGS) + bad})
    return rows


# ----- tiny models -------------------------------------------------------------------------------------------
def _batches(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order += rng.sample(range(n), n)
    return [order[k * batch_size:(k + 1) * batch_size] for k in range(steps)]


def tiny_causal_lm(texts: Sequence[str], out_dir: str, steps: int = 60, seed: int = 0, hidden_size: int = 64,
                   num_layers: int = 2, vocab_size: int = 400) -> str:
    """A tiny Llama and its BPE tokenizer (trained on `texts`), pretrained `steps` steps on `texts` (each
    followed by EOS), saved to `out_dir`; returns `out_dir`, loadable like a hub id."""
    from transformers import AutoModelForCausalLM

    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    torch.manual_seed(seed)
    config = tiny_llama_config(len(tokenizer), hidden_size=hidden_size, num_layers=num_layers, max_positions=256,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                               bos_token_id=tokenizer.bos_token_id)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    encoded = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for rows in _batches(len(encoded), 16, steps, seed):
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def wordpiece_tokenizer(texts: Sequence[str], vocab_size: int = 300):
    """A lower-casing BERT-style WordPiece tokenizer ([CLS] text [SEP]) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    backend.train_from_iterator(texts, trainer=trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False))
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]",
                                   model_input_names=["input_ids", "attention_mask"])


def tiny_classifier(texts: Sequence[str], labels: Sequence[int], label_names: Sequence[str], out_dir: str,
                    steps: int = 60, seed: int = 0) -> tuple[str, float]:
    """A tiny DistilBERT sequence classifier with labels `label_names` and its own WordPiece tokenizer,
    trained `steps` steps on (texts, labels) (the last fifth held out), saved to `out_dir`.
    Returns (out_dir, held-out accuracy)."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    tokenizer = wordpiece_tokenizer(texts)
    torch.manual_seed(seed)
    model = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=len(tokenizer), dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_position_embeddings=256,
        dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, pad_token_id=tokenizer.pad_token_id,
        num_labels=len(label_names), id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)}))
    encoded = [tokenizer(t)["input_ids"] for t in texts]
    split = len(texts) - len(texts) // 5
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for rows in _batches(split, 16, steps, seed):
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors="pt")
        loss = model(**batch, labels=torch.tensor([labels[i] for i in rows])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        held_out = tokenizer.pad({"input_ids": encoded[split:]}, return_tensors="pt")
        predicted = model(**held_out).logits.argmax(-1)
    accuracy = float((predicted == torch.tensor(labels[split:])).float().mean())
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir, accuracy
