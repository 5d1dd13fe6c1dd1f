"""`CPRCheckpointer`: the façade that wires access tracking, a policy, saving, storage and recovery.

Data flows one way. The rows each batch looks up go to the access tracker (from TorchRec's post-lookup
hook for a sharded model, or `observe` for a plain one); after each step the policy decides whether and
what to save (`step`); the save pipeline (`cpr.save`) snapshots, persists and commits it. On a failure
(`recover`) the strategy of the policy's recovery kind (`cpr.recovery`) decides what comes back from
storage: for `full`, every tensor, the step and the reader position of the last full save; for `partial`,
only the failed domains' rows and their optimizer state, while everything else goes on.

In a multi-rank job every rank creates its own `CPRCheckpointer` and calls `step`, `recover` and `report`
in the same order: they are collective (bounded by the coordinator's timeout).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cpr.accounting import RunLedger
from cpr.comm import Coordinator
from cpr.domains import DomainLayout
from cpr.planning import ClusterProfile
from cpr.planning.clock import EmulatedClock, RealClock
from cpr.policies import make_policy
from cpr.policies.base import CheckpointPolicy, PolicyContext, SaveDecision
from cpr.realtime import RunClock
from cpr.recovery import STRATEGIES, RecoveryResult, RejoinResult, Restorer, rejoin, start_run
from cpr.save import Differential, PartMaker, SavePipeline
from cpr.snapshot import RowSnapshot
from cpr.state import TrainingState
from cpr.storage import CheckpointStore
from cpr.tables import EmbeddingTables
from cpr.tracking import AccessTracker
from cpr.tracking.lookups import hook_served_lookups


class CPRCheckpointer:
    """Checkpointing with partial recovery for a TorchRec model, on one rank or many.

    Args:
        model: a DMP-wrapped model or a plain module holding `EmbeddingBagCollection`s.
        optimizer: the optimizer stepping the model (for DMP, the combined fused + dense optimizer).
        directory: where saves go (shared by every rank; created if missing, must be writable; a local path
            or an fsspec URL), or a `CheckpointStore` to save through (this checkpointer closes it).
        policy: a policy name (`none`, `full`, `partial`, `mfu`, `ssu`, `scar`) or a `CheckpointPolicy`.
        num_domains: failure domains of a one-process run, emulated by splitting every table's rows into
            this many contiguous ranges (default: the profile's). In a multi-rank job the domains are the
            ranks and this must be None or the world size.
        target_pls: the expected portion of lost samples that partial recovery may cost.
        profile: the cluster the run emulates (failure rate, save/load/reschedule costs).
        total_steps: the run's length in steps; the run spans `profile.job_hours` of emulated time.
        reader: the data reader, whose position full recovery rewinds (anything with state_dict).
        interval_steps: overrides the planned save interval.
        keep_last: full saves kept on disk (when `directory` is not a store).
        policy_options: extra settings for the prioritized policies (see `cpr.policies.make_policy`).
        resume: continue a run that died (a real crash, not an emulated failure): everything, including
            `global_step` and the reader, starts from the newest loadable full save in `directory` (none: an error).
        start_fresh: start at step 0 where the run does not resume (or finds nothing to), setting aside the saves found.
        coordinator: the ranks' collectives (default: from the initialised process group, if any).
        async_save: write saves in a background thread while training goes on; False writes them inside
            `step()`. A DMP model's full saves are snapshotted copy-on-write (the lookup hook keeps a row's values
            before its step changes them, see cpr/snapshot.py): code that changes rows other than by a
            training step must call `flush()` first (CPR's own recovery and loading do).
        overwrite: a new run (not `resume`) in a folder holding an earlier run's saves deletes them; without
            it that is an error, since mixing two runs' saves would restore rows of the other run.
        quantize: how saves store embedding weights: "none" (raw), "int8" or "int4" (row-wise quantized with
            a scale and bias per row; optimizer state stays raw), or "auto" (the bit width from the job's
            expected restores, see `cpr.save.AUTO_INT4_MAX_RESTORES`). Restores decode them transparently.
        differential: write each periodic full save as a subset save of the rows changed since their last
            save (Check-N-Run's incremental checkpoints, see `cpr.save.differential`). For partial-recovery
            policies only: a full rollback needs the dense model and the reader position, which only full
            saves hold.
        joining: this process replaces a killed rank of a supervised job: it neither saves nor loads here;
            `rejoin`, called with the survivors, brings its state (see `cpr.elastic`).
        clock: what plans the run: `EmulatedClock()` (default) or `RealClock(mtbf_hours, nodes)` (see cpr/realtime.py).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        directory: str | os.PathLike | CheckpointStore,
        policy: str | CheckpointPolicy = "partial",
        num_domains: int | None = None,
        target_pls: float = 0.02,
        profile: ClusterProfile | None = None,
        total_steps: int = 1000,
        reader: Stateful | None = None,
        interval_steps: int | None = None,
        keep_last: int = 3,
        policy_options: Mapping[str, Any] | None = None,
        resume: bool = False,
        start_fresh: bool = False,
        coordinator: Coordinator | None = None,
        async_save: bool = True,
        overwrite: bool = False,
        quantize: str = "none",
        differential: bool = False,
        joining: bool = False,
        clock: EmulatedClock | RealClock | None = None,
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, got {total_steps}")
        self.coordinator = coordinator or Coordinator()
        self.state = TrainingState(model, optimizer, reader)
        tables = self.state.tables
        profile = profile or ClusterProfile.preset("production")
        self.layout = self._layout(num_domains, profile)
        self.clock = RunClock(clock, dataclasses.replace(profile, num_domains=self.layout.num_domains), target_pls, total_steps)
        self.profile, self.hours_per_step, self.total_steps = self.clock.profile, self.clock.hours_per_step, total_steps
        self.tracker = AccessTracker(tables={name: info.local_rows for name, info in tables.tables.items()},
                                     feature_to_table=tables.feature_to_table, mode="mfu")
        context = PolicyContext(profile=self.profile, plan=self.clock.plan, target_pls=target_pls, total_steps=total_steps,
                                hours_per_step=self.hours_per_step, interval_steps=interval_steps, tracker=self.tracker,
                                layout=self.layout, tables=tables, options=dict(policy_options or {}),
                                coordinator=self.coordinator)
        self.policy = policy if isinstance(policy, CheckpointPolicy) else make_policy(policy, context)
        strategy = STRATEGIES[self.policy.recovery]
        if differential and not strategy.reads_subset_saves:
            raise ValueError(f"differential saves need a partial-recovery policy, not {self.policy.name!r}: a "
                             f"{self.policy.recovery!r} recovery restores from full saves only")
        parts = PartMaker(self.layout, tables, quantize, self.profile.expected_failures)
        self.weight_codec = parts.weight_codec
        # Sharded models report the rows each rank's shards serve; plain modules are observed per batch.
        self._hooked = hook_served_lookups(model, self._record_lookups)
        # A hooked lookup of fused tables in host memory comes before its step changes the rows, so an
        # asynchronous full save snapshots them copy-on-write (see cpr/snapshot.py); otherwise it copies them.
        copy_on_write = (self._hooked and tables.fused
                         and RowSnapshot.supports_copy_on_write(self.state.row_tensors()))
        snapshot_mode = "view" if not async_save else "copy_on_write" if copy_on_write else "copy"
        # The coordinator's store holds the folder's lock; every rank stages its parts under the coordinator's tag.
        self.store = (directory if isinstance(directory, CheckpointStore)
                      else CheckpointStore(directory, keep_last=keep_last, lock=self.coordinator.is_coordinator))
        self.ledger = self._ledger()
        self.saves = SavePipeline(
            self.state, self.layout, self.store, self.coordinator, self.policy, self.tracker, self.ledger, parts,
            snapshot_mode, async_save,
            rewrite=Differential(self.store, self.tracker, self.layout, parts, self.coordinator) if differential else None)
        self.recovery = strategy(Restorer(self.state, self.layout, self.store, self.coordinator, self.tracker,
                                          self.policy, self.ledger), self.saves, self.policy)
        self.clock.attach(self.policy, context, self.ledger, self.saves.persisting, self.coordinator)
        try:
            start_run(self.recovery, self.saves, resume, overwrite, joining, start_fresh)
        except BaseException:
            # A constructor that fails (a rank died during the initial save, an earlier run's saves) must not
            # keep the folder's lock: the next checkpointer of this process, or another run, needs it.
            self.close(flush=False)
            raise

    def _layout(self, num_domains: int | None, profile: ClusterProfile) -> DomainLayout:
        tables, world = self.state.tables.tables, self.coordinator.world_size
        if world > 1:
            if num_domains not in (None, world):
                raise ValueError(f"num_domains={num_domains}: in a {world}-rank job the failure domains are the "
                                 f"{world} ranks (emulated row-range domains are for one-process runs)")
            return DomainLayout.ranks(tables, self.coordinator.rank, world)
        return DomainLayout.virtual(tables, profile.num_domains if num_domains is None else num_domains)

    def _ledger(self) -> RunLedger:
        own_bytes = self.tables.nbytes()
        if self.coordinator.is_coordinator:
            own_bytes += sum(t.nbytes for t in self.state.capture_dense().values())
        return RunLedger(hours_per_step=self.hours_per_step, job_hours=self.profile.job_hours,
                         save_hours_full=self.profile.save_seconds / 3600, load_hours_full=self.profile.load_seconds / 3600,
                         reschedule_hours=self.profile.reschedule_seconds / 3600, full_bytes=own_bytes)

    # -- the live state --------------------------------------------------------------------------------------
    @property
    def global_step(self) -> int:
        """Training steps done (the step recoveries and resumes put training back to)."""
        return self.state.step

    @property
    def model(self) -> nn.Module:
        return self.state.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.state.optimizer

    @property
    def tables(self) -> EmbeddingTables:
        return self.state.tables

    # -- training-loop hooks ---------------------------------------------------------------------------
    def observe(self, batch: Batch | KeyedJaggedTensor) -> None:
        """Record the embedding rows a batch looks up (call once per batch, before or after its step).

        A DMP model needs no call: its sharded lookups report the rows each rank serves as they run, so
        this returns at once.
        """
        if not self._hooked:
            self._record_lookups(batch.sparse_features if isinstance(batch, Batch) else batch)

    def _record_lookups(self, kjt: KeyedJaggedTensor) -> None:
        self.tracker.observe(kjt)
        self.policy.observe(kjt)
        self.ledger.record_updates(int(kjt.values().numel()))
        self.saves.preserve_lookups(kjt)

    def step(self) -> SaveDecision | None:
        """Count one finished training step, commit a save whose write has finished, start the one the policy asks
        for now and return its decision (or None). A failed save is reported and abandoned, never raised."""
        self.clock.step_started()
        self.state.step += 1
        self.ledger.record_step()  # counted here, before a save's collective can find a peer dead
        self.saves.poll()
        decision = self.policy.decide(self.global_step)
        if self.global_step == self.total_steps:
            # The job's last step: no failure of this job can follow, so a save now would protect nothing
            # (the final model is the caller's to keep: `state_dict()` or dcp.save of the model).
            decision = None
        return self.clock.step_ended(self.global_step, self.saves.submit(decision) if decision is not None else None)

    def save_now(self, decision: SaveDecision) -> None:
        """Save what `decision` says now, whatever the policy's plan (after the saves in flight commit)."""
        self.saves.save(decision)

    def flush(self) -> None:
        """Wait for the saves in flight, if any, and commit them in order (collective)."""
        self.saves.flush()

    def unsaved_updates(self) -> int:
        """Row-updates this process's rows made since their last committed save: what its death would lose."""
        return self.saves.unsaved_updates()

    # -- failures ---------------------------------------------------------------------------------------
    def recover(self, failed_domains: Sequence[int]) -> RecoveryResult:
        """Recover from the emulated failure of `failed_domains` (ranks, or emulated domains) as the policy
        prescribes (see `cpr.recovery.strategies`). Collective: every rank calls it with the same domains.
        After a `full` recovery the step and the reader went back: re-create the batch iterator."""
        for domain in failed_domains:
            self.layout.check(domain)
        return self.recovery.recover(failed_domains)

    def reattach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Move this surviving rank's state into `model` and `optimizer`, the same model rebuilt with the same
        plan around the re-formed process group: rows, row-wise and dense optimizer state are copied in
        memory (nothing is read from a save), lookups are tracked on the new model, and CPR's collectives
        use the new group. The save in flight finishes writing here; `rejoin` settles whether it committed."""
        self.saves.wait()
        self.state.move_to(model, optimizer)
        self._hooked = hook_served_lookups(model, self._record_lookups)
        self.coordinator.reform()

    def rejoin(self, has_state: bool, replaced_progress: Mapping[int, tuple[int, int]]) -> RejoinResult:
        """Bring every rank of a re-formed group to one state (see `cpr.recovery.rejoin`). Collective: survivors
        call it after `reattach` with `has_state`, replacements (created with `joining=True`) without."""
        return rejoin(self.recovery, self.saves, has_state, replaced_progress)

    def close(self, flush: bool = True) -> None:
        """Commit the save in flight (unless `flush` is False: then it is dropped), stop the writer thread and
        release the checkpoint folder (its lock) so another run may use it (the lock also goes at process exit)."""
        if flush:
            self.flush()
        self.saves.close()
        self.store.close()

    # -- Stateful ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a restart needs: rows, row-wise and dense optimizer state, RNG, step, reader, tracker
        (the `Stateful` protocol of `torch.distributed.checkpoint`: `dcp.save({"cpr": ckpt})`)."""
        return {"tensors": self.state.full_tensors(), "step": self.global_step,
                "reader": self.state.reader_state() or {}, "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.state.load_full_tensors(state["tensors"])
        self.state.step = int(state["step"])
        if state.get("reader"):
            self.state.load_reader(dict(state["reader"]))
        self.tracker.load_state_dict(state["tracker"])

    # -- reporting --------------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """The job's accounting: saves, failures, bytes, PLS (measured; expected from the plan, or real deaths' from
        their schedule), overhead. Collective: every rank's counts are added up, so every rank gets the same report."""
        self.flush()
        ledger = RunLedger.merged(self.coordinator.all_gather(self.ledger, site="report.ledgers"))
        return {
            **ledger.summary(),
            "policy": self.policy.name,
            "policy_settings": self.policy.settings(),
            "world_size": self.coordinator.world_size,
            "domains": self.layout.mode,
            "domains_description": self.layout.describe(),
            "num_shards": self.layout.num_domains,
            "pls_expected": (ledger.pls_of_schedule(self.total_steps, self.layout.num_domains) if ledger.recoveries and self.policy.name == "partial"
                             else self.recovery.expected_pls(len(ledger.failures), self.layout.num_domains, self.total_steps)),
            "plan": dataclasses.asdict(self.clock.plan),
            **self.clock.report(),
            "tracking_bytes": self.coordinator.sum(self.tracker.memory_bytes(), site="report.tracking_bytes"),
            "policy_memory_bytes": self.coordinator.sum(self.policy.memory_bytes(), site="report.policy_bytes"),
        }
