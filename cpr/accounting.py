"""What failures cost: lost row-updates (PLS), lost computation, and save/load/reschedule time.

Time is accounted in emulated cluster hours: the run spans the emulated job, so one training step stands
for `hours_per_step` of it, and each save, load and reschedule costs what the `ClusterProfile` says
(scaled by the bytes actually moved, since a subset or a single shard moves less than the whole model).
Real seconds measured on this machine are recorded beside them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class CheckpointEvent:
    step: int
    kind: str
    bytes: int
    seconds: float


@dataclass(frozen=True)
class FailureEvent:
    step: int
    shard: int
    recovery: str
    restored_step: int
    lost_updates: int
    lost_steps: int


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
    overhead: Overhead = field(default_factory=Overhead)
    total_updates: int = 0

    def record_updates(self, count: int) -> None:
        """Row-updates made by one batch: every (sample, row) lookup adds one."""
        self.total_updates += count

    def _scaled(self, hours: float, nbytes: int) -> float:
        return hours * nbytes / self.full_bytes if self.full_bytes else 0.0

    def record_save(self, step: int, kind: str, nbytes: int, seconds: float) -> None:
        self.checkpoints.append(CheckpointEvent(step, kind, nbytes, seconds))
        self.overhead.save += self._scaled(self.save_hours_full, nbytes)

    def record_failure(self, event: FailureEvent, loaded_bytes: int) -> None:
        self.failures.append(event)
        self.overhead.load += self._scaled(self.load_hours_full, loaded_bytes)
        self.overhead.lost_compute += event.lost_steps * self.hours_per_step
        self.overhead.reschedule += self.reschedule_hours

    @property
    def lost_updates(self) -> int:
        return sum(f.lost_updates for f in self.failures)

    @property
    def pls_measured(self) -> float:
        """Lost row-updates over all row-updates made."""
        return self.lost_updates / self.total_updates if self.total_updates else 0.0

    @property
    def bytes_written(self) -> int:
        return sum(c.bytes for c in self.checkpoints)

    def summary(self) -> dict[str, Any]:
        overhead = asdict(self.overhead)
        overhead["total_hours"] = self.overhead.total
        overhead["total_fraction"] = self.overhead.total / self.job_hours
        return {
            "failures": [asdict(f) for f in self.failures],
            "checkpoints": [asdict(c) for c in self.checkpoints],
            "bytes_written": self.bytes_written,
            "bytes_per_hour": self.bytes_written / self.job_hours,
            "lost_updates": self.lost_updates,
            "total_updates": self.total_updates,
            "pls_measured": self.pls_measured,
            "overhead": overhead,
        }
