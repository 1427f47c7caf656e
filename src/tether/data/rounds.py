"""Prompt batches for online methods: each process gets its own whole prompts for every micro-step of a
round of generation (see `PromptRoundSampler`)."""

from __future__ import annotations

from collections.abc import Iterator

import torch


class PromptRoundSampler(torch.utils.data.Sampler[int]):
    """Prompt indices for rounds of generation, laid out for accelerate's batch sharding.

    Each round takes `processes x prompts_per_round` fresh prompts; process w's block is its
    `prompts_per_round` of them. The DataLoader groups indices into batches of prompts_per_round, and
    accelerate deals batches to processes in turn (batch j to process j % processes), so emitting the
    blocks of a round in process order, `repeats` times (one per micro-step of the round), hands each
    process its own block at every micro-step of the round. Order is a seeded shuffle per epoch, the
    same on every process; the prompts that do not fill a last round are left for the next epoch.
    """

    def __init__(self, num_prompts: int, prompts_per_round: int, processes: int, repeats: int, seed: int,
                 shuffle: bool = True) -> None:
        self.num_prompts, self.block, self.processes, self.repeats = num_prompts, prompts_per_round, processes, repeats
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0
        self.rounds = num_prompts // (prompts_per_round * processes)
        if self.rounds == 0:
            raise ValueError(
                f"The prompt dataset has {num_prompts} rows; one round of generation needs "
                f"{prompts_per_round * processes} (prompts per round x processes). Fix: add prompts or lower "
                "per_device_train_batch_size / steps_per_generation.")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_prompts, generator=generator).tolist()
        else:
            order = list(range(self.num_prompts))
        per_round = self.block * self.processes
        for r in range(self.rounds):
            round_indices = order[r * per_round:(r + 1) * per_round]
            for _ in range(self.repeats):
                yield from round_indices

    def __len__(self) -> int:
        return self.rounds * self.repeats * self.block * self.processes
