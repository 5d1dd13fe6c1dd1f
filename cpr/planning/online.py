"""Online re-planning on the real clock: when to plan again, and intervals that keep the PLS promise.

A real run plans after a short calibration (`calibration_steps`), then every `replan_every` steps compares
the costs it measures now with those of its plan and plans again when one moved by more than
`REPLAN_BOUND` (`moved`). Partial recovery promised an expected PLS: the mean age of a domain's newest
save over the run, A, may be at most target * N * M (M the job's MTBF in steps). A re-plan keeps that
promise for the steps already trained: `interval_keeping_promise` picks the longest interval for the rest
of the run whose ages, added to those the run already had, keep the whole run's mean within it.
"""
from __future__ import annotations

import math

import numpy as np

from .clock import MeasuredCosts

REPLAN_BOUND = 0.25  # a measured cost moving by more than this fraction of its planned value re-plans
REPLAN_FRACTION = 0.05  # how often (as a fraction of the run) measured costs are compared with the plan
_COMPARED = ("step_seconds", "save_seconds", "restore_seconds")


def calibration_steps(total_steps: int) -> int:
    """Steps measured before the first plan: 2% of the run, at least 3 and at most 20 (and not the last)."""
    return max(1, min(max(3, math.ceil(0.02 * total_steps)), 20, total_steps - 1))


def replan_every(total_steps: int) -> int:
    """How often, in steps, the measured costs are compared with the plan's (at most every K steps)."""
    return max(1, math.ceil(REPLAN_FRACTION * total_steps))


def moved(planned: MeasuredCosts, measured: MeasuredCosts, bound: float = REPLAN_BOUND) -> list[str]:
    """The costs that moved by more than `bound` of their planned value (a restore once it is measured)."""
    out = [name for name in _COMPARED
           if abs(getattr(measured, name) - getattr(planned, name)) > bound * max(getattr(planned, name), 1e-12)]
    if measured.restore_measured and not planned.restore_measured and "restore_seconds" not in out:
        out.append("restore_seconds")
    return out


def rest_age_sums(intervals: np.ndarray, rest: int, offset: int) -> np.ndarray:
    """Sum of a domain's save ages over the next `rest` step ends when it is `offset` steps past its last
    save now and saves every T (`intervals`) steps from now on: ages offset + j until the first save at
    j = T, then j mod T."""
    t = intervals.astype(np.float64)
    before = np.minimum(t - 1, rest)  # steps j = 1 .. T-1 before the first save
    first = offset * before + before * (before + 1) / 2
    after = np.maximum(rest - t + 1, 0)  # steps j = T .. rest, ages (j - T) mod T
    whole, part = np.floor_divide(after, t), np.mod(after, t)
    return first + whole * t * (t - 1) / 2 + part * (part - 1) / 2


def interval_keeping_promise(max_mean_age: float, total_steps: int, step: int, age_sum: float, offset: int) -> int:
    """The longest save interval from step `step` on (1 if none) that keeps the run's mean save age, over
    all `total_steps` step ends, at most `max_mean_age`, given the ages summed so far (`age_sum`) and the
    domain's age now (`offset` steps since its last save)."""
    rest = total_steps - step
    if rest <= 0:
        return max(1, total_steps)
    allowed = max_mean_age * total_steps - age_sum
    intervals = np.arange(1, rest + 2)
    meeting = intervals[rest_age_sums(intervals, rest, offset) <= allowed + 1e-9]
    return int(meeting[-1]) if len(meeting) else 1
