"""Multi-turn episodes (rollout/multiturn.py, trainers/episodes.py): masks, KV reuse across turns, the first
importance ratio, tool environments, the trainer's glue, the CLI, and the tools demo's learning."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from datasets import Dataset

from tether import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from tether.rollout import multiturn
from tether.rollout.multiturn import ToolEnvironment, chat_tool_observation, sample_episodes

OBSERVATION = " the movie"


class ScriptedEnv:
    """Answers every turn with OBSERVATION (repeated `i % 3 + 1` times) and reward = the turn's number; episode i
    is done after 2 + i % 2 turns."""

    def __init__(self, i: int = 0) -> None:
        self.i, self.turns, self.texts = i, 0, []

    def reset(self, prompt=None):
        return None

    def step(self, text):
        self.turns += 1
        self.texts.append(text)
        return OBSERVATION * (self.i % 3 + 1), float(self.turns), self.turns >= 2 + self.i % 2


def _episodes(model, tokenizer, prompts, reuse=True, seed=1, max_turn_tokens=5, budget=60, envs=None):
    envs = envs if envs is not None else [ScriptedEnv(i) for i in range(len(prompts))]
    return sample_episodes(model, tokenizer, prompts, envs, max_completion_length=budget, max_turns=4,
                           eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
                           max_turn_tokens=max_turn_tokens, generator=torch.Generator().manual_seed(seed),
                           reuse_cache=reuse), envs


def _prompts(tokenizer):
    texts = ["the film", "a great movie that", "bad", "i liked it", "the acting was", "plot"]
    return [tokenizer.encode(t) for t in texts]


def _teacher_forced(model, prompt, completion):
    """log p(token | everything before it) for each completion token: one plain forward pass over the episode."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logps = model(ids).logits[0].float().log_softmax(-1)
    return logps[len(prompt) - 1:-1].gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def test_loss_mask_covers_model_tokens_only(tiny_decoder, tokenizer):
    """Hand-built expectation: with max_turn_tokens=5 and no EOS sampled early, an episode is 5 model tokens, the
    observation's tokens, 5 model tokens, ...; the mask is True exactly at the model's tokens, the observation
    tokens are the environment's text, and each turn's text is what the environment received."""
    torch.manual_seed(0)
    obs_ids = tokenizer.encode(OBSERVATION, add_special_tokens=False)
    out, envs = _episodes(tiny_decoder, tokenizer, _prompts(tokenizer), max_turn_tokens=5)
    for i, env in enumerate(envs):
        ids, mask = out.completion_ids[i], out.completion_mask[i]
        expected_mask, position = [], 0
        for turn, text in enumerate(env.texts):
            turn_ids = ids[position:].tolist()
            turn_length = next((j + 1 for j, t in enumerate(turn_ids[:5]) if t == tokenizer.eos_token_id), 5)
            assert tokenizer.decode([t for t in turn_ids[:turn_length] if t != tokenizer.eos_token_id]) == text
            expected_mask += [True] * turn_length
            position += turn_length
            if turn + 1 < len(env.texts):  # an observation follows every turn but the last
                observed = obs_ids * (i % 3 + 1)
                assert ids[position:position + len(observed)].tolist() == observed
                expected_mask += [False] * len(observed)
                position += len(observed)
        assert mask[:position].tolist() == expected_mask
        assert not mask[position:].any() and not out.episode_mask[i, position:].any()
        assert out.episode_mask[i, :position].all()
        assert out.turn_rewards[i] == [float(t + 1) for t in range(len(env.texts))]
        assert float(out.rewards[i]) == sum(out.turn_rewards[i])
        assert (out.logps[i][~mask] == 0).all()


def test_kv_reuse_across_turns_equals_reencoding(tiny_decoder, tokenizer, monkeypatch):
    """The cache kept across turns (with masked holes and repacking) gives the same next-token log-probs as
    re-encoding each episode after every turn, and as one plain forward pass over the finished episode."""
    repacks = []
    original = multiturn._repack
    monkeypatch.setattr(multiturn, "_repack", lambda cache, mask: repacks.append(1) or original(cache, mask))
    monkeypatch.setattr(multiturn, "REPACK_WHEN_HOLES", 0.02)  # repack at the first holes
    prompts = _prompts(tokenizer)
    kept, _ = _episodes(tiny_decoder, tokenizer, prompts, reuse=True, max_turn_tokens=4)
    assert repacks, "the episodes should have left enough holes to repack the cache"
    reencoded, _ = _episodes(tiny_decoder, tokenizer, prompts, reuse=False, max_turn_tokens=4)
    assert torch.equal(kept.completion_ids, reencoded.completion_ids)
    assert torch.equal(kept.completion_mask, reencoded.completion_mask)
    torch.testing.assert_close(kept.logps, reencoded.logps, atol=2e-5, rtol=0)
    for i, prompt in enumerate(prompts):
        length = int(kept.episode_mask[i].sum())
        reference = _teacher_forced(tiny_decoder, prompt, kept.completion_ids[i, :length].tolist())
        model_tokens = kept.completion_mask[i, :length]
        torch.testing.assert_close(kept.logps[i, :length][model_tokens], reference[model_tokens], atol=2e-5, rtol=0)


def test_a_group_of_episodes_encodes_its_prompt_once(tiny_decoder, tokenizer, monkeypatch):
    """GRPO's k episodes of one prompt share its encoding (as single-turn sampling does); their log-probs are still
    the teacher-forced ones."""
    groups = []
    original = multiturn.shared_prompt_cache
    monkeypatch.setattr(multiturn, "shared_prompt_cache",
                        lambda fwd, ids, mask, k: groups.append((len(ids), k)) or original(fwd, ids, mask, k))
    prompts = [p for p in _prompts(tokenizer)[:3] for _ in range(2)]  # 3 prompts x 2 episodes
    out, _ = _episodes(tiny_decoder, tokenizer, prompts, max_turn_tokens=4)
    assert groups == [(3, 2)]
    for i, prompt in enumerate(prompts):
        length = int(out.episode_mask[i].sum())
        reference = _teacher_forced(tiny_decoder, prompt, out.completion_ids[i, :length].tolist())
        model_tokens = out.completion_mask[i, :length]
        torch.testing.assert_close(out.logps[i, :length][model_tokens], reference[model_tokens], atol=2e-5, rtol=0)
    assert multiturn._group_size([[1], [1], [2], [2]]) == 2
    assert multiturn._group_size([[1], [1], [2], [3]]) == 1 and multiturn._group_size([[1], [2]]) == 1


def test_cache_grows_past_its_preallocation(tiny_decoder, tokenizer, monkeypatch):
    """Observations can push the cache past the room preallocated for the budget: it grows, same numbers."""
    monkeypatch.setattr(multiturn, "REPACK_WHEN_HOLES", 2.0)  # never repack: holes pile up
    prompts = _prompts(tokenizer)
    grown, _ = _episodes(tiny_decoder, tokenizer, prompts, reuse=True, max_turn_tokens=2, budget=40)
    reencoded, _ = _episodes(tiny_decoder, tokenizer, prompts, reuse=False, max_turn_tokens=2, budget=40)
    assert torch.equal(grown.completion_ids, reencoded.completion_ids)
    torch.testing.assert_close(grown.logps, reencoded.logps, atol=2e-5, rtol=0)


def test_budget_truncates_and_turn_limit_ends(tiny_decoder, tokenizer):
    out, _ = _episodes(tiny_decoder, tokenizer, _prompts(tokenizer)[:2], max_turn_tokens=30, budget=12)
    assert (out.episode_mask.sum(-1) <= 12).all()
    assert out.truncated.all()  # 30-token turns cannot fit in 12 tokens without an EOS (untrained model)
    with pytest.raises(ValueError, match="one environment per prompt"):
        sample_episodes(tiny_decoder, tokenizer, _prompts(tokenizer), [ScriptedEnv()], max_completion_length=8,
                        max_turns=2, eos_token_ids=[1], pad_token_id=0)


# ----- tool environments -----------------------------------------------------------------------------------------
def test_tool_environment_classic_syntax():
    def reverse(text):
        return text[::-1]

    def broken(text):
        raise RuntimeError("no network")

    env = ToolEnvironment([reverse, broken], syntax="classic")
    assert env.stop_strings == ["<call>"]
    assert env.step("let me see <request><reverse>abc<call>") == ("cba<response>", 0.0, False)
    observation, reward, done = env.step("<request><broken>x<call>")
    assert observation == "RuntimeError: no network<response>" and not done
    observation, _, _ = env.step("<request><search>x<call>")
    assert "Unknown tool 'search'" in observation and "['broken', 'reverse']" in observation
    assert (env.tool_calls, env.tool_failures) == (3, 2)
    assert env.step("the answer is cba") == (None, 0.0, True)


def test_tool_environment_chat_syntax_and_final_reward(tokenizer):
    def add(a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: the first
            b: the second
        """
        return a + b

    env = ToolEnvironment([add], tokenizer, syntax="chat", final_reward=lambda: 0.5)
    text = 'sure <tool_call>{"name": "add", "arguments": {"a": 2, "b": 40}}</tool_call>'
    observation, reward, done = env.step(text)
    assert "42" in observation and (reward, done) == (0.0, False)
    assert env.step('<tool_call>{"name": oops}</tool_call>')[0].count("Unknown tool '<unparsable>'") == 1
    assert env.step("done") == (None, 0.5, True)


def test_chat_tool_observation_follows_the_template(tokenizer):
    """With a template that renders tool messages, the observation is the text between the assistant turn's end
    and the next assistant header; without one, <tool_response> blocks."""
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% if m.role == 'tool' %}[{{ m.name }}]{% endif %}"
        "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert chat_tool_observation(tokenizer, [("add", "42")]) == f"<|tool|>42[add]{tokenizer.eos_token}<|assistant|>"
    tokenizer.chat_template = None
    assert chat_tool_observation(tokenizer, [("add", "42")]) == "<tool_response>\n42\n</tool_response>\n"


def test_a_hanging_tool_ends_at_its_timeout():
    def hang(text):
        time.sleep(30)

    env = ToolEnvironment([hang], syntax="classic", timeout=0.3)
    started = time.perf_counter()
    observation, _, done = env.step("<request><hang>x<call>")
    assert time.perf_counter() - started < 5 and not done
    assert "timeout" in observation and env.tool_failures == 1


# ----- the trainers -------------------------------------------------------------------------------------------------
class CountingEnv:
    """A step-based environment: two turns; reward 1 on the last turn when it holds the letter 'e'."""

    def __init__(self):
        self.turns = 0

    def reset(self, prompt):
        self.turns = 0
        return " then"

    def step(self, text):
        self.turns += 1
        if self.turns < 2:
            return " and", 0.0, False
        return None, float("e" in text), True


def _config(tmp_path, config_class=GRPOConfig, **overrides):
    values = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, num_generations=4,
                  max_completion_length=16, max_turn_length=6, learning_rate=1e-3, logging_steps=1, report_to=[],
                  save_strategy="no", seed=0)
    values.update(overrides)
    return config_class(**values)


def _prompt_data():
    return Dataset.from_list([{"prompt": p} for p in ["the film", "a movie", "i liked", "the plot"]])


def test_grpo_with_an_environment_trains_on_model_tokens(tiny_decoder, tokenizer, tmp_path):
    """The environment's reward is a reward function named after it; reset's text joins the prompt; the
    trainer's log-probs of an episode are the teacher-forced ones at model tokens and 0 at observations; the
    step's token normaliser counts model tokens only; per-turn metrics are logged."""
    trainer = GRPOTrainer(tiny_decoder, args=_config(tmp_path), train_dataset=_prompt_data(),
                          processing_class=tokenizer, environment_factory=CountingEnv)
    batch = {"prompt": ["the film"], "prompt_input_ids": [tokenizer.encode("the film")]}
    round_ = trainer._generate_round(batch)
    prompt = tokenizer.encode("the film then")
    assert all(p == prompt for p in round_.prompt_ids)
    mask = round_.completion_mask
    assert (~mask & (round_.completion_ids != tokenizer.pad_token_id)).any()  # observation tokens are masked out
    grid = trainer._token_logps(trainer.model, round_.prompt_ids, round_.completion_ids, mask).logps_grid.detach()
    for i in range(len(mask)):
        length = int((round_.completion_ids[i] != tokenizer.pad_token_id).sum())
        reference = _teacher_forced(trainer.model, prompt, round_.completion_ids[i, :length].tolist())
        torch.testing.assert_close(grid[i, :length][mask[i, :length]], reference[mask[i, :length]], atol=1e-5, rtol=0)
        assert (grid[i][~mask[i]] == 0).all()
    assert round_.token_normalisers[0] == float(mask.sum())
    assert trainer.rewards.names[-1] == "CountingEnv"
    trainer.train()
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("episodes/turn_2/reward_mean" in row and "rewards/CountingEnv/mean" in row for row in logged)


def test_first_ratio_is_exactly_one_in_a_multiturn_round(tiny_decoder, tokenizer, tmp_path, monkeypatch):
    """num_iterations=2 stores the sampling policy's log-probs; before the first update they equal the training
    pass's bit for bit (the same pass recomputes them), so the ratio is exactly 1."""
    seen = []
    original = GRPOTrainer.policy_loss

    def spy(self, logps, old_logps, *args, **kwargs):
        seen.append((logps.detach().clone(), old_logps.clone()))
        return original(self, logps, old_logps, *args, **kwargs)

    monkeypatch.setattr(GRPOTrainer, "policy_loss", spy)
    trainer = GRPOTrainer(tiny_decoder, args=_config(tmp_path, max_steps=2, num_iterations=2,
                                                     gradient_accumulation_steps=1),
                          train_dataset=_prompt_data(), processing_class=tokenizer, environment_factory=CountingEnv)
    trainer.train()
    first_logps, first_old = seen[0]
    assert torch.equal(torch.exp(first_logps - first_old), torch.ones_like(first_logps))
    second_logps, second_old = seen[1]  # after one update the policy has moved
    assert not torch.equal(second_logps, second_old)


def test_rloo_with_tools_and_a_trl_style_environment(tiny_decoder, tokenizer, tmp_path):
    """TRL 1.x's environment_factory form: tool methods, reset(**row) whose text joins the prompt, get_reward."""
    class Counter:
        def __init__(self):
            self.calls = 0

        def reset(self, **row):
            self.calls = 0
            return None

        def count(self, text: str) -> str:
            """Count.

            Args:
                text: anything
            """
            self.calls += 1
            return str(len(text))

        def get_reward(self):
            return 1.0

    trainer = RLOOTrainer(tiny_decoder, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                          args=_config(tmp_path, RLOOConfig, max_steps=1, tool_call_format="classic"),
                          train_dataset=_prompt_data(), processing_class=tokenizer, environment_factory=Counter)
    assert trainer.rewards.names[-1] == "Counter" and [t.__name__ for t in trainer.episodes.template_tools] == ["count"]
    env = trainer.episodes._environment(conversational=False)
    assert env.step("<request><count>abcd<call>") == ("4<response>", 0.0, False)
    assert env.step("no call") == (None, 1.0, True)
    trainer.train()


def test_rollout_func(tiny_decoder, tokenizer, tmp_path):
    """TRL's rollout_func: its completions and env_mask become the round; extra fields reach reward functions."""
    received = {}

    def rollout(prompts, trainer):
        n = len(prompts) * trainer.args.num_generations
        return {"prompt_ids": [tokenizer.encode(p) for p in prompts], "completion_ids": [[5, 6, 7, 8]] * n,
                "env_mask": [[1, 0, 0, 1]] * n, "logprobs": [[0.0] * 4] * n, "tag": ["x"] * n}

    def reward(completions, tag, **kw):
        received["tag"] = tag
        return [float(i % 2) for i in range(len(completions))]

    trainer = GRPOTrainer(tiny_decoder, reward_funcs=reward, args=_config(tmp_path, max_steps=1),
                          train_dataset=_prompt_data(), processing_class=tokenizer, rollout_func=rollout)
    round_ = trainer._generate_round({"prompt": ["the film"], "prompt_input_ids": [tokenizer.encode("the film")]})
    assert round_.completion_mask.tolist() == [[True, False, False, True]] * 4
    assert received["tag"] == ["x"] * 4
    trainer.train()


def test_bad_arguments_are_named(tiny_decoder, tokenizer, tmp_path):
    with pytest.raises(TypeError, match="tools must be callables"):
        GRPOTrainer(tiny_decoder, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                    args=_config(tmp_path), train_dataset=_prompt_data(), processing_class=tokenizer, tools=["calc"])
    with pytest.raises(ValueError, match="pass it alone"):
        GRPOTrainer(tiny_decoder, args=_config(tmp_path), train_dataset=_prompt_data(), processing_class=tokenizer,
                    rollout_func=lambda p, t: {}, environment_factory=CountingEnv)
    with pytest.raises(ValueError, match="max_turns must be >= 1"):
        _config(tmp_path, max_turns=0)
    with pytest.raises(ValueError, match="tool_call_format"):
        _config(tmp_path, tool_call_format="xml")


def test_cli_environment_and_tools(tmp_path, tiny_decoder_dir):
    """`tether grpo --environment file.py:Factory --tools file.py:fn`: no --reward_funcs needed with an
    environment; the run trains and logs the environment's reward."""
    (tmp_path / "env.py").write_text(
        "class Env:\n"
        "    def reset(self, prompt):\n        self.turns = 0\n"
        "    def step(self, text):\n        self.turns += 1\n"
        "        return (' more', 0.0, False) if self.turns < 2 else (None, float(len(text) % 2), True)\n"
        "def shout(text):\n    return text.upper()\n")
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in ["a film", "the plot"]))
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "tether.cli", "grpo", "--model_name_or_path", tiny_decoder_dir,
         "--dataset_name", str(tmp_path / "prompts.jsonl"), "--environment", f"{tmp_path / 'env.py'}:Env",
         "--tools", f"{tmp_path / 'env.py'}:shout", "--output_dir", str(out), "--max_steps", "1",
         "--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "12",
         "--max_turn_length", "4", "--report_to", "none", "--save_strategy", "no"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = (out / "metrics.jsonl").read_text()
    assert "rewards/Env/mean" in logged and "episodes/turn_2/reward_mean" in logged


def test_demo_method_tools_dispatches(tmp_path, monkeypatch):
    """`tether demo --method tools` runs the tools demo (the real one: the slow tests below)."""
    from tether import cli
    from tether.demo import tools_task

    called = []
    monkeypatch.setattr(tools_task, "run_tools_demo", lambda *a, **kw: called.append((a, kw)))
    assert cli.main(["demo", "--method", "tools", "--quick", "--output_dir", str(tmp_path)]) == 0
    assert called == [((str(tmp_path),), {"quick": True, "seed": 0})]
    with pytest.raises(SystemExit, match="not a pipeline YAML"):
        cli.main(["demo", "--method", "tools", "--print-config"])


@pytest.mark.slow
def test_tools_demo_quick(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tether.cli", "demo", "--method", "tools", "--quick",
                             "--output_dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    story = json.loads((tmp_path / "story.json").read_text())
    assert story["quick"] and (tmp_path / "report.html").exists()
    assert "episodes/turn_1/tool_call_rate" in (tmp_path / "grpo" / "metrics.jsonl").read_text()


@pytest.mark.slow
def test_tools_demo_learns_to_call_the_calculator(tmp_path):
    """The learning test: GRPO raises the first turn's tool-call rate and task success clearly (the SFT warm-up
    starts both near 40%; a run that does not learn stays there)."""
    from tether.demo.tools_task import run_tools_demo

    story = run_tools_demo(tmp_path, seed=0)
    assert story["tool_call_rate_last"] >= story["tool_call_rate_first"] + 0.25, story
    assert story["success_last"] >= story["success_first"] + 0.2, story
    assert story["success_last"] >= 0.7, story


def test_ppo_train_with_an_environment(tiny_decoder_dir, tokenizer, tmp_path, monkeypatch):
    """PPOTrainer.train() runs multi-turn episodes too: step() gets each episode as the response with a mask that
    is 1 at the model's tokens and 0 at the observations (TRL 0.7's response_masks); the environment's reward
    is logged as a reward function."""
    from tether import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    calls = []
    original = PPOTrainer.step

    def spy(self, queries, responses, scores, masks=None):
        calls.append((queries, responses, masks))
        return original(self, queries, responses, scores, masks)

    monkeypatch.setattr(PPOTrainer, "step", spy)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir)
    config = PPOConfig(batch_size=4, mini_batch_size=2, learning_rate=1e-3, ppo_epochs=1, output_dir=str(tmp_path),
                       steps=8, max_new_tokens=16, max_turn_length=5)
    trainer = PPOTrainer(config, model, None, tokenizer, dataset=_prompt_data(), environment_factory=CountingEnv)
    trainer.train()
    observation = tokenizer.encode(" and", add_special_tokens=False)
    queries, responses, masks = calls[0]
    prompts = {tuple(tokenizer.encode(p + " then")) for p in _prompt_data()["prompt"]}
    assert all(tuple(q.tolist()) in prompts for q in queries)  # reset's text joined each prompt
    for response, mask in zip(responses, masks):
        assert len(response) == len(mask)
        masked = response[mask == 0].tolist()
        assert masked in ([], observation)  # the one observation between the two turns (none if turn 1 was cut)
    assert any((m == 0).any() for m in masks)
    logged = (tmp_path / "metrics.jsonl").read_text()
    assert "rewards/CountingEnv" in logged and "episodes/turn_1/reward_mean" in logged
    assert (tmp_path / "plots" / "turn_reward.png").exists()  # the report plots the per-turn metrics


def test_conversational_prompts_get_the_tools_schemas_and_chat_syntax(tiny_decoder, tokenizer, tmp_path):
    """tools= with conversational prompts: the chat template is rendered with the tools' JSON schemas, calls are
    read in the chat syntax, and a round trains."""
    def add(a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: the first
            b: the second
        """
        return a + b

    tokenizer.chat_template = ("{% if tools %}{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% endif %}"
                               + tokenizer.chat_template)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in ["add two", "sum", "go", "hi"]])
    trainer = GRPOTrainer(tiny_decoder, reward_funcs=lambda completions, **kw: [1.0] * len(completions),
                          args=_config(tmp_path, max_steps=1), train_dataset=data, processing_class=tokenizer,
                          tools=[add])
    rendered = tokenizer.decode(trainer.train_dataset[0]["prompt_input_ids"])
    assert rendered.startswith("[add]")
    assert trainer.episodes.syntax(conversational=True) == "chat"
    env = trainer.episodes._environment(conversational=True)
    observation, _, done = env.step('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>')
    assert "3" in observation and not done
    trainer.train()


def test_a_flooding_tool_is_cut_before_tokenizing(tiny_decoder, tokenizer, tmp_path):
    def flood(text):
        return "x" * 10_000_000

    trainer = GRPOTrainer(tiny_decoder, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                          args=_config(tmp_path, max_tool_response_length=8, tool_call_format="classic"),
                          train_dataset=_prompt_data(), processing_class=tokenizer, tools=[flood])
    observation, _, done = trainer.episodes._environment(conversational=False).step("<request><flood>a<call>")
    assert len(observation) <= 32 * 8 + len("<response>") and "truncated" in observation and not done


def test_sampling_settings_episodes_cannot_honour_are_named(tiny_decoder, tokenizer, tmp_path):
    trainer = GRPOTrainer(tiny_decoder, args=_config(tmp_path, repetition_penalty=1.2), train_dataset=_prompt_data(),
                          processing_class=tokenizer, environment_factory=CountingEnv)
    with pytest.raises(ValueError, match="repetition_penalty"):
        trainer.train()


def test_the_environment_reward_joins_the_reward_functions_with_weight_one():
    from tether.trainers.episodes import EpisodeRollout

    rollout = EpisodeRollout(GRPOConfig(output_dir="unused"), None, environment_factory=CountingEnv)

    def length(completions, **kw):
        return [float(len(c)) for c in completions]

    funcs, weights = rollout.with_environment_reward(length, [0.5])
    assert funcs[0] is length and funcs[1].__name__ == "CountingEnv" and weights == [0.5, 1.0]
    assert funcs[1](["p"], ["c"], environment_reward=[2.0]) == [2.0]
    assert rollout.with_environment_reward(None, None)[1] is None
    tools_only = EpisodeRollout(GRPOConfig(output_dir="unused"), None, tools=[len])
    assert tools_only.with_environment_reward([length], None) == ([length], None)  # tools alone give no reward
