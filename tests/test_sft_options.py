"""TRL 1.x SFTConfig options, written as a TRL user writes them: loss_type (nll, dft), packing_strategy (bfd,
bfd_split, wrapped), truncation_mode, shuffle_dataset, eval_packing, pad_to_multiple_of, dataset_kwargs.

Expected values come from the definitions: the DFT loss from its formula on full logits, packed rows from
hand-packed token lists, truncated rows from slicing the plain tokenization.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from tether import SFTConfig, SFTTrainer
from tether.data.collate import pack_examples
from tether.losses.lm import dft_loss, nll_loss

TEXTS = ["the film was great and the music was lovely.", "hello world", "two plus two is four.",
         "the plot was dull and far too long for a film about paris.", "question: answer:"]


def config(tmp_path, **overrides) -> SFTConfig:
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=1, report_to="none",
                  save_strategy="no", disable_tqdm=True, seed=0, dataloader_pin_memory=False)
    values.update(overrides)
    return SFTConfig(**values)


def plain_ids(tokenizer, text: str) -> list[int]:
    """What SFT trains on for a text row: its tokens, then EOS."""
    return tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]


# ----- loss_type="dft" ------------------------------------------------------------------------------------------

def test_dft_loss_against_a_token_by_token_reference():
    torch.manual_seed(0)
    logits = torch.randn(7, 11, dtype=torch.float64, requires_grad=True)  # [n, V]
    targets = torch.randint(0, 11, (7,))
    logps = logits.log_softmax(-1).gather(1, targets[:, None])[:, 0]  # [n]
    normalizer = 5.0
    loss = dft_loss(logps, normalizer)
    # Reference, token by token: -p * log p with p = softmax(logits)[target], summed, / normalizer.
    expected = 0.0
    for row, target in zip(logits.detach(), targets, strict=True):
        p = torch.softmax(row, 0)[target]
        expected += -(p * torch.log(p)).item()
    assert loss.item() == pytest.approx(expected / normalizer, rel=1e-12)
    # The weight is held constant: the gradient is the NLL gradient of each token scaled by its probability.
    (dft_grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
    for n in range(7):
        (nll_grad,) = torch.autograd.grad(nll_loss(logps[n:n + 1], normalizer), logits, retain_graph=True)
        p = logps[n].exp().item()
        torch.testing.assert_close(dft_grad[n], p * nll_grad[n], rtol=1e-10, atol=1e-12)


def test_sft_trainer_dft_loss_equals_the_formula_on_full_logits(tmp_path, tiny_decoder_dir):
    ds = Dataset.from_dict({"text": TEXTS[:4]})
    trainer = SFTTrainer(tiny_decoder_dir, args=config(tmp_path, loss_type="dft"), train_dataset=ds)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model = trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        logps = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
    token_logps = logps[:, :-1].gather(2, batch["input_ids"][:, 1:, None])[..., 0]  # [b, t-1]: predicts token j+1
    mask = batch["loss_mask"][:, 1:]
    expected = -(token_logps.exp() * token_logps)[mask].sum() / mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    nll = -token_logps[mask].sum() / mask.sum()
    assert abs(loss.item() - nll.item()) > 0.1  # it is not the plain NLL


def test_loss_type_values(tmp_path):
    with pytest.raises(ValueError, match="loss_type"):
        config(tmp_path, loss_type="focal")
    with pytest.warns(FutureWarning, match="chunked_nll"):
        assert config(tmp_path, loss_type="chunked_nll").loss_type == "nll"


# ----- packing_strategy -----------------------------------------------------------------------------------------

EXAMPLES = {"input_ids": [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10], [11]]}


def rows_with_sequences(packed):
    """Each row as a list of its sequences (a sequence starts where position_ids restart at 0)."""
    rows = []
    for ids, positions in zip(packed["input_ids"], packed["position_ids"], strict=True):
        sequences = []
        for token, position in zip(ids, positions, strict=True):
            if position == 0:
                sequences.append([])
            sequences[-1].append(token)
        rows.append(sequences)
    return sorted(rows)


@pytest.mark.parametrize("strategy, expected", [
    # best fit decreasing, the long example keeps its first 4 tokens (token 5 is lost); [11] takes the
    # tightest room that fits it, next to [8, 9, 10]
    ("bfd", [[[1, 2, 3, 4]], [[6, 7]], [[8, 9, 10], [11]]]),
    # the long example is split into [1, 2, 3, 4] and [5], packed as two examples: no token is lost ([5] comes
    # before [11] among the equal lengths and takes the tightest room, next to [8, 9, 10])
    ("bfd_split", [[[1, 2, 3, 4]], [[6, 7], [11]], [[8, 9, 10], [5]]]),
    # everything concatenated, cut every 4 tokens; each row is one sequence
    ("wrapped", [[[1, 2, 3, 4]], [[5, 6, 7, 8]], [[9, 10, 11]]]),
])
def test_pack_examples_strategies_by_hand(strategy, expected):
    packed = pack_examples({**EXAMPLES, "loss_mask": [[True] * len(i) for i in EXAMPLES["input_ids"]]}, 4, strategy)
    assert rows_with_sequences(packed) == sorted(expected)  # as TRL's pack_dataset documents this example
    assert all(len(m) == len(i) for m, i in zip(packed["loss_mask"], packed["input_ids"], strict=True))
    with pytest.raises(ValueError, match="packing_strategy"):
        pack_examples(EXAMPLES, 4, "ffd")


def test_sft_wrapped_packing_cuts_the_concatenation_into_full_rows(tmp_path, tiny_decoder_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_decoder_dir)
    ds = Dataset.from_dict({"text": TEXTS})
    trainer = SFTTrainer(tiny_decoder_dir, train_dataset=ds,
                         args=config(tmp_path, packing=True, packing_strategy="wrapped", max_length=8))
    stream = [t for text in TEXTS for t in plain_ids(tokenizer, text)]
    rows = trainer.train_dataset["input_ids"]
    assert rows == [stream[i:i + 8] for i in range(0, len(stream), 8)]
    assert trainer.train_dataset["position_ids"][0] == list(range(8))  # one sequence per row
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    loss = trainer.compute_loss(trainer.model, batch)
    assert torch.isfinite(loss)


def test_sft_bfd_split_keeps_every_token_and_bfd_truncates(tmp_path, tiny_decoder_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_decoder_dir)
    ds = Dataset.from_dict({"text": TEXTS})
    all_ids = sorted(t for text in TEXTS for t in plain_ids(tokenizer, text))
    kept = {}
    for strategy in ("bfd", "bfd_split"):
        trainer = SFTTrainer(tiny_decoder_dir, train_dataset=ds,
                             args=config(tmp_path, packing=True, packing_strategy=strategy, max_length=6))
        assert all(len(r) <= 6 for r in trainer.train_dataset["input_ids"])
        kept[strategy] = sorted(t for row in trainer.train_dataset["input_ids"] for t in row)
    assert kept["bfd_split"] == all_ids
    assert len(kept["bfd"]) == sum(min(len(plain_ids(tokenizer, t)), 6) for t in TEXTS)


# ----- truncation_mode, shuffle_dataset, eval_packing -----------------------------------------------------------

@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_truncation_mode(tmp_path, tiny_decoder_dir, mode):
    tokenizer = AutoTokenizer.from_pretrained(tiny_decoder_dir)
    text = TEXTS[3]
    full = plain_ids(tokenizer, text)
    assert len(full) > 6
    trainer = SFTTrainer(tiny_decoder_dir, train_dataset=Dataset.from_dict({"text": [text]}),
                         args=config(tmp_path, max_length=6, truncation_mode=mode))
    assert trainer.train_dataset[0]["input_ids"] == (full[:6] if mode == "keep_start" else full[-6:])
    with pytest.raises(ValueError, match="truncation_mode"):
        config(tmp_path, truncation_mode="middle")


def test_keep_end_keeps_the_completion_of_a_long_prompt(tmp_path, tiny_decoder_dir):
    # keep_start would leave only prompt tokens (the row would be dropped); keep_end keeps the completion.
    ds = Dataset.from_dict({"prompt": [TEXTS[3]], "completion": [" four."]})
    trainer = SFTTrainer(tiny_decoder_dir, train_dataset=ds,
                         args=config(tmp_path, max_length=6, truncation_mode="keep_end"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_decoder_dir)
    completion = tokenizer(" four.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    row = trainer.train_dataset[0]
    assert row["input_ids"][-len(completion):] == completion
    assert row["loss_mask"] == [False] * (6 - len(completion)) + [True] * len(completion)


def test_shuffle_dataset(tmp_path, tiny_decoder_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_decoder_dir)
    ds = Dataset.from_dict({"text": TEXTS * 4})
    in_order = SFTTrainer(tiny_decoder_dir, train_dataset=ds, args=config(tmp_path)).train_dataset["input_ids"]
    assert in_order == [plain_ids(tokenizer, t) for t in TEXTS * 4]  # TRL's default: not shuffled
    shuffled = SFTTrainer(tiny_decoder_dir, train_dataset=ds,
                          args=config(tmp_path, shuffle_dataset=True, seed=3)).train_dataset["input_ids"]
    assert shuffled == [plain_ids(tokenizer, t) for t in ds.shuffle(seed=3)["text"]]
    assert shuffled != in_order


def test_eval_packing(tmp_path, tiny_decoder_dir):
    ds = Dataset.from_dict({"text": TEXTS * 2})
    for eval_packing, eval_packed in ((None, True), (False, False)):
        trainer = SFTTrainer(tiny_decoder_dir, train_dataset=ds, eval_dataset=ds,
                             args=config(tmp_path, packing=True, max_length=32, eval_packing=eval_packing))
        assert "position_ids" in trainer.train_dataset.column_names
        assert ("position_ids" in trainer.eval_dataset.column_names) is eval_packed
        assert (len(trainer.eval_dataset) < len(ds)) is eval_packed


# ----- pad_to_multiple_of, dataset_kwargs -----------------------------------------------------------------------

def test_pad_to_multiple_of(tmp_path, tiny_decoder_dir):
    ds = Dataset.from_dict({"text": TEXTS[:2]})
    widths = {}
    for multiple in ("auto", None, 8):
        trainer = SFTTrainer(tiny_decoder_dir, train_dataset=ds, args=config(tmp_path, pad_to_multiple_of=multiple))
        batch = next(iter(trainer.get_train_dataloader()))
        widths[multiple] = batch["input_ids"].shape[1]
    longest = max(len(r) for r in trainer.train_dataset["input_ids"])
    assert widths["auto"] == widths[None] == longest
    assert widths[8] == -(-longest // 8) * 8 and widths[8] != longest
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        config(tmp_path, pad_to_multiple_of=0)


def test_dataset_kwargs_from_the_command_line_as_json(tmp_path):
    args = config(tmp_path, dataset_kwargs='{"skip_prepare_dataset": true}')
    assert args.dataset_kwargs == {"skip_prepare_dataset": True}
