"""Checkpoint intervals and their expected overheads for full and partial recovery (CPR, MLSys 2021).

All overheads are fractions of job time. The closed forms assume exponential inter-failure times; for
Weibull or gamma profiles they are applied with the same mean (job MTBF), which ignores the shape.
Derivations: docs/planning.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .profile import ClusterProfile

_SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True)
class OverheadBreakdown:
    """Expected overhead, as fractions of job time, by cause."""

    save: float
    load: float
    lost_compute: float
    reschedule: float
    total_fraction: float = field(init=False)  # a field, not a property, so that asdict() reports it

    def __post_init__(self) -> None:
        object.__setattr__(self, "total_fraction", self.save + self.load + self.lost_compute + self.reschedule)


@dataclass(frozen=True)
class IntervalPlan:
    """A checkpoint interval for one recovery policy with its expected cost."""

    policy: str  # "full" | "partial"
    interval_hours: float
    overhead: OverheadBreakdown
    expected_pls: float  # expected portion of lost samples; 0 for full recovery, which retrains them
    expected_failures: float


@dataclass(frozen=True)
class PlanResult:
    """Both policies' plans for one profile and PLS target, and which policy is cheaper."""

    full: IntervalPlan
    partial: IntervalPlan
    target_pls: float
    recommended: str  # "full" | "partial"
    reason: str


def young_daly_interval(profile: ClusterProfile) -> float:
    """Young's first-order optimal interval sqrt(2 * O_save * MTBF_job), in hours, unclamped."""
    return math.sqrt(2.0 * _hours(profile.save_seconds) * profile.job_mtbf_hours)


def expected_pls(interval_hours: float, profile: ClusterProfile) -> float:
    """Expected portion of lost samples under partial recovery: T / (2 * N_shards * MTBF_job)."""
    if interval_hours <= 0:
        raise ValueError(f"interval_hours must be > 0, got {interval_hours}")
    return interval_hours / (2.0 * profile.num_domains * profile.job_mtbf_hours)


def partial_interval(profile: ClusterProfile, target_pls: float) -> float:
    """The longest interval whose expected PLS is at most `target_pls`, in hours.

    T = 2 * N_shards * MTBF_job * target_pls, clamped to [save time, job length].
    """
    _check_target(target_pls)
    return _clamp(2.0 * profile.num_domains * profile.job_mtbf_hours * target_pls, profile)


def expected_lost_steps(interval_steps: int, total_steps: int) -> float:
    """Mean steps of a shard's updates that one failure loses when the run saves every `interval_steps`
    steps (and at step 0): the whole-step counterpart of T / 2.

    Failures are placed as `cpr.faults.schedule` places them: at a uniformly random hour of the job, so
    on steps 0 .. S-1 with probability 1/S each, step 0 moved to step 1. A save and a failure at the same
    step end happen save first, so a failure at step s loses s mod k steps: about (k - 1) / 2 when k
    divides S, less when the run ends early in an interval.
    """
    return float(_mean_lost_steps(np.asarray(interval_steps), total_steps))


def longest_interval_steps(max_lost_steps: float, total_steps: int) -> int:
    """The longest save interval, in whole steps up to the run's length, whose `expected_lost_steps` is at
    most `max_lost_steps` (every k is tried: near the run's length the loss is not monotone in k)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    intervals = np.arange(1, total_steps + 1)
    meeting = intervals[_mean_lost_steps(intervals, total_steps) <= max_lost_steps]
    return int(meeting[-1]) if len(meeting) else 1


def partial_interval_steps(profile: ClusterProfile, target_pls: float, total_steps: int) -> int:
    """`partial_interval` for a run of `total_steps` steps spanning the job, in whole steps.

    With J / M failures, PLS = (J / M) * lost steps / (N * S), so the target bounds the expected lost steps
    by target * N * M in steps. Rounding T_partial to the nearest step instead would pick a shorter
    interval (T = 11 on 106 steps of the production profile, 0.86x the target, where 12 meets it).
    """
    _check_target(target_pls)
    mtbf_steps = profile.job_mtbf_hours * total_steps / profile.job_hours
    return longest_interval_steps(target_pls * profile.num_domains * mtbf_steps, total_steps)


def _mean_lost_steps(interval_steps: np.ndarray, total_steps: int) -> np.ndarray:
    # sum_{s < S} (s mod k) = q k (k - 1) / 2 + r (r - 1) / 2 with S = q k + r; step 0's failure, moved to
    # step 1, loses 1 mod k.
    k = interval_steps.astype(np.float64)
    whole, rest = np.floor_divide(total_steps, k), np.mod(total_steps, k)
    moved = np.where(k > 1, 1.0, 0.0)
    return (whole * k * (k - 1) / 2 + rest * (rest - 1) / 2 + moved) / total_steps


def full_recovery_overhead(profile: ClusterProfile, interval_hours: float) -> OverheadBreakdown:
    """Saving every T, and per failure: reloading everything, retraining T/2 on average, rescheduling."""
    failures_per_hour = 1.0 / profile.job_mtbf_hours
    return OverheadBreakdown(
        save=_hours(profile.save_seconds) / interval_hours,
        load=_hours(profile.load_seconds) * failures_per_hour,
        lost_compute=interval_hours / 2.0 * failures_per_hour,
        reschedule=_hours(profile.reschedule_seconds) * failures_per_hour,
    )


def partial_recovery_overhead(profile: ClusterProfile, interval_hours: float) -> OverheadBreakdown:
    """Saving every T, and per failure: reloading one shard (1/N_shards of the load) and rescheduling.

    Nothing is retrained: the failed shard's updates since its last save are lost (counted as PLS).
    """
    failures_per_hour = 1.0 / profile.job_mtbf_hours
    return OverheadBreakdown(
        save=_hours(profile.save_seconds) / interval_hours,
        load=_hours(profile.load_seconds) / profile.num_domains * failures_per_hour,
        lost_compute=0.0,
        reschedule=_hours(profile.reschedule_seconds) * failures_per_hour,
    )


def plan(profile: ClusterProfile, target_pls: float) -> PlanResult:
    """Intervals and overheads for full recovery (Young interval) and partial recovery (PLS target)."""
    _check_target(target_pls)
    full_t = _clamp(young_daly_interval(profile), profile)
    partial_t = partial_interval(profile, target_pls)
    full = IntervalPlan("full", full_t, full_recovery_overhead(profile, full_t), 0.0, profile.expected_failures)
    partial = IntervalPlan("partial", partial_t, partial_recovery_overhead(profile, partial_t),
                           expected_pls(partial_t, profile), profile.expected_failures)
    full_cost, partial_cost = full.overhead.total_fraction, partial.overhead.total_fraction
    recommended = "partial" if partial_cost < full_cost else "full"
    comparison = "cheaper than" if recommended == "partial" else "no cheaper than"
    reason = (f"partial recovery costs {partial_cost:.2%} of job time at PLS {partial.expected_pls:.3g} "
              f"(target {target_pls:g}), {comparison} {full_cost:.2%} for full recovery")
    return PlanResult(full, partial, target_pls, recommended, reason)


def _hours(seconds: float) -> float:
    return seconds / _SECONDS_PER_HOUR


def _clamp(interval_hours: float, profile: ClusterProfile) -> float:
    # No interval can be shorter than a save, and one save per job is the fewest that means anything.
    return min(max(interval_hours, _hours(profile.save_seconds)), profile.job_hours)


def _check_target(target_pls: float) -> None:
    if not 0.0 < target_pls < 1.0:
        raise ValueError(f"target_pls must be in (0, 1), got {target_pls}")
