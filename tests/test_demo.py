"""`tether demo` end to end, in a subprocess as a newcomer would run it, the pipeline YAML it runs, and the
yardsticks its story is told by.

The default suite runs the `--quick` demo (files, printed sections, a self-contained report) and checks the
evaluation pieces (demo/evaluate.py) against references written here. The story itself (a reward model that
ranks the hand-written check set, PPO / DPO / GRPO / RLOO raising the held-out reward of fluent samples) only
holds at full size: the slow tests run the full demo once per method and read its story.json.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from launching import OFFLINE_ENV
from tether.demo.config import METHOD_STAGES, demo_yaml
from tether.demo.corpus import (
    CONTRADICTED,
    TRUNCATED,
    check_sentences,
    positivity_score,
    review_prompts,
    unknown_words,
)
from tether.demo.evaluate import (
    PolicyEval,
    check_reward_model,
    completion_perplexity,
    sample_completions,
)
from tether.demo.pipeline import HELD_OUT_OPENINGS, QUICK, STORY_FILE, TRAIN_OPENINGS, DemoContext

EXPECTED_FILES = [
    "data/reviews/train.jsonl", "data/reviews/test.jsonl", "data/ranked_pairs/train.jsonl",
    "data/positive_pairs/test.jsonl", "data/prompts.jsonl",
    "base/config.json", "base/model.safetensors", "base/tokenizer.json", "sft/pipeline_stage.yaml",
    "sft/config.json", "sft/model.safetensors", "sft/tokenizer.json",
    "reward/config.json", "reward/model.safetensors", "dpo/model.safetensors",
    "ppo/model.safetensors", "ppo/value_head.safetensors", "ppo/metrics.jsonl", STORY_FILE, "report.html",
]
IMG_SRC = re.compile(r'<img src="([^"]*)"')


def run_demo(output_dir, *flags: str, timeout: int, cwd=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tether.cli", "demo", "--output_dir", str(output_dir), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, env=OFFLINE_ENV, timeout=timeout, cwd=cwd)


def check_run(result: subprocess.CompletedProcess, output_dir) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in EXPECTED_FILES:
        assert (output_dir / name).is_file(), f"{name} missing"
    out = result.stdout
    assert "Samples BEFORE training" in out and "Samples AFTER training" in out and "Summary" in out
    assert "Held-out pairwise accuracy" in out and "Check set" in out and "Scores of a few sentences" in out
    assert "Samples AFTER DPO" in out and "rewards/accuracies" in out
    assert "Samples AFTER PPO" in out and "Mean reward of rollouts" in out
    assert out.count("Held-out evaluation") == 2  # after PPO and after DPO
    # matplotlib is a dependency: no "matplotlib is not installed" warning, however many reports are written
    assert "matplotlib" not in result.stderr


def check_report_is_self_contained(output_dir, tmp_path) -> None:
    """The report embeds its plots: copied alone to another folder, every image is still there (a PNG data URI
    holding the bytes of the PNG file it names)."""
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(output_dir / "report.html", moved / "report.html")
    page = (moved / "report.html").read_text()
    sources = IMG_SRC.findall(page)
    assert len(sources) >= 8, len(sources)  # plots of the SFT, reward, PPO and DPO runs
    for src, name in zip(sources, re.findall(r'data-file="([^"]*)"', page), strict=True):
        assert src.startswith("data:image/png;base64,"), src[:60]
        assert base64.b64decode(src.split(",", 1)[1]) == (output_dir / name).read_bytes(), name


def test_demo_quick(tmp_path):
    """`tether demo --quick` runs, and writes everything under --output_dir (run from an empty folder,
    that folder is all that appears); its report shows its plots wherever it is moved."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = run_demo("out", "--quick", cwd=cwd, timeout=300)
    check_run(result, cwd / "out")
    assert sorted(os.listdir(cwd)) == ["out"]
    check_report_is_self_contained(cwd / "out", tmp_path)
    # The YAML the demo prints is the pipeline it ran: planned from the same folder, every stage is up to date.
    printed = run_demo("out", "--quick", "--print-config", cwd=cwd, timeout=120)
    (tmp_path / "demo.yaml").write_text(printed.stdout)
    plan = subprocess.run([sys.executable, "-m", "tether.cli", "pipeline", str(tmp_path / "demo.yaml"), "--plan"],
                          capture_output=True, text=True, env=OFFLINE_ENV, timeout=120, cwd=cwd)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert re.findall(r"\d\. (\w+) \(\w+\): skip", plan.stdout) == ["sft", "reward", "ppo", "dpo"], plan.stdout
    story = json.loads((cwd / "out" / STORY_FILE).read_text())
    assert set(story) >= {"sft", "reward", "ppo", "dpo", "timings", "total_seconds"}
    for stage in ("ppo", "dpo"):
        assert set(story[stage]["before"]) == set(story[stage]["after"]) >= {"reward", "perplexity", "positivity"}
        assert len(story[stage]["samples"]) == len(HELD_OUT_OPENINGS) * QUICK.eval_samples


@pytest.mark.slow  # the default suite's 15-minute budget; the quick demo stays in it
def test_demo_is_reproducible_and_a_rerun_skips_every_stage(tmp_path, capsys):
    """Same seed, same run: identical samples and bit-identical fine-tuned weights (in process, --quick). Run
    again into the same folder, the demo rewrites no input, so the pipeline skips every stage, and the story
    (read from the stages' own files) is told again, the same."""
    from tether.demo.pipeline import run_demo as run_in_process

    samples, weights = [], []
    for name in ("a", "b", "a"):
        run_in_process(tmp_path / name, quick=True, seed=0)
        out = capsys.readouterr().out
        samples.append([line for line in out.splitlines() if line.strip().startswith(("greedy", "sampled"))])
        weights.append((tmp_path / name / "sft" / "model.safetensors").read_bytes())
    assert samples[0] and samples[0] == samples[1] == samples[2]
    assert weights[0] == weights[1] == weights[2]
    assert re.findall(r"Stage \d/4: (\w+) \(\w+\) -- skip", out) == ["sft", "reward", "ppo", "dpo"], out[-3000:]


@pytest.mark.parametrize("method", ["ppo", "grpo"])
def test_print_config_is_the_pipeline_the_demo_runs(method, tmp_path, capsys):
    """`tether demo --print-config` prints a pipeline YAML (its paths under --output_dir, the --quick sizes)
    with the method's stages, which `tether pipeline` accepts as it is; the header names the options."""
    import yaml

    from tether.cli import main
    from tether.pipeline import parse_pipeline

    out = tmp_path / "my demo"
    assert main(["demo", "--quick", "--method", method, "--output_dir", str(out), "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert printed == demo_yaml(str(out), QUICK, 0, method, f" --quick{'' if method == 'ppo' else ' --method grpo'}"
                                                               f" --output_dir {out}")
    assert "tether demo --quick" in printed and not (out / "base").exists()  # printing runs nothing
    values = yaml.safe_load(printed)
    spec = parse_pipeline(values)
    assert [s.name for s in spec.stages] == list(METHOD_STAGES[method])
    assert spec.output_dir == str(out) and spec.model == f"{out}/base"
    assert spec.stage("sft").config["max_steps"] == QUICK.sft_steps
    assert spec.stage("sft").dataset.name == f"{out}/data/reviews" and spec.stage("sft").dataset.test_split == "test"


@pytest.mark.slow  # the default suite's 15-minute budget; the quick demo stays in it
def test_demo_method_grpo_quick(tmp_path, capsys):
    """`tether demo --method grpo --quick` (in process): setup, SFT, reward model, then GRPO, one report."""
    from tether.cli import main

    assert main(["demo", "--method", "grpo", "--quick", "--output_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Samples AFTER GRPO" in out and "Mean reward of sampled reviews" in out
    assert "Samples AFTER DPO" not in out and "Samples AFTER PPO" not in out
    assert (tmp_path / "grpo" / "metrics.jsonl").is_file() and (tmp_path / "report.html").is_file()
    assert "grpo" in json.loads((tmp_path / STORY_FILE).read_text())
    page = (tmp_path / "report.html").read_text()
    assert "tether demo" in page and "held-out reward" in page  # the demo's title and its story's lines


# ----- the yardsticks ---------------------------------------------------------------------------------------
def test_prompts_of_policy_stages_leave_out_the_evaluation_openings():
    assert set(HELD_OUT_OPENINGS) <= set(review_prompts()) and not set(HELD_OUT_OPENINGS) & set(TRAIN_OPENINGS)
    assert set(HELD_OUT_OPENINGS) | set(TRAIN_OPENINGS) == set(review_prompts())


def test_stages_sample_with_seeds_of_their_own():
    ctx = DemoContext(output_dir=None, sizes=QUICK, seed=0)
    seeds = [ctx.stage_seed(s) for s in ("sft", "ppo", "dpo", "grpo", "rloo")]
    assert len(set(seeds)) == len(seeds)
    assert DemoContext(output_dir=None, sizes=QUICK, seed=1).stage_seed("ppo") == seeds[1] + 1


def test_check_of_a_reward_model_counts_its_rankings():
    """The check's accuracies are shares of correctly ordered pairs, counted here by hand."""
    sentences = {"positive": ["p1", "p2"], "negative": ["n1", "n2"], "neutral": ["u1"], TRUNCATED: ["t1", "t2"],
                 CONTRADICTED: ["c1", "c2"]}
    scores = {"p1": 2.0, "p2": 0.5, "n1": -1.0, "n2": 1.0, "u1": 0.0, "t1": 3.0, "t2": 0.0, "c1": 0.0, "c2": 0.0}
    check = check_reward_model(lambda texts: [scores[t] for t in texts], {k: list(v) for k, v in sentences.items()})
    assert check.accuracy == 3 / 4  # p1>n1, p1>n2, p2>n1; not p2>n2
    assert check.ranking_accuracy("positive", "neutral") == 1.0
    assert check.ranking_accuracy("neutral", "negative") == 1 / 2
    assert check.paired_accuracy("positive", TRUNCATED) == 1 / 2  # p1 < t1, p2 > t2
    assert check.paired_accuracy("positive", CONTRADICTED) == 1.0
    assert check.mean("positive") == 1.25 and check.mean("negative") == 0.0


def test_check_set_adds_the_positive_sentences_damaged():
    """Without damaged classes given, the check scores each positive sentence cut short and contradicting itself."""
    scored = []
    check = check_reward_model(lambda texts: scored.extend(texts) or [0.0] * len(texts))
    positive = check_sentences()["positive"]
    assert len(check.scores[TRUNCATED]) == len(check.scores[CONTRADICTED]) == len(positive)
    assert len(scored) == sum(len(v) for v in check_sentences().values()) + 2 * len(positive)
    damaged = scored[-2 * len(positive):]
    assert all(d != p for d, p in zip(damaged, positive * 2)) and len(set(damaged)) == len(damaged)


def test_the_lexicon_passes_the_check_and_a_neutral_loving_scorer_fails_it():
    """An oracle (the hand-written lexicon) ranks the check set perfectly; a scorer that prefers neutral
    text, as the reward model of the issue did, shows it in positive_over_neutral and the means."""
    oracle = check_reward_model(lambda texts: [positivity_score(t) for t in texts]).summary()
    assert oracle["accuracy"] == 1.0 and oracle["mean_positive"] > oracle["mean_neutral"] > oracle["mean_negative"]
    neutral = set(check_sentences()["neutral"])
    fooled = check_reward_model(lambda texts: [2.0 if t in neutral else positivity_score(t) for t in texts])
    assert fooled.accuracy == 1.0 and fooled.ranking_accuracy("positive", "neutral") == 0.0
    assert fooled.mean("neutral") > fooled.mean("positive")


def test_policy_eval_summary():
    ev = PolicyEval(["the plot", "the plot", "the film", "the film"],
                    [" was great.", " was great.", " was dull.", " was fine\ufffd."], rewards=[1.0, 2.0, -1.0, 0.0],
                    perplexity=3.0)
    assert ev.summary() == {"reward": 0.5, "positivity": (1 + 1 - 1 + 0) / 4, "positive_share": 0.5,
                            "perplexity": 3.0, "broken_share": 0.25, "distinct_share": 0.75}


def test_unknown_words():
    assert unknown_words("the plot was not bad at all, and the score was truly great.") == []
    assert unknown_words("the plot was goodish\ufffd") == ["goodish", "\ufffd"]


def test_sampled_completions_stop_at_eos_and_follow_the_seed(tiny_decoder_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)
    prompts = ["the plot", "this movie"]
    owners, ids = sample_completions(model, tokenizer, prompts, per_prompt=3, seed=5, max_new_tokens=6)
    assert owners == ["the plot"] * 3 + ["this movie"] * 3
    eos = tokenizer.eos_token_id
    assert all(0 < len(row) <= 6 and (eos not in row or row.index(eos) == len(row) - 1) for row in ids)
    assert sample_completions(model, tokenizer, prompts, 3, seed=5, max_new_tokens=6)[1] == ids
    assert sample_completions(model, tokenizer, prompts, 3, seed=6, max_new_tokens=6)[1] != ids


def test_completion_perplexity_is_exp_mean_token_nll(tiny_decoder_dir, tokenizer):
    """Against log-softmax of one unpadded forward pass per sample, written out here."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir).eval()
    prompts = ["the plot", "the plot", "this movie"]
    completions = [tokenizer(" was great.")["input_ids"] + [tokenizer.eos_token_id],
                   tokenizer(" was dull")["input_ids"], tokenizer(" seemed quite clever and fun.")["input_ids"]]
    nll, count = 0.0, 0
    for prompt, completion in zip(prompts, completions):
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = torch.tensor([prompt_ids + completion])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        for k, token in enumerate(completion):
            nll -= float(logprobs[len(prompt_ids) + k - 1, token])
            count += 1
    assert completion_perplexity(model, tokenizer, prompts, completions) == pytest.approx(math.exp(nll / count),
                                                                                          rel=1e-5)


# ----- the story, at full size (slow) -----------------------------------------------------------------------
def check_policy_story(story: dict, stage: str) -> None:
    """A policy stage raised the held-out reward of its samples a lot, the hand-written lexicon agrees that they
    became more positive (so they are not gaming the reward model), and they stayed fluent: perplexity under
    the SFT model within 1.5x of the SFT model's own samples', broken words no more frequent."""
    before, after = story[stage]["before"], story[stage]["after"]
    assert after["reward"] > before["reward"] + 1.0, (stage, before, after)
    assert after["positivity"] > before["positivity"] + 0.3, (stage, before, after)
    assert after["positive_share"] > 0.6, (stage, after)
    assert after["perplexity"] < 1.5 * before["perplexity"], (stage, before, after)
    assert after["broken_share"] <= max(0.05, before["broken_share"] + 0.02), (stage, before, after)
    assert after["distinct_share"] > 0.5, (stage, after)  # no collapse onto a few phrases


def check_reward_story(story: dict) -> None:
    reward = story["reward"]
    assert reward["accuracy"] >= 0.9, reward  # clearly positive above clearly negative, hand-written sentences
    assert reward["mean_positive"] > reward["mean_neutral"] + 1.0 > reward["mean_negative"] + 1.0, reward
    assert reward["positive_over_neutral"] >= 0.7 and reward["positive_over_truncated"] >= 0.7, reward


def sampled_lines(stdout: str, label: str) -> list[str]:
    after = stdout.split(f"Samples AFTER {label}")[1].split("Held-out evaluation")[0]
    return [line.split("  ", 2)[-1] for line in after.splitlines() if line.strip().startswith("sampled")]


@pytest.mark.slow
def test_demo_full(tmp_path):
    """The real demo: SFT writes reviews; the reward model ranks the check set; PPO and DPO each make the
    held-out samples clearly more positive while they stay fluent; each stage shows samples of its own."""
    output_dir = tmp_path / "demo"
    result = run_demo(output_dir, timeout=900)
    check_run(result, output_dir)
    check_report_is_self_contained(output_dir, tmp_path)
    after = result.stdout.split("Samples AFTER training")[1]
    greedy = [line.split("|", 1)[1] for line in after.splitlines() if line.strip().startswith("greedy")]
    assert greedy and all(text.rstrip().endswith(".") for text in greedy), greedy
    # Before training the held-out loss is about ln(vocab) ~ 6.7 nats/token; the corpus' own entropy is ~0.9.
    match = re.search(r"Held-out loss ([\d.]+) -> ([\d.]+)", result.stdout)
    assert match and float(match[1]) > 5.0 and float(match[2]) < 1.3, match
    story = json.loads((output_dir / STORY_FILE).read_text())
    check_reward_story(story)
    for stage in ("ppo", "dpo"):
        check_policy_story(story, stage)
    assert story["dpo"]["pair_accuracy"] >= 0.9
    assert story["ppo"]["rollout_reward_last"] > story["ppo"]["rollout_reward_first"] + 0.5
    ppo, dpo = sampled_lines(result.stdout, "PPO"), sampled_lines(result.stdout, "DPO")
    assert len(ppo) == len(dpo) == 8 and not set(ppo) & set(dpo), (ppo, dpo)
    # the PPO reward curve names the reward model's folder, not the SFT model it was initialised from
    names = {name for row in map(json.loads, open(output_dir / "ppo" / "metrics.jsonl")) for name in row}
    assert f"rewards/reward_model:{output_dir / 'reward'}" in names, sorted(names)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_demo_group_rl_full_raises_the_reward(method, tmp_path):
    """The full demo with GRPO / RLOO: held-out samples clearly more positive, still fluent."""
    result = run_demo(tmp_path, "--method", method, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    story = json.loads((tmp_path / STORY_FILE).read_text())
    check_reward_story(story)
    check_policy_story(story, method)
    assert story[method]["rollout_reward_last"] > story[method]["rollout_reward_first"] + 0.3
