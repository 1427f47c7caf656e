"""`BaseTrainer`: the abstract trainer interface of TRL 0.7 (`trl.trainer.BaseTrainer`).

tether's trainers do not derive from it (they build on `transformers.Trainer` through
`tether.trainers.base.TetherTrainer`); it is here for user code written against TRL 0.7 that subclasses
it to write a new algorithm.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub import PyTorchModelHubMixin


class BaseTrainer(PyTorchModelHubMixin):
    """A trainer holds its `config` and implements `step` (one training step on a batch), `loss`,
    `compute_rewards` and `_save_pretrained(save_directory)`, which `save_pretrained` / `push_to_hub`
    (from huggingface_hub's PyTorchModelHubMixin) call. Each raises NotImplementedError here."""

    def __init__(self, config: Any) -> None:
        self.config = config

    def step(self, *args: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__}.step: a BaseTrainer subclass implements its training step.")

    def loss(self, *args: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__}.loss: a BaseTrainer subclass implements its loss.")

    def compute_rewards(self, *args: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__}.compute_rewards: a BaseTrainer subclass implements it.")

    def _save_pretrained(self, save_directory: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__}._save_pretrained: a BaseTrainer subclass implements "
                                  "saving.")
