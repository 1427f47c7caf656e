"""Run TRL 0.7.11's example scripts and notebooks unchanged but for `trl` -> `tether` and hub ids -> local paths.

The only differences from the original text are listed here, in `IMPORT_RENAME` and `HUB_IDS`;
`rewrite_source` asserts that every changed line is one of them. A script runs in a subprocess, offline, on
CPU, in a fresh working folder, with its own command-line flags set small.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .standins import Standins

EXAMPLES = Path(__file__).resolve().parents[3] / "shared" / "trl-0.7.11-examples"
RUNNER = Path(__file__).resolve().with_name("runner.py")

# (a) The import rename: `from trl...` / `import trl...` -> tether, at the start of a line.
IMPORT_RENAME = re.compile(r"^(\s*)(from|import)(\s+)trl\b")

# (b) Hub id -> stand-in (see standins.Standins), replaced only as a whole quoted string literal, and only
# in the scripts whose spec lists it (ids a script reads from its command line are passed as flags instead).
HUB_IDS: dict[str, str] = {
    # models
    "gpt2": "gpt2",
    "lvwerra/gpt2-imdb": "gpt2",
    "lvwerra/gpt2-imdb-pos-v2": "gpt2",
    "meta-llama/Llama-2-7b-hf": "llama",
    "lvwerra/distilbert-imdb": "distilbert-sentiment",
    "facebook/roberta-hate-speech-dynabench-r4-target": "roberta-toxicity",
    "DaNLP/da-electra-hatespeech-detection": "electra-hatespeech",
    "openai/clip-vit-large-patch14": "clip-aesthetic",  # scripts/ddpo.py's aesthetic scorer (tests/test_trl_example_ddpo.py)
    # evaluate modules
    "ybelkada/toxicity": "toxicity-measurement",
    "accuracy": "accuracy-metric",
    # datasets
    "imdb": "imdb",
    "Anthropic/hh-rlhf": "hh-rlhf",
    "lvwerra/stack-exchange-paired": "stack-exchange-paired",
    "allenai/real-toxicity-prompts": "real-toxicity-prompts",
    "OxAISH-AL-LLM/wiki_toxic": "wiki-toxic",
    "gsm8k": "gsm8k",
    "trivia_qa": "trivia-qa",
}


# (c) Replays only, never the plain runs: where the original cannot run on this stack whatever tether does
# (transformers/datasets 5 removed a keyword it passes, or it requires CUDA), the `test_replay_*` tests run it
# with these substitutions, each of the environment's making, so that the rest of the script still exercises
# tether. Each `old` must occur in the rewritten text exactly `count` times.
RETURN_ALL_SCORES = (
    '"return_all_scores": True',
    '"top_k": None',
    "transformers 5 dropped return_all_scores; top_k=None returns every label (sorted by score)",
)
# transformers 5 removed load_tool (and transformers.Tool); tether.environment.load_tool returns tether's own
# implementations of the hub tools the tool scripts load, by the same ids, offline.
LOAD_TOOL = "transformers 5 removed load_tool; tether.environment.load_tool serves these hub ids with tether's tools"
# (old, new, why[, count])
ENVIRONMENT_PATCHES: dict[str, list[tuple]] = {
    "research_projects/tools/calculator.py": [
        (
            "from transformers import AutoTokenizer, load_tool",
            "from transformers import AutoTokenizer\nfrom tether.environment import load_tool",
            LOAD_TOOL,
        ),
        (
            'columns_to_log=["query", "response", "answer"]',
            'columns_to_log=["query", "response"]',
            "the script's own bug: its texts dict has no 'answer' column, which TRL 0.7.11's log_stats rejects "
            "with log_with='wandb' too",
        ),
    ],
    "research_projects/tools/python_interpreter.py": [
        (
            "from transformers import AutoTokenizer, HfArgumentParser, load_tool",
            "from transformers import AutoTokenizer, HfArgumentParser\nfrom tether.environment import load_tool",
            LOAD_TOOL,
        ),
    ],
    "research_projects/tools/triviaqa.py": [
        (
            "from transformers import AutoTokenizer, HfArgumentParser, load_tool",
            "from transformers import AutoTokenizer, HfArgumentParser\nfrom tether.environment import load_tool",
            LOAD_TOOL,
        ),
        (
            'tool = load_tool("vwxyzjn/pyserini-wikipedia-kilt-doc")',
            'tool = lambda query: f"{query}\\n{query} is an entry of an offline stand-in encyclopedia."',
            "the hub Space searched a 40 GB pyserini (Java Lucene) Wikipedia index; a stand-in answers as it did: "
            "a title line, then the text",
        ),
    ],
    "scripts/ddpo.py": [
        ("scorer = scorer.cuda()", "scorer = scorer", "the aesthetic scorer goes to CUDA unless an NPU/XPU is there"),
        (
            "embed = self.clip.get_image_features(**inputs)",
            "embed = self.clip.get_image_features(**inputs).pooler_output",
            "transformers 5's get_image_features returns an output object (the projected embeddings in pooler_output)",
        ),
    ],
    "scripts/ppo.py": [
        RETURN_ALL_SCORES,
        ('device_map = {"": Accelerator().local_process_index}', "device_map = None", "{'': 0} needs a GPU"),
    ],
    "notebooks/gpt2-sentiment.ipynb": [RETURN_ALL_SCORES],
    "notebooks/best_of_n.ipynb": [
        ("model.cuda()\nref_model.cuda()", "model.to(device)\nref_model.to(device)", "no GPU here"),
    ],
    "scripts/ppo_multi_adapter.py": [
        (
            'device_map={"": "xpu:0"} if is_xpu_available() else {"": "npu:0"} if is_npu_available else {"": 0},',
            "device_map=None,",
            "the script asks for an NPU (is_npu_available is not called); no GPU here",
        ),
        ("quantization_config=nf4_config,", "quantization_config=None,", "4-bit bitsandbytes needs a GPU"),
    ],
    "research_projects/stack_llama/scripts/rl_training.py": [
        (
            'load_in_8bit=True,\n    device_map={"": current_device},',
            "",
            "8-bit bitsandbytes and device_map={'': 0} need a GPU",
        ),
        (
            'device_map={"": current_device},\n    model_kwargs={"load_in_8bit": True},',
            "",
            "transformers 5's from_pretrained no longer accepts load_in_8bit; no GPU here",
        ),
        RETURN_ALL_SCORES,
    ],
    "research_projects/stack_llama/scripts/supervised_finetuning.py": [
        ("use_auth_token=True,", "", "datasets 5 no longer accepts use_auth_token"),
        (
            'evaluation_strategy="steps",',
            'eval_strategy="steps",',
            "transformers 5 renamed evaluation_strategy",
        ),
        (
            'load_in_8bit=True, device_map={"": Accelerator().process_index}',
            "",
            "transformers 5 no longer accepts load_in_8bit; 8-bit needs a GPU",
        ),
    ],
    "research_projects/stack_llama_2/scripts/sft_llama2.py": [
        (
            "if training_args.group_by_length and script_args.packing:",
            "if False:",
            "transformers 5 removed TrainingArguments.group_by_length",
        ),
        ("quantization_config=bnb_config,", "", "4-bit bitsandbytes needs a GPU"),
        ('device_map={"": Accelerator().local_process_index},', "", "device_map={'': 0} needs a GPU"),
        ("use_auth_token=True,", "", "datasets/transformers 5 no longer accept use_auth_token", 2),
    ],
    "research_projects/stack_llama_2/scripts/dpo_llama2.py": [
        ("load_in_4bit=True,", "", "transformers 5 no longer accepts load_in_4bit; 4-bit needs a GPU", 2),
        (
            'evaluation_strategy="steps",',
            'eval_strategy="steps",',
            "transformers 5 renamed evaluation_strategy",
        ),
        ("bf16=True,", "bf16=False,", "transformers refuses bf16 training without a GPU"),
    ],
}


# (d) Replays only: sizes a script hard-codes (no flag sets them) and that would keep a replay running for
# many minutes on CPU; the loop is the same, it runs fewer or smaller steps.
SIZE_PATCHES: dict[str, list[tuple]] = {
    "research_projects/tools/calculator.py": [
        ("for _step in range(100):", "for _step in range(2):", "100 steps of 256 episodes: ~25 min on CPU"),
        ("batch_size=256,", "batch_size=32,", "the same loop at a smaller batch"),
        ("mini_batch_size=64,", "mini_batch_size=16,", "keeps batch_size / mini_batch_size = 4 as written"),
    ],
}


def apply_patches(text: str, relative: str) -> str:
    for patch in ENVIRONMENT_PATCHES[relative] + SIZE_PATCHES.get(relative, []):
        old, new, _reason, *rest = patch
        count = rest[0] if rest else 1
        assert text.count(old) == count, f"{relative}: expected {count} x {old!r}, found {text.count(old)}"
        text = text.replace(old, new)
    return text


def examples_dir() -> Path:
    if not EXAMPLES.is_dir():
        raise FileNotFoundError(
            f"TRL 0.7.11's examples are missing: expected them at {EXAMPLES} (the repository's ../shared). "
            "These tests replay those exact files and cannot run without them."
        )
    return EXAMPLES


def rewrite_source(source: str, ids: dict[str, str]) -> str:
    """`source` with trl imports renamed and each quoted hub id in `ids` replaced by its local path.

    Asserts that the line count is unchanged and that every line that differs held a trl import or one of
    the quoted ids, and that no trl import is left."""
    out = []
    for line in source.splitlines(keepends=True):
        new = IMPORT_RENAME.sub(r"\1\2\3tether", line)
        for hub_id, local in ids.items():
            for quote in ('"', "'"):
                new = new.replace(f"{quote}{hub_id}{quote}", f"{quote}{local}{quote}")
        out.append(new)
    text = "".join(out)
    old_lines, new_lines = source.splitlines(), text.splitlines()
    assert len(old_lines) == len(new_lines)
    for old, new in zip(old_lines, new_lines):
        if old != new:
            allowed = IMPORT_RENAME.match(old) or any(f'"{i}"' in old or f"'{i}'" in old for i in ids)
            assert allowed, f"the rewrite changed a line it must not touch:\n- {old}\n+ {new}"
    leftover = [line for line in new_lines if IMPORT_RENAME.match(line)]
    assert not leftover, f"trl imports left after the rewrite: {leftover}"
    return text


def notebook_source(path: Path, skip_cells: dict[int, str]) -> str:
    """The code cells of a notebook in order, one script; `skip_cells` maps a cell index to why it is left
    out. Lines of IPython magics (`%...`, `!...`) and `display(...)` calls (display only) are left out."""
    cells = json.loads(path.read_text())["cells"]
    missing = set(skip_cells) - {i for i, c in enumerate(cells) if c["cell_type"] == "code"}
    assert not missing, f"skip_cells names cells that are not code cells: {missing}"
    chunks = []
    for index, cell in enumerate(cells):
        if cell["cell_type"] != "code" or index in skip_cells:
            continue
        lines = [
            line
            for line in "".join(cell["source"]).splitlines()
            if not line.lstrip().startswith(("%", "!", "display("))
        ]
        chunks.append(f"# --- cell {index}\n" + "\n".join(lines) + "\n")
    return "\n".join(chunks)


@dataclass
class Run:
    """A finished script run: exit code, output, how long it took, and the globals it dumped."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    cwd: Path
    script: Path
    dumped: dict

    def failure(self) -> str:
        """The innermost traceback frame in the script and the exception line, for triage."""
        frames = re.findall(rf'File "{re.escape(str(self.script))}", line (\d+)', self.stderr)
        lines = self.script.read_text().splitlines()
        where = f"{self.script.name}:{frames[-1]}: {lines[int(frames[-1]) - 1].strip()}" if frames else "?"
        error = [line for line in self.stderr.strip().splitlines() if line and not line.startswith(" ")]
        return f"{where}\n{error[-1] if error else ''}"

    def check_stops_at(self, code: str, error: str) -> None:
        """Assert the run failed at the script line containing `code`, with an exception line containing
        `error`: for scripts that cannot run on this stack whatever tether does."""
        assert self.returncode != 0, f"{self.script.name} now exits 0: turn this test into a passing one"
        where, _, exception = self.failure().partition("\n")
        assert code in where and error in exception, (
            f"{self.script.name} was expected to stop at `{code}` with `{error}`, but stopped at\n"
            f"{where}\n{exception}\n--- stderr tail ---\n{self.stderr[-3000:]}"
        )

    def check(self) -> None:
        assert self.returncode == 0, (
            f"{self.script.name} exited {self.returncode} after {self.seconds:.0f}s\n"
            f"{self.failure()}\n--- stderr tail ---\n{self.stderr[-4000:]}"
        )


def run_script(
    source: str,
    name: str,
    args: list[str],
    cwd: Path,
    hf_home: Path,
    dump: tuple[str, ...] = (),
    timeout: float = 900,
) -> Run:
    """Write `source` to cwd/`name` and run it as `__main__` in a subprocess with `args`, offline and on CPU.

    The runner (runner.py) executes the file with runpy (sys.argv[0] is the script) and, after it ends,
    writes a summary of the globals named in `dump` to dumped.json, so tests can check what it produced."""
    cwd.mkdir(parents=True, exist_ok=True)
    script = cwd / name
    script.write_text(source)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HOME": str(hf_home),
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
        "PYTHONUNBUFFERED": "1",
    }
    dump_file = cwd / "dumped.json"
    command = [sys.executable, str(RUNNER), str(dump_file), ",".join(dump), str(script), *args]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    dumped = json.loads(dump_file.read_text()) if dump_file.exists() else {}
    return Run(done.returncode, done.stdout, done.stderr, seconds, cwd, script, dumped)


def prepare(
    standins: Standins,
    relative: str,
    replace: tuple[str, ...],
    skip_cells: dict[int, str] | None = None,
    replay: bool = False,
) -> str:
    """The rewritten source of one example (a .py file, or a notebook's code cells); with `replay`, also
    the example's ENVIRONMENT_PATCHES."""
    path = examples_dir() / relative
    original = notebook_source(path, skip_cells or {}) if path.suffix == ".ipynb" else path.read_text()
    unknown = set(replace) - set(HUB_IDS)
    assert not unknown, f"ids not in HUB_IDS: {unknown}"
    present = [i for i in replace if f'"{i}"' in original or f"'{i}'" in original]
    assert present == list(replace), f"{relative} does not contain the ids {set(replace) - set(present)}"
    text = rewrite_source(original, {i: standins.path(HUB_IDS[i]) for i in replace})
    return apply_patches(text, relative) if replay else text
