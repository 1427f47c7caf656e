"""KL penalties for RLHF: per-token estimators, the KL-penalised reward, and the KL coefficient controllers.

Shapes: b = batch, t = tokens, v = vocabulary. Per token, with x the sampled token, p = pi(x | context)
the policy and q = pi_ref(x | context) the reference model,

    k1 = log p - log q                  ("kl": unbiased for KL(p || q) under x ~ p, can be negative)
    |k1|                                ("abs")
    k2 = 0.5 * (log p - log q)^2        ("mse": biased, low variance, >= 0)
    k3 = (s - 1) - log s,  s = q / p    ("k3": unbiased and >= 0, since log s <= s - 1)
    sum_v p_v (log p_v - log q_v)       ("full": the exact KL over the vocabulary, [b, t, v] inputs)

(J. Schulman, 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html, where
r = q/p is our s; names as TRL's classic PPO `kl_penalty`, plus "k3" as GRPO uses it.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _k1(logprob: torch.Tensor, ref_logprob: torch.Tensor) -> torch.Tensor:
    return logprob - ref_logprob


def _abs(logprob: torch.Tensor, ref_logprob: torch.Tensor) -> torch.Tensor:
    return (logprob - ref_logprob).abs()


def _k2(logprob: torch.Tensor, ref_logprob: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logprob - ref_logprob).square()


def _k3(logprob: torch.Tensor, ref_logprob: torch.Tensor) -> torch.Tensor:
    log_s = ref_logprob - logprob  # log(q / p)
    return torch.expm1(log_s) - log_s  # (s - 1) - log s; expm1 keeps it exact near s = 1


def _full(logprob: torch.Tensor, ref_logprob: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logprob, dim=-1)  # [b, t, v]; a no-op on log-probs, normalises logits
    logq = F.log_softmax(ref_logprob, dim=-1)  # [b, t, v]
    p = logp.exp()
    # p log(p/q) with 0 * log 0 = 0: where p underflows to 0, logp may be -inf and the product nan.
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros((), dtype=p.dtype, device=p.device))
    return terms.sum(-1)  # [b, t]


KL_PENALTIES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "kl": _k1,
    "abs": _abs,
    "mse": _k2,
    "k3": _k3,
    "full": _full,
}


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kind: str = "kl") -> torch.Tensor:
    """Per-token KL estimate, differentiable (see the module docstring for the formulas).

    kind in KL_PENALTIES. For "kl", "abs", "mse", "k3": logprob, ref_logprob [b, t] are the sampled
    tokens' log-probs -> [b, t]. For "full": [b, t, v] log-probs (or logits: they are normalised with
    log_softmax first) of the policy and the reference -> [b, t].
    """
    if kind not in KL_PENALTIES:
        raise ValueError(f"Unknown KL penalty {kind!r}; choose from {sorted(KL_PENALTIES)}")
    return KL_PENALTIES[kind](logprob, ref_logprob)


@torch.no_grad()
def kl_penalized_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kind: str = "kl",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token RLHF reward R = score - beta * KL (Ziegler et al., 2019, "Fine-Tuning Language Models
    from Human Preferences", sec. 2; Stiennon et al., 2020, "Learning to Summarize from Human
    Feedback"), spread over tokens as in TRL's classic PPO:

        kl_i        = kl_penalty(logprobs, ref_logprobs, kind)_i           at response tokens, else 0
        non_score_i = -kl_coef * kl_i
        rewards_i   = non_score_i + (score if i is the row's last mask-True token else 0)

    scores [b]; logprobs, ref_logprobs [b, t] ([b, t, v] for kind="full"); mask [b, t], True at response
    tokens (right- or left-padded) -> (rewards [b, t], non_score_reward [b, t], kl [b, t]), detached,
    in the log-probs' dtype. Every row needs at least one response token (ValueError otherwise).
    """
    mask = mask.bool()
    t = mask.shape[1]
    positions = torch.arange(t, device=mask.device).expand_as(mask)  # [b, t]
    last = torch.where(mask, positions, -1).max(dim=1).values  # [b], index of the last response token
    if bool((last < 0).any()):
        raise ValueError("kl_penalized_rewards: a row has no response token (mask all False)")
    per_token = kl_penalty(logprobs, ref_logprobs, kind)  # [b, t]
    kl = torch.where(mask, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    non_score_reward = -kl_coef * kl  # [b, t]
    rewards = non_score_reward.clone()
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards, non_score_reward, kl


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al., 2019, eq. 2):

        e_t       = clip((KL_t - KL_target) / KL_target, -0.2, 0.2)
        beta_t+1  = beta_t * (1 + K_beta * e_t),   K_beta = n_steps / horizon

    so beta grows while the measured KL is above the target and shrinks while below, by at most
    20% * n_steps / horizon per update. `value` is the current beta.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be positive, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        """Apply one update from the measured KL over the last n_steps samples; returns the new value."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class FixedKLController:
    """A constant KL coefficient with the AdaptiveKLController interface; `update` changes nothing."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


@torch.no_grad()
def sequence_kl(logprob: torch.Tensor, ref_logprob: torch.Tensor, mask: torch.Tensor, kind: str = "kl") -> torch.Tensor:
    """KL estimate of each whole sequence, the sum of its per-token estimates: [b, t] -> [b], detached.

    With kind="kl" this is log pi(o) - log pi_ref(o), the single-sample estimate of KL(pi || pi_ref) over
    completions that RLOO subtracts from the reward (Ahmadian et al., 2024, sec. 3: r - beta * KL).
    """
    per_token = kl_penalty(logprob, ref_logprob, kind)  # [b, t]
    zero = torch.zeros((), dtype=per_token.dtype, device=per_token.device)
    return torch.where(mask.bool(), per_token, zero).sum(-1)
