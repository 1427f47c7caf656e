"""Streaming datasets (`load_dataset(..., streaming=True)`, here `Dataset.to_iterable_dataset()` and
`IterableDataset.from_generator`) for every trainer, written as a TRL user writes the call: tokenized on the
fly to the same rows as the map-style dataset, max_steps required, format checked on the first rows without
consuming the stream, dataset_num_proc ignored, and GRPO/RLOO rounds read in stream order."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset, IterableDataset

from tether import (
    CPOConfig,
    CPOTrainer,
    DatasetError,
    DPOConfig,
    DPOTrainer,
    GRPOConfig,
    GRPOTrainer,
    KTOConfig,
    KTOTrainer,
    ORPOConfig,
    ORPOTrainer,
    RewardConfig,
    RewardTrainer,
    RLOOConfig,
    RLOOTrainer,
)
from tether.data.formats import DatasetType, detect_format
from tether.data.preference import prepare_preference, prepare_unpaired
from tether.data.prepare import prepare_language_modeling, prepare_prompts
from tether.data.rounds import PromptRoundSampler, PromptRoundStream

PAIRS = [{"prompt": f"question {i}:", "chosen": " a good answer", "rejected": " bad"} for i in range(8)]
UNPAIRED = [{"prompt": f"question {i}:", "completion": " an answer", "label": i % 2 == 0} for i in range(8)]
PROMPTS = [{"prompt": f"the capital of france is {i}"} for i in range(8)]


def stream(rows: list[dict]) -> IterableDataset:
    return Dataset.from_list(rows).to_iterable_dataset()


def common(tmp_path, **overrides) -> dict:
    values = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, logging_steps=1,
                  report_to="none", save_strategy="no", disable_tqdm=True, learning_rate=1e-3, seed=0)
    return {**values, **overrides}


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


OFFLINE = [
    (RewardTrainer, RewardConfig, PAIRS, {}),
    (DPOTrainer, DPOConfig, PAIRS, {}),
    (CPOTrainer, CPOConfig, PAIRS, {}),
    (ORPOTrainer, ORPOConfig, PAIRS, {}),
    (KTOTrainer, KTOConfig, UNPAIRED, {}),
]
ONLINE = [(GRPOTrainer, GRPOConfig), (RLOOTrainer, RLOOConfig)]
ONLINE_OPTIONS = dict(num_generations=2, max_completion_length=4, per_device_train_batch_size=2)


def _reward_model_dir(tiny_decoder_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_decoder_dir, num_labels=1)
    model.config.pad_token_id = AutoTokenizer.from_pretrained(tiny_decoder_dir).pad_token_id
    path = tmp_path / "reward-model"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_decoder_dir).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("trainer_class, config_class, rows, extra", OFFLINE, ids=lambda p: getattr(p, "__name__", ""))
def test_offline_trainers_train_on_a_stream(tmp_path, tiny_decoder_dir, trainer_class, config_class, rows, extra):
    model = _reward_model_dir(tiny_decoder_dir, tmp_path) if trainer_class is RewardTrainer else tiny_decoder_dir
    # dataset_num_proc cannot apply to a stream (datasets maps it in one process): it is ignored, not an error.
    args = config_class(**common(tmp_path / "out", dataset_num_proc=2, max_length=32), **extra)
    trainer = trainer_class(model, args=args, train_dataset=stream(rows), eval_dataset=stream(rows[:4]))
    assert isinstance(trainer.train_dataset, IterableDataset)
    before = [p.detach().clone() for p in trainer.model.parameters() if p.requires_grad]
    trainer.train()
    assert trainer.state.global_step == 2
    after = [p for p in trainer.model.parameters() if p.requires_grad]
    assert any(not torch.equal(b, a.detach()) for b, a in zip(before, after))
    assert "eval_loss" in trainer.evaluate()


@pytest.mark.parametrize("trainer_class, config_class, rows, extra", OFFLINE, ids=lambda p: getattr(p, "__name__", ""))
def test_offline_trainers_need_max_steps_for_a_stream(tmp_path, tiny_decoder_dir, trainer_class, config_class, rows,
                                                      extra):
    model = _reward_model_dir(tiny_decoder_dir, tmp_path) if trainer_class is RewardTrainer else tiny_decoder_dir
    args = config_class(**common(tmp_path / "out", max_steps=-1), **extra)
    with pytest.raises(ValueError, match="max_steps"):
        trainer_class(model, args=args, train_dataset=stream(rows))


@pytest.mark.parametrize("trainer_class, config_class", ONLINE, ids=lambda p: getattr(p, "__name__", ""))
def test_online_trainers_train_on_a_stream_and_need_max_steps(tmp_path, tiny_decoder_dir, trainer_class,
                                                              config_class):
    with pytest.raises(ValueError, match="max_steps"):
        trainer_class(tiny_decoder_dir, length_reward, args=config_class(**{**common(tmp_path, max_steps=-1),
                                                                            **ONLINE_OPTIONS}),
                      train_dataset=stream(PROMPTS))
    args = config_class(**{**common(tmp_path), **ONLINE_OPTIONS, "dataset_num_proc": 2})
    trainer = trainer_class(tiny_decoder_dir, length_reward, args=args, train_dataset=stream(PROMPTS),
                            eval_dataset=stream(PROMPTS[:2]))
    trainer.train()
    assert trainer.state.global_step == 2
    assert any("reward" in entry for entry in trainer.state.log_history)

    # A stream of eval prompts: the trainer switched accelerate's dispatching off (it cannot split prompt strings).
    assert not trainer.accelerator.dataloader_config.dispatch_batches
    assert "eval_reward" in trainer.evaluate()


def test_grpo_rounds_follow_the_stream_in_order(tmp_path, tiny_decoder_dir):
    # 2 completions per prompt, 2 micro-steps per round, 2 updates per round: a round is
    # per_device_train_batch_size x steps_per_generation / num_generations = 2 prompts, used 2 x 2 times.
    args = GRPOConfig(**{**common(tmp_path), **ONLINE_OPTIONS, "steps_per_generation": 2, "num_iterations": 2,
                         "shuffle_dataset": False})
    trainer = GRPOTrainer(tiny_decoder_dir, length_reward, args=args, train_dataset=stream(PROMPTS))
    batches = [batch["prompt"] for batch in trainer.get_train_dataloader()]
    expected = []
    for r in range(4):  # 8 prompts -> 4 rounds of 2
        expected += [[PROMPTS[2 * r]["prompt"], PROMPTS[2 * r + 1]["prompt"]]] * 4
    assert batches == expected
    assert all(len(ids) > 0 for ids in next(iter(trainer.get_train_dataloader()))["prompt_input_ids"])


def test_prompt_round_stream_matches_the_sampler_on_every_process():
    """Per process, the stream's batches are the ones PromptRoundSampler (unshuffled) gives once accelerate deals
    its batches of `block` indices to processes in turn (batch j to process j % processes)."""
    rows = [{"prompt": str(i)} for i in range(14)]  # 14 rows, rounds of 3 x 2 = 6: 2 rounds, 2 rows left out
    block, processes, repeats = 3, 2, 2
    indices = list(PromptRoundSampler(len(rows), block, processes, repeats, seed=0, shuffle=False))
    batches = [indices[i:i + block] for i in range(0, len(indices), block)]
    for rank in range(processes):
        from_sampler = [[rows[i] for i in batch] for j, batch in enumerate(batches) if j % processes == rank]
        from_stream = list(PromptRoundStream(stream(rows), block, processes, rank, repeats))
        assert from_stream == from_sampler
        assert len(from_stream) == 2 * repeats


def test_prompt_stream_shorter_than_a_round_is_an_error():
    with pytest.raises(ValueError, match="one round of generation needs 6"):
        list(PromptRoundStream(stream(PROMPTS[:5]), 3, 2, 0, 1))


def test_grpo_shuffles_a_stream_with_its_seed(tmp_path, tiny_decoder_dir):
    args = GRPOConfig(**{**common(tmp_path), **ONLINE_OPTIONS, "shuffle_dataset": True})
    trainer = GRPOTrainer(tiny_decoder_dir, length_reward, args=args, train_dataset=stream(PROMPTS))
    first = [p for batch in trainer.get_train_dataloader() for p in batch["prompt"]]
    again = [p for batch in trainer.get_train_dataloader() for p in batch["prompt"]]
    assert first == again  # same seed, same order
    assert sorted(first) == sorted(r["prompt"] for r in PROMPTS)  # every prompt once (one iteration, one step/round)


# ----- data layer: a stream gives the rows the map-style dataset gives -----------------------------------------
def test_streamed_rows_equal_the_map_style_rows(tokenizer):
    pairs, unpaired, prompts = Dataset.from_list(PAIRS), Dataset.from_list(UNPAIRED), Dataset.from_list(PROMPTS)
    texts = Dataset.from_list([{"prompt": "two plus two is", "completion": " four"}] * 3)
    cases = [
        (prepare_preference, pairs, dict(max_length=12, max_prompt_length=3)),
        (prepare_unpaired, unpaired, dict(max_length=12)),
        (prepare_unpaired, pairs, dict(max_length=12)),
        (prepare_prompts, prompts, {}),
        (prepare_language_modeling, texts, dict(max_length=32)),
        (prepare_language_modeling, texts, dict(max_length=32, packing=True)),
    ]
    for prepare, data, options in cases:
        whole = [dict(row) for row in prepare(data, tokenizer, **options)]
        streamed = [dict(row) for row in prepare(data.to_iterable_dataset(), tokenizer, **options)]
        assert streamed == whole, prepare.__name__


def test_generator_stream_is_read_from_its_first_rows_without_being_consumed(tokenizer):
    calls = []

    def rows():
        calls.append(1)
        yield from PAIRS[:3]

    data = IterableDataset.from_generator(rows)
    assert detect_format(data).type is DatasetType.PREFERENCE
    prepared = prepare_preference(data, tokenizer)
    assert len(list(prepared)) == 3  # the whole stream is still there after the format was read
    assert len(list(prepared)) == 3  # and can be read again (a new epoch)
    assert len(calls) >= 3


def test_stream_format_errors_come_before_training(tmp_path, tiny_decoder_dir):
    bad = stream([{"prompt": "q", "chosen": "a", "rejectd": "b"}] * 3)
    with pytest.raises(DatasetError, match="rejected"):
        DPOTrainer(tiny_decoder_dir, args=DPOConfig(**common(tmp_path)), train_dataset=bad)
    empty = IterableDataset.from_generator(lambda: iter([]))
    with pytest.raises(DatasetError, match="empty"):
        prepare_preference(empty, None)


def test_streamed_prompt_longer_than_max_prompt_length(tokenizer):
    long = stream([{"prompt": "hello world " * 20}])
    with pytest.raises(DatasetError, match="max_prompt_length=4"):
        prepare_prompts(long, tokenizer, max_prompt_length=4)


def test_stream_with_plain_training_arguments(tmp_path, tiny_decoder_dir):
    """TrainingArguments keep remove_unused_columns=True, which reads the prepared stream's column names."""
    from transformers import TrainingArguments

    args = TrainingArguments(**common(tmp_path, max_steps=1))
    trainer = DPOTrainer(tiny_decoder_dir, args=args, train_dataset=stream(PAIRS))
    assert set(trainer.train_dataset.column_names) == {"chosen_input_ids", "chosen_loss_mask", "rejected_input_ids",
                                                       "rejected_loss_mask", "prompt_length"}
    trainer.train()
    assert trainer.state.global_step == 1


def test_dpo_precomputed_reference_needs_the_whole_dataset(tmp_path, tiny_decoder_dir):
    args = DPOConfig(**common(tmp_path), precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match="precompute_ref_log_probs=False"):
        DPOTrainer(tiny_decoder_dir, args=args, train_dataset=stream(PAIRS))


def test_grpo_evaluates_a_dict_of_streamed_eval_sets(tmp_path, tiny_decoder_dir):
    args = GRPOConfig(**{**common(tmp_path), **ONLINE_OPTIONS})
    trainer = GRPOTrainer(tiny_decoder_dir, length_reward, args=args, train_dataset=Dataset.from_list(PROMPTS),
                          eval_dataset={"a": stream(PROMPTS[:2]), "b": stream(PROMPTS[2:4])})
    metrics = trainer.evaluate()  # each set gets its loss; the rollout metrics are logged as eval_* (as TRL)
    assert {"eval_a_loss", "eval_b_loss", "eval_reward"} <= set(metrics)
