"""Survivors wait for a replacement as long as it is alive and starting, within a bound that scales.

A replacement on a loaded machine can take a minute to import torch and TorchRec; a fixed timeout then
loses the whole job although nothing is wrong. The supervisor beats `starting/<rank>` (a counter it adds
to) while that rank's new process is alive and has not reached the rendezvous; survivors waiting in
`Membership.join` keep waiting while the beats go on. They give up when the beats stop (the supervisor
itself is gone) or past `START_FACTOR` times the slowest start-up this job has seen (its first processes,
`startup/<rank>`), and never before `CPR_REJOIN_TIMEOUT_S`. Each give-up names the setting to change.
"""
from __future__ import annotations

import time

from . import keys

BEAT_S = 0.5  # the supervisor beats this often
STALE_S = 15.0  # no beat for this long: the replacement (or its supervisor) is gone
START_FACTOR = 20.0  # a replacement may take this many times the job's own start-up


def beat(store, rank: int) -> None:
    """Supervisor: `rank`'s replacement is alive and starting."""
    store.add(keys.STARTING.format(rank=rank), 1)


class ReplacementWait:
    """A survivor's wait for the missing ranks of a rendezvous (see the module's docstring)."""

    def __init__(self, store, rejoin_timeout_s: float) -> None:
        self.store, self.rejoin_timeout_s = store, rejoin_timeout_s
        self.started = time.monotonic()
        self._beats: dict[int, tuple[int, float]] = {}  # rank: (counter, when it last changed)

    def _alive(self, rank: int, now: float) -> bool:
        key = keys.STARTING.format(rank=rank)
        count = int(self.store.add(key, 0))
        last = self._beats.get(rank)
        if count and (last is None or last[0] != count):
            self._beats[rank] = (count, now)
            return True
        return last is not None and now - last[1] < STALE_S

    def bound_s(self, missing: list[int]) -> float:
        startups = [float(self.store.get(keys.STARTUP.format(rank=r))) for r in missing
                    if self.store.check([keys.STARTUP.format(rank=r)])]
        return max(self.rejoin_timeout_s, START_FACTOR * max(startups, default=0.0))

    def give_up(self, rank: int, missing: list[int], generation: int) -> str | None:
        """None to go on waiting, else why this rank gives up (naming the setting)."""
        now = time.monotonic()
        waited = now - self.started
        if waited <= self.rejoin_timeout_s:
            return None
        alive = [r for r in missing if self._alive(r, now)]
        if len(alive) < len(missing):
            gone = sorted(set(missing) - set(alive))
            return (f"rank {rank}: ranks {gone} did not join generation {generation} within {waited:.0f} s and no "
                    f"supervisor reports them starting (raise CPR_REJOIN_TIMEOUT_S, now {self.rejoin_timeout_s:g}, to wait longer)")
        bound = self.bound_s(missing)
        if waited > bound:
            return (f"rank {rank}: the replacements of ranks {missing} are alive but did not join generation "
                    f"{generation} within {waited:.0f} s ({START_FACTOR:g}x this job's start-up, at least "
                    f"CPR_REJOIN_TIMEOUT_S={self.rejoin_timeout_s:g}; raise CPR_REJOIN_TIMEOUT_S to wait longer)")
        return None
