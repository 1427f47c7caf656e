"""Random response (or query) lengths for rollouts: `LengthSampler(min, max)()` draws max_new_tokens."""

from __future__ import annotations

import numpy as np


class LengthSampler:
    """Draws an int uniformly from [min_value, max_value) on each call (max excluded), from numpy's
    global RNG, so `set_seed` makes the draws reproducible; the stream of draws is the one TRL's
    LengthSampler gives for the same seed.

    `generate(..., length_sampler=LengthSampler(4, 16))` samples a new max_new_tokens per batch.
    """

    def __init__(self, min_value: int, max_value: int) -> None:
        if int(max_value) <= int(min_value):
            raise ValueError(f"LengthSampler needs min_value < max_value (max excluded), got min_value={min_value}, "
                             f"max_value={max_value}; e.g. LengthSampler(4, 17) draws 4..16.")
        self.min_value, self.max_value = int(min_value), int(max_value)
        self.values = list(range(self.min_value, self.max_value))  # the possible draws, as TRL exposes them

    def __call__(self) -> int:
        return int(np.random.randint(self.min_value, self.max_value))

    def __repr__(self) -> str:
        return f"LengthSampler({self.min_value}, {self.max_value})"
