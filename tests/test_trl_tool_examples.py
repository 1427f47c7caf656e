"""TRL 0.7.11's research_projects/tools scripts under tether, with only their imports renamed (the harness of
test_trl_examples.py: trl -> tether, hub ids -> tiny local stand-ins, nothing else), in a subprocess.

The three scripts import `load_tool` from transformers, which transformers 5 removed: run as they are, they
stop at that import, whatever tether does. The replays (harness.ENVIRONMENT_PATCHES) import it from
`tether.environment` instead, which serves the hub ids calculator.py and python_interpreter.py load
("ybelkada/simple-calculator", "lvwerra/python-interpreter") with tether's own tools, offline. triviaqa.py's
tool is a hub Space searching a 40 GB pyserini (Java Lucene) Wikipedia index: its replay puts a stand-in
function in its place. calculator.py's replay also drops a column its own log_stats call names but never
fills (TRL 0.7.11 raises on it too), and runs its hard-coded loop smaller (harness.SIZE_PATCHES); the other
two take their sizes as flags. The models never call a tool here (they are random); tests/test_text_environment.py
runs the tool path on a model scripted to call one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from test_trl_examples import assert_saved_model, run_example

TOOLS = "research_projects/tools/"


def run_tool_script(standins, hf_home, tmp_path, name, replace, args=(), dump=(), replay=False):
    return run_example(standins, hf_home, tmp_path, TOOLS + name, replace, args, dump, replay=replay)


def assert_ppo_step_stats(stats: dict) -> None:
    for key in ("ppo/loss/total", "ppo/loss/policy", "ppo/loss/value", "objective/kl"):
        assert isinstance(stats.get(key), float), f"step() stats lack a finite {key!r}: {sorted(stats)}"


# The flags both PEFT scripts share, set small (bigcode/starcoderbase -> the 1024-position GPT-2 stand-in).
SMALL = ["--batch_size", 2, "--mini_batch_size", 1, "--gradient_accumulation_steps", 1, "--ppo_epochs", 1,
         "--max_new_tokens", 8]


@pytest.mark.parametrize("name, replace", [("calculator.py", ["gpt2"]), ("python_interpreter.py", ["gsm8k"]),
                                           ("triviaqa.py", ["trivia_qa"])])
def test_tool_scripts_stop_at_transformers_load_tool(standins, hf_home, tmp_path, name, replace):
    run = run_tool_script(standins, hf_home, tmp_path, name, replace)
    run.check_stops_at("from transformers import", "cannot import name 'load_tool'")


@pytest.mark.slow
def test_replay_calculator(standins, hf_home, tmp_path):
    """2 PPO steps of 32 episodes on the tiny GPT-2 (harness.SIZE_PATCHES; written: 100 of 256)."""
    run = run_tool_script(standins, hf_home, tmp_path, "calculator.py", ["gpt2"], replay=True,
                          dump=["train_stats", "histories", "masks", "responses", "_step"])
    run.check()
    assert run.dumped["_step"] == 1.0
    assert_ppo_step_stats(run.dumped["train_stats"])
    assert run.dumped["histories"]["len"] == 32 and run.dumped["masks"]["len"] == 32
    assert_saved_model(Path(standins.path("gpt2") + "-calculator"))  # model_id + "-calculator": beside the model


@pytest.mark.slow
def test_replay_python_interpreter(standins, hf_home, tmp_path):
    args = ["--model_name", standins.path("gpt2-long"), *SMALL, "--n_epochs", 1]
    run = run_tool_script(standins, hf_home, tmp_path, "python_interpreter.py", ["gsm8k"], args, replay=True,
                          dump=["train_stats", "reward_mean_test", "step", "epoch", "histories"])
    run.check()
    assert_ppo_step_stats(run.dumped["train_stats"])
    assert run.dumped["step"] == 1.0 and run.dumped["epoch"] == 0.0  # 4 rows, batches of 2: two steps
    assert run.dumped["histories"]["len"] == 2
    assert isinstance(run.dumped["reward_mean_test"], float)
    saved = [p.parent for p in (Path(run.cwd) / "model").rglob("adapter_config.json")]
    assert len(saved) == 1 and saved[0].name.endswith("-gsm8k")  # f"model/{model_name}-gsm8k": the adapter
    assert_saved_model(saved[0])


@pytest.mark.slow
def test_replay_triviaqa(standins, hf_home, tmp_path):
    args = ["--model_name", standins.path("gpt2-long"), *SMALL, "--iterations", 2]
    run = run_tool_script(standins, hf_home, tmp_path, "triviaqa.py", ["trivia_qa"], args, replay=True,
                          dump=["train_stats", "i", "all_rewards", "text_env"])
    run.check()
    assert_ppo_step_stats(run.dumped["train_stats"])
    assert run.dumped["i"] == 1.0 and run.dumped["all_rewards"]["tensor_shape"] == [2]
    assert "max_tool_reponse" in run.stderr  # TRL 0.7.11's spelling: taken, with a FutureWarning
    saved = [p.parent for p in (Path(run.cwd) / "models").rglob("adapter_config.json")]
    assert len(saved) == 1 and saved[0].name.endswith("_0_0_triviaqa")  # saved at i == 0
