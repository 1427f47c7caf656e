"""Issue 13 item 7: two runs of any method with the same seed and config end with identical weights on CPU
(torch.equal, bit for bit: the same ops on the same numbers in the same order, in one process).

Between the two runs the test draws from every global random stream (torch, python, numpy), so a run that
depended on the random state before its trainer existed (a head or an adapter initialised from it, a sampler
seeded from it) would differ. Dropout is on where the method allows it, so the training-time streams count too.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import pytest
import torch
from datasets import Dataset

from test_kill_resume import (
    METHODS,
    PPO_PROMPTS,
    assert_equal_weights,
    make_trainer,
    noisy_length_reward,
    ppo_trainer,
)
from test_resume import DROPOUT
from tether import IterativeSFTTrainer, SFTConfig
from tether.demo.corpus import generate_reviews


def disturb_random_streams() -> None:
    """What a script may do before building its trainer: draw from the global generators."""
    torch.randn(7)
    random.random()
    np.random.rand()


def twice(run: Callable[[], torch.nn.Module]) -> tuple[torch.nn.Module, torch.nn.Module]:
    first = run()
    disturb_random_streams()
    return first, run()


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


def assert_trained(model: torch.nn.Module, start: dict[str, torch.Tensor]) -> None:
    """Every trainable tensor moved: a run that trains nothing would pass the comparison trivially."""
    frozen = [name for name, value in model.state_dict().items() if torch.equal(value, start[name])]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and not trainable & set(frozen), sorted(trainable & set(frozen))[:3]


LORA = dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
# Besides every method: a LoRA adapter (and a reward model's fresh score head, trained through modules_to_save)
# initialised from the random streams; GRPO scored by a reward model whose score head is fresh (loaded by path,
# before the policy); rounds spanning several optimizer steps.
EXTRA_RUNS = ["reward-lora", "grpo-reward-model", "grpo-iterations", "rloo-spg"]


@pytest.mark.parametrize("run", [*METHODS, *EXTRA_RUNS])
def test_trainer_runs_with_one_seed_end_with_equal_weights(run, tiny_decoder_dir, tokenizer, tmp_path):
    from peft import LoraConfig

    kwargs = {"reward-lora": dict(peft_config=LoraConfig(**LORA)),
              "grpo-reward-model": dict(reward_funcs=tiny_decoder_dir)}.get(run, {})
    method = {"reward-lora": "reward", "grpo-reward-model": "grpo"}.get(run, run)

    def trainer():
        return make_trainer(method, tiny_decoder_dir, tokenizer, str(tmp_path / "out"), save_strategy="no",
                            trainer_kwargs=kwargs)

    def train() -> torch.nn.Module:
        t = trainer()
        start = snapshot(t.model)
        t.train()
        assert_trained(t.model, start)
        return t.model

    first, second = twice(train)
    assert_equal_weights(first, second)


def test_ppo_step_loop_of_a_script_with_one_seed_ends_with_equal_weights(tiny_decoder_dir, tokenizer, tmp_path):
    """The classic script: the model built first, then PPOTrainer, then a loop over its shuffled dataloader,
    generate(), a score per response (drawing from python's and numpy's streams), step()."""
    rows = Dataset.from_dict({"input_ids": [tokenizer(p)["input_ids"] for p in PPO_PROMPTS]})

    def train() -> torch.nn.Module:
        trainer = ppo_trainer(tiny_decoder_dir, tokenizer, str(tmp_path / "out"), dataset=rows)
        start = snapshot(trainer.model)
        for _ in range(2):  # 3 batches an epoch: 6 steps
            for batch in trainer.dataloader:
                queries = [torch.tensor(ids) for ids in batch["input_ids"]]
                responses = trainer.generate(queries, return_prompt=False, max_new_tokens=5, do_sample=True)
                texts = tokenizer.batch_decode(responses)
                trainer.step(queries, responses, [torch.tensor(r) for r in noisy_length_reward(texts)])
        assert_trained(trainer.model, start)
        return trainer.model

    first, second = twice(train)
    assert_equal_weights(first, second)


def test_ppo_train_with_one_seed_ends_with_equal_weights(tiny_decoder_dir, tokenizer, tmp_path):
    """PPOTrainer.train() with a separate critic loaded by path (its score head fresh) and PPO-ptx batches."""
    ptx = Dataset.from_dict({"text": ["the film was good.", "a plot with holes.", "great acting overall."]})

    def train() -> torch.nn.Module:
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        trainer = ppo_trainer(tiny_decoder_dir, tokenizer, str(out), save_steps=0, ptx_coef=0.5, ptx_dataset=ptx,
                              critic=tiny_decoder_dir)
        both = torch.nn.ModuleList([trainer.model, trainer.critic])
        start = snapshot(both)
        trainer.train()
        assert_trained(both, start)
        return both

    first, second = twice(train)
    assert_equal_weights(first, second)


def test_iterative_sft_with_one_seed_ends_with_equal_weights(tiny_decoder_dir, tokenizer, tmp_path):
    """IterativeSFTTrainer: each step() shuffles its samples into mini-batches; dropout on."""
    texts = [row["text"] for row in generate_reviews(12, seed=2)]

    def train() -> torch.nn.Module:
        args = SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, learning_rate=1e-3,
                         seed=3, report_to="none", model_init_kwargs=DROPOUT, max_steps=6)
        trainer = IterativeSFTTrainer(tiny_decoder_dir, args=args, tokenizer=tokenizer)
        start = snapshot(trainer.model)
        for first in range(0, 12, 4):
            trainer.step(texts=texts[first:first + 4])
        assert_trained(trainer.model, start)
        return trainer.model

    first, second = twice(train)
    assert_equal_weights(first, second)
