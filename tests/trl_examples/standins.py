"""Tiny local stand-ins for the hub models and datasets TRL 0.7.11's example scripts load.

Each stand-in is built on first use and saved under one root folder, so a script loads it by path exactly
as it would load the hub id. Models share one byte-level BPE tokenizer trained here; datasets are JSON-lines
files whose columns and splits match the hub datasets the scripts read. Nothing is downloaded.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import torch

from tether.demo.corpus import generate_reviews
from tether.demo.tiny import tiny_llama_config, train_tokenizer

# GPT-2 names its only special token this way; the examples set `pad_token = eos_token` themselves.
GPT2_EOS = "<|endoftext|>"
# Stand-ins that are `evaluate` modules -> the module's folder and file name.
EVALUATE_MODULES = {"toxicity-measurement": "toxicity", "accuracy-metric": "accuracy"}
# The vocabulary must cover every script's text; a small one keeps the tiny models tiny.
VOCAB_SIZE = 512


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def _write_config(folder: Path, config: str, splits: dict[str, list[dict]]) -> None:
    """A dataset folder whose README names one config (`load_dataset(folder, config, split=...)`)."""
    files = ""
    for split, rows in splits.items():
        _write_jsonl(folder / config / f"{split}.jsonl", rows)
        files += f"  - split: {split}\n    path: {config}/{split}.jsonl\n"
    (folder / "README.md").write_text(f"---\nconfigs:\n- config_name: {config}\n  data_files:\n{files}---\n")


def _long_reviews(n: int, min_chars: int, seed: int) -> list[dict]:
    """IMDB-like rows (text, label) of at least `min_chars` characters, made of synthetic review sentences."""
    rng = random.Random(seed)
    pool = generate_reviews(4 * n + 200, seed=seed)
    rows = []
    for i in range(n):
        sentences = []
        while sum(len(s) + 1 for s in sentences) < min_chars:
            sentences.append(rng.choice(pool)["text"])
        rows.append({"text": " ".join(sentences), "label": i % 2})
    return rows


def _hh_rows(n: int, seed: int) -> list[dict]:
    """Anthropic/hh-rlhf-like rows: chosen/rejected share the dialogue up to the last "\\n\\nAssistant:"."""
    rng = random.Random(seed)
    reviews = generate_reviews(3 * n + 10, seed=seed)
    rows = []
    for i in range(n):
        question = f"what did you think of the movie number {i}?"
        prompt = f"\n\nHuman: {question}\n\nAssistant: let me think.\n\nHuman: {rng.choice(reviews)['text']}\n\nAssistant:"
        rows.append(
            {
                "chosen": prompt + " " + reviews[3 * i]["text"],
                "rejected": prompt + " " + reviews[3 * i + 1]["text"],
            }
        )
    return rows


def _stack_rows(n: int, seed: int) -> list[dict]:
    """lvwerra/stack-exchange-paired-like rows (question, date, metadata, response_j, response_k)."""
    reviews = generate_reviews(2 * n + 10, seed=seed)
    return [
        {
            "qid": i,
            "question": f"how good is movie {i % 97}?",
            "date": "2023/01/01",
            "metadata": ["x"],
            "response_j": reviews[2 * i]["text"],
            "response_k": reviews[2 * i + 1]["text"],
        }
        for i in range(n)
    ]


class Standins:
    """Builds each stand-in once, on first request, under `root`; `path(name)` returns its folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._builders: dict[str, Callable[[Path], None]] = {
            "tokenizer": self._tokenizer,
            "gpt2": self._gpt2,
            # bigcode/starcoderbase in the tool scripts: their few-shot prompts pass 256 tokens, and their LoRA
            # targets GPT-2's (and StarCoder's) c_attn / c_proj
            "gpt2-long": lambda p: self._gpt2(p, n_positions=1024),
            "llama": self._llama,
            "gptj-24-layers": self._gptj,
            "t5": self._t5,
            "distilbert-sentiment": self._distilbert,
            "roberta-toxicity": self._roberta,
            "electra-hatespeech": self._electra,
            "llama-reward-adapter-2-labels": lambda p: self._seq_cls_adapter(p, num_labels=2),
            "llama-reward-adapter-1-label": lambda p: self._seq_cls_adapter(p, num_labels=1),
            "llama-causal-adapter": self._causal_adapter,
            "toxicity-measurement": self._toxicity_measurement,
            "accuracy-metric": self._accuracy_metric,
            "imdb": self._imdb,
            "imdb-small": self._imdb_small,
            "hh-rlhf": self._hh,
            "stack-exchange-paired": self._stack,
            "openassistant-guanaco": self._guanaco,
            "real-toxicity-prompts": self._real_toxicity,
            "wiki-toxic": self._wiki_toxic,
            "gsm8k": self._gsm8k,
            "trivia-qa": self._trivia_qa,
        }

    def path(self, name: str) -> str:
        if name not in self._builders:
            raise KeyError(f"no stand-in named {name!r}; known: {sorted(self._builders)}")
        folder = self.root / name
        done = folder / ".built"
        if not done.exists():
            folder.mkdir(parents=True, exist_ok=True)
            torch.manual_seed(0)
            self._builders[name](folder)
            done.touch()
        # `evaluate.load(folder)` wants folder/<folder name>.py: those stand-ins live one level down.
        return str(folder / EVALUATE_MODULES[name]) if name in EVALUATE_MODULES else str(folder)

    # ---- tokenizers -------------------------------------------------------------------------------------
    def _tokenizer(self, folder: Path) -> None:
        texts = [r["text"] for r in generate_reviews(800, seed=1)]
        texts += [
            "Question: how good is it?\n\nAnswer: quite good.",
            "\n\nHuman: hi\n\nAssistant: hello",
        ] * 50
        texts += ["[negative] [neutral] [positive] 0 1 2 3 4 5 6 7 8 9"] * 20
        tokenizer = train_tokenizer(texts, vocab_size=VOCAB_SIZE)
        tokenizer.add_special_tokens({"additional_special_tokens": [GPT2_EOS]})
        tokenizer.eos_token = GPT2_EOS  # GPT-2's eos; the examples make it the pad token too
        tokenizer.save_pretrained(folder)

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path("tokenizer"))

    # ---- causal LMs ----------------------------------------------------------------------------------------
    def _save(self, model, folder: Path, tokenizer=None) -> None:
        model.save_pretrained(folder)
        (tokenizer or self.tokenizer()).save_pretrained(folder)

    def _gpt2(self, folder: Path, n_positions: int = 256) -> None:
        """GPT-2 architecture (Conv1D layers, tied head) at toy width: stands in for gpt2 and its imdb fine-tunes."""
        from transformers import GPT2Config, GPT2LMHeadModel

        tok = self.tokenizer()
        config = GPT2Config(
            vocab_size=len(tok),
            n_positions=n_positions,
            n_embd=32,
            n_layer=2,
            n_head=2,
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.eos_token_id,
        )
        self._save(GPT2LMHeadModel(config), folder, tok)

    def _llama(self, folder: Path) -> None:
        """Llama architecture (q/k/v/o_proj names the scripts' LoRA configs target) for the llama ids."""
        from transformers import AutoModelForCausalLM

        tok = self.tokenizer()
        config = tiny_llama_config(
            len(tok),
            hidden_size=32,
            max_positions=512,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id,
        )
        self._save(AutoModelForCausalLM.from_config(config), folder, tok)

    def _gptj(self, folder: Path) -> None:
        """GPT-J with 24 layers: the toxicity script shares 20 layers with its reference model."""
        from transformers import GPTJConfig, GPTJForCausalLM

        tok = self.tokenizer()
        config = GPTJConfig(
            vocab_size=len(tok),
            n_positions=256,
            n_embd=16,
            n_layer=24,
            n_head=2,
            rotary_dim=4,
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.eos_token_id,
        )
        self._save(GPTJForCausalLM(config), folder, tok)

    def _t5(self, folder: Path) -> None:
        from transformers import T5Config, T5ForConditionalGeneration

        tok = self.tokenizer()
        config = T5Config(
            vocab_size=len(tok),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_decoder_layers=1,
            num_heads=4,
            dropout_rate=0.0,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            decoder_start_token_id=tok.pad_token_id,
        )
        self._save(T5ForConditionalGeneration(config), folder, tok)

    # ---- classifiers ---------------------------------------------------------------------------------------
    def _distilbert(self, folder: Path) -> None:
        """lvwerra/distilbert-imdb: two labels NEGATIVE/POSITIVE, read through pipeline('sentiment-analysis')."""
        from transformers import DistilBertConfig, DistilBertForSequenceClassification

        tok = self.tokenizer()
        config = DistilBertConfig(
            vocab_size=len(tok),
            dim=32,
            hidden_dim=64,
            n_layers=1,
            n_heads=2,
            max_position_embeddings=512,
            pad_token_id=tok.pad_token_id,
            id2label={0: "NEGATIVE", 1: "POSITIVE"},
            label2id={"NEGATIVE": 0, "POSITIVE": 1},
        )
        self._save(DistilBertForSequenceClassification(config), folder, tok)

    def _roberta(self, folder: Path) -> None:
        """facebook/roberta-hate-speech-dynabench-r4-target: labels nothate/hate, loaded with RobertaTokenizer."""
        from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaTokenizer

        # The same byte-level BPE vocabulary and merges, with RoBERTa's own special tokens.
        model = json.loads(self.tokenizer().backend_tokenizer.to_str())["model"]
        merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        tok = RobertaTokenizer(vocab=model["vocab"], merges=merges)
        config = RobertaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=514,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            id2label={0: "nothate", 1: "hate"},
            label2id={"nothate": 0, "hate": 1},
        )
        self._save(RobertaForSequenceClassification(config), folder, tok)

    def _electra(self, folder: Path) -> None:
        """DaNLP/da-electra-hatespeech-detection: labels "not offensive"/"offensive"."""
        from transformers import ElectraConfig, ElectraForSequenceClassification

        tok = self.tokenizer()
        config = ElectraConfig(
            vocab_size=len(tok),
            embedding_size=16,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=512,
            pad_token_id=tok.pad_token_id,
            id2label={0: "not offensive", 1: "offensive"},
            label2id={"not offensive": 0, "offensive": 1},
        )
        self._save(ElectraForSequenceClassification(config), folder, tok)

    # ---- adapters ------------------------------------------------------------------------------------------
    def _seq_cls_adapter(self, folder: Path, num_labels: int) -> None:
        """A peft LoRA SEQ_CLS adapter over the llama stand-in, the score head saved in modules_to_save."""
        from peft import LoraConfig, TaskType, get_peft_model
        from transformers import AutoModelForSequenceClassification

        base = AutoModelForSequenceClassification.from_pretrained(self.path("llama"), num_labels=num_labels)
        config = LoraConfig(
            task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
        )
        model = get_peft_model(base, config)
        # Random (non-zero) LoRA B so the adapter changes the output, as a trained one would.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.02)
        model.save_pretrained(folder)
        # Record the base as a local path (peft writes the model's name_or_path).
        assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]

    def _causal_adapter(self, folder: Path) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(self.path("llama"))
        model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8))
        model.save_pretrained(folder)

    # ---- evaluate modules ----------------------------------------------------------------------------------
    def _toxicity_measurement(self, folder: Path) -> None:
        """A local `evaluate` measurement with the interface of ybelkada/toxicity: the config name is the
        classifier's id (here a local path); compute(predictions=...) -> {"toxicity": [p(toxic) per text]}."""
        (folder / "toxicity").mkdir()
        (folder / "toxicity" / "toxicity.py").write_text(TOXICITY_MEASUREMENT)

    def _accuracy_metric(self, folder: Path) -> None:
        """A local `evaluate` metric with the interface of the hub's "accuracy"."""
        (folder / "accuracy").mkdir()
        (folder / "accuracy" / "accuracy.py").write_text(ACCURACY_METRIC)

    # ---- datasets ------------------------------------------------------------------------------------------
    def _imdb(self, folder: Path) -> None:
        """imdb (text, label): 160 rows over 500 characters, so the notebooks' batch of 128 fills once."""
        _write_jsonl(folder / "train.jsonl", _long_reviews(160, 520, seed=0))
        _write_jsonl(folder / "test.jsonl", _long_reviews(16, 520, seed=1))

    def _imdb_small(self, folder: Path) -> None:
        """imdb with 8 train rows, for scripts that take the dataset name from the command line."""
        rows = _long_reviews(8, 220, seed=2)
        _write_jsonl(folder / "train.jsonl", rows)
        _write_jsonl(folder / "test.jsonl", rows[:4])

    def _hh(self, folder: Path) -> None:
        """Anthropic/hh-rlhf (chosen, rejected); 800 train rows so that `split="train[:1%]"` holds 8."""
        _write_jsonl(folder / "train.jsonl", _hh_rows(800, seed=0))
        _write_jsonl(folder / "test.jsonl", _hh_rows(8, seed=1))

    def _stack(self, folder: Path) -> None:
        """lvwerra/stack-exchange-paired with its data_dir subfolders; data/rl holds the 100,000 rows
        rl_training.py selects with `select(range(100000))`."""
        _write_jsonl(folder / "data/reward/train.jsonl", _stack_rows(16, seed=0))
        _write_jsonl(folder / "data/evaluation/train.jsonl", _stack_rows(8, seed=1))
        _write_jsonl(folder / "data/finetune/train.jsonl", _stack_rows(64, seed=2))
        rows = _stack_rows(64, seed=3)
        _write_jsonl(folder / "data/rl/train.jsonl", [rows[i % 64] | {"qid": i} for i in range(100_000)])

    def _guanaco(self, folder: Path) -> None:
        """timdettmers/openassistant-guanaco (text) in its "### Human: ... ### Assistant: ..." form."""
        reviews = generate_reviews(100, seed=4)
        rows = [
            {
                "text": f"### Human: what about movie {i}?### Assistant: {reviews[i]['text']} {reviews[i + 50]['text']}"
            }
            for i in range(40)
        ]
        _write_jsonl(folder / "train.jsonl", rows[:32])
        _write_jsonl(folder / "test.jsonl", rows[32:])

    def _real_toxicity(self, folder: Path) -> None:
        """allenai/real-toxicity-prompts: nested prompt/continuation structs; 3 of 5 prompts above 0.3
        toxicity, so the script's filter and 80/20 split leave 2 training rows (one batch of 2)."""
        reviews = generate_reviews(20, seed=5)
        scores = [0.9, 0.1, 0.8, None, 0.7]
        rows = []
        for i, tox in enumerate(scores):
            part = {
                "text": "",
                "toxicity": None,
                "profanity": None,
                "sexually_explicit": None,
                "flirtation": None,
                "identity_attack": None,
                "threat": None,
                "insult": None,
                "severe_toxicity": None,
            }
            rows.append(
                {
                    "filename": f"{i}.txt",
                    "begin": 0,
                    "end": 10,
                    "challenging": False,
                    "prompt": part | {"text": reviews[2 * i]["text"], "toxicity": tox},
                    "continuation": part | {"text": " " + reviews[2 * i + 1]["text"], "toxicity": 0.5},
                }
            )
        _write_jsonl(folder / "train.jsonl", rows)

    def _wiki_toxic(self, folder: Path) -> None:
        """OxAISH-AL-LLM/wiki_toxic (id, comment_text, label)."""
        reviews = generate_reviews(40, seed=6)
        rows = [{"id": str(i), "comment_text": reviews[i]["text"], "label": i % 2} for i in range(40)]
        _write_jsonl(folder / "train.jsonl", rows[:20])
        _write_jsonl(folder / "test.jsonl", rows[20:])

    def _gsm8k(self, folder: Path) -> None:
        """gsm8k with its "main" config (question, answer ending in "#### <number>"): 5 train rows (the
        script drops the first, leaving two batches of 2) and 2 test rows."""
        rng = random.Random(7)
        rows = []
        for _ in range(7):
            a, b = rng.randint(2, 40), rng.randint(2, 9)
            rows.append({"question": f"Tom has {a} apples and buys {b} bags of 3. How many apples does he have?",
                         "answer": f"He buys {b} * 3 = {3 * b} apples.\n#### {a + 3 * b}"})
        _write_config(folder, "main", {"train": rows[:5], "test": rows[5:]})

    def _trivia_qa(self, folder: Path) -> None:
        """trivia_qa with its "rc" config: question, answer.normalized_aliases (a list); 4 train rows."""
        rows = [
            {"question": f"Which movie number {i} won the prize?", "answer": {"normalized_aliases": [f"movie {i}", "film"]}}
            for i in range(4)
        ]
        _write_config(folder, "rc", {"train": rows})


TOXICITY_MEASUREMENT = '''"""Local stand-in for the ybelkada/toxicity measurement: a text classifier's probability of the toxic label."""
import datasets
import evaluate
from transformers import pipeline


class Toxicity(evaluate.Measurement):
    def _info(self):
        return evaluate.MeasurementInfo(
            module_type="measurement",
            description="probability of the toxic label",
            citation="",
            inputs_description="predictions: list of str",
            features=datasets.Features({"predictions": datasets.Value("string", id="sequence")}),
        )

    def _download_and_prepare(self, dl_manager):
        # The config name is the classifier's id, as in the hub module.
        self.classifier = pipeline("text-classification", model=self.config_name, top_k=None, truncation=True)
        labels = self.classifier.model.config.id2label.values()
        self.toxic_label = "offensive" if "offensive" in labels else "hate"

    def _compute(self, predictions):
        scores = []
        for outputs in self.classifier(predictions):
            scores.append(next(o["score"] for o in outputs if o["label"] == self.toxic_label))
        return {"toxicity": scores}
'''

ACCURACY_METRIC = '''"""Local stand-in for the accuracy metric: the fraction of predictions equal to their references."""
import datasets
import evaluate


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="accuracy",
            citation="",
            inputs_description="predictions, references: lists of int",
            features=datasets.Features({"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}),
        )

    def _compute(self, predictions, references):
        return {"accuracy": sum(int(p == r) for p, r in zip(predictions, references)) / len(predictions)}
'''
