"""`CPRCheckpointer`: the façade that wires access tracking, a policy, storage and recovery.

Data flows one way. The rows each batch looks up go to the access tracker (from TorchRec's post-lookup
hook for a sharded model, or `observe` for a plain one); after each step the policy decides whether and
what to save (`step`); every process writes its domains' part of the save and the coordinator commits it.
On a failure (`recover`) the policy's recovery kind decides what comes back: for `full`, every tensor, the
step and the reader position of the last full save (the lost steps are then trained again); for
`partial`, only the failed domains' rows and their optimizer state, composed row by row from the newest
saves, while everything else goes on.

In a multi-rank job every rank creates its own `CPRCheckpointer` and calls `step`, `recover` and `report`
in the same order: they are collective (bounded by the coordinator's timeout).
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import sys
from concurrent.futures import Future, ThreadPoolExecutor
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Protocol, Sequence

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import _init_optim_state
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cpr import dense
from cpr.accounting import FailureEvent, RunLedger
from cpr.comm import Coordinator
from cpr.planning import ClusterProfile, PlanResult, plan
from cpr.policies import make_policy
from cpr.policies.base import CheckpointPolicy, PolicyContext, SavePlan
from cpr.shards import ShardLayout
from cpr.snapshot import RowSnapshot, SnapshotMode
from cpr.threads import one_intraop_thread
from cpr.storage import (
    DENSE_PART,
    CheckpointMismatchError,
    CheckpointStore,
    CorruptCheckpointError,
    LoadedPart,
    PartContent,
    WrittenPart,
    SaveInfo,
    SkippedSaveWarning,
    TableMeta,
    check_part_rows,
    codecs,
    domain_part,
    restore_domain,
)
from cpr.storage.dcp_format import Chunk, table_chunks
from cpr.storage.names import ids_name, state_name, weight_name
from cpr.tables import EmbeddingTables
from cpr.tracking import AccessTracker
from cpr.tracking.lookups import hook_served_lookups


QUANTIZE_CHOICES = ("none", "int8", "int4", "auto")
# `quantize="auto"` follows Check-N-Run: every restore puts the quantization error of the restored rows into
# the model and the errors of successive restores add up, so a job that expects few restores can store fewer
# bits. Here: 4 bits while the job expects at most AUTO_INT4_MAX_RESTORES restores (failures over the job, from
# the cluster profile), 8 bits beyond.
AUTO_INT4_MAX_RESTORES = 4


def weight_codec(quantize: str, expected_restores: float, shapes: Mapping[str, tuple[str, int]]) -> str:
    """The codec of embedding weights in saves for `--quantize` `quantize`, given the job's expected
    restores and each table's (dtype name, dim); ValueError if a table cannot be stored so."""
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
    if quantize == "none":
        return "raw"
    codec = quantize
    if quantize == "auto":
        fits_int4 = all(codecs.problem("int4", dtype, (1, dim)) is None for dtype, dim in shapes.values())
        codec = "int4" if expected_restores <= AUTO_INT4_MAX_RESTORES and fits_int4 else "int8"
    for table, (dtype, dim) in shapes.items():
        problem = codecs.problem(codec, dtype, (1, dim))
        if problem:
            raise ValueError(f"quantize={quantize!r}: table {table!r}: {problem}")
    return codec


class RecoveryError(RuntimeError):
    """A failure that this run cannot recover from (no policy, or no loadable checkpoint)."""


class EarlierRunError(ValueError):
    """A new run was pointed at a checkpoint folder holding an earlier run's saves."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class RejoinResult:
    """What `rejoin` did in a re-formed group: `kind` is `partial` (the replaced ranks restored their own
    rows, the survivors kept theirs), `full` (every rank rolled back to the last full save) or `restart` (no
    rank had state: the newest full save, or the initial state). `bytes_read` were read by this process."""

    kind: str
    step: int  # where training goes on
    failed_at: int  # the steps done when the group broke
    bytes_read: int
    replaced: tuple[int, ...]


@dataclass(frozen=True)
class RecoveryResult:
    """What a recovery did; `step` is the step training continues from (earlier than before for `full`)."""

    kind: str
    step: int
    failures: tuple[FailureEvent, ...] = field(default_factory=tuple)


POLICY_PREFIX = "policy/"  # the policy's state tensors in the dense part of a full save
# Subset saves that may wait, copied, for the writer thread behind the save in flight (a few rows each).
QUEUED_SUBSET_SAVES = 4


class _SelectedRows(NamedTuple):
    """A subset save's rows of one table: ascending local ids, their tensors' rows by name (copies), and each
    local domain's [low, high) slice of both."""

    ids: torch.Tensor
    copies: dict[str, torch.Tensor]
    cuts: dict[int, tuple[int, int]]


@dataclass
class _PendingSave:
    """A save whose snapshot is taken and whose parts are being written (or were, when `written` is set),
    then committed: every rank's part records are gathered (`gathered`), the coordinator writes the commit
    in the background (`committing`, the outcome: None or why it failed) and every rank learns the outcome.

    The domains' parts are read from `snapshot` at once (into `parts`), or made by the writer thread: from a
    copy-on-write snapshot (see cpr/snapshot.py), or from a subset's rows copied at the snapshot (`selected`)."""

    decision: SavePlan
    snapshot: RowSnapshot
    parts: dict[str, PartContent]  # the parts taken at the snapshot (the dense part; the domains' unless read later)
    ledger: dict[str, Any] | None  # a full save's copy of this process's record, kept in its first domain part
    extra: dict[str, Any]  # the commit record's: reader position and policy state at the snapshot
    # A subset's rows, copied at the snapshot; the writer thread makes the domain parts of them.
    selected: dict[str, _SelectedRows] | None = None
    counts: dict[str, torch.Tensor] = field(default_factory=dict)  # the access counters the save cleared, given back should it fail
    unsaved: int = 0  # the access counts above, summed: updates that are lost should this save not commit
    future: Future | None = None
    written: tuple | None = None
    gathered: list[tuple[dict[str, WrittenPart], str | None]] | None = None
    data_bytes: int = 0  # the data every rank's parts hold (see CheckpointEvent.data_bytes), once gathered
    committing: Future | None = None
    stall_seconds: float = 0.0  # the training thread's time on this save: snapshot, preserving rows, gathering, settling

    @property
    def parts_made_by_writer(self) -> bool:
        """Whether the writer makes the domain parts (from a copy-on-write snapshot, or from a subset's copied
        rows) rather than the training thread at the snapshot."""
        return self.snapshot.preserving or self.selected is not None

    def write_result(self) -> tuple:
        """This rank's write: (written parts, error or None, staging folder, persist seconds), waiting for the
        writer thread if it is still at it."""
        return self.future.result() if self.future is not None else self.written


class CPRCheckpointer:
    """Checkpointing with partial recovery for a TorchRec model, on one rank or many.

    Args:
        model: a DMP-wrapped model or a plain module holding `EmbeddingBagCollection`s.
        optimizer: the optimizer stepping the model (for DMP, the combined fused + dense optimizer).
        directory: where saves go (shared by every rank); created if missing, must be writable.
        policy: a policy name (`none`, `full`, `partial`, `mfu`, `ssu`, `scar`) or a `CheckpointPolicy`.
        num_shards: failure domains of a one-process run, emulated by splitting every table's rows into
            this many contiguous ranges (default: the profile's). In a multi-rank job the domains are the
            ranks and this must be None or the world size.
        target_pls: the expected portion of lost samples that partial recovery may cost.
        profile: the cluster the run emulates (failure rate, save/load/reschedule costs).
        total_steps: the run's length in steps; the run spans `profile.job_hours` of emulated time.
        reader: the data reader, whose position full recovery rewinds (anything with state_dict).
        interval_steps: overrides the planned save interval.
        keep_last: full saves kept on disk.
        policy_options: extra settings for the prioritized policies (see `cpr.policies.make_policy`).
        resume: continue a run that died (a real crash, not an emulated failure): everything, including
            `global_step` and the reader, starts from the newest loadable full save in `directory`, if any.
        joining: this process replaces a killed rank of a supervised job: it neither saves nor loads here;
            `rejoin`, called with the survivors, brings its state (see `cpr.elastic`).
        coordinator: the ranks' collectives (default: from the initialised process group, if any).
        async_save: write saves in a background thread while training goes on; False writes them inside
            `step()`. A DMP model's full saves are snapshotted copy-on-write (the lookup hook keeps a row's values
            before its step changes them, see cpr/snapshot.py): code that changes rows other than by a
            training step must call `flush()` first (CPR's own recovery and loading do).
        overwrite: a new run (not `resume`) in a folder holding an earlier run's saves deletes them; without
            it that is an error, since mixing two runs' saves would restore rows of the other run.
        quantize: how saves store embedding weights: "none" (raw), "int8" or "int4" (row-wise quantized with
            a scale and bias per row; optimizer state stays raw), or "auto" (the bit width from the job's
            expected restores, see `AUTO_INT4_MAX_RESTORES`). Restores decode them transparently.
        differential: write each periodic full save as a subset save of the rows changed since their last
            save (Check-N-Run's incremental checkpoints); a real full save is written when the chain would
            make a restore read more than twice a full save. For partial-recovery policies only: a full
            rollback needs the dense model and the reader position, which only full saves hold.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        directory: str | Path,
        policy: str | CheckpointPolicy = "partial",
        num_shards: int | None = None,
        target_pls: float = 0.02,
        profile: ClusterProfile | None = None,
        total_steps: int = 1000,
        reader: Stateful | None = None,
        interval_steps: int | None = None,
        keep_last: int = 3,
        policy_options: Mapping[str, Any] | None = None,
        resume: bool = False,
        coordinator: Coordinator | None = None,
        async_save: bool = True,
        overwrite: bool = False,
        quantize: str = "none",
        differential: bool = False,
        joining: bool = False,
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, got {total_steps}")
        self.model = model
        self.optimizer = optimizer
        self.reader = reader
        self.coordinator = coordinator or Coordinator()
        # Optimizers such as Adam create their state at the first step; every save (the initial one too) and
        # every `Stateful` load must find it, so it is created now, as torch.distributed.checkpoint does
        # (a step with zero gradients and learning rate 0; it leaves the parameters as they are).
        _init_optim_state(optimizer)
        self.tables = EmbeddingTables(model, optimizer)
        self.profile = profile or ClusterProfile.preset("production")
        world = self.coordinator.world_size
        if world > 1:
            if num_shards not in (None, world):
                raise ValueError(f"num_shards={num_shards}: in a {world}-rank job the failure domains are the "
                                 f"{world} ranks (emulated row-range shards are for one-process runs)")
            self.layout = ShardLayout.ranks(self.tables.tables, self.coordinator.rank, world)
        else:
            self.layout = ShardLayout.virtual(self.tables.tables,
                                              self.profile.num_shards if num_shards is None else num_shards)
        self.profile = dataclasses.replace(self.profile, num_shards=self.layout.num_shards)  # the plan's N
        self.plan: PlanResult = plan(self.profile, target_pls)
        self.total_steps = total_steps
        self.hours_per_step = self.profile.job_hours / total_steps
        self._table_meta = {
            name: TableMeta(rows=info.local_rows, dim=info.dim, dtype=str(self.tables.weight(name).dtype).removeprefix("torch."))
            for name, info in self.tables.tables.items()
        }
        self.tracker = AccessTracker(
            tables={name: info.local_rows for name, info in self.tables.tables.items()},
            feature_to_table=self.tables.feature_to_table,
            mode="mfu",
        )
        context = PolicyContext(
            profile=self.profile,
            plan=self.plan,
            target_pls=target_pls,
            total_steps=total_steps,
            hours_per_step=self.hours_per_step,
            interval_steps=interval_steps,
            tracker=self.tracker,
            layout=self.layout,
            tables=self.tables,
            options=dict(policy_options or {}),
            coordinator=self.coordinator,
        )
        self.policy = policy if isinstance(policy, CheckpointPolicy) else make_policy(policy, context)
        if differential and self.policy.recovery != "partial":
            raise ValueError(f"differential saves need a partial-recovery policy, not {self.policy.name!r}: a "
                             f"{self.policy.recovery!r} recovery restores from full saves only")
        self.differential = differential
        self.weight_codec = weight_codec(quantize, self.profile.expected_failures,
                                         {t: (meta.dtype, meta.dim) for t, meta in self._table_meta.items()})
        # Sharded models report the rows each rank's shards serve; plain modules are observed per batch.
        self._hooked = hook_served_lookups(model, self._record_lookups)
        # A hooked lookup of fused tables in host memory comes before its step changes the rows, so an
        # asynchronous full save snapshots them copy-on-write (see cpr/snapshot.py); otherwise it copies them
        # at once.
        copy_on_write = self._hooked and self.tables.fused and RowSnapshot.supports_copy_on_write(self._row_tensors())
        self._snapshot_mode: SnapshotMode = "view" if not async_save else "copy_on_write" if copy_on_write else "copy"
        # The coordinator's store holds the folder's lock; every rank stages its parts under the coordinator's tag.
        self.store = CheckpointStore(directory, keep_last=keep_last, lock=self.coordinator.is_coordinator)
        self._pending: _PendingSave | None = None
        # Subset saves decided while a save is in flight, to be written after it (see `_may_queue`), oldest first.
        self._queued: collections.deque[_PendingSave] = collections.deque()
        # One writer thread: saves are written one after the other, in the order they were decided.
        self._executor = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpr-save",
                                             initializer=one_intraop_thread) if async_save else None)
        try:
            self._open(model, optimizer, resume, overwrite, joining)
        except BaseException:
            # A constructor that fails (a rank died during the initial save, an earlier run's saves) must not
            # keep the folder's lock: the next checkpointer of this process, or another run, needs it.
            self.close(flush=False)
            raise

    def _open(self, model: nn.Module, optimizer: torch.optim.Optimizer, resume: bool, overwrite: bool, joining: bool) -> None:
        """The rest of `__init__` once the folder is locked: the record, and the state training starts from."""
        # (a joining process learns it in `rejoin`, with the survivors)
        self._staging_tag = None if joining else self.coordinator.broadcast(self.store.writer_tag(), site="start.staging_tag")
        own_bytes = self.tables.nbytes()
        if self.coordinator.is_coordinator:
            own_bytes += sum(t.nbytes for t in dense.capture(model, optimizer, self.tables).values())
        self.ledger = RunLedger(
            hours_per_step=self.hours_per_step,
            job_hours=self.profile.job_hours,
            save_hours_full=self.profile.save_seconds / 3600,
            load_hours_full=self.profile.load_seconds / 3600,
            reschedule_hours=self.profile.reschedule_seconds / 3600,
            full_bytes=own_bytes,
        )
        self.global_step = 0
        if joining:
            return
        saves = self.store.saves()
        if resume and self._rollback(saves, resume=True) is not None:
            return
        if saves and not resume:
            if not overwrite:
                raise EarlierRunError(
                    f"checkpoint folder {self.store.directory} holds {len(saves)} saves of an earlier run (newest at "
                    f"step {saves[-1].step}); resume it, or start over deleting them (--overwrite / overwrite=True)")
            self.coordinator.all_gather(None, site="start.overwrite_barrier")  # every rank has looked before the saves go
            if self.coordinator.is_coordinator:
                self.store.discard_after(-1)
        if self.policy.recovery != "none":
            # A failure before the first periodic save must still find the domain's rows somewhere: the
            # initial save is committed before training starts.
            self._save(SavePlan("full", reason="initial state"))
            self.flush()

    # -- training-loop hooks ---------------------------------------------------------------------------
    def observe(self, batch: Batch | KeyedJaggedTensor) -> None:
        """Record the embedding rows a batch looks up (call once per batch, before or after its step).

        A DMP model needs no call: its sharded lookups report the rows each rank serves as they run, so
        this returns at once.
        """
        if self._hooked:
            return
        self._record_lookups(batch.sparse_features if isinstance(batch, Batch) else batch)

    def _record_lookups(self, kjt: KeyedJaggedTensor) -> None:
        self.tracker.observe(kjt)
        self.policy.observe(kjt)
        self.ledger.record_updates(int(kjt.values().numel()))
        pending = self._pending
        if pending is not None and pending.snapshot.preserving:
            started = time.perf_counter()
            pending.snapshot.preserve_lookups(kjt, self.tracker.feature_to_table)
            pending.stall_seconds += time.perf_counter() - started

    def step(self) -> SavePlan | None:
        """Count one finished training step; commit a save whose background write has finished, and start
        the save the policy asks for now. Returns that decision, or None. A save that fails is reported and
        abandoned when it would commit, never raised: the next one retries."""
        self.global_step += 1
        self._poll_pending()
        decision = self.policy.decide(self.global_step)
        if self.global_step == self.total_steps:
            # The job's last step: no failure of this job can follow, so a save now would protect nothing
            # (the final model is the caller's to keep: `state_dict()` or dcp.save of the model).
            decision = None
        if decision is not None:
            queue = self._may_queue(decision)
            if not queue:
                self.flush()  # the save in flight commits first (its commit may be changing the folder's saves)
            decision = self._written_as(decision)
            self._save(decision, queue=queue)
        return decision

    def flush(self) -> None:
        """Wait for the saves in flight, if any, and commit them in order (collective)."""
        while self._pending is not None:
            self._commit(self._pending)

    def _may_queue(self, decision: SavePlan) -> bool:
        """Whether `decision` is snapshotted now and written after the saves in flight, rather than waiting for
        them to commit: a policy's subset save (its few rows are copied at once), up to QUEUED_SUBSET_SAVES of
        them. A full save takes the writer for a while, and a prioritized policy's next subsets are often due
        meanwhile; a full save itself waits (its snapshot may be copy-on-write, for one save at a time). The
        answer is the same on every rank: saves in flight are settled collectively."""
        return (decision.kind == "subset" and self._executor is not None and self._pending is not None
                and len(self._queued) < QUEUED_SUBSET_SAVES)

    def _in_flight(self) -> list[_PendingSave]:
        """The save in flight and those queued behind it, oldest first."""
        return [self._pending, *self._queued] if self._pending is not None else []

    def _advance(self) -> None:
        """The save in flight is settled: the oldest one queued behind it, if any, is in flight now."""
        self._pending = self._queued.popleft() if self._queued else None

    # -- saving -----------------------------------------------------------------------------------------
    def _written_as(self, decision: SavePlan | None) -> SavePlan | None:
        """The save to write for the policy's `decision`: with `differential`, a periodic full save becomes a
        subset save of the rows changed since their last save (the tracker's dirty rows), unless the chain
        since the last real full save has grown too long.

        The bound: restoring a domain reads its part of the newest full save and of every subset save after
        it (the policy's own subsets too). A differential is written only while, for every domain, those
        subsets' bytes plus the differential's stay within the domain's part of the full save, so a restore
        reads at most twice a full save; otherwise the save is a real full one, which starts a new chain.
        Differential saves rely on a row changing only when it is looked up: true of TorchRec's fused sparse
        optimizers, not of a dense optimizer with momentum (such as Adam) stepping rows it did not look up.
        """
        if decision is None or decision.kind != "full" or not self.differential:
            return decision
        saves = self.store.saves()
        fulls = [s for s in saves if s.kind == "full"]
        if not fulls:
            return decision
        chain = [s for s in saves if s.kind == "subset" and s.step > fulls[-1].step]
        rows: dict[str, list[torch.Tensor]] = {}
        new_bytes: dict[str, int] = {}
        for domain in self.layout.local:
            new_bytes[domain_part(domain)] = 0
            for table, held in self.layout.held(domain).items():
                ids = self.tracker.dirty_rows(table, held)
                rows.setdefault(table, []).append(ids)
                per_row = codecs.stored_nbytes(self.weight_codec, self.tables.weight(table).dtype,
                                               (1, self._table_meta[table].dim))
                per_row += sum(state[0].nbytes for state in self.tables.row_states(table).values()) + 8  # + the id
                new_bytes[domain_part(domain)] += ids.numel() * per_row
        every_domain = {part: n for gathered in self.coordinator.all_gather(new_bytes, site="save.differential_sizes") for part, n in gathered.items()}
        for part, n in every_domain.items():
            chain_bytes = sum(s.parts[part].nbytes for s in chain if part in s.parts)
            if part in fulls[-1].parts and chain_bytes + n > fulls[-1].parts[part].nbytes:
                return dataclasses.replace(decision, reason=f"{decision.reason}; a full save ends the differential "
                                           f"chain since step {fulls[-1].step}")
        dirty = {table: torch.cat(ids) for table, ids in rows.items()}
        return SavePlan("subset", rows={t: ids for t, ids in dirty.items() if ids.numel()},
                        reason=f"differential: {decision.reason}", differential=True)

    def _row_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every local table's live per-row tensors (weight, row-wise optimizer state) by their save names."""
        return {table: {weight_name(table): self.tables.weight(table),
                        **{state_name(table, s): v for s, v in self.tables.row_states(table).items()}}
                for table in self.tables.tables}

    def _domain_parts(self, pending: _PendingSave) -> Iterator[tuple[str, PartContent]]:
        """This process's domain parts of a save, made one part at a time from its snapshot (a subset's from its
        `selected` rows)."""
        decision = pending.decision
        for i, domain in enumerate(self.layout.local):
            content = self._domain_part(domain, decision, pending.selected or {}, pending.snapshot)
            if content is not None and i == 0 and pending.ledger is not None:
                # This process's record of the run so far: a resumed run continues it (every rank keeps its own).
                content = dataclasses.replace(content, extra={"ledger": pending.ledger})
            if content is not None:
                yield domain_part(domain), content

    def _domain_part(self, domain: int, decision: SavePlan, selected: Mapping[str, _SelectedRows],
                     snapshot: RowSnapshot) -> PartContent | None:
        """Domain `domain`'s rows (all of them, or its share of a subset's `selected` rows) with their
        row-wise state; the weights stored with `weight_codec`."""
        tensors: dict[str, torch.Tensor] = {}
        tables: dict[str, TableMeta] = {}
        rows: dict[str, tuple[int, int]] = {}
        chunks: dict[str, Chunk] = {}
        for table, (start, end) in self.layout.held(domain).items():
            if decision.kind == "full":
                tensors.update(snapshot.rows(table, start, end))
                info = self.tables.tables[table]
                chunks.update(table_chunks(table, info.state_key, info.rows, self.layout.global_rows(table, domain)[0],
                                           tensors))
            else:
                if table not in selected:
                    continue
                ids, copies, cuts = selected[table]
                low, high = cuts[domain]
                if low == high:
                    continue
                tensors[ids_name(table)] = ids[low:high] - start
                tensors.update({name: rows_copy[low:high] for name, rows_copy in copies.items()})
            tables[table] = dataclasses.replace(self._table_meta[table], rows=end - start)
            rows[table] = self.layout.global_rows(table, domain)
        if decision.kind == "subset" and not tensors:
            return None
        stored = {weight_name(table): self.weight_codec for table in tables} if self.weight_codec != "raw" else {}
        return PartContent(tensors, tables, rows, codecs=stored, chunks=chunks)

    def _selected_rows(self, decision: SavePlan, snapshot: RowSnapshot) -> dict[str, _SelectedRows]:
        """A subset save's rows of each local table read from the snapshot (one index_select per tensor, not
        one per domain): ascending ids, the copies by tensor name, and each local domain's slice of them."""
        selected = {}
        for table, ids in decision.rows.items():
            if table not in self.tables.tables:
                continue
            ids = ids.to(torch.int64).sort().values
            copies = snapshot.select(table, ids)
            bounds = torch.tensor([self.layout.ranges[table][d] for d in self.layout.local], dtype=torch.int64)
            cuts = dict(zip(self.layout.local, map(tuple, torch.searchsorted(ids, bounds.reshape(-1, 2)).tolist())))
            selected[table] = _SelectedRows(ids, copies, cuts)
        return selected

    def _save(self, decision: SavePlan, queue: bool = False) -> None:
        """Snapshot what `decision` saves, then persist it (in the background, or here with `async_save`
        off) and commit it once every rank's parts are durable. A decision made while a save is in flight
        first waits for it to commit, unless it is `queue`d behind it (see `_may_queue`)."""
        if not queue:
            self.flush()
        started = time.perf_counter()
        step = self.global_step
        policy_state = self.policy.state_dict()
        policy_tensors = {k: v for k, v in policy_state.items() if isinstance(v, torch.Tensor)}
        # A subset's few rows cost less to copy now than a copy-on-write snapshot's bookkeeping of every row.
        mode = "copy" if decision.kind == "subset" and self._snapshot_mode == "copy_on_write" else self._snapshot_mode
        pending = _PendingSave(
            decision=dataclasses.replace(decision, step=step),
            snapshot=RowSnapshot(self._row_tensors(), mode),
            parts={},
            ledger=self.ledger.state_dict() if decision.kind == "full" else None,
            extra={"reader": self.reader.state_dict() if self.reader is not None else None,
                   "policy": {k: v for k, v in policy_state.items() if k not in policy_tensors},
                   "reason": decision.reason, "every_row": decision.saves_every_row},
        )
        if decision.kind == "subset":
            pending.selected = self._selected_rows(decision, pending.snapshot)  # copied now: training changes the rows next
        if not pending.parts_made_by_writer:
            pending.parts.update(self._domain_parts(pending))  # read now, for the same reason
        if decision.kind == "full" and self.coordinator.is_coordinator:
            snapshot = dense.capture(self.model, self.optimizer, self.tables)
            pending.parts[DENSE_PART] = PartContent(
                {**snapshot, **{POLICY_PREFIX + k: v for k, v in policy_tensors.items()}}, chunks=dense.chunks(snapshot))
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

    def _take_marks(self, decision: SavePlan) -> dict[str, torch.Tensor]:
        """Mark the rows `decision` saves as saved (their access counters restart from 0) and return the
        counters this cleared, to give back should the save fail."""
        if decision.kind == "full":
            return self.tracker.take_counts()
        taken = {}
        for table, ids in decision.rows.items():
            if table in self.tables.tables:
                taken[table] = self.tracker.counts(table, rows=ids)
                self.tracker.mark_saved(table, rows=ids)
        return taken

    def _persist(self, pending: _PendingSave) -> tuple[dict[str, WrittenPart], str | None, Path | None, float]:
        """Write this process's parts into the save's staging folder: (parts, error, staging, seconds)."""
        started = time.perf_counter()
        decision = pending.decision
        written: dict[str, WrittenPart] = {}
        error, staging = None, None
        # The domain parts come first: training stops preserving rows for a copy-on-write snapshot sooner.
        parts = itertools.chain(self._domain_parts(pending) if pending.parts_made_by_writer else (),
                                pending.parts.items())
        try:
            staging = self.store.stage(decision.step, decision.kind, self._staging_tag)
            for name, content in parts:
                written[name] = self.store.write_part(staging, name, decision.step, decision.kind,
                                                      self.policy.name, content)
        except OSError as err:  # disk full, permission lost, quota: abandon this save, keep training
            error = f"rank {self.coordinator.rank}: {type(err).__name__}: {err}"
        finally:
            pending.snapshot.release()
        return written, error, staging, time.perf_counter() - started

    def _poll_pending(self) -> None:
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

    def _commit(self, pending: _PendingSave) -> None:
        """Wait for this process's parts and the coordinator's commit, and settle the save (collective)."""
        started = time.perf_counter()
        if pending.gathered is None:
            self._gather(pending)
        if self._pending is pending:
            if pending.committing is not None:
                pending.committing.exception()  # wait (an error surfaces in `_settle`)
            pending.stall_seconds += time.perf_counter() - started
            self._settle(pending)

    def _gather(self, pending: _PendingSave) -> None:
        """Wait for this process's parts and gather every rank's written parts; the coordinator then starts
        the commit (in the background with `async_save`), or abandons the save if a rank failed to write.

        Should a rank die meanwhile (CoordinationError), the save stays pending: `rejoin` settles it."""
        written, error, staging, _ = pending.write_result()
        gathered = self.coordinator.all_gather((written, error), site="save.gather_parts")
        pending.gathered = gathered
        pending.data_bytes = sum(part.manifest.data_nbytes for parts, _ in gathered for part in parts.values())
        errors = [e for _, e in gathered if e]
        if pending.decision.kind == "subset" and not errors and not any(r for r, _ in gathered):
            self._advance()
            if self.coordinator.is_coordinator and staging is not None:
                self.store.abandon(staging)
            return  # no rank had a row to save: nothing to commit
        if not self.coordinator.is_coordinator:
            return
        if errors and staging is not None:
            self.store.abandon(staging)
        if self._executor is not None and not errors:
            pending.committing = self._executor.submit(self._commit_files, pending, staging)
        else:
            pending.committing = Future()
            pending.committing.set_result(errors[0] if errors else self._commit_files(pending, staging))

    def _commit_files(self, pending: _PendingSave, staging: Path | None) -> str | None:
        """The coordinator's commit of a save whose every part is durable (DCP metadata, commit record,
        rename, retention): None, or why it failed (the staging folder is then gone)."""
        try:
            self.store.commit(
                staging, pending.decision.step, pending.decision.kind, self.policy.name,
                {name: part for written, _ in pending.gathered for name, part in written.items()},
                world_size=self.coordinator.world_size, domain_mode=self.layout.mode,
                num_domains=self.layout.num_shards, extra={**pending.extra, "data_bytes": pending.data_bytes},
            )
        except OSError as err:
            return f"commit: {type(err).__name__}: {err}"
        return None

    def _settle(self, pending: _PendingSave) -> None:
        """Every rank learns the coordinator's outcome: the save is recorded, or undone everywhere (the
        marks and the policy's bookkeeping its snapshot made)."""
        started = time.perf_counter()
        step, kind = pending.decision.step, pending.decision.kind
        outcome = self.coordinator.broadcast(pending.committing.result() if self.coordinator.is_coordinator else None,
                                             site="save.settle_outcome")
        self._advance()
        if outcome is not None:
            self._undo_save(pending, outcome)
            if self.coordinator.is_coordinator:
                print(f"warning: the step-{step} {kind} save failed and was abandoned ({outcome}); training "
                      "goes on and the next save retries", file=sys.stderr)
            return
        persist_seconds = pending.write_result()[3]
        self.ledger.record_save(step, kind, sum(w.record.nbytes for written, _ in pending.gathered for w in written.values()),
                                pending.stall_seconds + time.perf_counter() - started, persist_seconds, pending.data_bytes)

    def _undo_save(self, pending: _PendingSave, error: str) -> None:
        """A save that will never commit: its accesses are unsaved again and the policy decides anew."""
        self.ledger.record_failed_save(pending.decision.step, pending.decision.kind, error)
        for table, counts in pending.counts.items():
            self.tracker.add_counts(table, counts, rows=None if pending.decision.kind == "full" else pending.decision.rows[table])
        self.policy.save_failed(pending.decision)

    def unsaved_updates(self) -> int:
        """Row-updates this process's rows made since their last committed save: what its death would lose."""
        return self.tracker.pending_total() + sum(p.unsaved for p in self._in_flight())

    # -- recovery ---------------------------------------------------------------------------------------
    def recover(self, failed_shards: Sequence[int]) -> RecoveryResult:
        """Recover from the failure of `failed_shards` (domains: ranks, or emulated shards) as the policy
        prescribes. Collective: every rank calls it with the same domains.

        `partial`: each failed domain's rows and optimizer state get their newest saved version; nothing
        else changes and training goes on at the same step. `full`: everything returns to the last full
        save, including the step and the reader; the caller re-creates its batch iterator and trains the
        lost steps again.
        """
        for shard in failed_shards:
            self.layout.check(shard)
        if self.policy.recovery == "none":
            raise RecoveryError(f"policy {self.policy.name!r} keeps no checkpoint, so shard failures cannot be recovered")
        # An emulated failure strikes between saves: the save in flight is completed first, so a seeded run
        # restores from the same saves however fast the disk is (a real failure would lose the dying
        # domain's part of that save, and the save with it).
        self.flush()
        saves = self.store.saves()  # every commit record parsed once per recovery
        if self.policy.recovery == "full":
            return self._recover_full(failed_shards, saves)
        return self._recover_partial(failed_shards, saves)

    def _load_full(self, save: SaveInfo) -> dict[str, LoadedPart]:
        """This process's domain parts and the dense part of one full save, checked against this job."""
        if (save.world_size, save.domain_mode, save.num_domains) != (self.coordinator.world_size, self.layout.mode,
                                                                      self.layout.num_shards):
            raise CheckpointMismatchError(
                f"{save.folder} was written by a job with world size {save.world_size} and {save.num_domains} "
                f"{save.domain_mode} domains; this job has world size {self.coordinator.world_size} and "
                f"{self.layout.num_shards} {self.layout.mode} domains")
        loaded = {}
        for domain in self.layout.local:
            part = domain_part(domain)
            loaded[part] = self.store.load_part(save, part)
            check_part_rows(loaded[part], {t: self.layout.global_rows(t, domain) for t in self.layout.held(domain)})
        loaded[DENSE_PART] = self.store.load_part(save, DENSE_PART)
        return loaded

    def _rollback(self, saves: Sequence[SaveInfo], resume: bool = False) -> tuple[int, int] | None:
        """Return everything to the newest full save every rank can load; (its step, bytes read here), or
        None if there is no full save at all. With `resume` (a restart after a crash) the run's record, kept
        in the save, is taken back too; an emulated full recovery keeps counting on the live record."""
        fulls = [s for s in saves if s.kind == "full"]
        skipped = []
        for save in reversed(fulls):
            loaded, problem, mismatch = None, None, None
            try:
                loaded = self._load_full(save)
            except CheckpointMismatchError as err:
                mismatch = str(err)
            except (CorruptCheckpointError, KeyError) as err:
                problem = str(err)
            statuses = self.coordinator.all_gather((problem, mismatch), site="rollback.load_status")
            mismatches = [m for _, m in statuses if m]
            if mismatches:
                raise CheckpointMismatchError(mismatches[0])
            problems = [p for p, _ in statuses if p]
            if problems:
                warnings.warn(f"skipping save, falling back to an older one: {problems[0]}", SkippedSaveWarning, stacklevel=3)
                skipped.append(save.folder.name)
                continue
            self._apply_full(loaded)
            if self.reader is not None and save.extra.get("reader") is not None:
                self.reader.load_state_dict(save.extra["reader"])
            self.global_step = save.step
            policy_state = dict(save.extra.get("policy") or {})
            policy_state.update({k.removeprefix(POLICY_PREFIX): v for k, v in loaded[DENSE_PART].tensors.items()
                                 if k.startswith(POLICY_PREFIX)})
            self.policy.load_state_dict(policy_state, save.step)
            if resume:
                self._resume_record(save, loaded)
            for table in self.tables.tables:
                self.tracker.mark_saved(table)  # the model is its saved self again: nothing is pending
            self.coordinator.all_gather(None, site="rollback.read_barrier")  # every rank has read the save before any newer one goes
            if self.coordinator.is_coordinator:
                self.store.discard_after(save.step)  # saves past the rollback point describe a future that is gone
            return save.step, sum(part.bytes_read for part in loaded.values())
        if skipped:
            raise CorruptCheckpointError(self.store.directory, ", ".join(skipped), "no loadable full save remains")
        return None

    def _resume_record(self, save: SaveInfo, loaded: Mapping[str, LoadedPart]) -> None:
        """Continue the record the save holds: everything up to it, and the save itself."""
        state = next((part.manifest.extra["ledger"] for part in loaded.values() if "ledger" in part.manifest.extra), None)
        if state is None:
            return
        self.ledger.load_state_dict(state)
        self.ledger.record_save(save.step, save.kind, save.nbytes, 0.0, data_bytes=save.extra.get("data_bytes"))

    def _apply_full(self, loaded: Mapping[str, LoadedPart]) -> None:
        with torch.no_grad():
            for domain in self.layout.local:
                tensors = loaded[domain_part(domain)].tensors
                for table, (start, end) in self.layout.held(domain).items():
                    self.tables.weight(table)[start:end].copy_(tensors[weight_name(table)])
                    for state, value in self.tables.row_states(table).items():
                        value[start:end].copy_(tensors[state_name(table, state)])
        dense.restore(loaded[DENSE_PART].tensors, self.model, self.optimizer, self.tables)

    def _recover_full(self, failed_shards: Sequence[int], saves: Sequence[SaveInfo]) -> RecoveryResult:
        events, _ = self._roll_back_for(failed_shards, self.global_step, saves)
        return RecoveryResult("full", self.global_step, events)

    def _roll_back_for(self, failed: Sequence[int], failed_at: int,
                       saves: Sequence[SaveInfo]) -> tuple[tuple[FailureEvent, ...], int]:
        """Full recovery from the failure of domains `failed` after `failed_at` steps: roll back and record it
        (the lost steps and the job's bytes read go to the first failure); (the events, bytes read here)."""
        rolled_back = self._rollback(saves)
        if rolled_back is None:
            raise RecoveryError(f"no loadable full checkpoint in {self.store.directory}")
        step, loaded_here = rolled_back
        loaded_bytes = int(self.coordinator.sum(loaded_here, site="recover.full.bytes_read"))
        events = tuple(
            FailureEvent(failed_at, domain, "full", step, lost_updates=0, lost_steps=failed_at - step if i == 0 else 0,
                         loaded_bytes=loaded_bytes if i == 0 else 0)
            for i, domain in enumerate(failed)
        )
        for event in events:
            self.ledger.record_failure(event)
        return events, loaded_here

    def _restore_domain(self, shard: int, saves: Sequence[SaveInfo]) -> tuple[int, int, int]:
        """Reload domain `shard`'s newest saved rows here; (lost updates, oldest restored step, bytes read)."""
        held = self.layout.held(shard)
        restored = restore_domain(
            self.store, saves, domain_part(shard),
            rows={t: self.layout.global_rows(t, shard) for t in held},
            state_names={t: list(self.tables.row_states(t)) for t in held},
        )
        lost, oldest = 0, self.global_step
        with torch.no_grad():
            for table, (start, end) in held.items():
                lost += int(self.tracker.counts(table)[start:end].sum())
                rows = restored.rows[table]
                self.tables.weight(table)[start:end].copy_(rows["weight"])
                for state, value in self.tables.row_states(table).items():
                    value[start:end].copy_(rows[f"opt/{state}"])
                oldest = min(oldest, int(restored.saved_step[table].min()))
                self.tracker.mark_saved(table, row_range=(start, end))
        return lost, oldest, restored.bytes_read

    def _recover_partial(self, failed_shards: Sequence[int], saves: Sequence[SaveInfo]) -> RecoveryResult:
        events = []
        for shard in failed_shards:
            outcome, problem = (0, self.global_step, 0), None
            if shard in self.layout.local:
                try:
                    outcome = self._restore_domain(shard, saves)
                except (CorruptCheckpointError, FileNotFoundError, CheckpointMismatchError) as err:
                    problem = str(err)
            gathered = self.coordinator.all_gather((problem, outcome), site="recover.partial.outcome")
            problems = [p for p, _ in gathered if p]
            if problems:
                raise RecoveryError(f"shard {shard} cannot be restored: {problems[0]}")
            event = FailureEvent(self.global_step, shard, "partial", min(o[1] for _, o in gathered),
                                 lost_updates=sum(o[0] for _, o in gathered), lost_steps=0,
                                 loaded_bytes=sum(o[2] for _, o in gathered))
            self.ledger.record_failure(event)
            events.append(event)
        return RecoveryResult("partial", self.global_step, tuple(events))

    # -- real failures: a rank's process died and was replaced (see cpr.elastic) ------------------------
    def reattach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Move this surviving rank's state into `model` and `optimizer`, the same model rebuilt with the same
        plan around the re-formed process group: rows, row-wise and dense optimizer state are copied in
        memory (nothing is read from a save), lookups are tracked on the new model, and CPR's collectives
        use the new group. The save in flight finishes writing here; `rejoin` settles whether it committed."""
        for pending in self._in_flight():
            if pending.future is not None:
                pending.future.exception()  # wait for this rank's parts (errors are in its result)
            if pending.committing is not None:
                pending.committing.exception()  # and for the coordinator's commit: the folder is settled
        _init_optim_state(optimizer)
        retained = dense.capture(self.model, self.optimizer, self.tables)
        self.tables.move_to(model, optimizer)
        dense.restore(retained, model, optimizer, self.tables)
        self.model, self.optimizer = model, optimizer
        self._hooked = hook_served_lookups(model, self._record_lookups)
        self.coordinator.reform()

    def rejoin(self, has_state: bool, replaced_progress: Mapping[int, tuple[int, int]]) -> RejoinResult:
        """Bring every rank of a re-formed group to one state. Collective: survivors call it after `reattach`
        with `has_state`, replacements (created with `joining=True`) without.

        `replaced_progress[rank]` is what each replaced rank last published, (row-updates served, updates
        since their rows' saves): the replacement continues the count, the loss goes into the record.
        Under a partial-recovery policy a replacement restores its own domains' newest saved rows and takes
        the step, reader position, dense model and optimizer, policy state and the job's record from the
        lowest surviving rank; survivors change nothing. Under `full` every rank rolls back to the last full
        save. With no survivor at all the job restarts from its newest full save (or its initial state).
        """
        states = self.coordinator.all_gather((has_state, self.global_step), site="rejoin.states")
        saves = self.store.saves()  # every survivor has finished its commit attempt: the folder is settled
        self._settle_interrupted_save(saves)
        self._staging_tag = self.coordinator.broadcast(self.store.writer_tag(), site="rejoin.staging_tag")
        survivors = [rank for rank, (alive, _) in enumerate(states) if alive]
        replaced = tuple(rank for rank, (alive, _) in enumerate(states) if not alive)
        if not has_state and self.coordinator.rank in replaced_progress:
            self.ledger.total_updates = replaced_progress[self.coordinator.rank][0]
        if not survivors:
            rolled_back = self._rollback(saves, resume=True)
            if rolled_back is None:
                self._save(SavePlan("full", reason="initial state"))
                self.flush()
            return RejoinResult("restart", self.global_step, max(step for _, step in states),
                                rolled_back[1] if rolled_back else 0, replaced)
        source = survivors[0]
        self.ledger.adopt_events(self.coordinator.broadcast(self.ledger, src=source, site="rejoin.ledger"))
        failed_at = states[source][1]
        if self.policy.recovery == "full":
            _, bytes_read = self._roll_back_for(replaced, failed_at, saves)
            return RejoinResult("full", self.global_step, failed_at, bytes_read, replaced)
        if self.policy.recovery == "none":
            raise RecoveryError(f"policy {self.policy.name!r} keeps no checkpoint: rank(s) {list(replaced)} cannot be restored")
        live = self.coordinator.broadcast(self._live_state() if self.coordinator.rank == source else None, src=source,
                                          site="rejoin.live_state")
        outcome, problem = (0, failed_at), None
        if not has_state:
            try:
                outcome = self._adopt_live_state(live, saves)
            except (CorruptCheckpointError, FileNotFoundError, CheckpointMismatchError, KeyError) as err:
                problem = str(err)
        self.global_step = failed_at
        gathered = self.coordinator.all_gather((problem, outcome), site="rejoin.outcome")
        problems = [p for p, _ in gathered if p]
        if problems:
            raise RecoveryError(f"rank(s) {list(replaced)} cannot be restored: {problems[0]}")
        for rank in replaced:
            self.ledger.record_failure(FailureEvent(
                failed_at, rank, "partial", gathered[rank][1][1],
                lost_updates=replaced_progress.get(rank, (0, 0))[1], lost_steps=0, loaded_bytes=gathered[rank][1][0]))
        return RejoinResult("partial", failed_at, failed_at, outcome[0], replaced)

    def _settle_interrupted_save(self, saves: Sequence[SaveInfo]) -> None:
        """Each save in flight when the group broke (and each queued behind it) committed everywhere or nowhere:
        `saves`, the folder's committed saves, say which."""
        interrupted = self._in_flight()
        self._pending = None
        self._queued.clear()
        for pending in interrupted:
            step, kind = pending.decision.step, pending.decision.kind
            committed = next((s for s in saves if (s.step, s.kind) == (step, kind)), None)
            if committed is not None:
                self.ledger.record_save(step, kind, committed.nbytes, pending.stall_seconds,
                                        data_bytes=committed.extra.get("data_bytes"))
                continue
            self._undo_save(pending, "a rank died before the save committed")
            staging = pending.write_result()[2]
            if self.coordinator.is_coordinator and staging is not None:
                self.store.abandon(staging)  # (a replaced coordinator's staging folder goes as a dead writer's)

    def _live_state(self) -> dict[str, Any]:
        """What a replacement takes from a survivor: everything but the rows, as training has it now."""
        return {
            "step": self.global_step,
            "reader": self.reader.state_dict() if self.reader is not None else None,
            "dense": dense.capture(self.model, self.optimizer, self.tables),
            "policy": self.policy.state_dict(),
        }

    def _adopt_live_state(self, live: Mapping[str, Any], saves: Sequence[SaveInfo]) -> tuple[int, int]:
        """A replacement's state: its domains' newest saved rows, the survivor's everything else; (bytes read,
        oldest restored step)."""
        self.global_step = int(live["step"])
        if self.reader is not None and live["reader"] is not None:
            self.reader.load_state_dict(live["reader"])
        dense.restore(live["dense"], self.model, self.optimizer, self.tables)
        bytes_read, oldest = 0, self.global_step
        for domain in self.layout.local:
            _, domain_oldest, domain_bytes = self._restore_domain(domain, saves)
            bytes_read, oldest = bytes_read + domain_bytes, min(oldest, domain_oldest)
        # The policy's schedule counts from the newest save holding every row, as the survivors' does.
        every_row = [s.step for s in saves if s.kind == "full" or s.extra.get("every_row")]
        self.policy.load_state_dict(live["policy"], max(every_row, default=0))
        return bytes_read, oldest

    def close(self, flush: bool = True) -> None:
        """Commit the save in flight (unless `flush` is False: then it is dropped), stop the writer thread and
        release the checkpoint folder (its lock) so another run may use it (the lock also goes at process exit)."""
        if flush:
            self.flush()
        if self._executor is not None:
            self._executor.shutdown()
        self.store.close()

    # -- Stateful ---------------------------------------------------------------------------------------
    def _full_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {name: value for named in self._row_tensors().values() for name, value in named.items()}
        tensors.update(dense.capture(self.model, self.optimizer, self.tables))
        return tensors

    def state_dict(self) -> dict[str, Any]:
        """Everything a restart needs: rows, row-wise and dense optimizer state, RNG, step, reader, tracker.

        Follows the `Stateful` protocol of `torch.distributed.checkpoint` (`dcp.save({"cpr": ckpt})`).
        """
        return {
            "tensors": self._full_tensors(),
            "step": self.global_step,
            "reader": self.reader.state_dict() if self.reader is not None else {},
            "tracker": self.tracker.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        tensors = state["tensors"]
        with torch.no_grad():
            for table in self.tables.tables:
                self.tables.weight(table).copy_(tensors[weight_name(table)])
                for name, value in self.tables.row_states(table).items():
                    value.copy_(tensors[state_name(table, name)])
        dense.restore(tensors, self.model, self.optimizer, self.tables)
        self.global_step = int(state["step"])
        if self.reader is not None and state.get("reader"):
            self.reader.load_state_dict(dict(state["reader"]))
        self.tracker.load_state_dict(state["tracker"])

    # -- reporting --------------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """The job's accounting: saves, failures, bytes, PLS (expected and measured), overhead. Collective:
        every rank's counts are added up, so every rank gets the same report. Commits the save in flight."""
        self.flush()
        ledger = RunLedger.merged(self.coordinator.all_gather(self.ledger, site="report.ledgers"))
        summary = ledger.summary()
        summary["policy"] = self.policy.name
        summary["policy_settings"] = self.policy.settings()
        summary["world_size"] = self.coordinator.world_size
        summary["domains"] = self.layout.mode
        summary["domains_description"] = self.layout.describe()
        summary["num_shards"] = self.layout.num_shards
        summary["pls_expected"] = (
            self.policy.expected_pls(len(ledger.failures), self.layout.num_shards, self.total_steps)
            if self.policy.recovery == "partial"
            else 0.0
        )
        summary["plan"] = dataclasses.asdict(self.plan)
        summary["tracking_bytes"] = self.coordinator.sum(self.tracker.memory_bytes(), site="report.tracking_bytes")
        summary["policy_memory_bytes"] = self.coordinator.sum(self.policy.memory_bytes(), site="report.policy_bytes")
        return summary
