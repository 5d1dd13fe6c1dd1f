"""The measured access profile a prioritized policy is planned from (`AccessProfile`), and the age math of
its rows under MFU and SSU subsets: how old each row's newest save is on average for a fraction r (MFU,
SCAR) or a sampling rate p (SSU) and a subset interval, binned by age (`AgeHistogram`) for the planner in
prioritized.py. Derivation: docs/prioritized.md.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

    from .prioritized import _Point

_AGE_BINS = 1024


class AgeHistogram(NamedTuple):
    """Rows binned by the age of their newest save: each bin's access share and mean age, and the share of
    accesses to rows no subset save catches (as old as the last full save)."""

    share: np.ndarray
    age: np.ndarray
    never: float


@dataclass(frozen=True)
class _DomainRates:
    table: str
    rows: int  # rows of the table in this shard
    rates: np.ndarray  # accesses per step of the shard's accessed rows, descending (float64)


class AccessProfile:
    """How often each row is accessed, per table and shard, as measured during a calibration window.

    Built from exact per-row counts (`from_counts`, MFU and SCAR) or from a uniform sample of accesses
    with multiplicity (`from_sample`, SSU). Rows never seen count as never accessed.
    """

    def __init__(self, groups: Sequence[_DomainRates], steps: int) -> None:
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
        import torch  # here, not above: planning loads without torch (the command line plans nothing before it)

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
        groups = [_DomainRates(table, int(rows), r) for table, rows, r in zip(state["access_tables"], state["access_rows"].tolist(), rates)]
        return cls(groups, int(state["access_steps"]))

    @classmethod
    def from_counts(
        cls, counts: Mapping[str, torch.Tensor], ranges: Mapping[str, Sequence[tuple[int, int]]], steps: int
    ) -> AccessProfile:
        """Per-row access counts over `steps` steps; `ranges[table]` are the domains' row ranges."""
        groups = []
        for table, table_counts in counts.items():
            values = table_counts.double().numpy()
            for start, end in ranges[table]:
                shard = values[start:end]
                shard = shard[shard > 0]
                groups.append(_DomainRates(table, end - start, -np.sort(-shard) / steps))
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
            unique, counts = ids.unique(return_counts=True)
            unique_np, counts_np = unique.numpy(), counts.double().numpy()
            for start, end in ranges[table]:
                inside = (unique_np >= start) & (unique_np < end)
                rates = counts_np[inside] / sample_fraction / steps
                groups.append(_DomainRates(table, end - start, -np.sort(-rates)))
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
