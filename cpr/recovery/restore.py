"""Reading saves back into the live state: a whole full save (a rollback, a resume), or one domain's newest
saved rows composed from the full and subset saves (partial recovery). Collective where every rank must
agree (which save is loadable), local otherwise."""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

from cpr.accounting import FailureEvent, RunLedger
from cpr.comm import Coordinator
from cpr.domains import DomainLayout
from cpr.errors import CheckpointMismatchError, CorruptCheckpointError, RecoveryError, SkippedSaveWarning
from cpr.policies.base import CheckpointPolicy
from cpr.state import TrainingState
from cpr.storage import DENSE_PART, CheckpointStore, LoadedPart, SaveInfo, check_part_rows, domain_part, restore_domain
from cpr.storage.names import POLICY_PREFIX
from cpr.tracking import AccessTracker

from .reshard import load_resharded, same_layout


@dataclass(frozen=True)
class DomainRestore:
    """One domain's rows restored here: the row-updates they had made since their saves (now lost), the step
    of the oldest save a row came from, and the bytes read."""

    lost_updates: int
    oldest_step: int
    bytes_read: int


@dataclass(frozen=True)
class Rollback:
    """Everything went back to the full save of `step`; `bytes_read` by this process."""

    step: int
    bytes_read: int


class Restorer:
    """Restores this process's share of the live state from the saves in `store`.

    Args:
        state: the live state restored into.
        layout: the failure domains this process holds.
        store, coordinator: where the saves are, and the ranks that read them together.
        tracker: its access counts restart at the restored rows (what they lose is counted first).
        policy: takes back the plan a full save holds.
        ledger: the run's record (a resumed run continues the one its save holds).
    """

    def __init__(self, state: TrainingState, layout: DomainLayout, store: CheckpointStore, coordinator: Coordinator,
                 tracker: AccessTracker, policy: CheckpointPolicy, ledger: RunLedger) -> None:
        self.state, self.layout, self.store, self.coordinator = state, layout, store, coordinator
        self.tracker, self.policy, self.ledger = tracker, policy, ledger

    # -- one domain ------------------------------------------------------------------------------------------
    def restore_domain(self, domain: int, saves: Sequence[SaveInfo]) -> DomainRestore:
        """Reload `domain`'s newest saved rows (and their row-wise optimizer state) here."""
        held = self.layout.held(domain)
        tables = self.state.tables
        restored = restore_domain(
            self.store, saves, domain_part(domain),
            rows={t: self.layout.global_rows(t, domain) for t in held},
            state_names={t: list(tables.row_states(t)) for t in held},
        )
        lost, oldest = 0, self.state.step
        for table, (start, end) in held.items():
            lost += int(self.tracker.counts(table)[start:end].sum())
            rows = restored.rows[table]
            self.state.write_rows(table, start, end, rows["weight"],
                                  {s: rows[f"opt/{s}"] for s in tables.row_states(table)})
            oldest = min(oldest, int(restored.saved_step[table].min()))
            self.tracker.mark_saved(table, row_range=(start, end))
        return DomainRestore(lost, oldest, restored.bytes_read)

    # -- a whole full save -------------------------------------------------------------------------------
    def load_full(self, save: SaveInfo) -> dict[str, LoadedPart]:
        """This process's domain parts and the dense part of one full save, checked against this job. A save
        of another world size or sharding plan is read by global row range (`cpr.recovery.reshard`)."""
        if not same_layout(save, self.coordinator.world_size, self.layout):
            return load_resharded(self.state, self.layout, self.store, save)
        loaded = {}
        for domain in self.layout.local:
            part = domain_part(domain)
            loaded[part] = self.store.load_part(save, part)
            try:
                check_part_rows(loaded[part], {t: self.layout.global_rows(t, domain) for t in self.layout.held(domain)})
            except CheckpointMismatchError:  # the same world size with another plan
                return load_resharded(self.state, self.layout, self.store, save)
        loaded[DENSE_PART] = self.store.load_part(save, DENSE_PART)
        return loaded

    def apply_full(self, loaded: Mapping[str, LoadedPart]) -> None:
        """Copy a `load_full` into the live state: every local domain's rows, and the dense state."""
        for domain in self.layout.local:
            tensors = loaded[domain_part(domain)].tensors
            for table, (start, end) in self.layout.held(domain).items():
                self.state.write_saved_rows(table, start, end, tensors)
        self.state.restore_dense(loaded[DENSE_PART].tensors)

    def rollback(self, saves: Sequence[SaveInfo], resume: bool = False) -> Rollback | None:
        """Return everything to the newest full save every rank can load, or None if there is no full save at
        all. With `resume` (a restart after a crash) the run's record, kept in the save, is taken back too; an
        emulated full recovery keeps counting on the live record."""
        skipped = []
        for save in reversed([s for s in saves if s.kind == "full"]):
            agreement = self.coordinator.agree(functools.partial(self.load_full, save), site="rollback.load_status", share=False,
                                               expected=(CheckpointMismatchError, CorruptCheckpointError, KeyError))
            mismatch = agreement.first(CheckpointMismatchError)
            if mismatch is not None:
                raise CheckpointMismatchError(mismatch.message)
            problem = agreement.first()
            if problem is not None:
                warnings.warn(f"skipping save, falling back to an older one: {problem.message}", SkippedSaveWarning,
                              stacklevel=3)
                skipped.append(save.folder.name)
                continue
            loaded = agreement.local
            self.apply_full(loaded)
            self.state.load_reader(save.extra.get("reader"))
            self.state.step = save.step
            policy_state = dict(save.extra.get("policy") or {})
            policy_state.update({k.removeprefix(POLICY_PREFIX): v for k, v in loaded[DENSE_PART].tensors.items()
                                 if k.startswith(POLICY_PREFIX)})
            self.policy.load_state_dict(policy_state, save.step)
            if resume:
                self._resume_record(save, loaded)
            for table in self.state.tables.tables:
                self.tracker.mark_saved(table)  # the model is its saved self again: nothing is pending
            self.coordinator.all_gather(None, site="rollback.read_barrier")  # every rank has read the save before any newer one goes
            if self.coordinator.is_coordinator:
                self.store.mark_loadable(save.step, save.kind)  # every rank read it whole
                self.store.set_aside_after(save.step)  # a future that is gone, or skipped: kept, not deleted
            return Rollback(save.step, sum(part.bytes_read for part in loaded.values()))
        if skipped:
            raise CorruptCheckpointError(self.store.directory, ", ".join(skipped), "no loadable full save remains")
        return None

    def roll_back_for(self, failed: Sequence[int], failed_at: int,
                      saves: Sequence[SaveInfo]) -> tuple[tuple[FailureEvent, ...], int]:
        """Full recovery from the failure of domains `failed` after `failed_at` steps: roll back and record it
        (the lost steps and the job's bytes read go to the first failure); (the events, bytes read here)."""
        rolled_back = self.rollback(saves)
        if rolled_back is None:
            raise RecoveryError(f"no loadable full checkpoint in {self.store.directory}")
        loaded_bytes = int(self.coordinator.sum(rolled_back.bytes_read, site="recover.full.bytes_read"))
        events = tuple(
            FailureEvent(failed_at, domain, "full", rolled_back.step, lost_updates=0,
                         lost_steps=failed_at - rolled_back.step if i == 0 else 0,
                         loaded_bytes=loaded_bytes if i == 0 else 0)
            for i, domain in enumerate(failed)
        )
        for event in events:
            self.ledger.record_failure(event)
        return events, rolled_back.bytes_read

    def _resume_record(self, save: SaveInfo, loaded: Mapping[str, LoadedPart]) -> None:
        """Continue the record the save holds: everything up to it, and the save itself."""
        state = next((part.manifest.extra["ledger"] for part in loaded.values() if "ledger" in part.manifest.extra), None)
        if state is None:
            return
        self.ledger.load_state_dict(state)
        self.ledger.record_save(save.step, save.kind, save.nbytes, 0.0, data_bytes=save.extra.get("data_bytes"))
