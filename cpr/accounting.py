"""What failures cost: lost row-updates (PLS), lost computation, and save/load/reschedule time.

Time is accounted in emulated cluster hours: the run spans the emulated job, so one training step stands
for `hours_per_step` of it, and each save, load and reschedule costs what the `ClusterProfile` says
(scaled by the data actually moved, since a subset or a single shard moves less than the whole model).
Real seconds measured on this machine are recorded beside them.

In a multi-rank job the events (saves, failures, recoveries of killed ranks) are the job's: every rank
records the same ones, with bytes and lost updates already summed over the ranks when they happen, so a
replacement for a killed rank can take them over from a survivor. Only what a rank counts alone, the
row-updates its shards served and the size of what it holds, is per rank; `RunLedger.merged` adds those
up, so the job's PLS is exact: lost row-updates over all row-updates of all ranks.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence


@dataclass(frozen=True)
class CheckpointEvent:
    step: int
    kind: str
    bytes: int  # written, file format and metadata included
    seconds: float  # training stalled: the snapshot and the commit (the whole write for a synchronous save)
    persist_seconds: float = 0.0  # writing the parts (in the background for an asynchronous save)
    # The data the save holds (its tensors as their codecs store them), which its emulated time is charged for
    # (`bytes` when not known): a file format's headers per tensor (about 1.5 KB for a torch.save record) are
    # nothing next to a production table's rows, but they doubled the charge for the small model with which
    # the experiments emulate a production job.
    data_bytes: int | None = None

    @property
    def charged_bytes(self) -> int:
        return self.bytes if self.data_bytes is None else self.data_bytes


@dataclass(frozen=True)
class FailureEvent:
    """Domain `domain` failed after `step` steps and was recovered (`recovery`) from saves of `restored_step`
    (the oldest, for partial recovery), losing `lost_updates` row-updates and `lost_steps` trained steps."""

    step: int
    domain: int
    recovery: str
    restored_step: int
    lost_updates: int
    lost_steps: int
    loaded_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        """As summary.json and a save's ledger keep it: the domain under its command-line name, `shard`."""
        data = asdict(self)
        return {"step": data.pop("step"), "shard": data.pop("domain"), **data}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FailureEvent:
        data = dict(data)
        return cls(domain=data.pop("shard"), **data)


@dataclass(frozen=True)
class RecoveryRecord:
    """A rank's process that really died (killed) and was replaced, in a supervised job.

    Times run from the death (as the supervisor or the kill injector saw it) to the survivors training
    again (`seconds_to_resume`) and to the replacement training (`seconds_to_rejoin`). `bytes_read` is what
    the replacement read from the checkpoint, `own_bytes` the size of that rank's rows and row-wise optimizer
    state, `survivor_bytes_read` what the survivors read (0 when they kept their memory). `dropped_steps`:
    the step in flight at the death, whose updates are dropped, not trained again. `phases` (seconds): from
    the death until the survivors' collectives failed, until the replacement process was ready to join, its
    rendezvous with the survivors, rebuilding the model on the new group, and the restore (`rejoin`).
    """

    rank: int
    step: int
    kind: str
    generation: int
    seconds_to_resume: float
    seconds_to_rejoin: float
    bytes_read: int
    own_bytes: int
    survivor_bytes_read: int
    dropped_steps: int
    resumed_at: int
    phases: dict[str, float | None] = field(default_factory=dict)


@dataclass(frozen=True)
class FailedSave:
    step: int
    kind: str
    error: str


@dataclass
class Overhead:
    """Emulated hours spent on fault tolerance, by cause."""

    save: float = 0.0
    load: float = 0.0
    lost_compute: float = 0.0
    reschedule: float = 0.0

    @property
    def total(self) -> float:
        return self.save + self.load + self.lost_compute + self.reschedule


@dataclass
class RunLedger:
    """Running account of one training run; `summary()` is what `report()` prints and saves."""

    hours_per_step: float
    job_hours: float
    save_hours_full: float
    load_hours_full: float
    reschedule_hours: float
    full_bytes: int
    checkpoints: list[CheckpointEvent] = field(default_factory=list)
    failures: list[FailureEvent] = field(default_factory=list)
    failed_saves: list[FailedSave] = field(default_factory=list)
    recoveries: list[RecoveryRecord] = field(default_factory=list)
    total_updates: int = 0
    rank_updates: list[int] = field(default_factory=list)  # each rank's row-updates (set by `merged`)
    # Steps the job trained (retrained ones included): a replacement takes the count over with the job's events,
    # so that a replaced rank 0 reports the job's steps, not its own since it joined. Not saved: a resumed run
    # counts its own steps.
    steps_executed: int = 0

    def record_step(self) -> None:
        """One training step done (not one dropped at a peer's death)."""
        self.steps_executed += 1

    def record_updates(self, count: int) -> None:
        """Row-updates made by one batch: every (sample, row) lookup adds one."""
        self.total_updates += count

    def _scaled(self, hours: float, nbytes: int) -> float:
        return hours * nbytes / self.full_bytes if self.full_bytes else 0.0

    def record_save(self, step: int, kind: str, nbytes: int, seconds: float, persist_seconds: float = 0.0,
                    data_bytes: int | None = None) -> None:
        self.checkpoints.append(CheckpointEvent(step, kind, nbytes, seconds, persist_seconds, data_bytes))

    def record_failed_save(self, step: int, kind: str, error: str) -> None:
        self.failed_saves.append(FailedSave(step, kind, error))

    def record_failure(self, event: FailureEvent) -> None:
        self.failures.append(event)

    def record_recovery(self, record: RecoveryRecord) -> None:
        self.recoveries.append(record)

    def adopt_events(self, other: RunLedger) -> None:
        """Take over the job's events from `other` (a survivor's ledger): a replacement for a killed rank
        continues the job's record, not its own."""
        self.checkpoints, self.failures = list(other.checkpoints), list(other.failures)
        self.failed_saves, self.recoveries = list(other.failed_saves), list(other.recoveries)
        self.steps_executed = other.steps_executed

    @property
    def overhead(self) -> Overhead:
        return Overhead(
            save=sum(self._scaled(self.save_hours_full, c.charged_bytes) for c in self.checkpoints),
            load=sum(self._scaled(self.load_hours_full, f.loaded_bytes) for f in self.failures),
            lost_compute=sum(f.lost_steps for f in self.failures) * self.hours_per_step,
            reschedule=len(self.failures) * self.reschedule_hours,
        )

    @property
    def lost_updates(self) -> int:
        return sum(f.lost_updates for f in self.failures)

    @property
    def pls_measured(self) -> float:
        """Lost row-updates over all row-updates made."""
        return self.lost_updates / self.total_updates if self.total_updates else 0.0

    def pls_of_schedule(self, total_steps: int, num_domains: int) -> float:
        """Expected PLS of the failures this run had, from when they came and how old their domain's newest
        save was (`step - restored_step`): each loses that many steps of its domain's share of the updates
        (the rank's measured share in a multi-rank job, 1/N for emulated domains), out of `total_steps`."""
        shares = ([n / self.total_updates for n in self.rank_updates]
                  if self.total_updates and len(self.rank_updates) == num_domains else [1.0 / num_domains] * num_domains)
        return sum((f.step - f.restored_step) * shares[f.domain] for f in self.failures) / total_steps

    @property
    def bytes_written(self) -> int:
        return sum(c.bytes for c in self.checkpoints)

    @classmethod
    def merged(cls, ledgers: Sequence[RunLedger]) -> RunLedger:
        """One ledger for the whole job from every rank's: the job's events once (a save stalled training as
        long as its slowest rank), the per-rank counts added up (`full_bytes` is the whole model)."""
        first = ledgers[0]
        if any(len(l.checkpoints) != len(first.checkpoints) or len(l.failures) != len(first.failures) for l in ledgers):
            raise ValueError("ranks recorded different numbers of saves or failures")
        return dataclasses.replace(
            first,
            full_bytes=sum(l.full_bytes for l in ledgers),
            total_updates=sum(l.total_updates for l in ledgers),
            rank_updates=[l.total_updates for l in ledgers],
            checkpoints=[
                dataclasses.replace(events[0], seconds=max(e.seconds for e in events),
                                    persist_seconds=max(e.persist_seconds for e in events))
                for events in zip(*(l.checkpoints for l in ledgers))
            ],
            failures=list(first.failures),
            failed_saves=list(first.failed_saves),
            recoveries=list(first.recoveries),
        )

    def _events(self) -> dict[str, list[dict[str, Any]]]:
        """The job's events as JSON-ready data, by kind: what a checkpoint keeps and `summary()` reports."""
        return {
            "checkpoints": [asdict(c) for c in self.checkpoints],
            "failures": [f.to_json() for f in self.failures],
            "failed_saves": [asdict(f) for f in self.failed_saves],
            "recoveries": [asdict(r) for r in self.recoveries],
        }

    def state_dict(self) -> dict[str, Any]:
        """The record so far, as JSON-ready data (a resumed run continues it)."""
        return {**self._events(), "total_updates": self.total_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.checkpoints = [CheckpointEvent(**c) for c in state["checkpoints"]]
        self.failures = [FailureEvent.from_json(f) for f in state["failures"]]
        self.failed_saves = [FailedSave(**f) for f in state["failed_saves"]]
        self.recoveries = [RecoveryRecord(**r) for r in state.get("recoveries", [])]
        self.total_updates = int(state["total_updates"])

    def summary(self) -> dict[str, Any]:
        overhead = self.overhead
        out = asdict(overhead)
        out["total_hours"] = overhead.total
        out["total_fraction"] = overhead.total / self.job_hours
        events = self._events()
        return {
            "failures": events.pop("failures"),  # summary.json has always listed the failures first
            **events,
            "bytes_written": self.bytes_written,
            "bytes_per_hour": self.bytes_written / self.job_hours,
            "lost_updates": self.lost_updates,
            "total_updates": self.total_updates,
            "pls_measured": self.pls_measured,
            "overhead": out,
        }
