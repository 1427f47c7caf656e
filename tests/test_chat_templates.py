"""Chat templates for training: the assistant-only mask on templates that are not prefix-stable and on
`{% generation %}` templates, clone_chat_template, and the SFT/Reward options chat_template_path, eos_token and
pad_token (as TRL 1.x users set them).

Masks are checked by decoding the marked tokens back to text and comparing with the assistant output written
out by hand; the ids must be the plain tokenization of the rendered conversation.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from test_tokenize import spans  # the test folder is on sys.path
from tether import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
from tether.data.chat_format import clone_chat_template, setup_chat_format
from tether.data.formats import DatasetError
from tether.data.tokenize import tokenize_conversation


def conv(*turns):
    return [{"role": r, "content": c} for r, c in zip(turns[::2], turns[1::2], strict=True)]


# A reasoning template: an assistant turn before the last user message loses its "<think>...</think>" part,
# as Qwen3's and DeepSeek-R1's templates do. Rendering the conversation up to an earlier assistant turn shows
# that turn's thoughts; the whole conversation does not, so a rendered prefix is not a prefix of the rendering.
THINKING_TEMPLATE = (
    "{% set ns = namespace(last_user=-1) %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}"
    "{% set content = m['content'] %}"
    "{% if m['role'] == 'assistant' and loop.index0 < ns.last_user and '</think>' in content %}"
    "{% set content = content.split('</think>')[-1].lstrip() %}{% endif %}"
    "{{ '<|' + m['role'] + '|>\n' + content + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

THINKING_CHAT = conv("user", "two plus two", "assistant", "<think>add them</think> four.", "user", "hello",
                     "assistant", "<think>greet back</think> hello world")


def test_thinking_template_is_not_prefix_stable_and_the_mask_covers_exactly_the_assistant_tokens(tokenizer):
    tokenizer.chat_template = THINKING_TEMPLATE
    rendered = tokenizer.apply_chat_template(THINKING_CHAT, tokenize=False)
    first_turn = tokenizer.apply_chat_template(THINKING_CHAT[:2], tokenize=False)
    assert not rendered.startswith(first_turn)  # the premise: not prefix-stable
    out = tokenize_conversation(tokenizer, THINKING_CHAT, assistant_only_loss=True)
    assert out["input_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    # The first answer as the whole rendering shows it (thoughts dropped), the last one with its thoughts,
    # each with its end-of-turn markup; nothing else.
    assert spans(tokenizer, out["input_ids"], out["loss_mask"]) == [
        "four.<|end|>\n", "<think>greet back</think> hello world<|end|>\n"]
    assert spans(tokenizer, out["input_ids"], out["loss_mask"], False) == [
        "<|user|>\ntwo plus two<|end|>\n<|assistant|>\n", "<|user|>\nhello<|end|>\n<|assistant|>\n"]


def test_thinking_template_through_sft_trainer(tmp_path, tiny_decoder_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_decoder_dir)
    tokenizer.chat_template = THINKING_TEMPLATE
    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, max_steps=1, report_to="none",
                     per_device_train_batch_size=2, save_strategy="no", disable_tqdm=True)
    trainer = SFTTrainer(tiny_decoder_dir, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_dict({"messages": [THINKING_CHAT] * 2}))
    row = trainer.train_dataset[0]
    assert spans(tokenizer, row["input_ids"], row["loss_mask"]) == [
        "four.<|end|>\n", "<think>greet back</think> hello world<|end|>\n"]
    trainer.train()


GENERATION_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ m['content'] + '<|end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def test_generation_markers_decide_the_mask(tokenizer):
    tokenizer.chat_template = GENERATION_TEMPLATE
    chat = conv("user", "hello", "assistant", "hello world", "user", "two plus two", "assistant", "four.")
    out = tokenize_conversation(tokenizer, chat, assistant_only_loss=True)
    # The template's own blocks: "<|end|>" is inside, the newline after it is not.
    assert spans(tokenizer, out["input_ids"], out["loss_mask"]) == ["hello world<|end|>", "four.<|end|>"]
    reference = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert out["input_ids"] == reference["input_ids"]
    assert out["loss_mask"] == [False] + [bool(m) for m in reference["assistant_masks"][1:]]


def test_generation_markers_that_mark_nothing_are_an_error(tokenizer):
    tokenizer.chat_template = GENERATION_TEMPLATE.replace("m['role'] == 'assistant'", "m['role'] == 'bot'")
    with pytest.raises(DatasetError, match="generation"):
        tokenize_conversation(tokenizer, conv("user", "hi", "assistant", "hello"), assistant_only_loss=True)


# ----- clone_chat_template ------------------------------------------------------------------------------------

@pytest.fixture()
def chatml_tokenizer_dir(tmp_path, tokenizer_dir):
    """A tokenizer with ChatML special tokens and template (setup_chat_format), saved to disk."""
    source = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_config(_tiny_config(len(source)))
    setup_chat_format(model, source)
    path = tmp_path / "chatml-tokenizer"
    source.save_pretrained(path)
    return str(path)


def _tiny_config(vocab_size):
    from tether.demo.tiny import tiny_llama_config

    return tiny_llama_config(vocab_size)


def test_clone_chat_template(chatml_tokenizer_dir, tiny_decoder_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_decoder_dir)
    tokenizer.chat_template = None
    size = len(tokenizer)
    model, tokenizer, added = clone_chat_template(model, tokenizer, chatml_tokenizer_dir)
    source = AutoTokenizer.from_pretrained(chatml_tokenizer_dir)
    assert tokenizer.chat_template == source.chat_template
    # The two ChatML tokens first, then placeholders up to the next multiple of 64.
    assert tokenizer.convert_ids_to_tokens(added[:2]) == ["<|im_start|>", "<|im_end|>"]
    assert added == list(range(size, len(tokenizer)))
    assert len(tokenizer) == -(-(size + 2) // 64) * 64 == model.get_input_embeddings().weight.shape[0]
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer)
    assert tokenizer.eos_token == "<|im_end|>" and model.config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    ids = tokenizer.apply_chat_template(conv("user", "hi"), tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # one token, not split
    with torch.no_grad():
        assert model(torch.tensor([ids])).logits.shape[-1] == len(tokenizer)
    # None: no rounding up
    model = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_decoder_dir)
    model, tokenizer, added = clone_chat_template(model, tokenizer, chatml_tokenizer_dir, resize_to_multiple_of=None)
    assert len(added) == 2 and len(tokenizer) == size + 2 == model.get_input_embeddings().weight.shape[0]


# ----- SFT / Reward options -----------------------------------------------------------------------------------

def sft_args(tmp_path, **overrides):
    return SFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, report_to="none", per_device_train_batch_size=2,
                     save_strategy="no", disable_tqdm=True, **overrides)


def test_sft_chat_template_path_jinja_file(tmp_path, tiny_decoder_dir):
    template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|end|>' }}{% endfor %}"
    path = tmp_path / "template.jinja"
    path.write_text(template)
    chat = conv("user", "hello", "assistant", "hello world")
    trainer = SFTTrainer(tiny_decoder_dir, args=sft_args(tmp_path, chat_template_path=str(path)),
                         train_dataset=Dataset.from_dict({"messages": [chat] * 2}))
    assert trainer.processing_class.chat_template == template
    ids = trainer.train_dataset[0]["input_ids"]
    assert trainer.processing_class.decode(ids) == "user: hello<|end|>assistant: hello world<|end|>"
    trainer.train()


def test_sft_chat_template_path_tokenizer_dir_clones_and_trains(tmp_path, tiny_decoder_dir, chatml_tokenizer_dir):
    chat = conv("user", "hello", "assistant", "hello world")
    trainer = SFTTrainer(tiny_decoder_dir, args=sft_args(tmp_path, chat_template_path=chatml_tokenizer_dir,
                                                         assistant_only_loss=True),
                         train_dataset=Dataset.from_dict({"messages": [chat] * 2}))
    tokenizer = trainer.processing_class
    assert tokenizer.eos_token == "<|im_end|>"
    assert len(tokenizer) % 64 == 0 and trainer.model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    row = trainer.train_dataset[0]
    assert spans(tokenizer, row["input_ids"], row["loss_mask"]) == ["hello world<|im_end|>\n"]
    trainer.train()


def test_sft_eos_token(tmp_path, tiny_decoder_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_decoder_dir)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    old_eos = tokenizer.eos_token_id
    trainer = SFTTrainer(tiny_decoder_dir, args=sft_args(tmp_path, eos_token="<|end|>"),
                         train_dataset=Dataset.from_dict({"text": ["hello world", "two plus two is four."]}))
    assert [row[-1] for row in trainer.train_dataset["input_ids"]] == [end, end]  # each example ends with it
    assert old_eos not in trainer.train_dataset[0]["input_ids"]
    assert trainer.model.config.eos_token_id == end
    # generation stops at the new EOS and still at the old one (the tiny model's generation config had it)
    assert trainer.model.generation_config.eos_token_id == [end, old_eos]
    with pytest.raises(ValueError, match="eos_token='<\\|im_end\\|>' is not a token"):
        SFTTrainer(tiny_decoder_dir, args=sft_args(tmp_path, eos_token="<|im_end|>"),
                   train_dataset=Dataset.from_dict({"text": ["hello world"]}))


def test_sft_pad_token(tmp_path, tiny_decoder_dir):
    trainer = SFTTrainer(tiny_decoder_dir, args=sft_args(tmp_path, pad_token="<|end|>"),
                         train_dataset=Dataset.from_dict({"text": ["hello", "two plus two is four."]}))
    pad = trainer.processing_class.convert_tokens_to_ids("<|end|>")
    assert trainer.processing_class.pad_token_id == pad == trainer.model.config.pad_token_id
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    short = len(trainer.train_dataset[0]["input_ids"])
    assert (batch["input_ids"][0, short:] == pad).all() and short < batch["input_ids"].shape[1]


@pytest.fixture()
def pairs():
    return Dataset.from_dict({"prompt": ["two plus two is", "hello"], "chosen": [" four.", " world"],
                              "rejected": [" five.", " paris"]})


def reward_args(tmp_path, **overrides):
    return RewardConfig(output_dir=str(tmp_path / "out"), max_steps=1, report_to="none", per_device_train_batch_size=2,
                        save_strategy="no", disable_tqdm=True, **overrides)


def test_reward_eos_pad_and_pad_to_multiple_of(tmp_path, tiny_decoder_dir, pairs):
    trainer = RewardTrainer(tiny_decoder_dir, args=reward_args(tmp_path, eos_token="<|end|>", pad_token="<|system|>",
                                                               pad_to_multiple_of=16, padding_free=False),
                            train_dataset=pairs)
    tokenizer = trainer.processing_class
    end, pad = tokenizer.convert_tokens_to_ids(["<|end|>", "<|system|>"])
    assert trainer.model.config.eos_token_id == end and trainer.model.config.pad_token_id == pad
    assert trainer.train_dataset[0]["chosen_input_ids"][-1] == end
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    assert batch["input_ids"].shape[1] % 16 == 0
    assert (batch["input_ids"][batch["attention_mask"] == 0] == pad).all()
    trainer.train()


def test_reward_chat_template_path_clones(tmp_path, tiny_decoder_dir, chatml_tokenizer_dir):
    chat_pairs = Dataset.from_dict({"prompt": [conv("user", "hello")] * 2,
                                    "chosen": [conv("assistant", "world")] * 2,
                                    "rejected": [conv("assistant", "paris")] * 2})
    trainer = RewardTrainer(tiny_decoder_dir, args=reward_args(tmp_path, chat_template_path=chatml_tokenizer_dir),
                            train_dataset=chat_pairs)
    tokenizer = trainer.processing_class
    assert trainer.model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert tokenizer.decode(trainer.train_dataset[0]["chosen_input_ids"]).startswith("<|im_start|>user\nhello")
    trainer.train()


def test_sft_lora_with_cloned_template_trains_the_new_token_rows_and_head(tmp_path, tiny_decoder_dir,
                                                                          chatml_tokenizer_dir):
    from peft import LoraConfig

    chat = conv("user", "hello", "assistant", "hello world")
    trainer = SFTTrainer(tiny_decoder_dir, args=sft_args(tmp_path, chat_template_path=chatml_tokenizer_dir),
                         train_dataset=Dataset.from_dict({"messages": [chat] * 2}),
                         peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    im_end = trainer.processing_class.convert_tokens_to_ids("<|im_end|>")
    embed = trainer.model.get_input_embeddings()
    before = embed(torch.tensor([im_end])).detach().clone()
    head_before = trainer.model.get_output_embeddings().weight.detach().clone()
    trainer.train()
    assert not torch.equal(embed(torch.tensor([im_end])).detach(), before)  # the new token's row learned
    assert not torch.equal(trainer.model.get_output_embeddings().weight.detach(), head_before)


def test_clone_chat_template_names_a_missing_local_tokenizer(tmp_path, tiny_decoder_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from tether import clone_chat_template

    with pytest.raises(FileNotFoundError, match="Tokenizer .*no such local folder"):
        clone_chat_template(AutoModelForCausalLM.from_pretrained(tiny_decoder_dir), tokenizer,
                            str(tmp_path / "no-such-tokenizer"))
