"""TRL's `trl.trainer.callbacks` path; the implementations are in tether.callbacks."""

from ..callbacks import (  # noqa: F401
    BEMACallback,
    LogCompletionsCallback,
    RefModelCallbackHandler,
    RichProgressCallback,
    WeaveCallback,
    __getattr__,  # noqa: F401  (SyncRefModelCallback, resolved on first use)
)
