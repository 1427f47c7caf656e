"""Classic PPO, TRL 0.11.4 against tether: does tether's PPO learn as well as TRL's did, and faster?

    python benchmarks/ppo_vs_trl011.py                      # 3 seeds x 40 steps (~4 min on an idle machine)
    python benchmarks/ppo_vs_trl011.py --seeds 0 --steps 20
    python benchmarks/ppo_vs_trl011.py --quick              # 1 seed, 3 steps: checks that everything works

The first run also builds the TRL venv (about a minute) and the assets (about a minute of SFT).

One loop, `ppo_loop`, written against the classic API exactly as TRL 0.7.11's examples/scripts/ppo.py calls it
(PPOConfig, AutoModelForCausalLMWithValueHead.from_pretrained, PPOTrainer(config, model, ref_model, tokenizer,
dataset, data_collator), `generate(query_tensors, return_prompt=False, ...)`, `step(queries, responses,
rewards)`), parametrised only by the module it imports: `trl` or `tether`.

- TRL side: TRL 0.11.4, the last release with the classic PPOTrainer; it needs transformers 4.x, so it runs in
  its own virtual environment, benchmarks/.venv-trl011 (git-ignored), built on first use and reused after:
  torch 2.13.0+cpu first (the wheel on disk; checked afterwards), then trl 0.11.4, transformers 4.46.3 and
  rich (which trl 0.11.4 imports without declaring it), with torch pinned by a constraints file so pip cannot
  replace it. A marker file records the pins; a venv whose marker or versions do not match is rebuilt.
- tether side: the current interpreter (transformers 5). Each (library, seed) is a fresh subprocess of this
  script (`--library trl|tether`), so peak RSS (ru_maxrss) is per run; seeds run TRL and tether alternately
  (TRL first for even seeds, tether first for odd ones) so machine noise hits both alike.
- Assets, built once in the current interpreter and cached in the work dir (default bench-out/ppo_vs_trl011):
  a byte-level BPE tokenizer (tether.demo.tiny.train_tokenizer, vocabulary 1024 -> 838 tokens, every corpus
  word one token) over tether.demo.corpus's 3,000 synthetic movie reviews; a GPT-2 (4 layers, hidden 128, 4
  heads, 64 positions, tied embeddings, dropout 0 so the rollout and training passes see the same network)
  built from its config with seed 0 and pre-trained by SFT_STEPS of plain next-token training on those
  reviews, so its samples are reviews of every sentiment; saved as safetensors. Both transformers load it
  identically: the script compares the logits under 4.46.3 and 5.x on fixed inputs (tolerance 1e-5) and the
  token ids of encode/decode before any run.
- Prompts: 2,000 beginnings (the first 2-5 tokens) of held-out reviews (corpus seed 1), tokenised once into
  prompts.json. Step s of seed k draws the same 16 prompts in both libraries (random.Random(1000 + k)).
- Reward: tether.demo.corpus.positivity_score (lexicon, negation-aware, in [-1, 1]) of the decoded query +
  response, loaded from the source file in both environments, so it is the same code. The SFT model writes
  positive, negative and neutral reviews about equally (mean reward near 0); PPO should push it toward
  positive.
- Config, identical on both sides: batch_size 16, mini_batch_size 4, gradient_accumulation_steps 1 (4
  optimizer steps of 4 samples per PPO epoch in both libraries), ppo_epochs 4, learning_rate LR, init_kl_coef
  0.2, adap_kl_ctrl True, everything else each library's default; sampled 8-token responses (do_sample, top_k
  0, top_p 1, min_length -1, pad_token_id = eos, the example's arguments); ref_model None (each library makes
  the frozen reference copy); `set_seed(seed)` before loading the model, as the example does. 1 torch thread
  (`--threads`).

- Replay check (before the runs; skip with --no-replay): 16 fixed rollouts, one value head and TRL's
  mini-batch order (tether's epoch shuffle is drawn with numpy's global RNG there, as TRL 0.11.4 draws it) go
  through both libraries' step() twice; the stats that agree to 1e-4 are listed and any unexpected difference
  is printed. This separates the update itself from sampling noise: the learning curves differ by chance
  (sampling, and the value head's initial weights) even where the update is the same.

Output: per-step mean reward and the step's scalar stats per (library, seed) in WORK/results.json (with
--quick: WORK/results-quick.json); a plot of both reward curves (mean over seeds, min/max band) and of
objective/kl to benchmarks/ppo_vs_trl011.png (with --quick: WORK/ppo_vs_trl011.png); a markdown table on
stdout: reward gain (mean of the last 5 steps minus mean of the first 5, per seed and mean), KL, steps/s (1 /
median seconds of generate + reward + step(), the first step excluded; and per CPU-second, which other load on
the machine disturbs less), generate and step() seconds, peak RSS, the 1-minute load at the end of each run;
then the targets, a side-by-side of the per-step stats both libraries report, and the replay check.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VENV = HERE / ".venv-trl011"
TORCH_PIN = "torch==2.13.0+cpu"  # the CPU wheel on this machine's disk; never let pip pull another torch
TRL_PINS = ["trl==0.11.4", "transformers==4.46.3", "rich"]  # rich: imported by trl 0.11.4, not declared
EXPECTED = {"torch": "2.13.0+cpu", "trl": "0.11.4", "transformers": "4.46.3"}
CORPUS_PY = REPO / "src" / "tether" / "demo" / "corpus.py"
ASSET_VERSION = 2  # bump when the assets change: cached ones are rebuilt

# the PPO setting, the same for both libraries
BATCH, MINI_BATCH, PPO_EPOCHS, INIT_KL, MAX_NEW_TOKENS = 16, 4, 4, 0.2, 8
LR = 1e-4
SFT_STEPS, SFT_BATCH, SFT_LR = 300, 32, 3e-3
PROMPT_TOKENS = (2, 5)
N_PROMPTS = 2000
EDGE = 5  # reward gain: mean of the last EDGE steps minus mean of the first EDGE
# stats both libraries report (TRL 0.11.4's names), compared side by side
STAT_KEYS = (
    "objective/kl", "objective/kl_coef", "objective/entropy", "ppo/mean_non_score_reward", "ppo/mean_scores",
    "ppo/policy/clipfrac", "ppo/policy/approxkl", "ppo/policy/policykl", "ppo/policy/entropy",
    "ppo/policy/advantages_mean", "ppo/loss/policy", "ppo/loss/value", "ppo/loss/total", "ppo/val/vpred",
    "ppo/val/error", "ppo/val/clipfrac", "ppo/val/mean", "ppo/val/var_explained", "ppo/returns/mean",
    "ppo/learning_rate", "tokens/responses_len_mean", "time/ppo/forward_pass", "time/ppo/optimize_step",
)


# ----- the TRL 0.11.4 environment ---------------------------------------------------------------------------
def venv_python() -> Path:
    return VENV / "bin" / "python"


def _venv_versions() -> dict[str, str] | None:
    probe = ("import json, torch, transformers, trl, accelerate, datasets; print(json.dumps({m.__name__: "
             "m.__version__ for m in (torch, transformers, trl, accelerate, datasets)}))")
    if not venv_python().exists():
        return None
    proc = subprocess.run([str(venv_python()), "-c", probe], capture_output=True, text=True)
    if proc.returncode:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ensure_trl_venv() -> dict[str, Any]:
    """Build benchmarks/.venv-trl011 unless a matching one exists (idempotent); returns what it found."""
    marker = VENV / "tether-bench.json"
    wanted = {"torch": TORCH_PIN, "packages": TRL_PINS}
    if marker.exists() and json.loads(marker.read_text()).get("pins") == wanted:
        versions = _venv_versions()
        if versions and all(versions.get(k) == v for k, v in EXPECTED.items()):
            return {"venv": str(VENV), "built": False, "versions": versions}
        print(f"{VENV}: versions {versions} do not match {EXPECTED}; rebuilding", file=sys.stderr)
    t0 = time.perf_counter()
    if VENV.exists():
        shutil.rmtree(VENV)
    print(f"building {VENV} (about a minute) ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(venv_python()), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    constraints = VENV / "constraints.txt"
    constraints.write_text(TORCH_PIN + "\n")
    # torch first, so nothing below can choose a torch; then the rest with torch held by the constraints file
    for args in ([TORCH_PIN], ["-c", str(constraints), *TRL_PINS]):
        if subprocess.run([*pip, *args]).returncode:
            raise SystemExit(f"pip install {' '.join(args)} failed in {VENV} (its output is above); "
                             f"{TORCH_PIN} must be installable here (this machine has the wheel on disk, pip "
                             "finds it via find-links)")
    versions = _venv_versions()
    if not versions or any(versions.get(k) != v for k, v in EXPECTED.items()):
        raise SystemExit(f"{VENV} was built but has {versions}, expected {EXPECTED}; remove it and check "
                         "pip's output")
    marker.write_text(json.dumps({"pins": wanted, "versions": versions}, indent=1))
    return {"venv": str(VENV), "built": True, "build_s": round(time.perf_counter() - t0),
            "versions": versions}


# ----- assets (built in the current interpreter) ------------------------------------------------------------
def load_reward() -> Any:
    """tether.demo.corpus.positivity_score, loaded from its file: the same code in both environments (the TRL
    venv has no tether, and the module needs nothing but the standard library)."""
    spec = importlib.util.spec_from_file_location("_bench_demo_corpus", CORPUS_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.positivity_score


def gpt2_config(tok: Any) -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=len(tok), n_positions=64, n_embd=128, n_layer=4, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )


def build_assets(work: Path, threads: int) -> dict[str, Any]:
    """Tokenizer + SFT-pre-trained GPT-2 in work/model, prompts in work/prompts.json (cached)."""
    info_path = work / "assets.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("asset_version") == ASSET_VERSION and (work / "model" / "model.safetensors").exists():
            return {**info, "cached": True}
    import torch
    from transformers import GPT2LMHeadModel

    sys.path.insert(0, str(REPO / "src"))
    from tether.demo.corpus import generate_reviews
    from tether.demo.tiny import train_tokenizer

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    texts = [r["text"] for r in generate_reviews(3000, seed=0)]
    tok = train_tokenizer(texts, vocab_size=1024)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config(tok))
    # SFT: next-token loss on whole reviews + EOS, right-padded batches
    docs = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
    rng = random.Random(0)
    opt = torch.optim.AdamW(model.parameters(), lr=SFT_LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * (1 - s / SFT_STEPS))
    model.train()
    losses = []
    for _ in range(SFT_STEPS):
        rows = rng.sample(docs, SFT_BATCH)
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tok.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    model.eval()
    (work / "model").mkdir(parents=True, exist_ok=True)
    model.save_pretrained(work / "model", safe_serialization=True)
    tok.save_pretrained(work / "model")
    portable_tokenizer_config(work / "model", tok)
    # prompts: the first 2-5 tokens of held-out reviews
    prng = random.Random(1)
    held_out = [r["text"] for r in generate_reviews(N_PROMPTS, seed=1)]
    prompts = [tok(t)["input_ids"][: prng.randint(*PROMPT_TOKENS)] for t in held_out]
    (work / "prompts.json").write_text(json.dumps({"input_ids": prompts, "query": tok.batch_decode(prompts)}))
    info = {
        "asset_version": ASSET_VERSION,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "vocab": len(tok),
        "sft_loss_first_last": [round(losses[0], 3), round(statistics.mean(losses[-20:]), 3)],
        "prompts": len(prompts),
        "build_s": round(time.perf_counter() - t0, 1),
    }
    info_path.write_text(json.dumps(info, indent=1))
    return {**info, "cached": False}


def portable_tokenizer_config(path: Path, tok: Any) -> None:
    """transformers 5 writes tokenizer_class "TokenizersBackend", which 4.x does not know; both load the same
    tokenizer.json through PreTrainedTokenizerFast. The chat template file is left out (not used here)."""
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.bos_token, "eos_token": tok.eos_token,
        "pad_token": tok.pad_token, "additional_special_tokens": [t for t in tok.all_special_tokens
                                                                  if t not in (tok.bos_token, tok.eos_token,
                                                                               tok.pad_token)],
        "model_max_length": 64,
    }, indent=1))
    (path / "chat_template.jinja").unlink(missing_ok=True)


PARITY_TEXTS = ["this movie was really wonderful and great.", "honestly, the ending felt dull at first, but",
                "the cast was not bad at all, so i would gladly watch it again.<eos>"]


def load_probe(work: Path) -> dict[str, Any]:
    """What the parity check compares: the saved model's logits on fixed inputs, token ids, decoded text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model").eval()
    ids = [tok(t)["input_ids"] for t in PARITY_TEXTS]
    with torch.no_grad():
        logits = [model(input_ids=torch.tensor([i])).logits[0].tolist() for i in ids]
    return {"ids": ids, "decoded": [tok.decode(i) for i in ids], "logits": logits,
            "special": [tok.pad_token_id, tok.eos_token_id, tok.bos_token_id], "len": len(tok)}


def check_parity(work: Path) -> dict[str, Any]:
    """Load the assets under transformers 4.46.3 (the venv) and 5.x (here): same ids and logits to 1e-5."""
    here = load_probe(work)
    proc = subprocess.run([str(venv_python()), __file__, "--load-probe", "--workdir", str(work)],
                          capture_output=True, text=True, env=child_env())
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(harness.MARK)]
    if proc.returncode or not lines:
        raise SystemExit(f"loading the assets under TRL's transformers failed:\n{proc.stderr[-3000:]}")
    there = json.loads(lines[-1][len(harness.MARK):])
    for key in ("ids", "decoded", "special", "len"):
        if here[key] != there[key]:
            raise SystemExit(f"tokenizer differs between transformers 5 and 4.46 ({key}): "
                             f"{here[key]} vs {there[key]}")
    diff = max(abs(a - b) for x, y in zip(here["logits"], there["logits"])
               for ra, rb in zip(x, y) for a, b in zip(ra, rb))
    if diff > 1e-5:
        raise SystemExit(f"the model's logits differ by {diff:.2e} between transformers 5 and 4.46 "
                         "(limit 1e-5)")
    return {"max_logit_diff": diff, "tokens_checked": sum(map(len, here["ids"]))}


# ----- the one PPO loop (run in a child, in either environment) ---------------------------------------------
def ppo_loop(library: str, work: Path, seed: int, steps: int, lr: float) -> dict[str, Any]:
    """The classic loop of examples/scripts/ppo.py with `library` "trl" or "tether": per-step rewards, stats,
    times."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    lib = importlib.import_module(library)
    set_seed = getattr(lib, "set_seed", None)
    if set_seed is None:  # a tether without a top-level set_seed: the function TRL's seeds the same way
        from transformers import set_seed
    score = load_reward()
    pool = json.loads((work / "prompts.json").read_text())
    model_dir = str(work / "model")

    config = lib.PPOConfig(
        batch_size=BATCH, mini_batch_size=MINI_BATCH, gradient_accumulation_steps=1, ppo_epochs=PPO_EPOCHS,
        learning_rate=lr, init_kl_coef=INIT_KL, adap_kl_ctrl=True, seed=seed,
    )
    dataset = Dataset.from_dict(pool)
    dataset.set_format(type="torch")

    def collator(data: list[dict[str, Any]]) -> dict[str, list[Any]]:
        return {key: [d[key] for d in data] for key in data[0]}

    # set seed before initializing value head for deterministic eval (as the example does)
    set_seed(config.seed)
    model = lib.AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ppo_trainer = lib.PPOTrainer(config, model, None, tokenizer, dataset=dataset, data_collator=collator)
    generation_kwargs = {"min_length": -1, "top_k": 0.0, "top_p": 1.0, "do_sample": True,
                         "pad_token_id": tokenizer.eos_token_id, "max_new_tokens": MAX_NEW_TOKENS}

    # the same prompts per step in both libraries (the trainers' own dataloaders shuffle differently)
    order = random.Random(1000 + seed)
    per_step: list[dict[str, Any]] = []
    for _ in range(steps):
        rows = order.sample(range(len(pool["input_ids"])), BATCH)
        batch = collator([dataset[i] for i in rows])
        query_tensors = batch["input_ids"]
        t0, c0 = time.perf_counter(), time.process_time()
        response_tensors = ppo_trainer.generate(query_tensors, return_prompt=False, **generation_kwargs)
        t1, c1 = time.perf_counter(), time.process_time()
        batch["response"] = tokenizer.batch_decode(response_tensors, skip_special_tokens=True)
        texts = [q + r for q, r in zip(batch["query"], batch["response"])]
        rewards = [torch.tensor(score(t)) for t in texts]
        t2 = time.perf_counter()
        stats = ppo_trainer.step(query_tensors, response_tensors, rewards)
        t3, c3 = time.perf_counter(), time.process_time()
        scalars = {k: float(v) for k, v in stats.items()
                   if isinstance(v, (int, float)) or (hasattr(v, "ndim") and v.ndim == 0)}
        per_step.append({
            "reward": float(torch.stack(rewards).mean()), "generate_s": t1 - t0, "reward_s": t2 - t1,
            "step_s": t3 - t2, "cpu_s": c3 - c0, "generate_cpu_s": c1 - c0,
            "response_tokens": sum(len(r) for r in response_tensors), "sample": texts[0], "stats": scalars,
        })
    return {"per_step": per_step, "peak_rss_mib": round(harness.peak_rss_mib(), 1),
            "torch_threads": torch.get_num_threads(), "loadavg_1m_end": os.getloadavg()[0]}


def child_env() -> dict[str, str]:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    env.update(dict.fromkeys(harness.OFFLINE, "1"))
    return env


def run_child(lib: str, work: Path, seed: int, steps: int, lr: float, threads: int) -> dict[str, Any]:
    python = str(venv_python()) if lib == "trl" else sys.executable
    cmd = [python, __file__, "--library", lib, "--seed", str(seed), "--steps", str(steps), "--lr", str(lr),
           "--threads", str(threads), "--workdir", str(work)]
    log = work / f"log-{lib}-seed{seed}.txt"
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, env=child_env())
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(harness.MARK)]
    if proc.returncode or not lines:
        tail = "\n".join(log.read_text().strip().splitlines()[-15:])
        raise SystemExit(f"{lib} seed {seed} failed (rc {proc.returncode}); {log}:\n{tail}")
    result = json.loads(lines[-1][len(harness.MARK):])
    result.update(lib=lib, seed=seed, run_s=round(time.perf_counter() - t0, 1))
    return result


# ----- replay: the same rollouts through both step()s -------------------------------------------------------
REPLAY_STEPS = 2
# stats whose definitions differ (not the algorithm): TRL 0.11.4 averages them over the mini-batches of the
# PPO epochs, tether computes them once over the whole batch
DEFINED_DIFFERENTLY = ("ppo/policy/advantages_mean", "ppo/returns/mean", "ppo/returns/var", "ppo/val/mean",
                       "ppo/val/var", "ppo/val/var_explained")


def build_replay_inputs(work: Path) -> None:
    """work/replay.json: 16 prompts, responses sampled once from the SFT model (seed 0, 8 new tokens, cut
    after EOS), their rewards, and one value head's weights, so both libraries step on identical data."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model").eval()
    queries = json.loads((work / "prompts.json").read_text())["input_ids"][:BATCH]
    torch.manual_seed(0)
    responses = []
    for q in queries:
        out = model.generate(torch.tensor([q]), do_sample=True, top_k=0, max_new_tokens=MAX_NEW_TOKENS,
                             pad_token_id=tok.eos_token_id)[0, len(q):].tolist()
        responses.append(out[: out.index(tok.eos_token_id) + 1] if tok.eos_token_id in out else out)
    score = load_reward()
    texts = [tok.decode(q) + tok.decode(r, skip_special_tokens=True) for q, r in zip(queries, responses)]
    scores = [score(t) for t in texts]
    head = torch.nn.Linear(model.config.n_embd, 1)
    (work / "replay.json").write_text(json.dumps({
        "queries": queries, "responses": responses, "scores": scores,
        "v_head": [head.weight.tolist(), head.bias.tolist()],
    }))


def replay_child(library: str, work: Path, lr: float) -> dict[str, Any]:
    """REPLAY_STEPS step() calls on work/replay.json's data (the same data every time) with the benchmark's
    config; returns their scalar stats. tether's epoch shuffle is drawn with numpy's global RNG as TRL 0.11.4
    draws it (np.random.permutation after set_seed), so both visit the mini-batches in the same order."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    lib = importlib.import_module(library)
    data = json.loads((work / "replay.json").read_text())
    config = lib.PPOConfig(
        batch_size=BATCH, mini_batch_size=MINI_BATCH, gradient_accumulation_steps=1, ppo_epochs=PPO_EPOCHS,
        learning_rate=lr, init_kl_coef=INIT_KL, adap_kl_ctrl=True, seed=0,
    )
    model = lib.AutoModelForCausalLMWithValueHead.from_pretrained(str(work / "model"))
    with torch.no_grad():
        model.v_head.summary.weight.copy_(torch.tensor(data["v_head"][0]))
        model.v_head.summary.bias.copy_(torch.tensor(data["v_head"][1]))
    tokenizer = AutoTokenizer.from_pretrained(str(work / "model"))
    trainer = lib.PPOTrainer(config, model, None, tokenizer)
    if library == "tether":
        torch.randperm = lambda n, *args, **kwargs: torch.from_numpy(np.random.permutation(n))
    queries = [torch.tensor(q) for q in data["queries"]]
    responses = [torch.tensor(r) for r in data["responses"]]
    scores = [torch.tensor(float(x)) for x in data["scores"]]
    out = []
    for _ in range(REPLAY_STEPS):
        stats = trainer.step(queries, responses, scores)
        out.append({k: float(v) for k, v in stats.items() if not k.startswith("time/")
                    and (isinstance(v, (int, float)) or (hasattr(v, "ndim") and v.ndim == 0))})
    return {"replay": out}


def replay(work: Path, lr: float) -> dict[str, Any]:
    """Both libraries' step() on the same rollouts, value head and shuffle: which stats agree (rel 1e-4)."""
    if not (work / "replay.json").exists():
        build_replay_inputs(work)
    runs = {}
    for lib in ("trl", "tether"):
        python = str(venv_python()) if lib == "trl" else sys.executable
        cmd = [python, __file__, "--replay", "--library", lib, "--lr", str(lr), "--workdir", str(work)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(harness.MARK)]
        if proc.returncode or not lines:
            return {"error": f"{lib}: {proc.stderr.strip().splitlines()[-1:]}"}
        runs[lib] = json.loads(lines[-1][len(harness.MARK):])["replay"]
    equal, differ = [], {}
    for key in sorted(set(runs["trl"][0]) & set(runs["tether"][0])):
        pairs = [(a[key], b[key]) for a, b in zip(runs["trl"], runs["tether"])]
        if all(abs(x - y) <= 1e-4 * max(1.0, abs(x)) for x, y in pairs):
            equal.append(key)
        else:
            differ[key] = pairs
    return {"steps": REPLAY_STEPS, "equal": equal, "differ": differ}


def replay_lines(r: dict[str, Any]) -> list[str]:
    if "error" in r:
        return [f"Replay check failed: {r['error']}"]
    unexplained = sorted(set(r["differ"]) - set(DEFINED_DIFFERENTLY))
    explained = (", all stats the two define differently (TRL averages them over the mini-batches of the "
                 f"epochs, tether takes them over the batch): {', '.join(sorted(r['differ']))}")
    lines = [f"Replay (the same 16 rollouts, value head and mini-batch order through both step()s, "
             f"{r['steps']} steps): {len(r['equal'])} stats agree to 1e-4 (losses, clipfrac, approxkl, KL, "
             f"values, ...); {len(r['differ'])} differ{'' if unexplained else explained}."]
    for key in unexplained:
        lines.append(f"  UNEXPECTED difference in {key}: TRL / tether per step = "
                     + ", ".join(f"{x:.6g} / {y:.6g}" for x, y in r["differ"][key]))
    return lines


# ----- summary ----------------------------------------------------------------------------------------------
NAMES = {"trl": "TRL 0.11.4", "tether": "tether"}


def summarise(r: dict[str, Any]) -> dict[str, Any]:
    steps = r["per_step"]
    rewards = [s["reward"] for s in steps]
    edge = max(1, min(EDGE, len(steps) // 2))
    timed = steps[1:] or steps  # the first step is warm-up
    totals = [s["generate_s"] + s["reward_s"] + s["step_s"] for s in timed]
    kl = [s["stats"].get("objective/kl", float("nan")) for s in steps]
    return {
        "first": statistics.mean(rewards[:edge]), "last": statistics.mean(rewards[-edge:]),
        "gain": statistics.mean(rewards[-edge:]) - statistics.mean(rewards[:edge]),
        "kl_last": statistics.mean(kl[-edge:]),
        "steps_per_s": 1 / statistics.median(totals),
        # CPU seconds of the process (1 torch thread): what the step costs, whatever else runs on the machine
        "steps_per_cpu_s": 1 / statistics.median(s["cpu_s"] for s in timed),
        "load": r.get("loadavg_1m_end", float("nan")),
        "generate_s": statistics.median(s["generate_s"] for s in timed),
        "step_s": statistics.median(s["step_s"] for s in timed),
        "peak_rss_mib": r["peak_rss_mib"],
    }


def render(results: list[dict[str, Any]], libs: list[str], seeds: list[int]) -> str:
    by = {(r["lib"], r["seed"]): summarise(r) for r in results}
    edge = max(1, min(EDGE, len(results[0]["per_step"]) // 2))
    head = ["library", f"reward gain per seed ({' / '.join(map(str, seeds))})", "mean gain",
            f"reward first {edge} -> last {edge}", f"KL last {edge}", "steps/s (median)", "steps per CPU-s",
            "generate s/step", "step() s/step", "peak RSS MiB", "load 1m"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    agg: dict[str, dict[str, float]] = {}
    for lib in libs:
        rows = [by[(lib, s)] for s in seeds]
        gains = [x["gain"] for x in rows]
        agg[lib] = {
            "gain": statistics.mean(gains), "gain_sd": statistics.stdev(gains) if len(gains) > 1 else 0.0,
            "steps_per_s": statistics.median(x["steps_per_s"] for x in rows),
            "steps_per_cpu_s": statistics.median(x["steps_per_cpu_s"] for x in rows),
            "rss": max(x["peak_rss_mib"] for x in rows),
        }
        loads = " / ".join(f"{x['load']:.1f}" for x in rows)
        lines.append(
            f"| {NAMES[lib]} | {' / '.join(f'{g:+.3f}' for g in gains)} | {agg[lib]['gain']:+.3f} | "
            f"{statistics.mean(x['first'] for x in rows):+.3f} -> "
            f"{statistics.mean(x['last'] for x in rows):+.3f} | "
            f"{statistics.mean(x['kl_last'] for x in rows):.2f} | {agg[lib]['steps_per_s']:.2f} | "
            f"{agg[lib]['steps_per_cpu_s']:.2f} | {statistics.median(x['generate_s'] for x in rows):.3f} | "
            f"{statistics.median(x['step_s'] for x in rows):.3f} | {agg[lib]['rss']:.0f} | "
            f"{loads} |")
    if set(libs) == {"trl", "tether"}:
        t, b = agg["tether"], agg["trl"]
        noise = max(b["gain_sd"], t["gain_sd"])
        lines += [
            "",
            f"Reward gain: tether {t['gain']:+.3f} vs TRL {b['gain']:+.3f} (seed sd {t['gain_sd']:.3f} / "
            f"{b['gain_sd']:.3f}): target 'at least TRL's within seed noise' (tether >= TRL - max sd) "
            f"{'MET' if t['gain'] >= b['gain'] - noise else 'NOT MET'}.",
            f"Steps/s: tether/TRL = {t['steps_per_s'] / b['steps_per_s']:.2f} (wall), "
            f"{t['steps_per_cpu_s'] / b['steps_per_cpu_s']:.2f} (per CPU-second): target > 1 "
            f"{'MET' if t['steps_per_s'] > b['steps_per_s'] else 'NOT MET'} (wall), "
            f"{'MET' if t['steps_per_cpu_s'] > b['steps_per_cpu_s'] else 'NOT MET'} (CPU). "
            f"Peak RSS tether/TRL = {t['rss'] / b['rss']:.2f}.",
        ]
    lines += ["", stats_table(results, libs)]
    return "\n".join(lines)


def stats_table(results: list[dict[str, Any]], libs: list[str]) -> str:
    """Per stat both report: step-1 value and the mean over all steps, each averaged over the seeds."""
    def mean_of(lib: str, key: str, first: bool) -> str:
        vals = []
        for r in (r for r in results if r["lib"] == lib):
            xs = [s["stats"][key] for s in r["per_step"][: 1 if first else None] if key in s["stats"]]
            if xs:
                vals.append(statistics.mean(xs))
        return f"{statistics.mean(vals):.4g}" if vals else "-"

    head = ["stat", *(f"{NAMES[lib]} step 1" for lib in libs), *(f"{NAMES[lib]} all steps" for lib in libs)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in STAT_KEYS:
        lines.append(f"| {key} | " + " | ".join([*(mean_of(lib, key, True) for lib in libs),
                                                 *(mean_of(lib, key, False) for lib in libs)]) + " |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], libs: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    for lib, color in zip(libs, ("tab:orange", "tab:blue")):
        runs = [r for r in results if r["lib"] == lib]
        for ax, get in ((axes[0], lambda s: s["reward"]),
                        (axes[1], lambda s: s["stats"].get("objective/kl", float("nan")))):
            curves = [[get(s) for s in r["per_step"]] for r in runs]
            x = range(1, len(curves[0]) + 1)
            cols = list(zip(*curves))
            ax.plot(x, [statistics.mean(c) for c in cols], color=color,
                    label=f"{NAMES[lib]} (mean of {len(runs)} seeds)")
            ax.fill_between(x, [min(c) for c in cols], [max(c) for c in cols], color=color, alpha=0.2, lw=0)
    axes[0].set(xlabel="PPO step", ylabel="mean reward (positivity)", title="reward, min/max over seeds")
    axes[1].set(xlabel="PPO step", ylabel="objective/kl", title="KL to the reference")
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def git_state() -> str:
    """The checkout's commit, with '+dirty' when src/ has uncommitted changes (what tether ran as)."""
    def git(*args: str) -> str:
        proc = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--", "src") else "")


# ----- entry points -----------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=40, help="PPO steps per run")
    p.add_argument("--quick", action="store_true", help="1 seed, 3 steps: a check that everything works")
    p.add_argument("--libs", default="trl,tether", help="comma-separated subset of trl,tether")
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--threads", type=int, default=1, help="torch threads in each run (same for both)")
    p.add_argument("--workdir", type=Path, default=REPO / "bench-out" / "ppo_vs_trl011")
    p.add_argument("--plot", type=Path,
                   help="PNG path (default benchmarks/ppo_vs_trl011.png; --quick: WORK/ppo_vs_trl011.png)")
    p.add_argument("--library", choices=("trl", "tether"), help=argparse.SUPPRESS)  # child mode
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--load-probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--replay", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-replay", action="store_true", help="skip the replay check of step() against TRL's")
    a = p.parse_args()
    os.environ.update(dict.fromkeys(harness.OFFLINE, "1"), TOKENIZERS_PARALLELISM="false")
    if a.load_probe:
        harness.emit(load_probe(a.workdir))
        return
    if a.replay:
        import torch

        torch.set_num_threads(a.threads)
        harness.emit(replay_child(a.library, a.workdir, a.lr))
        return
    if a.library:
        import torch

        torch.set_num_threads(a.threads)
        import transformers

        out = ppo_loop(a.library, a.workdir, a.seed, a.steps, a.lr)
        versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                    a.library: importlib.import_module(a.library).__version__}
        harness.emit({**out, "versions": versions})
        return

    if a.quick:
        a.seeds, a.steps = a.seeds[:1], 3
    libs = [x for x in a.libs.split(",") if x]
    if not set(libs) <= {"trl", "tether"} or not libs:
        raise SystemExit(f"--libs must name trl and/or tether, got {a.libs!r}")
    a.workdir.mkdir(parents=True, exist_ok=True)
    log = sys.stderr
    if "trl" in libs:
        print(f"TRL venv: {json.dumps(ensure_trl_venv())}", file=log, flush=True)
    assets = build_assets(a.workdir, a.threads)
    print(f"assets: {json.dumps(assets)}", file=log, flush=True)
    if "trl" in libs:
        print(f"load parity transformers 4.46.3 vs {__import__('transformers').__version__}: "
              f"{json.dumps(check_parity(a.workdir))}", file=log, flush=True)
    replayed = None
    if set(libs) == {"trl", "tether"} and not a.no_replay:
        replayed = replay(a.workdir, a.lr)
        print("\n".join(replay_lines(replayed)), file=log, flush=True)
    results = []
    for i, seed in enumerate(a.seeds):
        for lib in (libs if i % 2 == 0 else libs[::-1]):  # alternate which library goes first
            print(f"running {lib} seed {seed} ({a.steps} steps) ...", file=log, flush=True)
            results.append(run_child(lib, a.workdir, seed, a.steps, a.lr, a.threads))
            s = summarise(results[-1])
            print(f"  {lib} seed {seed}: reward {s['first']:+.3f} -> {s['last']:+.3f}, "
                  f"{s['steps_per_s']:.2f} steps/s, peak RSS {s['peak_rss_mib']:.0f} MiB, "
                  f"{results[-1]['run_s']} s", file=log, flush=True)
    setting = {"batch_size": BATCH, "mini_batch_size": MINI_BATCH, "gradient_accumulation_steps": 1,
               "ppo_epochs": PPO_EPOCHS, "learning_rate": a.lr, "init_kl_coef": INIT_KL, "adap_kl_ctrl": True,
               "max_new_tokens": MAX_NEW_TOKENS, "steps": a.steps, "seeds": a.seeds, "threads": a.threads,
               "tether_commit": git_state()}
    out = a.workdir / ("results-quick.json" if a.quick else "results.json")  # --quick keeps a full run's file
    out.write_text(json.dumps({"setting": setting, "assets": assets, "replay": replayed, "runs": results}))
    png = a.plot or (a.workdir / "ppo_vs_trl011.png" if a.quick else HERE / "ppo_vs_trl011.png")
    plot(results, libs, png)
    print(f"per-step results: {out}; plot: {png}", file=log, flush=True)
    print(f"setting: {json.dumps(setting)}")
    print(render(results, libs, a.seeds))
    if replayed is not None:
        print("\n" + "\n".join(replay_lines(replayed)))


if __name__ == "__main__":
    main()
