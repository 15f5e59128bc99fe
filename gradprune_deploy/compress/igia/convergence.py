"""Pure: when has the probe's layer ranking converged? (`--probe-steps auto`, beyond the paper, which
fixes the probe at ~1% of the fine-tune's steps.)

The probe snapshots the accumulated layer scores after every informative step. The ranking has
converged when, for `patience` consecutive pairs of successive snapshots,

    the cut is unchanged     the layers the budget would drop (selection.select_layers_to_drop) are
                             the same set in both snapshots; skipped when the drop count is not known
                             before the cut (--target-params, --drop-layers auto): then τ alone decides
    Kendall τ-b ≥ tau_min    the whole ranking agrees, not only its low end (the merge picks among
                             the dropped layers by score, --drop-layers auto grows the cut along it)

The floor (`min_steps`) and the cap (`max_steps`) are the probe's (probe.IGIAProbe): this module
judges a list of snapshots and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from ..selection import select_layers_to_drop


@dataclass(frozen=True)
class StabilityRule:
    """--probe-steps auto's stopping rule (ProbeConfig's fields, resolved with the budget)."""

    tau_min: float = 0.9  # Kendall τ-b between successive snapshots must reach this
    patience: int = 3  # ... for this many consecutive pairs, with the cut unchanged
    min_steps: int = 8  # never stop before this many informative steps
    max_steps: int = 64  # stop here whatever the ranking does
    drop_count: int | None = None  # the budget's cut size; None: not known before the cut (τ alone decides)
    protect_first: int = 0
    protect_last: int = 0

    def __post_init__(self):
        if not -1 <= self.tau_min <= 1:
            raise ValueError(f"tau_min must be in [-1, 1], got {self.tau_min}")
        if self.patience < 1 or self.min_steps < 1 or self.max_steps < self.min_steps:
            raise ValueError(f"need patience ≥ 1 and 1 ≤ min_steps ≤ max_steps, got {self}")

    def as_dict(self) -> dict:
        return asdict(self)


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's τ-b of two score vectors (ties in either counted as scipy.stats.kendalltau counts them);
    nan when either is constant (no pair is ordered)."""
    if len(x) != len(y):
        raise ValueError(f"length mismatch: {len(x)} vs {len(y)}")
    concordant = discordant = tied_x_only = tied_y_only = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue  # tied in both: in neither τ-b denominator term
            if dx == 0:
                tied_x_only += 1
            elif dy == 0:
                tied_y_only += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    ordered_x, ordered_y = concordant + discordant + tied_y_only, concordant + discordant + tied_x_only
    denominator = math.sqrt(ordered_x * ordered_y)
    return (concordant - discordant) / denominator if denominator else float("nan")


def cut_of(scores: Sequence[float], rule: StabilityRule) -> frozenset[int] | None:
    """The layers the budget would drop by these scores (None when the size is not known up front)."""
    if rule.drop_count is None:
        return None
    dropped = select_layers_to_drop(
        torch.as_tensor(scores, dtype=torch.float64),
        drop_count=rule.drop_count,
        protect_first=rule.protect_first,
        protect_last=rule.protect_last,
    )
    return frozenset(dropped)


def pair_stable(previous: Sequence[float], current: Sequence[float], rule: StabilityRule) -> tuple[bool, float]:
    """(whether the step from `previous` to `current` counts toward convergence, their τ-b)."""
    tau = kendall_tau_b(previous, current)
    same_cut = cut_of(previous, rule) == cut_of(current, rule)
    return same_cut and not math.isnan(tau) and tau >= rule.tau_min, tau


def ranking_converged(snapshots: Sequence[Sequence[float]], rule: StabilityRule) -> tuple[bool, float | None]:
    """(stop?, τ-b of the last two snapshots or None with fewer than two): stop when each of the last
    `rule.patience` successive pairs is stable (pair_stable). The floor and the cap are the caller's."""
    if len(snapshots) < 2:
        return False, None
    stop, last_tau = True, None
    for k in range(len(snapshots) - 1, max(0, len(snapshots) - 1 - rule.patience), -1):
        stable, tau = pair_stable(snapshots[k - 1], snapshots[k], rule)
        last_tau = tau if last_tau is None else last_tau
        stop = stop and stable
    return stop and len(snapshots) > rule.patience, last_tau
