"""Worker processes as torchrun starts them: its environment contract, and their output kept for the verdict.

Every worker gets torchrun's variables (so a script written for torchrun runs unchanged: `env://`
rendezvous, `LOCAL_RANK` for the device, `TORCHELASTIC_RESTART_COUNT` to resume) plus CPR's own:
`CPR_STORE` (the job's store, used by `ElasticJob`) and `CPR_INCARNATION` (which process of the job this
is). A worker's stderr passes through its supervisor line by line; the last lines are kept so that a death
can be judged by what the worker said (`verdict.py`).
"""
from __future__ import annotations

import collections
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Sequence

from .keys import STORE_ENV

INCARNATION_ENV = "CPR_INCARNATION"
SPARE_ENV = "CPR_SPARE"  # set in a hot spare: "NODE:ID" (see spares.py); such a process has no rank yet
_TAIL_LINES = 40


@dataclass(frozen=True)
class Placement:
    """Where a worker sits in the job: what torchrun's variables say."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    nnodes: int
    restart_count: int


def torchrun_env(placement: Placement) -> dict[str, str]:
    """torchrun's per-worker variables for `placement` (the job-wide ones are in `job_env`)."""
    p = placement
    return {"RANK": str(p.rank), "LOCAL_RANK": str(p.local_rank), "WORLD_SIZE": str(p.world_size),
            "LOCAL_WORLD_SIZE": str(p.local_world_size), "GROUP_RANK": str(p.node_rank),
            "GROUP_WORLD_SIZE": str(p.nnodes), "ROLE_RANK": str(p.rank), "ROLE_WORLD_SIZE": str(p.world_size),
            "ROLE_NAME": "default", "TORCHELASTIC_RESTART_COUNT": str(p.restart_count)}


def job_env(store_endpoint: str, master_addr: str, master_port: int, max_restarts: int, run_id: str,
            nproc: int) -> dict[str, str]:
    """The variables every worker of the job shares."""
    env = {STORE_ENV: store_endpoint, "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
           "TORCHELASTIC_MAX_RESTARTS": str(max_restarts), "TORCHELASTIC_RUN_ID": run_id,
           "TORCHELASTIC_USE_AGENT_STORE": "False"}  # rank 0 hosts the script's own store, as plain torchrun does
    if nproc > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = "1"  # as torchrun: N workers each spinning every core's thread would thrash
    return env


class WorkerProcess:
    """One worker (or hot spare) process; its stderr is forwarded to the supervisor's and its tail kept."""

    def __init__(self, command: Sequence[str], env: dict[str, str], incarnation: str) -> None:
        self.incarnation = incarnation
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self.popen = subprocess.Popen(list(command), env={**os.environ, **env, INCARNATION_ENV: incarnation},
                                      stderr=subprocess.PIPE)
        self._forward = threading.Thread(target=self._pump, name=f"stderr-{incarnation}", daemon=True)
        self._forward.start()

    def _pump(self) -> None:
        out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
        for raw in iter(self.popen.stderr.readline, b""):
            if out is not None:
                out.write(raw)
                out.flush()
            else:
                sys.stderr.write(raw.decode(errors="replace"))
            self.tail.append(raw.decode(errors="replace").rstrip("\n"))
        self.popen.stderr.close()

    def poll(self) -> int | None:
        return self.popen.poll()

    def last_lines(self, timeout_s: float = 2.0) -> list[str]:
        """The worker's last lines of stderr, once it has ended (what it wrote as it died included)."""
        self._forward.join(timeout_s)
        return list(self.tail)

    def terminate(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout=timeout)
