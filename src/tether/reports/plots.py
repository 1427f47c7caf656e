"""Which curves a run's report shows, and drawing them.

A method names its metric groups, one PNG each (`METHOD_GROUPS`); a group lists metric names as fnmatch
patterns (`GROUPS`), and each name also brings its `eval_` twin, drawn dashed. A run whose method is not in
the table (or whose groups match nothing logged) gets one plot per logged metric instead.

matplotlib is a dependency of tether (without it, a page has no plots and one warning says so). It is imported
only here, only when drawing, and through `matplotlib.figure.Figure`, which renders with Agg without touching
pyplot's global backend.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

# metric name -> (steps, values), in step order
Series = dict[str, tuple[list[float], list[float]]]


@dataclass(frozen=True)
class MetricGroup:
    """One plot: a title and the metric names (fnmatch patterns) drawn in it."""

    title: str
    patterns: tuple[str, ...]


GROUPS: dict[str, MetricGroup] = {
    "loss": MetricGroup("Loss", ("loss",)),
    "learning_rate": MetricGroup("Learning rate", ("learning_rate",)),
    "grad_norm": MetricGroup("Gradient norm (before clipping)", ("grad_norm",)),
    "token_accuracy": MetricGroup("Next-token accuracy", ("mean_token_accuracy",)),
    "entropy": MetricGroup("Entropy (nats/token)", ("entropy",)),
    # DPO family (implicit rewards: beta * log-ratio to the reference, or the method's equivalent)
    "preference_accuracy": MetricGroup("Preference accuracy (chosen reward > rejected)", ("rewards/accuracies",)),
    "preference_margin": MetricGroup("Reward margin (chosen - rejected)", ("rewards/margins",)),
    "preference_rewards": MetricGroup("Implicit rewards", ("rewards/chosen", "rewards/rejected")),
    "logps": MetricGroup("Completion log-probabilities", ("logps/chosen", "logps/rejected")),
    "nll_loss": MetricGroup("NLL of the chosen completions", ("nll_loss",)),
    "log_odds": MetricGroup("Log odds", ("log_odds_ratio", "log_odds_chosen")),
    "kl": MetricGroup("KL to the reference", ("kl",)),
    # reward models
    "reward_accuracy": MetricGroup("Pairwise accuracy (chosen scored above rejected)", ("accuracy",)),
    "reward_margin": MetricGroup("Score margin (chosen - rejected)", ("margin",)),
    "reward_scores": MetricGroup("Scores", ("mean_reward", "min_reward", "max_reward")),
    # PPO (TRL's classic names)
    "ppo_reward": MetricGroup("Reward of the rollouts", ("env/reward_mean", "rewards/*")),
    "ppo_kl": MetricGroup("KL to the reference (nats per response)", ("objective/kl",)),
    "ppo_kl_coef": MetricGroup("KL coefficient", ("objective/kl_coef",)),
    "ppo_losses": MetricGroup("PPO losses", ("ppo/loss/policy", "ppo/loss/value", "ppo/loss/total")),
    "ppo_policy": MetricGroup("Policy update: clip fraction and approximate KL",
                              ("ppo/policy/clipfrac", "ppo/policy/approxkl")),
    "ppo_response_length": MetricGroup("Response length (tokens)", ("tokens/responses_len_mean",)),
    # GRPO / RLOO (TRL's names)
    "reward": MetricGroup("Reward", ("reward", "rewards/*/mean")),
    "reward_std": MetricGroup("Reward standard deviation", ("reward_std",)),
    "completion_length": MetricGroup("Completion length (tokens)",
                                     ("completions/mean_length", "completions/min_length", "completions/max_length")),
    "clip_ratio": MetricGroup("Clip ratio", ("clip_ratio/*",)),
    # multi-turn episodes (tools, environments), any online method
    "tool_call_rate": MetricGroup("Tool-call rate per turn (share of episodes at that turn calling a tool)",
                                  ("episodes/turn_*/tool_call_rate",)),
    "turn_reward": MetricGroup("Reward per turn", ("episodes/turn_*/reward_mean",)),
    "episode_turns": MetricGroup("Turns and tool calls per episode", ("episodes/turns_mean", "episodes/tool_calls_mean")),
    # DDPO (TRL's names), one row per epoch
    "ddpo_reward": MetricGroup("Mean reward of the epoch's images", ("reward_mean",)),
    "ddpo_policy": MetricGroup("Policy update: clip fraction and approximate KL", ("clipfrac", "approx_kl")),
}

_TRAINING = ("learning_rate", "grad_norm")
_PAIRWISE = ("loss", "preference_accuracy", "preference_margin", "preference_rewards", "logps")
_EPISODES = ("tool_call_rate", "turn_reward", "episode_turns")
_GROUP_RELATIVE = ("loss", "reward", "reward_std", "kl", "entropy", "completion_length", "clip_ratio", *_EPISODES,
                   *_TRAINING)
METHOD_GROUPS: dict[str, tuple[str, ...]] = {
    "sft": ("loss", "token_accuracy", "entropy", *_TRAINING),
    "reward": ("loss", "reward_accuracy", "reward_margin", "reward_scores", *_TRAINING),
    "dpo": (*_PAIRWISE, *_TRAINING),
    "cpo": (*_PAIRWISE, "nll_loss", *_TRAINING),
    "orpo": (*_PAIRWISE, "nll_loss", "log_odds", *_TRAINING),
    "kto": ("loss", "preference_margin", "preference_rewards", "kl", "logps", *_TRAINING),
    "ppo": ("ppo_reward", "ppo_kl", "ppo_kl_coef", "ppo_losses", "ppo_policy", "ppo_response_length", *_EPISODES),
    "grpo": _GROUP_RELATIVE,
    "rloo": _GROUP_RELATIVE,
    "onlinedpo": ("loss", "reward", "ppo_kl", "preference_accuracy", "preference_margin", "preference_rewards",
                  "logps", "completion_length", *_TRAINING),
    "gkd": ("loss", *_TRAINING),
    "ddpo": ("ddpo_reward", "reward_std", "loss", "ddpo_policy"),
}

# For runs that did not record their method: a metric only that method logs, checked in this order.
SIGNATURE_METRICS = (("ppo", "env/reward_mean"), ("grpo", "completions/mean_length"), ("reward", "accuracy"),
                     ("kto", "count/chosen"), ("dpo", "rewards/accuracies"), ("sft", "mean_token_accuracy"))

# Bookkeeping, not curves: left out of the one-plot-per-metric fallback.
NOT_CURVES = ("step", "epoch", "total_flos", "train_loss", "*_runtime", "*_per_second", "time/*")


def metric_series(rows: list[dict[str, Any]]) -> Series:
    """Each finite numeric metric of the logged rows as (steps, values), in step order. The x value is the
    row's `step` (its position, 1-based, when it has none). A step logged twice keeps its last value: a
    resumed run logs again the steps after its checkpoint."""
    by_metric: dict[str, dict[float, float]] = {}
    for position, row in enumerate(rows, 1):
        step = row.get("step", position)
        for name, value in row.items():
            if name == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                by_metric.setdefault(name, {})[step] = float(value)
    return {name: (sorted(points), [points[s] for s in sorted(points)]) for name, points in by_metric.items()}


def _base_name(name: str) -> str:
    return name.removeprefix("eval_")


def method_of(names: list[str]) -> str | None:
    """The method whose signature metric was logged (train or eval), or None."""
    logged = {_base_name(n) for n in names}
    return next((method for method, metric in SIGNATURE_METRICS if metric in logged), None)


def select_groups(method: str | None, names: list[str]) -> list[tuple[str, MetricGroup, list[str]]]:
    """(file stem, group, metric names to draw) for each plot of a run that logged `names`: the method's
    groups that match something, else one plot per metric."""
    selected = []
    for key in METHOD_GROUPS.get(method or "", ()):
        group = GROUPS[key]

        def rank(name: str, patterns: tuple[str, ...] = group.patterns) -> tuple[int, bool, str]:
            index = next((i for i, p in enumerate(patterns) if fnmatchcase(_base_name(name), p)), -1)
            return index, name.startswith("eval_"), name

        members = sorted((n for n in names if rank(n)[0] >= 0), key=rank)
        if members:
            selected.append((key, group, members))
    if selected:
        return selected
    curves = sorted({_base_name(n) for n in names if not any(fnmatchcase(_base_name(n), p) for p in NOT_CURVES)})
    return [(base.replace("/", "_"), MetricGroup(base, (base,)), [n for n in (base, f"eval_{base}") if n in names])
            for base in curves]


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_group(title: str, series: Series, names: list[str], path: str | os.PathLike) -> Series:
    """Draw `names` from `series` against the step into one PNG at `path`; returns the data of each line
    as read back from the figure, so callers (and tests) see exactly what was drawn."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    axes = figure.subplots()
    colours: dict[str, str] = {}  # a metric and its eval_ twin share a colour
    for name in names:
        steps, values = series[name]
        evaluation = name.startswith("eval_")
        axes.plot(steps, values, label=name, color=colours.setdefault(_base_name(name), f"C{len(colours)}"),
                  linestyle="--" if evaluation else "-", marker="o" if evaluation or len(steps) <= 20 else None,
                  markersize=3)
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    if len(names) > 1:
        axes.legend(fontsize="small")
    figure.savefig(path)
    return {line.get_label(): ([float(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()])
            for line in axes.get_lines()}
