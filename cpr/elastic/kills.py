"""Injected deaths, the launcher's own (`python -m cpr.run --kill-at STEP:RANK --kill-after SECONDS:RANK`).

`--kill-at` needs the worker to say which step it is at: `ElasticJob` reads the kills from `KILLS_ENV` and
SIGKILLs its own process as it starts that step (once per job, claimed in the store). `--kill-after` works
for any script: the supervisor SIGKILLs that rank's process that many seconds after the job started.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

KILLS_ENV = "CPR_KILL_AT"  # "STEP:RANK,STEP:RANK": the launcher's --kill-at, for ElasticJob


def parse_pairs(specs: Sequence[str], option: str, first: str, kind: type = int) -> list[tuple]:
    """`option` values `FIRST:RANK` as (first, rank); ValueError naming the option and the value otherwise."""
    pairs = []
    for spec in specs:
        head, sep, rank = spec.partition(":")
        try:
            value = kind(head)
            if not sep or not rank.strip().isdigit() or value < (1 if kind is int else 0):
                raise ValueError
        except ValueError:
            raise ValueError(f"{option} {spec!r}: expected {first}:RANK (e.g. {'150' if kind is int else '2.5'}:1)") from None
        pairs.append((value, int(rank)))
    return pairs


def kills_from_env() -> list[tuple[int, int]]:
    """The launcher's --kill-at kills, as (step, rank)."""
    text = os.environ.get(KILLS_ENV, "")
    return parse_pairs([s for s in text.split(",") if s], "--kill-at", "STEP") if text else []


def kills_env(kills: Sequence[tuple[int, int]]) -> dict[str, str]:
    return {KILLS_ENV: ",".join(f"{step}:{rank}" for step, rank in kills)} if kills else {}


@dataclass
class TimedKill:
    """`--kill-after SECONDS:RANK`: SIGKILL that rank's process once, SECONDS after the job started."""

    seconds: float
    rank: int
    done: bool = False


class TimedKills:
    """The supervisor's --kill-after kills of its own node's ranks."""

    def __init__(self, kills: Sequence[tuple[float, int]]) -> None:
        self.pending = [TimedKill(seconds, rank) for seconds, rank in kills]
        self.started = time.monotonic()

    def due(self, kill: Callable[[int], bool]) -> None:
        """Kill every rank whose time has come (`kill(rank)`: False if that rank has no live process)."""
        elapsed = time.monotonic() - self.started
        for item in self.pending:
            if not item.done and elapsed >= item.seconds and kill(item.rank):
                item.done = True
                print(f"supervisor: --kill-after {item.seconds:g}:{item.rank}: killing rank {item.rank} (SIGKILL)",
                      file=sys.stderr, flush=True)
