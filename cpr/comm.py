"""The few collectives CPR needs across ranks, each with a bounded timeout.

Saves commit only when every rank's part is durable, recoveries pick a save every rank can load, and
reports add up what each rank counted. All of it moves small Python objects, so CPR keeps its own gloo
group (CPU, whatever backend training uses) with its own timeout: a rank that died or hangs makes the
others fail within `timeout_s` with `CoordinationError` instead of waiting for torch's 30-minute default.
At world size 1 nothing is communicated.
"""
from __future__ import annotations

import gc
import json
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

import torch.distributed as dist

from cpr.environment import setting
from cpr.errors import CoordinationError

T = TypeVar("T")

DEFAULT_TIMEOUT_S = setting("CPR_COLLECTIVE_TIMEOUT_S")
# A folder: every process appends each collective it enters, with the site that called it, to
# `<folder>/rank-<rank>-pid-<pid>.jsonl` (one JSON object a line, flushed at once, so a killed process's
# trace is whole up to its death). Ranks whose sequences differ are what a collective mismatch is made of.
TRACE_ENV = "CPR_TRACE_COLLECTIVES"


@dataclass(frozen=True)
class RankProblem:
    """An error one rank met in an `agree`d step: its message, and the names of its exception's classes."""

    rank: int
    message: str
    kinds: tuple[str, ...]

    def is_a(self, *types: type[BaseException]) -> bool:
        return any(t.__name__ in self.kinds for t in types)


@dataclass(frozen=True)
class Agreement(Generic[T]):
    """What an `agree`d step gave: this rank's value (`local`, None after a problem), every rank's value when
    they were shared (`values`, in rank order), and the problems ranks met."""

    local: T | None
    values: list[T | None]
    problems: list[RankProblem]

    def first(self, *types: type[BaseException]) -> RankProblem | None:
        """The lowest rank's problem (of one of `types`, if given), or None."""
        return next((p for p in self.problems if not types or p.is_a(*types)), None)


class Coordinator:
    """This process's rank among the job's ranks, and object collectives over CPR's own gloo group.

    Every rank must create it (creating the group is itself collective) and call the same collectives in
    the same order.
    """

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, trace: str | os.PathLike | None = None) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        trace = trace if trace is not None else os.environ.get(TRACE_ENV) or None
        self._trace_folder = Path(trace) if trace is not None else None
        self.reform()

    def _trace(self, op: str, site: str) -> None:
        """Record one collective of this process (see TRACE_ENV); also at world size 1, where nothing is sent,
        so that a one-process run shows the sequence a multi-rank one would run."""
        if self._trace_folder is None:
            return
        self._trace_folder.mkdir(parents=True, exist_ok=True)
        path = self._trace_folder / f"rank-{self.rank}-pid-{os.getpid()}.jsonl"
        with open(path, "a") as f:
            f.write(json.dumps({"op": op, "site": site, "world_size": self.world_size}) + "\n")

    def reform(self) -> None:
        """Take this process's place in the current default process group: at creation, and again after a
        supervised job re-formed the group around a replaced rank (the old group's peers are gone)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.rank = dist.get_rank()
            self.world_size = dist.get_world_size()
            self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout_s))
        else:
            self.rank, self.world_size, self._group = 0, 1, None
        self._trace("reform", "coordinator.reform")

    @property
    def is_coordinator(self) -> bool:
        """Rank 0 commits saves, writes the dense state once and applies retention."""
        return self.rank == 0

    def all_gather(self, obj: T, *, site: str) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank. `site` names the caller's purpose (traced)."""
        self._trace("all_gather", site)
        return self._all_gather(obj)

    def _all_gather(self, obj: T) -> list[T]:
        if self._group is None:
            return [obj]
        out: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(out, obj, group=self._group)
        except RuntimeError as err:  # gloo reports timeouts and dead peers as RuntimeError subclasses
            raise CoordinationError(f"rank {self.rank}: all_gather among {self.world_size} ranks failed "
                                    f"(a rank died or did not answer within {self.timeout_s:.0f} s): {err}") from err
        return out

    def broadcast(self, obj: T, src: int = 0, *, site: str) -> T:
        """Rank `src`'s `obj` on every rank."""
        self._trace("broadcast", site)
        if self._group is None:
            return obj
        box = [obj]
        try:
            dist.broadcast_object_list(box, src=src, group=self._group)
        except RuntimeError as err:
            raise CoordinationError(f"rank {self.rank}: broadcast among {self.world_size} ranks failed "
                                    f"(a rank died or did not answer within {self.timeout_s:.0f} s): {err}") from err
        return box[0]

    def agree(self, fn: Callable[[], T], *, expected: tuple[type[BaseException], ...], site: str,
              share: bool = True) -> Agreement[T]:
        """Run `fn` on every rank and tell every rank what each one got: the `expected` error it raised, if any
        (any other error propagates, on that rank, before the collective), and with `share` its value. One
        rank's problem is thus known to all, which then act alike (raise, fall back), as DCP's `_DistWrapper`
        does. Without `share` only the problems travel (the value stays here: a loaded save, say)."""
        try:
            value, problem = fn(), None
        except expected as err:
            value, problem = None, (str(err), tuple(c.__name__ for c in type(err).__mro__))
        gathered = self.all_gather((value if share else None, problem), site=site)
        return Agreement(value, [v for v, _ in gathered] if share else [],
                         [RankProblem(rank, *p) for rank, (_, p) in enumerate(gathered) if p is not None])

    def sum(self, value: int | float, *, site: str) -> int | float:
        self._trace("sum", site)
        return sum(self._all_gather(value))

    def all_true(self, flag: bool, *, site: str) -> bool:
        self._trace("all_true", site)
        return all(self._all_gather(bool(flag)))


def release_process_group() -> None:
    """Destroy the default process group and every group made from it, while the interpreter is whole.

    Left to interpreter exit, a gloo group dies with the last object holding it (DMP, DDP's reducer, a
    `Coordinator`), and its threads then release tensors while Python is half torn down: the process aborts
    ("terminate called without an active exception", pytorch/pytorch#179291) after its work is done, and its
    launcher sees a crash. Collecting garbage first frees the reference cycles (modules, optimizers,
    closures) that keep a group alive, while that is still safe.
    """
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
