"""Supervised (next-token) losses over the target tokens of a batch.

Shapes: n = target tokens of the batch (every loss-masked token, all rows together).
Each loss is a sum over tokens divided by `normalizer` (the step's target-token count, see
`TetherTrainer._token_normalizer`), so splitting a batch over accumulation steps or processes does not
change it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def nll_loss(token_logps: torch.Tensor, normalizer: torch.Tensor | float) -> torch.Tensor:
    """Negative log-likelihood: sum_n -log p(y_n | y_<n) / normalizer. token_logps: [n] -> scalar."""
    return -token_logps.sum() / normalizer


def dft_loss(token_logps: torch.Tensor, normalizer: torch.Tensor | float) -> torch.Tensor:
    """Dynamic Fine-Tuning (Wu et al., 2025, "On the Generalization of SFT: A Reinforcement Learning Perspective
    with Reward Rectification", arXiv:2508.05629): each token's NLL weighted by the probability the model gives the target
    token, held constant (no gradient flows through the weight):

        L = sum_n -sg(p_n) * log p_n / normalizer,   p_n = exp(token_logps_n)

    Its gradient is the NLL gradient scaled by p_n, which undoes SFT's implicit 1/p importance weight and damps
    the pull of tokens the model finds unlikely. token_logps: [n] -> scalar.
    """
    return -(token_logps.detach().exp() * token_logps).sum() / normalizer


SFT_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor | float], torch.Tensor]] = {
    "nll": nll_loss,
    "dft": dft_loss,
}
