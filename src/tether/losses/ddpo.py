"""DDPO: reinforcement learning on a diffusion model's denoising loop (Black et al., 2023, "Training
Diffusion Models with Reinforcement Learning", https://arxiv.org/abs/2305.13301).

The T denoising steps are a T-step MDP: the state is (prompt, t, x_t), the action is x_{t-1}, and the policy
is the sampler's Gaussian step p_theta(x_{t-1} | x_t, c). The reward r(x_0, c) comes only at the end. Here:

- the DDIM step (Song et al., 2021, "Denoising Diffusion Implicit Models", eqs. 12 and 16) as a Gaussian,
  its sample and the log-density of a given next latent (`ddim_step_with_log_prob`);
- the two policy-gradient estimators of the paper (sec. 4.3): DDPO_SF, the score function (REINFORCE), and
  DDPO_IS, importance sampling with PPO's clip (`DDPO_LOSSES`);
- advantages: rewards normalised over the batch, or per prompt over a running buffer (sec. 4.3 / app. B.2,
  `PerPromptStatTracker`).

Shapes: b = samples, c x h x w = one latent ([b, c, h, w]); per-sample quantities are [b].
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tether.ops.rng import randn_tensor

from .ppo import clipped_surrogate

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def _per_sample(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[b] (or a scalar) -> [b, 1, 1, 1], broadcastable against `like` [b, c, h, w]."""
    return x.reshape(-1, *([1] * (like.dim() - 1))).to(like.device, like.dtype)


def predicted_x0_and_noise(model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor,
                           prediction_type: str = "epsilon") -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) from the network's output at x_t, with abar = alpha_prod_t [b] (DDIM eq. 12's
    "predicted x0"): for epsilon-prediction x0_hat = (x_t - sqrt(1 - abar) eps_hat) / sqrt(abar); the
    x0- and v-parameterisations are rewritten into the same pair. All tensors [b, c, h, w]."""
    abar = _per_sample(alpha_prod_t, sample)
    if prediction_type == "epsilon":
        return (sample - (1 - abar).sqrt() * model_output) / abar.sqrt(), model_output
    if prediction_type == "sample":
        return model_output, (sample - abar.sqrt() * model_output) / (1 - abar).sqrt()
    if prediction_type == "v_prediction":
        return abar.sqrt() * sample - (1 - abar).sqrt() * model_output, abar.sqrt() * model_output + (
            1 - abar).sqrt() * sample
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")


def ddim_step_mean_std(model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor,
                       alpha_prod_t_prev: torch.Tensor, eta: float, prediction_type: str = "epsilon",
                       x0_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       use_clipped_model_output: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [b, c, h, w] and standard deviation [b, 1, 1, 1] of the DDIM step x_t -> x_{t-1}:

        sigma_t = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)      (eq. 16)
        mu      = sqrt(abar_prev) * x0_hat + sqrt(1 - abar_prev - sigma_t^2) * eps_hat             (eq. 12)

    abar_t = alpha_prod_t, abar_prev = alpha_prod_t_prev: [b] (each sample may be at its own timestep).
    `x0_transform` clips or thresholds x0_hat as the scheduler is configured to; `use_clipped_model_output`
    then re-derives eps_hat from the transformed x0_hat (GLIDE), as diffusers' DDIMScheduler does.
    """
    x0_hat, eps_hat = predicted_x0_and_noise(model_output, sample, alpha_prod_t, prediction_type)
    if x0_transform is not None:
        x0_hat = x0_transform(x0_hat)
    abar_t, abar_prev = _per_sample(alpha_prod_t, sample), _per_sample(alpha_prod_t_prev, sample)
    if use_clipped_model_output:
        eps_hat = (sample - abar_t.sqrt() * x0_hat) / (1 - abar_t).sqrt()
    variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)  # [b, 1, 1, 1]
    std = eta * variance.sqrt()
    mean = abar_prev.sqrt() * x0_hat + (1 - abar_prev - std.square()).sqrt() * eps_hat
    return mean, std


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2) per element, averaged over all but the first dimension: [b].

    The mean (not the sum) over the c*h*w elements is the DDPO reference implementation's convention; it
    scales every log-ratio by 1 / (c*h*w), which is why DDPO's clip ranges are tiny (1e-4)."""
    log_density = (-(x.detach() - mean).square() / (2 * std.square()) - std.log()
                   - 0.5 * math.log(2 * math.pi))  # [b, c, h, w]
    return log_density.mean(dim=tuple(range(1, x.dim())))


def ddim_step_with_log_prob(model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor,
                            alpha_prod_t_prev: torch.Tensor, eta: float, prediction_type: str = "epsilon",
                            x0_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                            use_clipped_model_output: bool = False, prev_sample: torch.Tensor | None = None,
                            generator: torch.Generator | list[torch.Generator] | None = None,
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_{t-1} [b, c, h, w], log p_theta(x_{t-1} | x_t) [b]) of one stochastic DDIM step (eta > 0).

    With `prev_sample` None, x_{t-1} = mu + sigma_t * z is drawn (z from `generator`); given, its log-density
    under the step is computed, which is how DDPO re-scores a stored trajectory under the current weights.
    The log-density is differentiable in `model_output` (through mu), never in the sample itself."""
    if prev_sample is not None and generator is not None:
        raise ValueError("Pass either prev_sample (to score it) or generator (to draw one), not both.")
    mean, std = ddim_step_mean_std(model_output, sample, alpha_prod_t, alpha_prod_t_prev, eta, prediction_type,
                                   x0_transform, use_clipped_model_output)
    if prev_sample is None:
        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                             dtype=model_output.dtype)
        prev_sample = mean + std * noise
    return prev_sample.to(sample.dtype), gaussian_log_prob(prev_sample, mean, std)


# ----- the policy-gradient losses -------------------------------------------------------------------------
@dataclass
class DDPOLossOutput:
    loss: torch.Tensor  # scalar, differentiable
    approx_kl: torch.Tensor  # detached: 0.5 * mean (log p - log p_old)^2
    clipfrac: torch.Tensor  # detached: share of samples with |ratio - 1| > clip_range


def _diagnostics(log_ratio: torch.Tensor, clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return 0.5 * log_ratio.square().mean(), ((log_ratio.exp() - 1).abs() > clip_range).float().mean()


def ddpo_is_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                 clip_range: float, adv_clip_max: float) -> DDPOLossOutput:
    """DDPO_IS (paper eq. 5 with PPO's clip, Schulman et al., 2017, eq. 7), for one denoising step:

        A = clip(advantages, -adv_clip_max, adv_clip_max),  r = exp(log p_theta - log p_old)
        loss = mean_b max(-A * r, -A * clip(r, 1 - clip_range, 1 + clip_range))

    log_probs (differentiable), old_log_probs (from sampling), advantages: [b]. clipfrac counts
    |r - 1| > clip_range, as the DDPO reference implementation logs it."""
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    log_ratio = log_probs - old_log_probs.detach()  # [b]
    per_sample, _, _ = clipped_surrogate(log_ratio, advantages, clip_range, clip_range)  # [b]
    return DDPOLossOutput(per_sample.mean(), *_diagnostics(log_ratio, clip_range))


def ddpo_sf_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                 clip_range: float, adv_clip_max: float) -> DDPOLossOutput:
    """DDPO_SF (paper eq. 4, REINFORCE): loss = -mean_b A * log p_theta(x_{t-1} | x_t, c), A clipped as
    in `ddpo_is_loss`. Its gradient is DDPO_IS's at r = 1, so it is exact only on the samples' own policy
    (one update per sampling round: train_num_inner_epochs = 1, all timesteps in one optimizer step)."""
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    loss = -(advantages.detach() * log_probs).mean()
    return DDPOLossOutput(loss, *_diagnostics(log_probs - old_log_probs.detach(), clip_range))


DDPO_LOSSES: dict[str, Callable[..., DDPOLossOutput]] = {"ddpo_is": ddpo_is_loss, "ddpo_sf": ddpo_sf_loss}


# ----- advantages -----------------------------------------------------------------------------------------
def batch_advantages(rewards: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """(r - mean(r)) / (std(r) + eps) over the whole batch [n], std the population one (ddof 0)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return (rewards - rewards.mean()) / (rewards.std() + eps)


class PerPromptStatTracker:
    """Advantages normalised per prompt (paper app. B.2): each prompt keeps its last `buffer_size` rewards;
    a reward's advantage is (r - mean) / (std + 1e-6) over its prompt's buffer (this batch's rewards
    included), or over the whole batch while the buffer holds fewer than `min_count`. std is ddof 0."""

    def __init__(self, buffer_size: int, min_count: int) -> None:
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats: dict[str, deque] = {}

    def update(self, prompts: Sequence[str], rewards: Sequence[float] | np.ndarray) -> np.ndarray:
        """Add this batch's rewards to their prompts' buffers; the advantages [n], in input order."""
        prompts, rewards = np.asarray(prompts), np.asarray(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        for prompt in np.unique(prompts):
            rows = prompts == prompt
            buffer = self.stats.setdefault(str(prompt), deque(maxlen=self.buffer_size))
            buffer.extend(rewards[rows].tolist())
            reference = np.asarray(buffer) if len(buffer) >= self.min_count else rewards
            advantages[rows] = (rewards[rows] - reference.mean()) / (reference.std() + 1e-6)
        return advantages

    def get_stats(self) -> dict[str, dict[str, float]]:
        """Per prompt: the buffer's mean, std and count."""
        return {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "count": len(v)} for k, v in self.stats.items()}
