"""`CPRCheckpointer`: the façade that wires access tracking, a policy, storage and recovery.

Data flows one way. Each batch goes to the access tracker (`observe`); after each step the policy decides
whether and what to save (`step`), and the storage writes it. On a failure (`recover`) the policy's
recovery kind decides what comes back: for `full`, every tensor, the step and the reader position of the
last full save (the lost steps are then trained again); for `partial`, only the failed shards' rows and
their optimizer state, composed row by row from the newest saves, while everything else goes on.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cpr import dense
from cpr.accounting import FailureEvent, RunLedger
from cpr.planning import ClusterProfile, PlanResult, plan
from cpr.policies import make_policy
from cpr.policies.base import CheckpointPolicy, PolicyContext, SavePlan
from cpr.shards import ShardLayout
from cpr.storage import CheckpointStore, TableMeta, restore_rows
from cpr.tables import EmbeddingTables
from cpr.tracking import AccessTracker


class RecoveryError(RuntimeError):
    """A failure that this run cannot recover from (no policy, or no loadable checkpoint)."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class RecoveryResult:
    """What a recovery did; `step` is the step training continues from (earlier than before for `full`)."""

    kind: str
    step: int
    failures: tuple[FailureEvent, ...] = field(default_factory=tuple)


def _weight_name(table: str) -> str:
    return f"emb/{table}/weight"


def _state_name(table: str, state: str) -> str:
    return f"emb/{table}/opt/{state}"


class CPRCheckpointer:
    """Checkpointing with partial recovery for a TorchRec model.

    Args:
        model: a DMP-wrapped model or a plain module holding `EmbeddingBagCollection`s.
        optimizer: the optimizer stepping the model (for DMP, the combined fused + dense optimizer).
        directory: where saves go; created if missing, must be writable.
        policy: a policy name (`none`, `full`, `partial`, `mfu`, `ssu`, `scar`) or a `CheckpointPolicy`.
        num_shards: failure domains; every table's rows are split into this many contiguous ranges
            (default: the profile's shard count).
        target_pls: the expected portion of lost samples that partial recovery may cost.
        profile: the cluster the run emulates (failure rate, save/load/reschedule costs).
        total_steps: the run's length in steps; the run spans `profile.job_hours` of emulated time.
        reader: the data reader, whose position full recovery rewinds (anything with state_dict).
        interval_steps: overrides the planned save interval.
        keep_last: full saves kept on disk.
        policy_options: extra settings for the prioritized policies (see `cpr.policies.make_policy`).
        resume: continue a run that died (a real crash, not an emulated failure): everything, including
            `global_step` and the reader, starts from the newest loadable full save in `directory`, if any.
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
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, got {total_steps}")
        self.model = model
        self.optimizer = optimizer
        self.reader = reader
        self.profile = profile or ClusterProfile.preset("production")
        if num_shards is not None:
            self.profile = dataclasses.replace(self.profile, num_shards=num_shards)
        self.tables = EmbeddingTables(model, optimizer)
        self.layout = ShardLayout.virtual(self.tables.tables, self.profile.num_shards)
        self.plan: PlanResult = plan(self.profile, target_pls)
        self.total_steps = total_steps
        self.hours_per_step = self.profile.job_hours / total_steps
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
        )
        self.policy = policy if isinstance(policy, CheckpointPolicy) else make_policy(policy, context)
        self.store = CheckpointStore(directory, keep_last=keep_last)
        full_bytes = self.tables.nbytes() + sum(t.nbytes for t in dense.capture(model, optimizer, self.tables).values())
        self.ledger = RunLedger(
            hours_per_step=self.hours_per_step,
            job_hours=self.profile.job_hours,
            save_hours_full=self.profile.save_seconds / 3600,
            load_hours_full=self.profile.load_seconds / 3600,
            reschedule_hours=self.profile.reschedule_seconds / 3600,
            full_bytes=full_bytes,
        )
        self._table_meta = {
            name: TableMeta(rows=info.local_rows, dim=info.dim, dtype=str(self.tables.weight(name).dtype).removeprefix("torch."))
            for name, info in self.tables.tables.items()
        }
        self.global_step = 0
        if resume and self._rollback() is not None:
            return
        if self.policy.recovery != "none":
            # A failure before the first periodic save must still find the shard's rows somewhere.
            self._save(SavePlan("full", reason="initial state"))

    # -- training-loop hooks ---------------------------------------------------------------------------
    def observe(self, batch: Batch | KeyedJaggedTensor) -> None:
        """Record the embedding rows a batch looks up (call once per batch, before or after its step)."""
        kjt = batch.sparse_features if isinstance(batch, Batch) else batch
        self.tracker.observe(kjt)
        self.policy.observe(kjt)
        self.ledger.record_updates(int(kjt.values().numel()))

    def step(self) -> SavePlan | None:
        """Count one finished training step and save if the policy says so; returns what was saved."""
        self.global_step += 1
        decision = self.policy.decide(self.global_step)
        if decision is not None:
            self._save(decision)
        return decision

    # -- saving -----------------------------------------------------------------------------------------
    def _full_tensors(self) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for table in self.tables.tables:
            tensors[_weight_name(table)] = self.tables.weight(table)
            for state, value in self.tables.row_states(table).items():
                tensors[_state_name(table, state)] = value
        tensors.update(dense.capture(self.model, self.optimizer, self.tables))
        return tensors

    def _subset_tensors(self, rows: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for table, ids in rows.items():
            if ids.numel() == 0:
                continue
            ids = ids.to(torch.int64)
            tensors[f"emb/{table}/ids"] = ids
            tensors[_weight_name(table)] = self.tables.weight(table).index_select(0, ids)
            for state, value in self.tables.row_states(table).items():
                tensors[_state_name(table, state)] = value.index_select(0, ids)
        return tensors

    def _save(self, decision: SavePlan) -> None:
        start = time.perf_counter()
        if decision.kind == "full":
            tensors = self._full_tensors()
        else:
            tensors = self._subset_tensors(decision.rows)
        record = self.store.save(
            step=self.global_step,
            kind=decision.kind,
            policy=self.policy.name,
            tensors=tensors,
            tables=self._table_meta,
            shards=self.layout.to_json(),
            extra={"reader": self.reader.state_dict() if self.reader is not None else None, "reason": decision.reason},
        )
        if decision.kind == "full":
            for table in self.tables.tables:
                self.tracker.mark_saved(table)
        else:
            for table, ids in decision.rows.items():
                self.tracker.mark_saved(table, rows=ids)
        self.policy.after_save(decision)
        self.ledger.record_save(self.global_step, decision.kind, record.nbytes, time.perf_counter() - start)

    # -- recovery ---------------------------------------------------------------------------------------
    def recover(self, failed_shards: Sequence[int]) -> RecoveryResult:
        """Recover from the failure of `failed_shards` as the policy prescribes.

        `partial`: each failed shard's rows and optimizer state get their newest saved version; nothing
        else changes and training goes on at the same step. `full`: everything returns to the last full
        save, including the step and the reader; the caller re-creates its batch iterator and trains the
        lost steps again.
        """
        for shard in failed_shards:
            self.layout.check(shard)
        if self.policy.recovery == "none":
            raise RecoveryError(f"policy {self.policy.name!r} keeps no checkpoint, so shard failures cannot be recovered")
        if self.policy.recovery == "full":
            return self._recover_full(failed_shards)
        return self._recover_partial(failed_shards)

    def _rollback(self) -> tuple[int, int] | None:
        """Return everything to the newest loadable full save; (its step, bytes read), or None if none."""
        loaded = self.store.latest_loadable(kind="full")
        if loaded is None:
            return None
        manifest, tensors = loaded.manifest, loaded.tensors
        self._apply_full_tensors(tensors)
        self.store.discard_after(manifest.step)  # saves past the rollback point describe a future that is gone
        if self.reader is not None and manifest.extra.get("reader") is not None:
            self.reader.load_state_dict(manifest.extra["reader"])
        self.global_step = manifest.step
        for table in self.tables.tables:
            self.tracker.mark_saved(table)  # the model is its saved self again: nothing is pending
        return manifest.step, sum(t.nbytes for t in tensors.values())

    def _recover_full(self, failed_shards: Sequence[int]) -> RecoveryResult:
        failed_at = self.global_step
        rolled_back = self._rollback()
        if rolled_back is None:
            raise RecoveryError(f"no loadable full checkpoint in {self.store.directory}")
        step, loaded_bytes = rolled_back
        events = tuple(
            FailureEvent(failed_at, shard, "full", step, lost_updates=0, lost_steps=failed_at - step if i == 0 else 0)
            for i, shard in enumerate(failed_shards)
        )
        for i, event in enumerate(events):
            self.ledger.record_failure(event, loaded_bytes=loaded_bytes if i == 0 else 0)
        return RecoveryResult("full", self.global_step, events)

    def _recover_partial(self, failed_shards: Sequence[int]) -> RecoveryResult:
        events = []
        for shard in failed_shards:
            loaded = 0
            lost = 0
            oldest = self.global_step
            for table in self.tables.tables:
                start, end = self.layout.rows(table, shard)
                if start == end:
                    continue
                live_states = self.tables.row_states(table)
                restored = restore_rows(self.store, table, (start, end), list(live_states))
                lost += int(self.tracker.counts(table)[start:end].sum())
                with torch.no_grad():
                    self.tables.weight(table)[start:end].copy_(restored["weight"])
                    for state, value in live_states.items():
                        value[start:end].copy_(restored[f"opt/{state}"])
                loaded += sum(t.nbytes for name, t in restored.items() if name != "saved_step")
                oldest = min(oldest, int(restored["saved_step"].min()))
                self.tracker.mark_saved(table, row_range=(start, end))
            event = FailureEvent(self.global_step, shard, "partial", oldest, lost_updates=lost, lost_steps=0)
            self.ledger.record_failure(event, loaded_bytes=loaded)
            events.append(event)
        return RecoveryResult("partial", self.global_step, tuple(events))

    def _apply_full_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for table in self.tables.tables:
                self.tables.weight(table).copy_(tensors[_weight_name(table)])
                for state, value in self.tables.row_states(table).items():
                    value.copy_(tensors[_state_name(table, state)])
        dense.restore(tensors, self.model, self.optimizer, self.tables)

    # -- Stateful ---------------------------------------------------------------------------------------
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
        self._apply_full_tensors(state["tensors"])
        self.global_step = int(state["step"])
        if self.reader is not None and state.get("reader"):
            self.reader.load_state_dict(dict(state["reader"]))
        self.tracker.load_state_dict(state["tracker"])

    # -- reporting --------------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """The run's accounting: saves, failures, bytes, PLS (expected and measured), overhead."""
        summary = self.ledger.summary()
        summary["policy"] = self.policy.name
        summary["policy_settings"] = self.policy.settings()
        summary["num_shards"] = self.layout.num_shards
        summary["pls_expected"] = (
            self.policy.expected_pls(len(self.ledger.failures), self.layout.num_shards, self.total_steps)
            if self.policy.recovery == "partial"
            else 0.0
        )
        summary["plan"] = dataclasses.asdict(self.plan)
        summary["tracking_bytes"] = self.tracker.memory_bytes()
        summary["policy_memory_bytes"] = self.policy.memory_bytes()
        return summary
