"""The classic TextEnvironment / TextHistory (TRL 0.7.11's API): bookkeeping, the <request> syntax, episodes
run on a model whose generations are known in advance, and the PPO step that trains only the model's tokens.

The scripted model is a real GPT-2 whose weights make it a bigram table: the embedding of token a is the
one-hot vector e_a, the transformer block adds nothing (its weights are zero) and lm_head row b is
20 * e_a when b is a's successor, so after token a the logit of its successor is ~400 and every other
logit is ~0: it generates the scripted chain, sampled or greedy.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

import tether.trainers.ppo as ppo_module
from tether import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer, TextEnvironment, TextHistory
from tether.environment import load_tool
from tether.rollout.generation import StopStrings, generate_responses
from tether.rollout.sampling import sample_groups
from tether.rollout.tools import Calculator

SYNTAX = ["<request>", "<call>", "<response>", "<submit>", "<Calc>"]
QUERY = "Q: What is 2+3?"
# The model's script: after "?" it calls the calculator, after the tool's "<response>" it submits. "<call>"
# and "<submit>" have successors too, so only the stop strings end the turns there.
CALL_THEN_SUBMIT = [("?", "<request>"), ("<request>", "<Calc>"), ("<Calc>", "2"), ("2", "+"), ("+", "3"),
                    ("3", "<call>"), ("<call>", "9"), ("<response>", "<submit>"), ("<submit>", "9")]
GENERATION = {"do_sample": True, "top_k": 0.0, "top_p": 1.0, "min_length": -1, "max_new_tokens": 12,
              "eos_token_id": -1}


@pytest.fixture(scope="module")
def syntax_tokenizer_dir(tokenizer_dir, tmp_path_factory):
    """The test tokenizer with the call syntax as single tokens (so a bigram script can be unambiguous)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_tokens(SYNTAX)
    path = tmp_path_factory.mktemp("syntax-tokenizer")
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture()
def syntax_tokenizer(syntax_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(syntax_tokenizer_dir)
    tokenizer.pad_token = tokenizer.eos_token  # as TRL's scripts do
    return tokenizer


def token_id(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) == 1, f"{text!r} is {len(ids)} tokens"
    return ids[0]


def scripted_model(tokenizer, successors, path) -> AutoModelForCausalLMWithValueHead:
    vocab = len(tokenizer)
    config = GPT2Config(vocab_size=vocab, n_positions=256, n_embd=vocab, n_layer=1, n_head=1, n_inner=4,
                        tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                        bos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for parameter in model.transformer.h.parameters():
            parameter.zero_()
        model.transformer.wpe.weight.zero_()
        model.transformer.wte.weight.copy_(torch.eye(vocab))
        model.lm_head.weight.zero_()
        for before, after in successors:
            model.lm_head.weight[token_id(tokenizer, after), token_id(tokenizer, before)] = 20.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)  # the value head
    return AutoModelForCausalLMWithValueHead.from_pretrained(path)


@pytest.fixture()
def caller(syntax_tokenizer, tmp_path):
    return scripted_model(syntax_tokenizer, CALL_THEN_SUBMIT, tmp_path / "caller")


def environment(model, tokenizer, tools=None, reward_fn=None, **kwargs) -> TextEnvironment:
    return TextEnvironment(model, tokenizer, tools or {"Calc": Calculator()},
                           reward_fn or (lambda texts, **_: [torch.tensor(float(len(t))) for t in texts]),
                           "Few-shot examples.\n", generation_kwargs=dict(GENERATION), **kwargs)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


# ---- TextHistory -----------------------------------------------------------------------------------------
def test_history_segments_tokens_and_masks_line_up():
    history = TextHistory("query", torch.tensor([1, 2, 3]))
    history.append_segment("model", torch.tensor([4, 5]), system=False)
    history.append_segment("tool", torch.tensor([6]), system=True)
    history.append_segment("again", torch.tensor([7, 8, 9]), system=False)
    assert history.text == "querymodeltoolagain"
    assert history.text_spans == [(0, 5), (5, 10), (10, 14), (14, 19)]
    assert history.token_spans == [(0, 3), (3, 5), (5, 6), (6, 9)]
    assert history.system_spans == [True, False, True, False]
    assert torch.equal(history.tokens, torch.arange(1, 10))
    assert torch.equal(history.token_masks, torch.tensor([0, 0, 0, 1, 1, 0, 1, 1, 1]))
    for (start, end), system in zip(history.token_spans, history.system_spans):
        assert bool((history.token_masks[start:end] == int(not system)).all())  # each segment's mask: its source
    assert history.last_text_segment == "again"
    query, response, mask = history.split_query_response_tokens()
    assert query.tolist() == [1, 2, 3] and response.tolist() == [4, 5, 6, 7, 8, 9]
    assert mask.tolist() == [1, 1, 0, 1, 1, 1]  # the tool's token is never trained
    assert not history.completed and history.reward == 0.0


def test_history_first_segment_source_and_completion():
    assert TextHistory("a", torch.tensor([1]), system=False).token_masks.tolist() == [1]
    history = TextHistory("a", torch.tensor([1]))
    history.complete()
    assert history.completed and not history.truncated
    history.complete(truncated=True)
    assert history.truncated


def test_history_rejects_empty_and_2d_segments():
    history = TextHistory("a", torch.tensor([1]))
    with pytest.raises(ValueError, match="non-empty"):
        history.append_segment("", torch.tensor([2]))
    with pytest.raises(ValueError, match="non-empty"):
        history.append_segment("b", torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="1-D"):
        history.append_segment("b", torch.tensor([[2]]))


def test_show_text_and_tokens_colour_each_source(syntax_tokenizer, capsys):
    history = TextHistory("Q?", torch.tensor(ids(syntax_tokenizer, "Q?")))
    history.append_segment("<request>", torch.tensor(ids(syntax_tokenizer, "<request>")), system=False)
    history.append_segment("5", torch.tensor(ids(syntax_tokenizer, "5")), system=True)
    history.reward = 1.5
    styles = [(span.start, span.end, str(span.style)) for span in history.text_view().spans]
    assert styles[:3] == [(0, 2, TextHistory.prompt_color), (2, 11, TextHistory.model_color),
                          (11, 12, TextHistory.system_color)]
    assert styles[3][2] == TextHistory.reward_color
    history.show_text(show_legend=True)
    history.show_tokens(syntax_tokenizer)
    printed = capsys.readouterr().out
    assert "Q?<request>5" in printed and "Reward: 1.5" in printed
    assert "Prompt|System|Model|Reward" in printed
    assert "Q ? <request> 5" in printed  # the tokens, as the tokenizer spells them
    token_styles = [str(span.style) for span in history.tokens_view(syntax_tokenizer).spans]
    assert token_styles == [TextHistory.prompt_color] * 2 + [TextHistory.model_color, TextHistory.system_color,
                                                             TextHistory.reward_color]


# ---- the call syntax ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, parsed", [
    ("Let me see <request><Calc>1+2<call>", ("Calc", "1+2")),
    ("<request> <Calc>a > b<call> ignored <request><Other>x<call>", ("Calc", "a > b")),  # the first call
    ("<request><Calc>\nmulti\nline\n<call>", ("Calc", "\nmulti\nline\n")),
    ("<Calc>1+2<call>", (None, None)),  # no <request>
    ("<request><Calc>1+2", (None, None)),  # no <call>
    ("<request>|Calc|1+2<call>", (None, None)),  # no <name>
    ("<>abc<>def<>", (None, None)),
])
def test_parse_tool_call(caller, syntax_tokenizer, text, parsed):
    assert environment(caller, syntax_tokenizer).parse_tool_call(text) == parsed


def test_step_answers_the_call_as_a_system_segment(caller, syntax_tokenizer):
    env = environment(caller, syntax_tokenizer)
    history = TextHistory("<request><Calc>6*7<call>", torch.tensor([1, 2, 3]))
    env.step(history)
    assert history.last_text_segment == "42<response>" and history.system_spans == [True, True]
    assert history.tokens[3:].tolist() == ids(syntax_tokenizer, "42<response>")
    assert history.token_masks.tolist() == [0] * len(history.tokens)


@pytest.mark.parametrize("limit, length", [(100, 100), (500, 500), (1001, 1000), (2000, 1000)])
def test_tool_answers_are_cut_to_max_tool_response(caller, syntax_tokenizer, limit, length):
    env = environment(caller, syntax_tokenizer, tools={"dummy": lambda _: "a" * 1000})
    env.max_tool_response = limit
    history = env.step(TextHistory("<request><dummy>x<call>", torch.tensor([1])))
    assert len(history.last_text_segment) - len("<response>") == length


@pytest.mark.parametrize("tools, answer", [
    ({"Other": Calculator()}, "Unknown tool Calc.<response>"),
    ({"Calc": lambda _: 1 / 0}, "ZeroDivisionError: division by zero<response>"),
])
def test_unknown_tools_and_tool_errors_answer_the_model(caller, syntax_tokenizer, tools, answer):
    history = environment(caller, syntax_tokenizer, tools=tools).step(
        TextHistory("<request><Calc>1<call>", torch.tensor([1])))
    assert history.last_text_segment == answer


def test_a_hung_tool_times_out(caller, syntax_tokenizer):
    import threading

    release = threading.Event()
    env = environment(caller, syntax_tokenizer, tools={"Calc": lambda _: release.wait(30)}, tool_timeout=0.2)
    history = env.step(TextHistory("<request><Calc>1<call>", torch.tensor([1])))
    release.set()
    assert history.last_text_segment == "timeout after 0.2s<response>"


# ---- episodes --------------------------------------------------------------------------------------------
def test_run_calls_the_tool_then_submits(caller, syntax_tokenizer):
    """The script: turn 1 "<request><Calc>2+3<call>" (stopped at <call> although the script goes on), tool
    answer "5<response>", turn 2 "<submit>" (stopped there) -> episode over."""
    seen = {}

    def reward_fn(texts, answers):
        seen["texts"], seen["answers"] = texts, answers
        return [torch.tensor(1.0 if t == "<submit>" else 0.0) for t in texts]

    env = environment(caller, syntax_tokenizer, reward_fn=reward_fn)
    queries, responses, masks, rewards, histories = env.run([QUERY, QUERY], answers=[5, 5])
    turn_1, tool, turn_2 = ids(syntax_tokenizer, "<request><Calc>2+3<call>"), ids(syntax_tokenizer, "5<response>"), \
        ids(syntax_tokenizer, "<submit>")
    for query, response, mask, history in zip(queries, responses, masks, histories):
        assert query.tolist() == ids(syntax_tokenizer, "Few-shot examples.\n" + QUERY)
        assert response.tolist() == turn_1 + tool + turn_2
        assert mask.tolist() == [1] * len(turn_1) + [0] * len(tool) + [1] * len(turn_2)
        assert history.text == "Few-shot examples.\n" + QUERY + "<request><Calc>2+3<call>5<response><submit>"
        assert history.system_spans == [True, False, True, False]
        assert history.completed and not history.truncated
    assert seen == {"texts": ["<submit>", "<submit>"], "answers": [5, 5]}
    assert [float(r) for r in rewards] == [1.0, 1.0]


def test_max_turns_limits_the_calls(syntax_tokenizer, tmp_path):
    looping = [pair for pair in CALL_THEN_SUBMIT if pair[0] != "<response>"] + [("<response>", "<request>")]
    model = scripted_model(syntax_tokenizer, looping, tmp_path / "looping")
    call = "<request><Calc>2+3<call>5<response>"
    for turns in (1, 2, 3):
        env = environment(model, syntax_tokenizer, max_turns=turns)
        history = env.run([QUERY])[4][0]
        assert history.text == "Few-shot examples.\n" + QUERY + call * turns
        assert not history.completed  # still calling when the turns ran out


def test_max_length_ends_an_episode_as_truncated(caller, syntax_tokenizer):
    query_length = len(ids(syntax_tokenizer, "Few-shot examples.\n" + QUERY))
    history = environment(caller, syntax_tokenizer, max_length=query_length + 3).run([QUERY])[4][0]
    assert history.completed and history.truncated
    assert history.text.endswith("<call>")  # ended right after the first turn: no tool answer


def test_a_turn_without_a_call_ends_the_episode(syntax_tokenizer, tmp_path):
    model = scripted_model(syntax_tokenizer, [("?", "9"), ("9", "8"), ("8", "<submit>")], tmp_path / "answerer")
    env = environment(model, syntax_tokenizer, max_turns=4)
    env.generation_kwargs["max_new_tokens"] = 2
    history = env.run([QUERY])[4][0]
    assert history.text.endswith("?98") and history.completed and len(history.text_spans) == 2


def test_batched_generation_equals_one_at_a_time(tiny_decoder_dir, tokenizer):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_decoder_dir)
    env = TextEnvironment(model, tokenizer, {"Calc": Calculator()}, lambda t: [0] * len(t), "p ",
                          generation_kwargs={"do_sample": False, "max_new_tokens": 6})
    queries = [tokenizer("this is a test", return_tensors="pt").input_ids[0],
               tokenizer("this is another, longer test", return_tensors="pt").input_ids[0]]
    batched = env._generate_batched(queries, batch_size=2)
    single = [env._generate_batched([q], batch_size=1)[0] for q in queries]
    assert [b.tolist() for b in batched] == [s.tolist() for s in single]


def test_tools_as_a_list_are_named_by_class(caller, syntax_tokenizer):
    def lookup(text):
        return text

    env = environment(caller, syntax_tokenizer, tools=[load_tool("ybelkada/simple-calculator"), lookup])
    assert sorted(env.tools) == ["SimpleCalculatorTool", "lookup"]
    assert env.tools["SimpleCalculatorTool"]("13-3") == "10.0"


@pytest.mark.parametrize("kwargs, message", [
    ({"tools": {"Calc": "not callable"}}, r"tools\['Calc'\] is a str, not callable"),
    ({"tools": {"<Calc>": Calculator()}}, "not a usable tool name"),
    ({"tools": [Calculator(), Calculator()]}, "two tools are named 'Calculator'"),
    ({"tools": {}}, "tools is empty"),
    ({"max_turns": 0}, "max_turns must be an int >= 1"),
    ({"max_tool_response": 0}, "max_tool_response must be an int >= 1"),
    ({"max_length": 0}, "max_length must be None or an int >= 1"),
    ({"reward_fn": "x"}, "reward_fn must be callable"),
])
def test_bad_arguments_name_the_fix(caller, syntax_tokenizer, kwargs, message):
    arguments = {"model": caller, "tokenizer": syntax_tokenizer, "tools": {"Calc": Calculator()},
                 "reward_fn": lambda t: t, "prompt": "", **kwargs}
    with pytest.raises(ValueError, match=message):
        TextEnvironment(**arguments)


def test_trl_0_7_11_spelling_of_max_tool_response(caller, syntax_tokenizer):
    with pytest.warns(FutureWarning, match="max_tool_response"):
        env = environment(caller, syntax_tokenizer, max_tool_reponse=7)
    assert env.max_tool_response == 7


def test_reward_fn_must_score_every_episode(caller, syntax_tokenizer):
    env = environment(caller, syntax_tokenizer, reward_fn=lambda texts: [1.0])
    with pytest.raises(ValueError, match="returned 1 rewards for 2 episodes"):
        env.run([QUERY, QUERY])


def test_load_tool_unknown_name_says_what_to_do():
    with pytest.raises(ValueError, match="transformers 5 removed load_tool"):
        load_tool("vwxyzjn/pyserini-wikipedia-kilt-doc")


# ---- stop strings in generation ------------------------------------------------------------------------
def test_stop_strings_find_a_string_spanning_tokens(tokenizer):
    stop = StopStrings(tokenizer, ["<call>"])
    text = ids(tokenizer, "the plot <call> was fine")
    assert len(ids(tokenizer, "<call>")) > 1  # several tokens in this tokenizer
    ends = [bool(stop(torch.tensor([text[:k]]))[0]) for k in range(1, len(text) + 1)]
    first = ends.index(True) + 1
    assert tokenizer.decode(text[:first]).endswith("<call>") and not any(ends[:first - 1])
    assert stop.cut(torch.tensor(text)).tolist() == text[:first]
    assert stop.cut(torch.tensor(text[:first - 1])).tolist() == text[:first - 1]  # nothing to cut


def test_the_sampler_ends_a_row_at_a_multi_token_stop_string(caller, syntax_tokenizer):
    query = torch.tensor(ids(syntax_tokenizer, QUERY))
    plain, stopped = (generate_responses(caller.pretrained_model, [query], syntax_tokenizer.eos_token_id,
                                         stop_strings=stop, tokenizer=syntax_tokenizer, **GENERATION)[0]
                      for stop in (None, ["2+3"]))
    assert len(plain) == 12  # eos_token_id=-1: no EOS, the whole budget
    assert syntax_tokenizer.decode(stopped) == "<request><Calc>2+3"
    sampled = sample_groups(caller, [query.tolist()] * 2, 1, 12, syntax_tokenizer.eos_token_id, [-1],
                            stop_check=StopStrings(syntax_tokenizer, ["<call>"]))
    assert sampled.completion_mask.sum(-1).tolist() == [6, 6]  # up to and with <call>
    assert sampled.truncated.tolist() == [False, False]  # ended by the stop string, not by the budget


# ---- PPO on the episodes -------------------------------------------------------------------------------
def test_ppo_step_trains_only_the_model_tokens(caller, syntax_tokenizer, monkeypatch):
    """The masks run() returns reach the PPO loss as TRL 0.7.11's response_masks: the loss mask is True at
    the model's tokens only, and the loss's gradient with respect to each token's log-prob is 0 at the
    tool's tokens (and not at the model's)."""
    env = environment(caller, syntax_tokenizer)
    queries, responses, masks, rewards, _ = env.run([QUERY, QUERY])
    captured = []
    real_loss = ppo_module.ppo_policy_loss

    def spy(logprobs, old_logprobs, advantages, mask, *args, **kwargs):
        logprobs.register_hook(lambda grad: captured.append((grad.detach().clone(), mask.detach().clone())))
        return real_loss(logprobs, old_logprobs, advantages, mask, *args, **kwargs)

    monkeypatch.setattr(ppo_module, "ppo_policy_loss", spy)
    trainer = PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2, ppo_epochs=1), caller, None, syntax_tokenizer)
    stats = trainer.step(queries, responses, [torch.tensor(1.0), torch.tensor(-1.0)], masks)
    assert len(captured) == 1 and math.isfinite(stats["ppo/loss/total"])
    grad, mask = captured[0]  # [2, t] each; the two rows are the same episode
    # Hand-built: a response token at response index j sits at sequence position len(query) + j; the loss
    # counts it iff masks[j] == 1 (the model's tokens: 6 of the first turn, 1 of the second).
    expected = torch.zeros(mask.shape[1], dtype=torch.bool)
    expected[len(queries[0]) + torch.nonzero(masks[0]).squeeze(-1)] = True
    assert torch.equal(mask.bool(), expected.expand_as(mask))
    tool_positions = len(queries[0]) + torch.nonzero(masks[0] == 0).squeeze(-1)
    assert len(tool_positions) == 2
    assert torch.equal(grad[:, tool_positions], torch.zeros_like(grad[:, tool_positions]))
    assert bool((grad[:, expected] != 0).all())
