"""Prompt batches for online methods: each process gets its own whole prompts for every micro-step of a
round of generation (`PromptRoundSampler` for a Dataset, `PromptRoundStream` for a stream, both for the
Trainer-based GRPO/RLOO), or endless shuffled batches with a resumable position (`ShuffledBatches`, for
PPO's own loop and its PPO-ptx data)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
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


class PromptRoundStream(torch.utils.data.IterableDataset):
    """`PromptRoundSampler`'s rounds for a stream of prompt rows, which cannot be indexed: yields this
    process's batch (a list of `prompts_per_round` rows) once per micro-step of each round.

    Rounds are consecutive runs of `processes x prompts_per_round` rows of the stream, read in its order by
    every process alike; process `rank` takes block `rank` of each, `repeats` times in a row. Rows that do not
    fill a last round are left out. Read it with `DataLoader(..., batch_size=None)`: items are batches.
    """

    def __init__(self, rows: Iterable[dict[str, Any]], prompts_per_round: int, processes: int, rank: int,
                 repeats: int) -> None:
        super().__init__()
        self.rows, self.block, self.processes, self.rank, self.repeats = rows, prompts_per_round, processes, rank, repeats

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.rows, "set_epoch"):  # a shuffled datasets stream reshuffles per epoch
            self.rows.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        per_round, pending, rounds = self.block * self.processes, [], 0
        for row in self.rows:
            pending.append(row)
            if len(pending) == per_round:
                mine = pending[self.rank * self.block:(self.rank + 1) * self.block]
                for _ in range(self.repeats):
                    yield mine
                pending, rounds = [], rounds + 1
        if rounds == 0:
            raise ValueError(
                f"The prompt stream has {len(pending)} rows; one round of generation needs {per_round} (prompts per "
                "round x processes). Fix: add prompts or lower per_device_train_batch_size / steps_per_generation.")


class ShuffledBatches:
    """Endless batches of `rows`, reshuffled every epoch in an order fixed by (seed, stream, epoch) alone.

    Nothing here draws from a global random stream, so the batches do not depend on what else a run
    sampled, and the whole state is one number, `position` (batches drawn so far): a resumed run
    `seek`s to the saved position and draws exactly the batches an uninterrupted run would have.
    With several processes each draw takes one global batch of `batch_size * world_size` rows and each
    process collates its own contiguous slice, so N processes see the batches of one process with an
    N times larger `batch_size`. Each epoch's last incomplete global batch is dropped.
    """

    def __init__(self, rows: Sequence[Any], batch_size: int, collate: Callable[[list[Any]], Any], seed: int,
                 stream: int, rank: int = 0, world_size: int = 1, name: str = "dataset") -> None:
        self.rows, self.batch_size, self.collate = rows, batch_size, collate
        self.seed, self.stream, self.rank = seed, stream, rank
        self.global_batch = batch_size * world_size
        self.per_epoch = len(rows) // self.global_batch
        if self.per_epoch == 0:
            raise ValueError(f"The {name} has fewer rows ({len(rows)}) than one batch: {batch_size} per process x "
                             f"{world_size} process(es). Add rows or lower the batch size.")
        self.position = 0
        self._epoch, self._order = -1, np.arange(0)

    def __iter__(self) -> ShuffledBatches:
        return self

    def __next__(self) -> Any:
        epoch, index = divmod(self.position, self.per_epoch)
        if epoch != self._epoch:
            # A SeedSequence of (seed, stream, epoch): independent orders per stream and epoch, same on every process.
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, self.stream, epoch]).permutation(
                len(self.rows))
        start = index * self.global_batch + self.rank * self.batch_size
        self.position += 1
        return self.collate([self.rows[int(i)] for i in self._order[start:start + self.batch_size]])

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "rows": len(self.rows), "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, int], name: str) -> None:
        if (state["rows"], state["global_batch"]) != (len(self.rows), self.global_batch):
            warnings.warn(f"The {name} was checkpointed with {state['rows']} rows in global batches of "
                          f"{state['global_batch']}, and now has {len(self.rows)} in batches of {self.global_batch}: "
                          "the resumed run continues at the same position but sees other batches than an "
                          "uninterrupted run would.", UserWarning, stacklevel=3)
        self.position = state["position"]
