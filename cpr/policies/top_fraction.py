"""CPR-MFU and SCAR: subsets of the top fraction r of each shard's rows, by accesses since their last save
(`MFUPolicy`) or by how far they moved since it (`SCARPolicy`); both planned with the MFU access model."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from cpr.planning.prioritized import AccessProfile, PrioritizedPlan
from cpr.policies.base import PolicyContext, SaveDecision
from cpr.policies.prioritized_base import PrioritizedPolicy


class _TopFractionPolicy(PrioritizedPolicy):
    """Subsets of the top fraction r of each shard's rows by some per-row priority; planned from the
    checkpointer's access counts with the MFU model."""

    knob_option = "fraction"

    def __init__(self, context: PolicyContext) -> None:
        super().__init__(context)
        self.fraction: float | None = self.pinned.get("fraction")

    def access_profile(self, window: int) -> AccessProfile:
        tracker = self.context.tracker
        return AccessProfile.from_counts({t: tracker.counts(t) for t in tracker.table_rows}, self.context.layout.ranges, window)

    def apply_plan(self, plan: PrioritizedPlan) -> None:
        self.fraction = plan.fraction

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "fraction": self.fraction}


class MFUPolicy(_TopFractionPolicy):
    """CPR-MFU: subsets of the most-frequently-used rows of each shard since their last save."""

    name = "mfu"

    def select_rows(self) -> dict[str, torch.Tensor]:
        tracker = self.context.tracker
        return self._per_domain(lambda table, r: tracker.hottest(table, fraction=self.fraction, row_range=r))

    def memory_bytes(self) -> int:
        return self.context.tracker.memory_breakdown()["counters"]


class SCARPolicy(_TopFractionPolicy):
    """SCAR's priority: subsets of the rows of each shard that moved most (L2) since their last save.

    Keeps a copy of every row's newest saved weight. After a partial recovery the restored rows equal
    that copy already, so nothing needs updating then. Planned with the MFU access model (a row that
    moves is a row that was accessed), which SCAR's ranking only approximates.
    """

    name = "scar"

    def __init__(self, context: PolicyContext) -> None:
        super().__init__(context)
        self._saved: dict[str, torch.Tensor] = {}

    def select_rows(self) -> dict[str, torch.Tensor]:
        distances = {
            t: (self.context.tables.weight(t).detach().float() - saved.float()).norm(dim=1)
            for t, saved in self._saved.items()
        }

        def farthest(table: str, row_range: tuple[int, int]) -> torch.Tensor:
            start, end = row_range
            moved = distances[table][start:end]
            k = min(math.ceil(self.fraction * (end - start)), int((moved > 0).sum()))
            return (torch.topk(moved, k).indices + start).sort().values

        return self._per_domain(farthest)

    def after_save(self, plan: SaveDecision) -> None:
        super().after_save(plan)
        with torch.no_grad():
            if plan.saves_every_row:
                self._saved = {t: self.context.tables.weight(t).detach().clone() for t in self.context.tables.tables}
            else:
                for table, ids in plan.rows.items():
                    self._saved[table][ids] = self.context.tables.weight(table)[ids]

    def load_state_dict(self, state: Mapping[str, Any], step: int) -> None:
        super().load_state_dict(state, step)
        # The rows were just restored from the save: they are the saved copy.
        self._saved = {t: self.context.tables.weight(t).detach().clone() for t in self.context.tables.tables}

    def memory_bytes(self) -> int:
        return sum(t.nbytes for t in self._saved.values())

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "saved_copy_bytes": self.memory_bytes()}
