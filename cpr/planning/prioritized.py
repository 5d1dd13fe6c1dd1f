"""Planning CPR-MFU, CPR-SSU and SCAR from measured access frequencies (derivation: docs/prioritized.md).

A prioritized policy saves everything every T_full steps and, in between, a subset of rows every T_sub
steps: for MFU and SCAR the top fraction r of each shard's rows, for SSU the rows whose accesses were
sampled with probability p. A failure loses each of the failed shard's rows' accesses since that row's
last save, so the expected PLS is the access-weighted mean age of a row's newest save over N * MTBF:

    PLS = A / (N * M),    A = sum_i w_i * age_i,    w_i = share of accesses that go to row i

(all times in steps). The planner searches a fixed grid of (r or p, T_sub) and solves, for each point,
the longest T_full that meets the target; the cheapest point in bytes written per hour wins. Because the
grid does not depend on the target and T_full only grows with it, a higher target never costs more.
The access profile and the rows' ages under each kind of subset are in access.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, Sequence

import numpy as np

from .access import AccessProfile, AgeHistogram
from .plan import expected_lost_steps, longest_interval_steps
from .profile import ClusterProfile

PriorityKind = Literal["mfu", "ssu", "scar"]
PRIORITY_KINDS: tuple[str, ...] = ("mfu", "ssu", "scar")

# The fixed search grid. Fractions and rates span three orders of magnitude; subset intervals are powers
# of two (in steps), the same for every target.
DEFAULT_FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
DEFAULT_SAMPLE_RATES: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
# SSU sets are sized for this many times the expected distinct sampled rows per table and window.
SSU_CAPACITY_MARGIN = 1.5
SSU_MIN_CAPACITY = 64
_AGE_AT_BLOCK = 64  # phases of `_Point.age_at` computed together


def default_subset_intervals(total_steps: int) -> tuple[int, ...]:
    """Subset intervals searched: 1, 2, 4, ... steps, below half the run."""
    out, t = [], 1
    while 2 * t <= total_steps:
        out.append(t)
        t *= 2
    return tuple(out) or (1,)


@dataclass(frozen=True)
class PrioritizedPlan:
    """Chosen settings of a prioritized policy and what the model predicts for them.

    `subset_interval_steps` 0 means no subset saves (plain partial recovery was cheapest). `mean_age_steps`
    is A, the access-weighted mean age of the rows' newest saves; `expected_pls` = A / (N * M).
    `age_at(phase)` is the model's A `phase` steps after a full save (a policy compares it with the ages
    it measures); it is left out of comparisons and reports.
    """

    kind: str
    full_interval_steps: int
    subset_interval_steps: int
    fraction: float | None
    sample_rate: float | None
    ssu_capacity: int | None
    subset_rows: float
    top_share: float | None
    mean_age_steps: float
    expected_pls: float
    bytes_per_hour: float
    target_pls: float | None
    meets_target: bool
    age_at: Callable[[int], float] | None = field(default=None, compare=False, repr=False)


class _Model:
    """The PLS and bytes model of one policy kind on one access profile (see docs/prioritized.md)."""

    def __init__(
        self,
        kind: str,
        access: AccessProfile,
        profile: ClusterProfile,
        hours_per_step: float,
        total_steps: int,
        full_bytes: int,
        row_bytes: Mapping[str, int],
    ) -> None:
        if kind not in PRIORITY_KINDS:
            raise ValueError(f"kind must be one of {PRIORITY_KINDS}, got {kind!r}")
        if hours_per_step <= 0 or total_steps < 1 or full_bytes <= 0:
            raise ValueError(f"need hours_per_step > 0, total_steps >= 1, full_bytes > 0; got "
                             f"{hours_per_step}, {total_steps}, {full_bytes}")
        missing = [t for t in access.tables if t not in row_bytes]
        if missing:
            raise ValueError(f"row_bytes lacks tables {missing}")
        self.kind, self.access, self.total_steps = kind, access, total_steps
        self.hours_per_step, self.full_bytes, self.row_bytes = hours_per_step, full_bytes, row_bytes
        self.num_domains = profile.num_domains
        self.mtbf_steps = profile.job_mtbf_hours / hours_per_step
        # Everything the model's numbers depend on besides the access profile.
        self.key = (kind, hours_per_step, total_steps, full_bytes, tuple(sorted(row_bytes.items())), self.num_domains,
                    self.mtbf_steps)

    def pls(self, mean_age_steps: float) -> float:
        return mean_age_steps / (self.num_domains * self.mtbf_steps)

    def bytes_per_hour(self, full_steps: int, subset_steps: int, subset_bytes: float) -> float:
        per_step = self.full_bytes / full_steps + (subset_bytes / subset_steps if subset_steps else 0.0)
        return per_step / self.hours_per_step

    def point(self, knob: float, subset_steps: int) -> "_Point":
        """The subset set of one grid point; `knob` is r (MFU, SCAR) or p (SSU); built once per profile."""
        key = (self.key, knob, subset_steps)
        if key not in self.access._points:
            self.access._points[key] = self._new_point(knob, subset_steps)
        return self.access._points[key]

    def _new_point(self, knob: float, subset_steps: int) -> "_Point":
        if self.kind == "ssu":
            def ssu_ages() -> np.ndarray:
                q = self.access.catch_probability(knob, subset_steps)
                # A geometric renewal: caught in each interval with probability q, so the newest save is
                # T_sub / 2 + T_sub (1 - q) / q old on average (T_sub (2 - q) / (2 q)). The intervals that
                # missed the row had none of their accesses sampled, so they hold only (1 - p) of the row's
                # mean accesses: its lost accesses are l * u with u = T_sub / 2 + (1 - p) T_sub (1 - q) / q.
                with np.errstate(divide="ignore", invalid="ignore"):
                    return np.where(q > 0, subset_steps / 2 + (1 - knob) * subset_steps * (1 - q) / q, np.inf)
            histogram = self.access.age_histogram(("ssu", knob, subset_steps), ssu_ages)
            return _Point(self, knob, subset_steps, self.access.ssu_rows(knob, subset_steps), None, histogram)
        rows = self.access.mfu_ages(knob, subset_steps)[1]
        histogram = self.access.age_histogram(("mfu", knob, subset_steps), lambda: self.access.mfu_ages(knob, subset_steps)[0])
        return _Point(self, knob, subset_steps, rows, self.access.top_share(knob), histogram)


class _Point:
    """One (knob, T_sub) grid point: its subset bytes and its mean age as a function of T_full."""

    def __init__(self, model: _Model, knob: float, subset_steps: int, rows: Mapping[str, float],
                 share: float | None, histogram: AgeHistogram) -> None:
        self.model, self.knob, self.subset_steps, self.rows, self.share = model, knob, subset_steps, rows, share
        self.subset_bytes = sum(n * model.row_bytes[t] for t, n in rows.items())
        self._share, self._age, self._never = histogram
        # v_i: each bin's mean age in whole steps. Saves and failures both fall on step ends, so a row saved
        # every T steps is 0 .. T-1 steps old at a failure, (T - 1) / 2 on average: half a step less than
        # the continuous-time u_i.
        self._subset_age = np.maximum(self._age - 0.5, 0.0)
        self._ages_at: dict[int, float] = {}

    def age_at(self, phase: int) -> float:
        """A(phase): the expected access-weighted age `phase` steps after a full save. A row whose subset
        saves alone give it whole-step age v (taken as exponential with mean v) is min(that, phase) old:
        v (1 - e^(-phase / v)); rows no subset catches are `phase` old. A policy asks for it after every step,
        one phase after the other: it is computed for _AGE_AT_BLOCK phases at once and remembered."""
        if phase not in self._ages_at:
            v, phases = self._subset_age, np.arange(phase, phase + _AGE_AT_BLOCK, dtype=np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                ages = np.where(v > 0, v * -np.expm1(-phases[:, None] / v), 0.0)
            self._ages_at.update(zip(range(phase, phase + _AGE_AT_BLOCK), (ages @ self._share + self._never * phases).tolist()))
        return self._ages_at[phase]

    def mean_age(self, full_steps: int) -> float:
        """A(T_full): see `_mean_ages`."""
        return float(_mean_ages(np.array([float(full_steps)]), self._subset_age[None], self._share[None],
                                np.array([self._never]))[0])

    def plan(self, full_steps: int, target: float | None) -> PrioritizedPlan:
        model = self.model
        age = self.mean_age(full_steps)
        pls = model.pls(age)
        capacity = None
        if model.kind == "ssu":
            capacity = max(SSU_MIN_CAPACITY, math.ceil(SSU_CAPACITY_MARGIN * max(self.rows.values(), default=0)))
        return PrioritizedPlan(
            kind=model.kind,
            full_interval_steps=full_steps,
            subset_interval_steps=self.subset_steps,
            fraction=None if model.kind == "ssu" else self.knob,
            sample_rate=self.knob if model.kind == "ssu" else None,
            ssu_capacity=capacity,
            subset_rows=float(sum(self.rows.values())),
            top_share=self.share,
            mean_age_steps=age,
            expected_pls=pls,
            bytes_per_hour=model.bytes_per_hour(full_steps, self.subset_steps, self.subset_bytes),
            target_pls=target,
            meets_target=target is None or pls <= target * (1 + 1e-9),
            age_at=self.age_at,
        )


def _full_only(model: _Model, full_steps: int, target: float | None) -> PrioritizedPlan:
    age = expected_lost_steps(full_steps, model.total_steps)  # plain partial recovery, in whole steps
    return PrioritizedPlan(model.kind, full_steps, 0, None, None, None, 0.0, None, age, model.pls(age),
                           model.bytes_per_hour(full_steps, 0, 0.0), target,
                           target is None or model.pls(age) <= target * (1 + 1e-9), age_at=float)


def _points(model: _Model, knobs: Sequence[float] | None, subset_intervals: Sequence[int] | None) -> list[_Point]:
    """The grid points of `model` whose T_sub is shorter than the run: `knobs` x `subset_intervals`, each the
    module's fixed grid when not given."""
    knobs = knobs or (DEFAULT_SAMPLE_RATES if model.kind == "ssu" else DEFAULT_FRACTIONS)
    subset_intervals = subset_intervals or default_subset_intervals(model.total_steps)
    return [model.point(knob, t) for knob in knobs for t in subset_intervals if t < model.total_steps]


def _mean_ages(t: np.ndarray, v: np.ndarray, share: np.ndarray, never: np.ndarray) -> np.ndarray:
    """A(T_full) of points whose bins (rows of `v`, the bins' whole-step subset ages, and `share`; padded
    with share 0) and never-caught shares are given, each at its own T_full `t`: A(phase) averaged over the
    phases 0 .. T_full - 1 of a full-save cycle, sum_phase (1 - e^(-phase / v)) = T - (1 - e^(-T / v)) /
    (1 - e^(-1 / v)). Tail rows get (T_full - 1) / 2 as under plain partial recovery."""
    t = t[:, None]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = np.where(v > 0, -np.expm1(-t / v) / -np.expm1(-1 / np.where(v > 0, v, 1.0)), t)
        ages = np.where(v > 0, v * (1 - ratio / t), 0.0)
    return np.maximum(0.0, np.einsum("pb,pb->p", share, ages) + never * (t[:, 0] - 1) / 2)


def _longest_fulls(points: Sequence[_Point], max_age: float, total_steps: int) -> list[int | None]:
    """Each point's longest T_full (> T_sub, <= `total_steps`) whose mean age is at most `max_age`, or None:
    binary searches of all points in step (mean_age is nondecreasing in T_full), each step one evaluation
    of every point's bins stacked in one array (a re-plan searches the whole grid; point by point that took
    most of its ~20 ms)."""
    if not points:
        return []
    width = max(len(p._share) for p in points)
    v, share = np.zeros((len(points), width)), np.zeros((len(points), width))
    for i, point in enumerate(points):
        v[i, :len(point._share)], share[i, :len(point._share)] = point._subset_age, point._share
    never = np.array([p._never for p in points])
    lo = np.array([p.subset_steps + 1 for p in points], dtype=np.int64)
    hi = np.full(len(points), total_steps, dtype=np.int64)
    found = (lo <= hi) & (_mean_ages(lo.astype(np.float64), v, share, never) <= max_age)
    while np.any(found & (lo < hi)):
        mid = (lo + hi + 1) // 2
        fits = _mean_ages(mid.astype(np.float64), v, share, never) <= max_age
        searching = found & (lo < hi)
        lo = np.where(searching & fits, mid, lo)
        hi = np.where(searching & ~fits, mid - 1, hi)
    return [int(full) if ok else None for full, ok in zip(lo, found)]


def plan_prioritized(
    kind: PriorityKind, access: AccessProfile, profile: ClusterProfile, target_pls: float, hours_per_step: float,
    total_steps: int, full_bytes: int, row_bytes: Mapping[str, int], knobs: Sequence[float] | None = None,
    subset_intervals: Sequence[int] | None = None, full_interval_steps: int | None = None,
) -> PrioritizedPlan:
    """The settings that meet `target_pls` in the model at the fewest bytes written per hour.

    `knobs` (fractions r for MFU/SCAR, sampling rates p for SSU) and `subset_intervals` (steps) are the
    grid, by default the module's fixed grid; give one value to pin a setting. `full_interval_steps` pins
    T_full. Plain partial recovery (no subset saves) is a candidate too. When no candidate meets the
    target, the one with the least expected PLS is returned (`meets_target` False).
    """
    if not 0 < target_pls < 1:
        raise ValueError(f"target_pls must be in (0, 1), got {target_pls}")
    model = _Model(kind, access, profile, hours_per_step, total_steps, full_bytes, row_bytes)
    max_age = target_pls * model.num_domains * model.mtbf_steps
    points = _points(model, knobs, subset_intervals)
    candidates: list[PrioritizedPlan] = []
    if full_interval_steps is not None:
        candidates = [p.plan(full_interval_steps, target_pls) for p in points if p.subset_steps < full_interval_steps]
        if subset_intervals is None:
            candidates.append(_full_only(model, full_interval_steps, target_pls))
    else:
        if subset_intervals is None:
            candidates.append(_full_only(model, longest_interval_steps(max_age, total_steps), target_pls))
        for point, full_steps in zip(points, _longest_fulls(points, max_age, total_steps)):
            candidates.append(point.plan(full_steps if full_steps is not None else point.subset_steps + 1, target_pls))
    if not candidates:
        raise ValueError(f"no {kind} setting to evaluate: the subset intervals {subset_intervals} must be shorter "
                         f"than T_full ({full_interval_steps}) and the run ({total_steps} steps)")
    meeting = [c for c in candidates if c.meets_target]
    if meeting:
        return min(meeting, key=lambda c: (c.bytes_per_hour, c.expected_pls))
    return min(candidates, key=lambda c: (c.expected_pls, c.bytes_per_hour))


def plan_for_budget(
    kind: PriorityKind, access: AccessProfile, profile: ClusterProfile, bytes_per_hour: float, hours_per_step: float,
    total_steps: int, full_bytes: int, row_bytes: Mapping[str, int], knobs: Sequence[float] | None = None,
    subset_intervals: Sequence[int] | None = None,
) -> PrioritizedPlan:
    """The dual: the settings with the least expected PLS that write at most `bytes_per_hour` (the other
    arguments as for `plan_prioritized`).

    For each grid point the shortest T_full that fits the budget left after the subset saves is taken.
    Raises ValueError when not even one full save per run fits.
    """
    model = _Model(kind, access, profile, hours_per_step, total_steps, full_bytes, row_bytes)
    budget_per_step = bytes_per_hour * hours_per_step
    candidates = []
    cheapest_full = math.ceil(full_bytes / budget_per_step) if budget_per_step > 0 else math.inf
    if cheapest_full <= total_steps:
        candidates.append(_full_only(model, max(1, cheapest_full), None))
    for point in _points(model, knobs, subset_intervals):
        left = budget_per_step - point.subset_bytes / point.subset_steps
        if left <= 0:
            continue
        full_steps = max(point.subset_steps + 1, math.ceil(full_bytes / left))
        if full_steps <= total_steps:
            candidates.append(point.plan(full_steps, None))
    if not candidates:
        raise ValueError(f"a budget of {bytes_per_hour:.4g} bytes/hour does not fit one full save "
                         f"({full_bytes} bytes) per {total_steps * hours_per_step:.4g}-hour run")
    return min(candidates, key=lambda c: (c.expected_pls, c.bytes_per_hour))
