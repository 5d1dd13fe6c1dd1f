"""`WallClock`: where a training loop's wall-clock seconds went, by cause, and the goodput they leave.

The loop (cpr/loop.py) times each part of every step and hands it here: the batch and the step itself
(`training`, or `reexecuted` for a step trained again after a full recovery rolled the job back), the
checkpointer's step (`save_stalls`: snapshots, gathers, commits), emulated recoveries (`restores`), a real
death's heal (`restores` for its restore phase, `waiting` for the rest: noticing, the replacement's start,
the rendezvous, rebuilding) and evaluations. Steps trained while a save persisted beside them are
training too, but slower: `persisting` is their time over the median of the steps with no save beside them,
taken out of `training`. Whatever the loop did not time (its own bookkeeping, the progress bar) is `other`.

Goodput is useful steps per second over the no-failure rate measured in the same run (one step per median
clean step): the share of the wall clock that went into training the job's steps once.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

CAUSES = ("training", "save_stalls", "persisting", "restores", "reexecuted", "waiting", "evaluation", "other")


@dataclass
class WallClock:
    """Seconds by cause (see the module docstring); `add_step` and `add` are the loop's calls."""

    seconds: dict[str, float] = field(default_factory=lambda: {cause: 0.0 for cause in CAUSES})
    clean_steps: list[float] = field(default_factory=list)
    persisting_steps: list[float] = field(default_factory=list)
    useful_steps: int = 0

    def add(self, cause: str, seconds: float) -> None:
        self.seconds[cause] += seconds

    def add_step(self, seconds: float, persisting: bool, reexecuted: bool) -> None:
        """A training step (its batch included) that took `seconds`."""
        if reexecuted:
            self.add("reexecuted", seconds)
            return
        self.useful_steps += 1
        (self.persisting_steps if persisting else self.clean_steps).append(seconds)

    def clean_step_seconds(self) -> float:
        steps = self.clean_steps or self.persisting_steps
        return statistics.median(steps) if steps else 0.0

    def summary(self, wall_seconds: float) -> dict[str, Any]:
        clean = self.clean_step_seconds()
        seconds = dict(self.seconds)
        persisting = sum(self.persisting_steps)
        slowdown = max(0.0, persisting - clean * len(self.persisting_steps))
        seconds["training"] = sum(self.clean_steps) + persisting - slowdown
        seconds["persisting"] = slowdown
        seconds["other"] = 0.0
        seconds["other"] = wall_seconds - sum(seconds.values())
        overhead = wall_seconds - seconds["training"] - seconds["evaluation"]
        job = wall_seconds - seconds["evaluation"]
        return {
            "seconds": seconds,
            "wall_seconds": wall_seconds,
            "overhead_fraction": overhead / job if job > 0 else 0.0,
            "clean_step_seconds": clean,
            "useful_steps": self.useful_steps,
            # useful steps per second over the no-failure rate (1 / clean step) measured in this run
            "goodput": self.useful_steps * clean / job if job > 0 else 0.0,
        }
