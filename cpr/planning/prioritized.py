"""Planning CPR-MFU, CPR-SSU and SCAR from measured access frequencies (derivation: docs/prioritized.md).

A prioritized policy saves everything every T_full steps and, in between, a subset of rows every T_sub
steps: for MFU and SCAR the top fraction r of each shard's rows, for SSU the rows whose accesses were
sampled with probability p. A failure loses each of the failed shard's rows' accesses since that row's
last save, so the expected PLS is the access-weighted mean age of a row's newest save over N * MTBF:

    PLS = A / (N * M),    A = sum_i w_i * age_i,    w_i = share of accesses that go to row i

(all times in steps). The planner searches a fixed grid of (r or p, T_sub) and solves, for each point,
the longest T_full that meets the target; the cheapest point in bytes written per hour wins. Because the
grid does not depend on the target and T_full only grows with it, a higher target never costs more.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, NamedTuple, Sequence

import numpy as np
import torch

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
_AGE_BINS = 1024
_AGE_AT_BLOCK = 64  # phases of `_Point.age_at` computed together


def default_subset_intervals(total_steps: int) -> tuple[int, ...]:
    """Subset intervals searched: 1, 2, 4, ... steps, below half the run."""
    out, t = [], 1
    while 2 * t <= total_steps:
        out.append(t)
        t *= 2
    return tuple(out) or (1,)


class AgeHistogram(NamedTuple):
    """Rows binned by the age of their newest save: each bin's access share and mean age, and the share of
    accesses to rows no subset save catches (as old as the last full save)."""

    share: np.ndarray
    age: np.ndarray
    never: float


@dataclass(frozen=True)
class _ShardRates:
    table: str
    rows: int  # rows of the table in this shard
    rates: np.ndarray  # accesses per step of the shard's accessed rows, descending (float64)


class AccessProfile:
    """How often each row is accessed, per table and shard, as measured during a calibration window.

    Built from exact per-row counts (`from_counts`, MFU and SCAR) or from a uniform sample of accesses
    with multiplicity (`from_sample`, SSU). Rows never seen count as never accessed.
    """

    def __init__(self, groups: Sequence[_ShardRates], steps: int) -> None:
        if steps < 1:
            raise ValueError(f"calibration window must be at least one step, got {steps}")
        self.steps = steps
        self.groups = tuple(groups)
        self.tables = tuple(dict.fromkeys(g.table for g in self.groups))
        self.rates = np.concatenate([g.rates for g in self.groups]) if self.groups else np.zeros(0)
        self.row_table = np.concatenate([np.full(len(g.rates), self.tables.index(g.table)) for g in self.groups]) \
            if self.groups else np.zeros(0, dtype=np.int64)
        self.total_rate = float(self.rates.sum())
        if self.total_rate <= 0:
            raise ValueError(f"no accesses were observed in the {steps}-step calibration window")
        # Each shard's cumulative rates from 0, back to back: shard g's top k rows take
        # _cumulative[_cumulative_starts[g] + k].
        self._lengths = np.array([len(g.rates) for g in self.groups], dtype=np.int64)
        self._cumulative = np.concatenate([np.concatenate([[0.0], np.cumsum(g.rates)]) for g in self.groups]) \
            if self.groups else np.zeros(0)
        self._cumulative_starts = np.cumsum(self._lengths + 1) - (self._lengths + 1)
        # mfu_ages by (fraction, subset_steps): a policy re-plans from the same profile many times.
        self._mfu_ages: dict[tuple[float, int], tuple[np.ndarray, dict[str, float]]] = {}
        self._mfu_thresholds: dict[float, np.ndarray] = {}
        self._histograms: dict[tuple[str, float, int], AgeHistogram] = {}
        self._top_shares: dict[float, float] = {}
        # The grid points of each model, by (model key, knob, T_sub): a re-plan evaluates them all again.
        self._points: dict[tuple, _Point] = {}

    def to_tensors(self) -> dict[str, Any]:
        """The profile as tensors and plain values (a policy keeps it in its saves to re-plan after a resume)."""
        return {
            "access_rates": torch.from_numpy(np.ascontiguousarray(self.rates, dtype=np.float64)),
            "access_lengths": torch.tensor([len(g.rates) for g in self.groups], dtype=torch.int64),
            "access_rows": torch.tensor([g.rows for g in self.groups], dtype=torch.int64),
            "access_tables": [g.table for g in self.groups],
            "access_steps": self.steps,
        }

    @classmethod
    def from_tensors(cls, state: Mapping[str, Any]) -> AccessProfile:
        """The profile `to_tensors()` gave."""
        rates = np.split(state["access_rates"].numpy(), np.cumsum(state["access_lengths"].numpy())[:-1])
        groups = [_ShardRates(table, int(rows), r) for table, rows, r in zip(state["access_tables"], state["access_rows"].tolist(), rates)]
        return cls(groups, int(state["access_steps"]))

    @classmethod
    def from_counts(
        cls, counts: Mapping[str, torch.Tensor], ranges: Mapping[str, Sequence[tuple[int, int]]], steps: int
    ) -> AccessProfile:
        """Per-row access counts over `steps` steps; `ranges[table]` are the shards' row ranges."""
        groups = []
        for table, table_counts in counts.items():
            values = table_counts.double().numpy()
            for start, end in ranges[table]:
                shard = values[start:end]
                shard = shard[shard > 0]
                groups.append(_ShardRates(table, end - start, -np.sort(-shard) / steps))
        return cls(groups, steps)

    @classmethod
    def from_sample(
        cls,
        sampled: Mapping[str, torch.Tensor],
        sample_fraction: float,
        ranges: Mapping[str, Sequence[tuple[int, int]]],
        steps: int,
    ) -> AccessProfile:
        """A uniform sample of the accesses of `steps` steps: `sampled[table]` holds the row id of each
        sampled access (with repeats), `sample_fraction` the sampled share of all accesses. A row seen
        c times stands for c / sample_fraction accesses."""
        if not 0 < sample_fraction <= 1:
            raise ValueError(f"sample_fraction must be in (0, 1], got {sample_fraction}")
        groups = []
        for table, ids in sampled.items():
            unique, counts = torch.unique(ids, return_counts=True)
            unique_np, counts_np = unique.numpy(), counts.double().numpy()
            for start, end in ranges[table]:
                inside = (unique_np >= start) & (unique_np < end)
                rates = counts_np[inside] / sample_fraction / steps
                groups.append(_ShardRates(table, end - start, -np.sort(-rates)))
        return cls(groups, steps)

    def top_share(self, fraction: float) -> float:
        """P(r): the share of accesses that go to the top `fraction` of each shard's rows."""
        if fraction not in self._top_shares:
            rows = np.array([g.rows for g in self.groups], dtype=np.float64)
            taken = np.minimum(np.ceil(fraction * rows).astype(np.int64), self._lengths)
            self._top_shares[fraction] = float(self._cumulative[self._cumulative_starts + taken].sum()) / self.total_rate
        return self._top_shares[fraction]

    def mfu_ages(self, fraction: float, subset_steps: int) -> tuple[np.ndarray, dict[str, float]]:
        """Per-row mean age of the newest save under MFU subsets (before the T_full cap), and the
        expected rows per subset save of each table.

        Each save takes the k = ceil(r * rows) rows of a shard with the most accesses since their last
        save, so a row is saved once its unsaved count reaches a threshold theta (the same for the whole
        shard): a row of rate l is saved every max(T_sub, theta / l) steps. theta is where the saves per
        step, sum_i min(1 / T_sub, l_i / theta), equal k / T_sub (theta >= 1: a row needs an access to
        be picked). A row that waits for theta accesses and then for the next subset save is on average
        (theta - 1) / (2 l) + T_sub / 2 old.
        """
        key = (fraction, subset_steps)
        if key not in self._mfu_ages:
            self._mfu_ages[key] = self._solve_mfu_ages(fraction, subset_steps)
        return self._mfu_ages[key]

    def _solve_mfu_ages(self, fraction: float, subset_steps: int) -> tuple[np.ndarray, dict[str, float]]:
        s = float(subset_steps)
        sizes, group = self._mfu_layout
        quota = self._mfu_quota(fraction) / s
        rates = self.rates

        def saves_per_step(theta: np.ndarray) -> np.ndarray:
            return np.bincount(group, weights=np.minimum(1 / s, rates / theta[group]), minlength=len(sizes))

        busy = saves_per_step(np.ones(len(sizes))) > quota  # more accessed rows than the quota: theta > 1
        theta = np.where(busy, np.maximum(s * self._mfu_threshold_per_step(fraction), 1.0), 1.0)
        ages = (theta[group] - 1) / (2 * rates) + s / 2
        per_save = np.minimum(quota, saves_per_step(theta)) * s
        rows: dict[str, float] = {}
        for g, n in zip(self.groups, per_save):
            rows[g.table] = rows.get(g.table, 0.0) + float(n)
        return ages, rows

    @functools.cached_property
    def _mfu_layout(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows per shard, and each row's shard."""
        sizes = np.array([len(g.rates) for g in self.groups])
        return sizes, np.repeat(np.arange(len(self.groups)), sizes)

    def _mfu_quota(self, fraction: float) -> np.ndarray:
        """k = ceil(r * rows) of every shard: the rows each subset save takes."""
        return np.array([math.ceil(fraction * g.rows) for g in self.groups], dtype=np.float64)

    def _mfu_threshold_per_step(self, fraction: float) -> np.ndarray:
        """theta / T_sub of every shard (before theta >= 1 is imposed), solved exactly (one pass over the rows,
        not a search) and the same for every T_sub, so it is solved once per fraction: with the rates of a
        shard descending, the rows saved every T_sub are a prefix, the first J, and the rest give l_i / theta,
        so theta = (sum of the rates after the first J) / (quota - J / T_sub) with quota = k / T_sub, that is
        T_sub * (rates after J) / (k - J). Row i belongs to that prefix exactly when the saves per step at
        theta = T_sub * l_i fall short of the quota: (i + 1) + (rates after i) / l_i < k (i from 0 in its
        shard), whatever T_sub."""
        if fraction not in self._mfu_thresholds:
            sizes, group = self._mfu_layout
            k = self._mfu_quota(fraction)
            rates = self.rates
            starts = np.cumsum(sizes) - sizes
            position = np.arange(len(rates)) - starts[group]  # i's index within its shard, from 0
            totals = np.bincount(group, weights=rates, minlength=len(sizes))
            prefix = np.concatenate([[0.0], np.cumsum(rates)])  # prefix[i]: the rates of every row before i
            after = totals[group] - (prefix[1:] - prefix[starts[group]])  # rates of i's shard after row i
            with np.errstate(divide="ignore", invalid="ignore"):
                short = (position + 1) + after / rates < k[group]
            saturated = np.bincount(group, weights=short, minlength=len(sizes)).astype(np.int64)
            rest = totals - (prefix[starts + saturated] - prefix[starts])
            with np.errstate(divide="ignore", invalid="ignore"):
                self._mfu_thresholds[fraction] = rest / np.maximum(k - saturated, 1e-300)
        return self._mfu_thresholds[fraction]

    def age_histogram(self, key: tuple[str, float, int], ages: Callable[[], np.ndarray]) -> AgeHistogram:
        """The rows in ~1000 log-spaced bins of their age (`ages()`, per row; inf for rows no subset save
        catches), each bin as its access share and share-weighted mean age, and the share of the rows never
        caught: evaluating a T_full then costs the same for any table size. Cached by `key`, (kind, knob,
        T_sub), since a policy re-plans from the same profile many times."""
        if key not in self._histograms:
            per_row = ages()
            weights = self.rates / self.total_rate
            finite = np.isfinite(per_row)
            never = float(weights[~finite].sum())
            per_row, weights = per_row[finite], weights[finite]
            if len(per_row):
                edges = np.geomspace(per_row.min(), per_row.max() * (1 + 1e-9) + 1e-12, _AGE_BINS + 1)
                bins = np.clip(np.searchsorted(edges, per_row, side="right") - 1, 0, _AGE_BINS - 1)
                share = np.bincount(bins, weights=weights, minlength=_AGE_BINS)
                summed = np.bincount(bins, weights=weights * per_row, minlength=_AGE_BINS)
                kept = share > 0
                self._histograms[key] = AgeHistogram(share[kept], summed[kept] / share[kept], never)
            else:
                self._histograms[key] = AgeHistogram(np.zeros(0), np.zeros(0), never)
        return self._histograms[key]

    def catch_probability(self, sample_rate: float, subset_steps: int) -> np.ndarray:
        """q_i: probability that SSU samples row i within one subset interval. Its accesses in an
        interval are a Poisson count of mean a_i = rate_i * T_sub, each sampled with probability p, so
        q_i = 1 - E[(1 - p)^K] = 1 - exp(-p * a_i) (about 1 - (1 - p)^(a_i) for small p)."""
        return -np.expm1(-sample_rate * self.rates * subset_steps)

    def ssu_rows(self, sample_rate: float, subset_steps: int) -> dict[str, float]:
        """Expected distinct rows per table that SSU samples in one subset interval: sum of q_i."""
        q = self.catch_probability(sample_rate, subset_steps)
        sums = np.bincount(self.row_table, weights=q, minlength=len(self.tables))
        return {table: float(s) for table, s in zip(self.tables, sums)}


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
        self.num_shards = profile.num_shards
        self.mtbf_steps = profile.job_mtbf_hours / hours_per_step
        # Everything the model's numbers depend on besides the access profile.
        self.key = (kind, hours_per_step, total_steps, full_bytes, tuple(sorted(row_bytes.items())), self.num_shards,
                    self.mtbf_steps)

    def pls(self, mean_age_steps: float) -> float:
        return mean_age_steps / (self.num_shards * self.mtbf_steps)

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


def _points(model: _Model, knobs: Sequence[float], subset_intervals: Sequence[int]) -> list[_Point]:
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
    kind: PriorityKind,
    access: AccessProfile,
    profile: ClusterProfile,
    target_pls: float,
    hours_per_step: float,
    total_steps: int,
    full_bytes: int,
    row_bytes: Mapping[str, int],
    knobs: Sequence[float] | None = None,
    subset_intervals: Sequence[int] | None = None,
    full_interval_steps: int | None = None,
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
    max_age = target_pls * model.num_shards * model.mtbf_steps
    knobs = knobs or (DEFAULT_SAMPLE_RATES if kind == "ssu" else DEFAULT_FRACTIONS)
    points = _points(model, knobs, subset_intervals or default_subset_intervals(total_steps))
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
    kind: PriorityKind,
    access: AccessProfile,
    profile: ClusterProfile,
    bytes_per_hour: float,
    hours_per_step: float,
    total_steps: int,
    full_bytes: int,
    row_bytes: Mapping[str, int],
    knobs: Sequence[float] | None = None,
    subset_intervals: Sequence[int] | None = None,
) -> PrioritizedPlan:
    """The dual: the settings with the least expected PLS that write at most `bytes_per_hour`.

    For each grid point the shortest T_full that fits the budget left after the subset saves is taken.
    Raises ValueError when not even one full save per run fits.
    """
    model = _Model(kind, access, profile, hours_per_step, total_steps, full_bytes, row_bytes)
    budget_per_step = bytes_per_hour * hours_per_step
    knobs = knobs or (DEFAULT_SAMPLE_RATES if kind == "ssu" else DEFAULT_FRACTIONS)
    candidates = []
    cheapest_full = math.ceil(full_bytes / budget_per_step) if budget_per_step > 0 else math.inf
    if cheapest_full <= total_steps:
        candidates.append(_full_only(model, max(1, cheapest_full), None))
    for point in _points(model, knobs, subset_intervals or default_subset_intervals(total_steps)):
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
