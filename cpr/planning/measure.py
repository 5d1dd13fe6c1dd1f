"""`CostMeter`: what a step, a save and a restore really cost this run, from timings it is handed.

The meter reads no clock of its own: the checkpointer hands it the time a training step took (from the end
of one `step()` to the start of the next, so a save's stall is not in it) and whether a save was persisting
beside it, and the saves and restores the run's ledger recorded. `costs()` turns them into the
`MeasuredCosts` a `RealClock` plans with:

- step time: the median of the recent steps with no save persisting beside them;
- a full save's cost to the loop: its stall (the median of the last three), and for an asynchronous save the slowdown of the steps it
  persisted beside (their median over the clean median, times how many there were per save). Until a
  save has persisted beside measured steps, the slowdown is taken as its whole write (the cautious guess);
- a subset save's cost: the same for subset saves;
- a restore: measured when one happened (scaled to the whole model), else the model's bytes over the
  write bandwidth the saves measured (no read has been timed yet; reads are rarely slower than writes).
"""
from __future__ import annotations

import statistics
from collections import deque
from typing import Sequence

from .clock import MeasuredCosts

_WINDOW = 64  # recent steps the medians are taken over
_SAVE_WINDOW = 3  # recent saves of a kind their cost is the median of (one slow save is not a trend)


class CostMeter:
    """Running measurements of one process's training loop and saves (see the module docstring)."""

    def __init__(self, full_bytes: int) -> None:
        self.full_bytes = full_bytes
        self._clean: deque[float] = deque(maxlen=_WINDOW)
        self._persisting: dict[str, deque[float]] = {"full": deque(maxlen=_WINDOW), "subset": deque(maxlen=_WINDOW)}
        self._persist_steps = {"full": 0, "subset": 0}  # steps measured beside each kind of save
        self._stalls: dict[str, list[float]] = {"full": [], "subset": []}
        self._writes: dict[str, list[tuple[float, int]]] = {"full": [], "subset": []}  # (write seconds, bytes)
        self._restores: list[tuple[float, int]] = []  # (seconds, bytes read)
        self.steps = 0

    # -- what the checkpointer hands it ------------------------------------------------------------------
    def record_step(self, seconds: float, persisting: str | None) -> None:
        """One training step took `seconds`; `persisting` is the kind of save written beside it, or None."""
        self.steps += 1
        if persisting is None:
            self._clean.append(seconds)
        else:
            self._persisting[persisting].append(seconds)
            self._persist_steps[persisting] += 1

    def record_save(self, kind: str, stall_seconds: float, persist_seconds: float, nbytes: int) -> None:
        self._stalls[kind].append(stall_seconds)
        if persist_seconds > 0 and nbytes > 0:
            self._writes[kind].append((persist_seconds, nbytes))

    def record_restore(self, seconds: float, nbytes: int) -> None:
        if nbytes > 0:
            self._restores.append((seconds, nbytes))

    # -- what it measured ---------------------------------------------------------------------------------
    @property
    def calibrated(self) -> bool:
        """A step time is known (a save's cost is known from the run's first save on)."""
        return len(self._clean) > 0

    def step_seconds(self) -> float:
        return statistics.median(self._clean) if self._clean else 0.0

    def _save_cost(self, kind: str) -> tuple[float, float]:
        """(stall, slowdown while persisting) of one save of `kind`, as measured."""
        stalls = self._stalls[kind][-_SAVE_WINDOW:]
        stall = statistics.median(stalls) if stalls else 0.0
        writes = self._writes[kind][-_SAVE_WINDOW:]
        if not writes:
            return stall, 0.0  # synchronous saves: their stall is the whole write
        persisting = self._persisting[kind]
        if not persisting or not self._clean:
            return stall, statistics.median(w for w, _ in writes)  # not measured yet: the whole write
        per_step = max(0.0, statistics.median(persisting) - self.step_seconds())
        return stall, per_step * self._persist_steps[kind] / len(self._writes[kind])

    def _write_bandwidth(self) -> float | None:
        writes = self._writes["full"] or self._writes["subset"]
        seconds = sum(w for w, _ in writes)
        return sum(n for _, n in writes) / seconds if seconds > 0 else None

    def costs(self) -> MeasuredCosts:
        stall, slowdown = self._save_cost("full")
        subset_stall, subset_slowdown = self._save_cost("subset")
        if self._restores:
            seconds, nbytes = self._restores[-1]
            restore, measured = seconds * self.full_bytes / nbytes, True
        else:
            bandwidth = self._write_bandwidth()
            restore = self.full_bytes / bandwidth if bandwidth else stall + slowdown
            measured = False
        return MeasuredCosts(
            step_seconds=self.step_seconds(), save_stall_seconds=stall, persist_slowdown_seconds=slowdown,
            subset_save_seconds=subset_stall + subset_slowdown, restore_seconds=restore, restore_measured=measured,
            steps_measured=self.steps, saves_measured=sum(len(s) for s in self._stalls.values()),
        )


def slowest(costs: Sequence[MeasuredCosts]) -> MeasuredCosts:
    """One job's costs from every rank's: each cost as its slowest rank measured it (the ranks' steps and
    saves are collective, so the slowest one sets the pace), the counts of the first rank."""
    first = costs[0]
    return MeasuredCosts(
        step_seconds=max(c.step_seconds for c in costs),
        save_stall_seconds=max(c.save_stall_seconds for c in costs),
        persist_slowdown_seconds=max(c.persist_slowdown_seconds for c in costs),
        subset_save_seconds=max(c.subset_save_seconds for c in costs),
        restore_seconds=max(c.restore_seconds for c in costs),
        restore_measured=any(c.restore_measured for c in costs),
        steps_measured=first.steps_measured, saves_measured=first.saves_measured,
    )
