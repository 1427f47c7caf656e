"""How long a reward-function call may run: the config fields of the methods that call reward functions (GRPO,
RLOO, PPO's train()) and their check. No heavy imports: configs import this."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# Seconds a reward call may run before a warning says it is still running (a hang should not look like a
# silent stall); GRPOConfig/RLOOConfig.reward_warn_after set it per run.
DEFAULT_WARN_AFTER = 10.0


@dataclass
class RewardCallFields:
    """Config fields of the methods that call reward functions (GRPO, RLOO, PPO's train()): how long a call may
    run. Validated by `check_reward_call_fields`."""

    reward_timeout: float | None = field(default=None, metadata={
        "help": "Seconds one call of a reward function may take; a call still running then is abandoned and "
                "training stops with RewardFunctionTimeout naming the function (None: no limit). With a limit, "
                "each call runs in a worker thread, where signal-based timeouts (signal.alarm) cannot be used."})
    reward_warn_after: float | None = field(default=DEFAULT_WARN_AFTER, metadata={
        "help": "Seconds after which a reward-function call still running logs a warning naming the function "
                "and the time so far, so a hang does not look like a silent stall (None: never)."})


def check_reward_call_fields(config: Any) -> None:
    """A ValueError naming the field unless reward_timeout and reward_warn_after are finite seconds > 0 or None."""
    for name in ("reward_timeout", "reward_warn_after"):
        value = getattr(config, name)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{type(config).__name__}.{name} must be a finite number of seconds > 0, or None "
                             f"(no limit), got {value}.")
