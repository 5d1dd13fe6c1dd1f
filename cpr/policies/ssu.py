"""CPR-SSU: subsets of the rows whose accesses were sub-sampled with probability p since the last subset
save (`SSUPolicy`), planned from a bounded uniform sample of the calibration window's accesses
(`_AccessSample`)."""
from __future__ import annotations

from typing import Any

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cpr.planning.prioritized import AccessProfile, PrioritizedPlan
from cpr.policies.base import PolicyContext, SaveDecision
from cpr.policies.prioritized_base import PrioritizedPolicy
from cpr.tracking import AccessTracker

# Accesses SSU keeps (with multiplicity) to plan from: 18 bytes each, so about 1.2 MB whatever the tables.
CALIBRATION_SAMPLE = 1 << 16


class _AccessSample:
    """A uniform sample without replacement of at most `capacity` accesses (table, row id), with
    multiplicity: every access gets a random key and the `capacity` smallest keys are kept (bottom-k)."""

    def __init__(self, feature_to_table: dict[str, int], capacity: int, seed: int) -> None:
        self.feature_to_table = feature_to_table
        self.capacity = capacity
        self.generator = torch.Generator().manual_seed(seed)
        self.keys = torch.zeros(0, dtype=torch.float64)
        self.ids = torch.zeros(0, dtype=torch.int64)
        self.tables = torch.zeros(0, dtype=torch.int16)
        self.seen = 0

    def add(self, kjt: KeyedJaggedTensor) -> None:
        values = kjt.values().to("cpu", torch.int64)
        per_key = torch.tensor([self.feature_to_table[k] for k in kjt.keys()], dtype=torch.int16)
        lengths = torch.tensor(kjt.offset_per_key()).diff()
        keys = torch.rand(values.numel(), generator=self.generator, dtype=torch.float64)
        self.seen += values.numel()
        self.keys = torch.cat([self.keys, keys])
        self.ids = torch.cat([self.ids, values])
        self.tables = torch.cat([self.tables, per_key.repeat_interleave(lengths)])
        if self.keys.numel() > self.capacity:
            keep = torch.topk(self.keys, self.capacity, largest=False).indices
            self.keys, self.ids, self.tables = self.keys[keep], self.ids[keep], self.tables[keep]

    def nbytes(self) -> int:
        return self.capacity * (self.keys.element_size() + self.ids.element_size() + self.tables.element_size())

    def by_table(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {name: self.ids[self.tables == i] for i, name in enumerate(names)}


class SSUPolicy(PrioritizedPolicy):
    """CPR-SSU: subsets of the rows whose accesses were sub-sampled with probability p since the last
    subset save. The SSU tracker is built at calibration with the planned p and set capacity."""

    name = "ssu"
    knob_option = "sample_rate"

    def __init__(self, context: PolicyContext) -> None:
        super().__init__(context)
        self._tables = list(context.tables.tables)
        index = {t: i for i, t in enumerate(self._tables)}
        self._sample: _AccessSample | None = _AccessSample(
            {f: index[t] for f, t in context.tables.feature_to_table.items()}, CALIBRATION_SAMPLE, seed=0
        )
        self.calibration_sample_bytes = self._sample.nbytes()
        self.tracker: AccessTracker | None = None
        self.overflow = 0  # sampled ids dropped because a set was full, over the run
        # Sampling starts at calibration, so rows updated before it are unknown to the sets: the first
        # subset also takes the rows updated since their last save (the checkpointer's counters above 0, once).
        self._catch_up = False

    def observe(self, kjt: KeyedJaggedTensor) -> None:
        super().observe(kjt)
        if self.tracker is not None:
            self.tracker.observe(kjt)
        elif self._sample is not None:
            self._sample.add(kjt)

    def access_profile(self, window: int) -> AccessProfile:
        sample = self._sample
        fraction = sample.ids.numel() / sample.seen if sample.seen else 1.0
        by_table = sample.by_table(self._tables)
        self._sample = None  # calibration only: the sample's memory is released once planned
        return AccessProfile.from_sample(by_table, fraction, self.context.layout.ranges, window)

    def stateful_knobs(self) -> bool:
        return self.tracker is not None

    def apply_plan(self, plan: PrioritizedPlan) -> None:
        if not plan.subset_interval_steps or self.tracker is not None:
            return  # nothing to sample, or the sets in use keep their p and capacity
        tables = self.context.tables
        self.tracker = AccessTracker(
            {name: info.local_rows for name, info in tables.tables.items()},
            tables.feature_to_table,
            mode="ssu",
            ssu_rate=plan.sample_rate,
            ssu_capacity=plan.ssu_capacity,
            device=self.context.tracker.device,
        )
        self._catch_up = True

    def select_rows(self) -> dict[str, torch.Tensor]:
        rows = {}
        for table in self._tables:
            self.overflow += self.tracker.ssu_overflow(table)
            ids = self.tracker.sampled(table, clear=True)
            if self._catch_up:
                ids = torch.cat([ids, self.context.tracker.dirty_rows(table)]).unique()
            if ids.numel():
                rows[table] = ids
        self._catch_up = False
        return rows

    def after_save(self, plan: SaveDecision) -> None:
        super().after_save(plan)
        if plan.saves_every_row and self.tracker is not None:
            for table in self._tables:  # every row was just saved: earlier samples are stale
                self.tracker.sampled(table, clear=True)

    def memory_bytes(self) -> int:
        return self.tracker.memory_breakdown()["ssu_sets"] if self.tracker is not None else 0

    def settings(self) -> dict[str, Any]:
        out = {**super().settings(), "sample_rate": None, "ssu_capacity": None,
               "calibration_sample_bytes": self.calibration_sample_bytes}
        if self.tracker is not None:
            memory = self.tracker.memory_breakdown()
            out.update(sample_rate=self.tracker.ssu_rate, ssu_capacity=self.tracker.ssu_capacity,
                       ssu_set_bytes=memory["ssu_sets"],
                       ssu_overflow=self.overflow + sum(self.tracker.ssu_overflow(t) for t in self._tables))
        return out
