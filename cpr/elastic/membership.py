"""A worker's side of a supervised job: the store it shares with the supervisors, and its generations.

The supervisor (`supervisor.py`) hosts a `torch.distributed.TCPStore` outside the workers, so no worker is
a single point of failure for it, and starts each worker with `CPR_STORE=host:port`, `RANK` and
`WORLD_SIZE`. Each time a worker dies the supervisor records the death and bumps the store's *generation*;
the workers of a generation form one process group, a rendezvous that waits until every rank of the newest
generation has arrived. The store's keys are in `keys.py`. Everything here waits a bounded time.
"""
from __future__ import annotations

import os
import time
from datetime import timedelta

import torch.distributed as dist

from cpr.environment import setting
from cpr.errors import MembershipError

from . import keys
from .heartbeat import ReplacementWait
from .keys import STORE_ENV, Death
from .stores import connect
from .workers import INCARNATION_ENV

REJOIN_TIMEOUT_S = setting("CPR_REJOIN_TIMEOUT_S")
_POLL_S = 0.02


class Membership:
    """This worker's rank in a supervised job and the generation of the process group it is in.

    Args:
        store: the job's store (hosted by a supervisor).
        rank, world_size: fixed for the job's life; a replacement takes the dead worker's rank.
        backend: the process group's backend ("gloo" on CPU, "nccl" on GPUs).
        collective_timeout: the process group's timeout for training collectives.
        rejoin_timeout_s: how long a rendezvous, or a wait for the next generation, may take.
    """

    def __init__(self, store: dist.Store, rank: int, world_size: int, backend: str = "gloo",
                 collective_timeout: timedelta = timedelta(seconds=300),
                 rejoin_timeout_s: float = REJOIN_TIMEOUT_S) -> None:
        self.store = store
        self.rank, self.world_size = rank, world_size
        self.backend = backend
        self.collective_timeout = collective_timeout
        self.rejoin_timeout_s = rejoin_timeout_s
        self.generation: int | None = None  # the generation whose group this process is in, if any

    @classmethod
    def from_env(cls, backend: str = "gloo", collective_timeout: timedelta = timedelta(seconds=300)) -> Membership | None:
        """The membership a supervisor gave this process (None when no supervisor started it)."""
        endpoint = os.environ.get(STORE_ENV)
        if not endpoint:
            return None
        return cls(connect(endpoint), int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), backend, collective_timeout)

    # -- generations -------------------------------------------------------------------------------------
    def newest_generation(self) -> int:
        return int(self.store.get(keys.GENERATION))

    def _check_stopped(self) -> None:
        if self.store.check([keys.STOP]):
            raise MembershipError(f"rank {self.rank}: the supervisor stopped the job: {self.store.get(keys.STOP).decode()}")

    def join(self) -> int:
        """Form the default process group with every rank of the newest generation and return it. A death
        while waiting moves the rendezvous on to the next generation; MembershipError after
        `rejoin_timeout_s` or when the job is stopped."""
        wait = ReplacementWait(self.store, self.rejoin_timeout_s)  # waits on while a replacement is starting
        self.store.set(keys.ELASTIC, "1")  # the supervisor replaces a dead rank alone
        while True:
            generation = self.newest_generation()
            here = {rank: keys.HERE.format(generation=generation, rank=rank) for rank in range(self.world_size)}
            self.store.set(here[self.rank], "1")
            while not self.store.check(list(here.values())) and self.newest_generation() == generation:
                self._check_stopped()
                missing = [rank for rank, key in here.items() if not self.store.check([key])]
                reason = wait.give_up(self.rank, missing, generation) if missing else None
                if reason:
                    raise MembershipError(reason)
                time.sleep(_POLL_S)
            if self.newest_generation() != generation:
                continue  # another death meanwhile: its replacement joins the next generation
            self.generation = generation  # also when forming the group fails: the next one is past it
            group_store = dist.PrefixStore(keys.PROCESS_GROUP.format(generation=generation), self.store)
            dist.init_process_group(self.backend, store=group_store, rank=self.rank, world_size=self.world_size,
                                    timeout=self.collective_timeout)
            return generation

    def leave(self) -> None:
        """Drop this process's group (its peers may be dead). Peers blocked on this rank then fail at once
        instead of at their timeout. `generation` stays: the one this process was last in."""
        if dist.is_initialized():
            dist.destroy_process_group()

    def await_next_generation(self, after: int, timeout_s: float) -> bool:
        """Wait until the store's generation is past `after` (a supervisor replaced a dead worker): True, or
        False if none came within `timeout_s` (the error was not a worker's death)."""
        deadline = time.monotonic() + timeout_s
        while self.newest_generation() <= after:
            self._check_stopped()
            if time.monotonic() > deadline:
                return False
            time.sleep(_POLL_S)
        return True

    def deaths_since(self, generation: int) -> list[Death]:
        """The deaths whose replacements joined a generation after `generation`, oldest first."""
        count = int(self.store.add(keys.DEATHS, 0))
        deaths = [Death.from_json(self.store.get(keys.DEATH.format(n=n))) for n in range(1, count + 1)]
        return [d for d in deaths if d.generation > generation]

    # -- what a death would lose, and injected deaths ------------------------------------------------------
    def publish_progress(self, updates: int, unsaved: int) -> None:
        self.store.set(keys.PROGRESS.format(rank=self.rank), f"{updates},{unsaved}")

    def progress(self, rank: int) -> tuple[int, int]:
        """(row-updates served, updates since their rows' saves) that `rank` last published; zeros if none."""
        if not self.store.check([keys.PROGRESS.format(rank=rank)]):
            return 0, 0
        updates, unsaved = self.store.get(keys.PROGRESS.format(rank=rank)).decode().split(",")
        return int(updates), int(unsaved)

    def mark_finished(self) -> None:
        """This rank's work is done (see `Supervisor`: a later death is not replaced)."""
        self.store.set(keys.FINISHED.format(rank=self.rank), "1")

    def mark_stepped(self) -> None:
        """This process finished a training step: its later death is not a start-up crash (verdict.py)."""
        self.store.set(keys.STEPPED.format(rank=self.rank), os.environ.get(INCARNATION_ENV, ""))

    def claim_kill(self, step: int) -> bool:
        """True once per (step, rank): whether the injected kill of this rank at `step` is still to happen
        (a replacement, or full recovery training the step again, must not repeat it)."""
        return int(self.store.add(keys.KILL.format(step=step, rank=self.rank), 1)) == 1
