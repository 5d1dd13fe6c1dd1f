"""The save pipeline: snapshot -> parts written (in the background) -> every rank's parts gathered -> the
coordinator commits -> every rank learns the outcome.

A save takes a snapshot of the rows it holds; one writer thread writes the saves one after the other, in the
order they were decided, while training goes on. At the first step boundary after every rank's parts are
durable the ranks exchange their part records; the coordinator's writer then commits (DCP's metadata, the
commit record, fsyncs, rename, retention), and every rank learns the outcome at a later step boundary, so
the collectives stay in step on every rank. A save that fails anywhere is undone everywhere (its access
marks and the policy's bookkeeping), never raised: training goes on and the next save retries.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Sequence

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cpr.accounting import RunLedger
from cpr.comm import Coordinator
from cpr.domains import DomainLayout
from cpr.policies.base import CheckpointPolicy, SaveDecision
from cpr.snapshot import RowSnapshot, SnapshotMode
from cpr.state import TrainingState
from cpr.storage import DENSE_PART, CheckpointStore, SaveInfo, WrittenPart
from cpr.storage.location import Folder
from cpr.threads import one_intraop_thread
from cpr.tracking import AccessTracker

from .parts import PartMaker
from .pending import PendingSave, RankWrite, WriteResult

# Subset saves that may wait, copied, for the writer thread behind the save in flight (a few rows each).
QUEUED_SUBSET_SAVES = 4


def write_failure(error: Exception) -> str:
    """How a write failed, for the warning and the ledger: the error and the OS error under it, if any.
    torch's zip writer turns a failed write (ENOSPC, EIO) into `RuntimeError: [enforce fail at
    inline_container.cc:...] unexpected pos`, keeping the OSError only as its context."""
    text, seen = f"{type(error).__name__}: {error}", {id(error)}
    under = error.__cause__ or error.__context__
    while under is not None and id(under) not in seen and not isinstance(under, OSError):
        seen.add(id(under))
        under = under.__cause__ or under.__context__
    if isinstance(under, OSError) and under is not error:
        text += f" (from {type(under).__name__}: {under})"
    return text


class SavePipeline:
    """This process's saves from decision to commit (collective: every rank runs the same calls).

    Args:
        state: the live training state the saves read.
        layout: the failure domains; each local domain gets a part.
        store: where saves go; only the coordinator commits.
        policy: told of every save it decided (`after_save`) and of every one that failed (`save_failed`).
        tracker: the access counts a save marks as saved (and gives back should it fail).
        ledger: the record every committed or failed save goes to.
        parts: makes the parts from a snapshot.
        snapshot_mode: how a full save's rows are snapshotted (see cpr/snapshot.py); subsets are copied.
        async_save: write in a background thread; False writes and commits inside `submit`.
        rewrite: what a full decision is written as, decided once the saves in flight are settled (the
            differential rewrite, see differential.py); None writes every decision as it is.
    """

    def __init__(self, state: TrainingState, layout: DomainLayout, store: CheckpointStore, coordinator: Coordinator,
                 policy: CheckpointPolicy, tracker: AccessTracker, ledger: RunLedger, parts: PartMaker,
                 snapshot_mode: SnapshotMode, async_save: bool,
                 rewrite: Callable[[SaveDecision], SaveDecision] | None = None) -> None:
        self.state, self.layout, self.store, self.coordinator = state, layout, store, coordinator
        self.policy, self.tracker, self.ledger, self.parts = policy, tracker, ledger, parts
        self.snapshot_mode, self.rewrite = snapshot_mode, rewrite
        self.staging_tag: str | None = None  # every rank stages under the coordinator's tag (set at run start)
        self._pending: PendingSave | None = None
        # Subset saves decided while a save is in flight, to be written after it (see `may_queue`), oldest first.
        self._queued: collections.deque[PendingSave] = collections.deque()
        # One writer thread: saves are written one after the other, in the order they were decided.
        self._executor = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpr-save",
                                             initializer=one_intraop_thread) if async_save else None)

    # -- deciding and snapshotting ------------------------------------------------------------------------
    def submit(self, decision: SaveDecision) -> SaveDecision:
        """Save what the policy decided now; returns the decision as written (a differential one, say)."""
        queue = self.may_queue(decision)
        if not queue:
            self.flush()  # the save in flight commits first (its commit may be changing the folder's saves)
        if self.rewrite is not None:
            decision = self.rewrite(decision)
        self.save(decision, queue=queue)
        return decision

    def may_queue(self, decision: SaveDecision) -> bool:
        """Whether `decision` is snapshotted now and written after the saves in flight, rather than waiting for
        them to commit: a policy's subset save (its few rows are copied at once), up to QUEUED_SUBSET_SAVES of
        them. A full save takes the writer for a while, and a prioritized policy's next subsets are often due
        meanwhile; a full save itself waits (its snapshot may be copy-on-write, for one save at a time). The
        answer is the same on every rank: saves in flight are settled collectively."""
        return (decision.kind == "subset" and self._executor is not None and self._pending is not None
                and len(self._queued) < QUEUED_SUBSET_SAVES)

    def save(self, decision: SaveDecision, queue: bool = False) -> None:
        """Snapshot what `decision` saves, then persist it (in the background, or here with `async_save`
        off) and commit it once every rank's parts are durable. A decision made while a save is in flight
        first waits for it to commit, unless it is `queue`d behind it (see `may_queue`)."""
        if not queue:
            self.flush()
        started = time.perf_counter()
        policy_state = self.policy.state_dict()
        policy_tensors = {k: v for k, v in policy_state.items() if isinstance(v, torch.Tensor)}
        # A subset's few rows cost less to copy now than a copy-on-write snapshot's bookkeeping of every row.
        mode = "copy" if decision.kind == "subset" and self.snapshot_mode == "copy_on_write" else self.snapshot_mode
        pending = PendingSave(
            decision=dataclasses.replace(decision, step=self.state.step),
            snapshot=RowSnapshot(self.state.row_tensors(), mode),
            parts={},
            ledger=self.ledger.state_dict() if decision.kind == "full" else None,
            extra={"reader": self.state.reader_state(),
                   "policy": {k: v for k, v in policy_state.items() if k not in policy_tensors},
                   "reason": decision.reason, "every_row": decision.saves_every_row},
        )
        if decision.kind == "subset":
            pending.selected = self.parts.selected_rows(decision, pending.snapshot)  # copied now: training changes the rows next
        if not pending.parts_made_by_writer:
            pending.parts.update(self._domain_parts(pending))  # read now, for the same reason
        if decision.kind == "full" and self.coordinator.is_coordinator:
            pending.parts[DENSE_PART] = self.parts.dense_part(self.state.capture_dense(), policy_tensors)
        # The marks and the policy's plan take this save into account now, whenever its write finishes, so a
        # seeded run decides the same whatever the disk's speed; should the save fail, both are undone and
        # the next save retries.
        unsaved = self.tracker.pending_total()
        pending.counts = self._take_marks(pending.decision)
        pending.unsaved = unsaved - self.tracker.pending_total()  # the accesses the marks cleared
        self.policy.after_save(pending.decision)
        if self._executor is None:
            pending.written = self._persist(pending)
        else:
            pending.future = self._executor.submit(self._persist, pending)
        pending.stall_seconds = time.perf_counter() - started
        if queue:
            self._queued.append(pending)
            return
        self._pending = pending
        if self._executor is None:
            self._commit(pending)

    def _domain_parts(self, pending: PendingSave):
        return self.parts.domain_parts(pending.decision, pending.snapshot, pending.selected or {}, pending.ledger)

    def _take_marks(self, decision: SaveDecision) -> dict[str, torch.Tensor]:
        """Mark the rows `decision` saves as saved (their access counters restart from 0) and return the
        counters this cleared, to give back should the save fail."""
        if decision.kind == "full":
            return self.tracker.take_counts()
        taken = {}
        for table, ids in decision.rows.items():
            if table in self.state.tables.tables:
                taken[table] = self.tracker.counts(table, rows=ids)
                self.tracker.mark_saved(table, rows=ids)
        return taken

    def preserve_lookups(self, kjt: KeyedJaggedTensor) -> None:
        """A batch's lookups, before its step changes their rows: a copy-on-write snapshot keeps those rows."""
        pending = self._pending
        if pending is not None and pending.snapshot.preserving:
            started = time.perf_counter()
            pending.snapshot.preserve_lookups(kjt, self.tracker.feature_to_table)
            pending.stall_seconds += time.perf_counter() - started

    # -- persisting (the writer thread) ------------------------------------------------------------------
    def _persist(self, pending: PendingSave) -> WriteResult:
        """Write this process's parts into the save's staging folder."""
        started = time.perf_counter()
        decision = pending.decision
        written: dict[str, WrittenPart] = {}
        error, staging = None, None
        # The domain parts come first: training stops preserving rows for a copy-on-write snapshot sooner.
        parts = itertools.chain(self._domain_parts(pending) if pending.parts_made_by_writer else (),
                                pending.parts.items())
        try:
            staging = self.store.stage(decision.step, decision.kind, self.staging_tag)
            for name, content in parts:
                written[name] = self.store.write_part(staging, name, decision.step, decision.kind,
                                                      self.policy.name, content)
        except Exception as err:  # disk full, quota, EIO, read-only, folder gone, whatever the serializer makes
            # of them: abandon this save on every rank (the gather tells them), keep training
            error = f"rank {self.coordinator.rank}: {write_failure(err)}"
        finally:
            pending.snapshot.release()
        return WriteResult(written, error, staging, time.perf_counter() - started)

    # -- gathering, committing, settling -----------------------------------------------------------------
    def poll(self) -> None:
        """Move the save in flight on, without waiting: once every rank has written its parts, gather their
        records (the coordinator then commits in the background); once the coordinator's commit is done,
        settle it on every rank. One small collective per step while a save is in flight, so the ranks take
        each stage at the same step."""
        pending = self._pending
        if pending is None:
            return
        if pending.gathered is None:
            if not self.coordinator.all_true(pending.future is None or pending.future.done(), site="save.poll_written"):
                return
            started = time.perf_counter()
            self._gather(pending)
            pending.stall_seconds += time.perf_counter() - started
        if self._pending is pending and self.coordinator.all_true(pending.committing is None or pending.committing.done(),
                                                                  site="save.poll_committed"):
            self._settle(pending)

    def flush(self) -> None:
        """Wait for the saves in flight, if any, and commit them in order (collective)."""
        while self._pending is not None:
            self._commit(self._pending)

    def _commit(self, pending: PendingSave) -> None:
        """Wait for this process's parts and the coordinator's commit, and settle the save (collective)."""
        started = time.perf_counter()
        if pending.gathered is None:
            self._gather(pending)
        if self._pending is pending:
            if pending.committing is not None:
                pending.committing.exception()  # wait (an error surfaces in `_settle`)
            pending.stall_seconds += time.perf_counter() - started
            self._settle(pending)

    def _gather(self, pending: PendingSave) -> None:
        """Wait for this process's parts and gather every rank's written parts; the coordinator then starts
        the commit (in the background with `async_save`), or abandons the save if a rank failed to write.

        Should a rank die meanwhile (CoordinationError), the save stays pending: a rejoin settles it."""
        result = pending.write_result()
        gathered = self.coordinator.all_gather(RankWrite(result.parts, result.error), site="save.gather_parts")
        pending.gathered = gathered
        pending.data_bytes = sum(part.manifest.data_nbytes for rank in gathered for part in rank.parts.values())
        errors = [rank.error for rank in gathered if rank.error]
        if pending.decision.kind == "subset" and not errors and not any(rank.parts for rank in gathered):
            self._advance()
            if self.coordinator.is_coordinator and result.staging is not None:
                self.store.abandon(result.staging)
            return  # no rank had a row to save: nothing to commit
        if not self.coordinator.is_coordinator:
            return
        if errors and result.staging is not None:
            self.store.abandon(result.staging)
        if self._executor is not None and not errors:
            pending.committing = self._executor.submit(self._commit_files, pending, result.staging)
        else:
            pending.committing = Future()
            pending.committing.set_result(errors[0] if errors else self._commit_files(pending, result.staging))

    def _commit_files(self, pending: PendingSave, staging: Folder | None) -> str | None:
        """The coordinator's commit of a save whose every part is durable (DCP metadata, commit record,
        rename, retention): None, or why it failed (the staging folder is then gone)."""
        try:
            self.store.commit(
                staging, pending.decision.step, pending.decision.kind, self.policy.name,
                {name: part for rank in pending.gathered for name, part in rank.parts.items()},
                world_size=self.coordinator.world_size, domain_mode=self.layout.mode,
                num_domains=self.layout.num_domains, extra={**pending.extra, "data_bytes": pending.data_bytes},
            )
        except Exception as err:  # as in `_persist`: the commit's writes fail the same ways
            if staging is not None:
                self.store.abandon(staging)  # (the store's commit removes it too; a failure before it may not)
            return f"commit: {write_failure(err)}"
        return None

    def _settle(self, pending: PendingSave) -> None:
        """Every rank learns the coordinator's outcome: the save is recorded, or undone everywhere (the
        marks and the policy's bookkeeping its snapshot made)."""
        started = time.perf_counter()
        step, kind = pending.decision.step, pending.decision.kind
        outcome = self.coordinator.broadcast(pending.committing.result() if self.coordinator.is_coordinator else None,
                                             site="save.settle_outcome")
        self._advance()
        if outcome is not None:
            self._undo(pending, outcome)
            if self.coordinator.is_coordinator:
                print(f"warning: the step-{step} {kind} save failed and was abandoned ({outcome}); training "
                      "goes on and the next save retries", file=sys.stderr)
            return
        nbytes = sum(part.record.nbytes for rank in pending.gathered for part in rank.parts.values())
        self.ledger.record_save(step, kind, nbytes, pending.stall_seconds + time.perf_counter() - started,
                                pending.write_result().seconds, pending.data_bytes)

    def _undo(self, pending: PendingSave, error: str) -> None:
        """A save that will never commit: its accesses are unsaved again and the policy decides anew."""
        self.ledger.record_failed_save(pending.decision.step, pending.decision.kind, error)
        for table, counts in pending.counts.items():
            self.tracker.add_counts(table, counts, rows=None if pending.decision.kind == "full" else pending.decision.rows[table])
        self.policy.save_failed(pending.decision)

    # -- what is in flight ---------------------------------------------------------------------------------
    def in_flight(self) -> list[PendingSave]:
        """The save in flight and those queued behind it, oldest first."""
        return [self._pending, *self._queued] if self._pending is not None else []

    def persisting(self) -> str | None:
        """The kind of the save this process's writer is writing now, if any (the real clock measures it)."""
        pending = self._pending
        return pending.decision.kind if pending is not None and pending.future is not None and not pending.future.done() else None

    def _advance(self) -> None:
        """The save in flight is settled: the oldest one queued behind it, if any, is in flight now."""
        self._pending = self._queued.popleft() if self._queued else None

    def unsaved_updates(self) -> int:
        """Row-updates this process's rows made since their last committed save: what its death would lose."""
        return self.tracker.pending_total() + sum(p.unsaved for p in self.in_flight())

    def wait(self) -> None:
        """Wait for every save in flight to finish writing here, and the coordinator's commit attempts (a peer
        died: nothing more is gathered; `settle_interrupted` then learns from the folder what committed)."""
        for pending in self.in_flight():
            pending.wait()

    def settle_interrupted(self, saves: Sequence[SaveInfo]) -> None:
        """Each save in flight when the group broke (and each queued behind it) committed everywhere or nowhere:
        `saves`, the folder's committed saves, say which."""
        interrupted = self.in_flight()
        self._pending = None
        self._queued.clear()
        for pending in interrupted:
            step, kind = pending.decision.step, pending.decision.kind
            committed = next((s for s in saves if (s.step, s.kind) == (step, kind)), None)
            if committed is not None:
                self.ledger.record_save(step, kind, committed.nbytes, pending.stall_seconds,
                                        data_bytes=committed.extra.get("data_bytes"))
                continue
            self._undo(pending, "a rank died before the save committed")
            staging = pending.write_result().staging
            if self.coordinator.is_coordinator and staging is not None:
                self.store.abandon(staging)  # (a replaced coordinator's staging folder goes as a dead writer's)

    def close(self) -> None:
        """Stop the writer thread (after what it is writing)."""
        if self._executor is not None:
            self._executor.shutdown()
