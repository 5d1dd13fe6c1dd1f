"""A worker's side of a supervised job: the store it shares with the supervisors, and its generations.

The supervisor (`cpr.supervisor`) hosts a `torch.distributed.TCPStore` outside the workers, so no worker is
a single point of failure for it, and starts each worker with `CPR_STORE=host:port`, `RANK` and
`WORLD_SIZE`. Each time a worker dies the supervisor records the death and bumps the store's *generation*;
the workers of a generation form one process group (keys under `pg/<generation>/`), a rendezvous that
waits until every rank of the newest generation has arrived. Everything here waits a bounded time.

Store keys (all small strings):
  generation          the newest generation (supervisors `add` to it)
  deaths, death/<n>   how many workers died, and each death: {"rank", "time", "returncode", "generation"}
  here/<g>/<rank>     the rank arrived for generation g
  progress/<rank>     the rank's "updates,unsaved" after its last finished step (what its death loses)
  kill/<step>:<rank>  an injected kill that already happened (each happens once)
  finished/<rank>     the rank's work is done: its process ending now, however, is not a failure
  stop                why a supervisor stopped the job (workers waiting for a generation give up)
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

STORE_ENV = "CPR_STORE"
REJOIN_TIMEOUT_S = float(os.environ.get("CPR_REJOIN_TIMEOUT_S", "120"))
_POLL_S = 0.02


class MembershipError(RuntimeError):
    """The job could not (re-)form its process group in time, or a supervisor stopped it."""


@dataclass(frozen=True)
class Death:
    """A worker process that ended with a non-zero code, as its supervisor saw it."""

    rank: int
    time: float  # time.time() on the supervisor's host
    returncode: int
    generation: int  # the generation its replacement joins


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"store endpoint {endpoint!r} is not HOST:PORT")
    return host, int(port)


def connect(endpoint: str, timeout_s: float = REJOIN_TIMEOUT_S) -> dist.TCPStore:
    """A client of the supervisor's store."""
    host, port = parse_endpoint(endpoint)
    return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))


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
        return int(self.store.get("generation"))

    def _check_stopped(self) -> None:
        if self.store.check(["stop"]):
            raise MembershipError(f"rank {self.rank}: the supervisor stopped the job: {self.store.get('stop').decode()}")

    def join(self) -> int:
        """Form the default process group with every rank of the newest generation and return it. A death
        while waiting moves the rendezvous on to the next generation; MembershipError after
        `rejoin_timeout_s` or when the job is stopped."""
        deadline = time.monotonic() + self.rejoin_timeout_s
        while True:
            generation = self.newest_generation()
            self.store.set(f"here/{generation}/{self.rank}", "1")
            arrived = [f"here/{generation}/{rank}" for rank in range(self.world_size)]
            while not self.store.check(arrived) and self.newest_generation() == generation:
                self._check_stopped()
                if time.monotonic() > deadline:
                    missing = [rank for rank in range(self.world_size) if not self.store.check([f"here/{generation}/{rank}"])]
                    raise MembershipError(f"rank {self.rank}: ranks {missing} did not join generation {generation} "
                                          f"within {self.rejoin_timeout_s:.0f} s")
                time.sleep(_POLL_S)
            if self.newest_generation() != generation:
                continue  # another death meanwhile: its replacement joins the next generation
            self.generation = generation  # also when forming the group fails: the next one is past it
            dist.init_process_group(self.backend, store=dist.PrefixStore(f"pg/{generation}", self.store),
                                    rank=self.rank, world_size=self.world_size, timeout=self.collective_timeout)
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
        count = int(self.store.add("deaths", 0))
        deaths = [Death(**json.loads(self.store.get(f"death/{n}"))) for n in range(1, count + 1)]
        return [d for d in deaths if d.generation > generation]

    # -- what a death would lose, and injected deaths ------------------------------------------------------
    def publish_progress(self, updates: int, unsaved: int) -> None:
        self.store.set(f"progress/{self.rank}", f"{updates},{unsaved}")

    def progress(self, rank: int) -> tuple[int, int]:
        """(row-updates served, updates since their rows' saves) that `rank` last published; zeros if none."""
        if not self.store.check([f"progress/{rank}"]):
            return 0, 0
        updates, unsaved = self.store.get(f"progress/{rank}").decode().split(",")
        return int(updates), int(unsaved)

    def mark_finished(self) -> None:
        """This rank's work is done (see `Supervisor`: a later death is not replaced)."""
        self.store.set(f"finished/{self.rank}", "1")

    def claim_kill(self, step: int) -> bool:
        """True once per (step, rank): whether the injected kill of this rank at `step` is still to happen
        (a replacement, or full recovery training the step again, must not repeat it)."""
        return int(self.store.add(f"kill/{step}:{self.rank}", 1)) == 1
