"""`PPODecorators`: TRL 0.7's switchable "empty the device cache after this" context manager / decorator,
over `distributed.empty_device_cache` (the one implementation, which PPOTrainer calls when
`PPOConfig.optimize_device_cache` is set)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class PPODecorators:
    """`PPODecorators.empty_device_cache()` as a context manager or a decorator: after the block (or the
    decorated call) returns or raises, empty the device cache if the class attribute
    `optimize_device_cache` is True (off by default, as in TRL)."""

    optimize_device_cache: bool = False

    @classmethod
    @contextmanager
    def empty_device_cache(cls) -> Iterator[None]:
        try:
            yield
        finally:
            if cls.optimize_device_cache:
                from ..distributed import empty_device_cache  # on use: tether.core stays light to import

                empty_device_cache()
