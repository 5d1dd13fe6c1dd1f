"""The supervisor: starts a node's worker processes and replaces only the one that dies.

torchrun's elastic agent restarts every worker of the job when one fails; a sharded embedding table has no
replica to heal from, so restarting everyone would throw away every survivor's memory. Here the supervisor
keeps the survivors running: when a worker dies it records the death in the job's store, bumps the store's
generation and starts one replacement with the same rank. Survivors notice (their next collective fails),
re-form the process group of the new generation with the replacement (`membership.py`), and CPR restores
only the replacement's rows (`job.py`).

One supervisor per node. Node 0's hosts the job's `TCPStore` (outside the workers, so a worker's death never
takes the store with it); the others connect to it (`endpoint`, like torchrun's `--rdzv-endpoint`).
A worker that exits with code 2 reported bad input or an unrecoverable state: that is not retried. A rank
that dies more than `max_restarts` times stops the whole job with a message.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from typing import Sequence

import torch.distributed as dist

from . import keys
from .keys import STORE_ENV, Death, parse_endpoint
from .membership import connect

USAGE_EXIT = 2  # what `python -m cpr.train` returns after one clear message: retrying cannot help
_POLL_S = 0.02
_SIMULTANEOUS_S = 0.25  # deaths this close together get one new generation
_DONE_WAIT_S = 300.0  # node 0 keeps the store up this long for the other nodes' workers to finish
_TERMINATE_GRACE_S = 10.0


class Supervisor:
    """Runs `command` as `nproc` workers of this node and replaces any that dies.

    Args:
        command: the worker's command line (e.g. `[sys.executable, "-m", "cpr.train", ...]`).
        nproc: workers on this node; their ranks are `node_rank * nproc + i`.
        nnodes, node_rank: the job's nodes, and this one's place among them.
        endpoint: HOST:PORT of the job's store: node 0 listens there (port 0: any free port, single node
            only), the others connect.
        max_restarts: replacements allowed per rank before the job is stopped.
    """

    def __init__(self, command: Sequence[str], nproc: int, nnodes: int = 1, node_rank: int = 0,
                 endpoint: str | None = None, max_restarts: int = 3) -> None:
        if nproc < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
            raise ValueError(f"need nproc >= 1 and 0 <= node_rank < nnodes, got {nproc}, {node_rank}, {nnodes}")
        if nnodes > 1 and endpoint is None:
            raise ValueError("a job on several nodes needs the store's endpoint (HOST:PORT) on every node")
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
        self.command = list(command)
        self.nproc, self.nnodes, self.node_rank = nproc, nnodes, node_rank
        self.world_size = nproc * nnodes
        self.max_restarts = max_restarts
        host, port = parse_endpoint(endpoint) if endpoint else ("127.0.0.1", 0)
        if node_rank == 0:
            self.store = dist.TCPStore(host, port, is_master=True, timeout=timedelta(seconds=60), wait_for_workers=False)
            self.store.set(keys.GENERATION, "0")
        else:
            self.store = connect(f"{host}:{port}", timeout_s=300)
        self.endpoint = f"{host}:{self.store.port}"
        self.restarts = {rank: 0 for rank in self._ranks}
        self._workers: dict[int, subprocess.Popen] = {}

    @property
    def _ranks(self) -> range:
        return range(self.node_rank * self.nproc, (self.node_rank + 1) * self.nproc)

    def _start(self, rank: int) -> None:
        env = {**os.environ, STORE_ENV: self.endpoint, "RANK": str(rank), "WORLD_SIZE": str(self.world_size),
               "LOCAL_RANK": str(rank - self.node_rank * self.nproc), "LOCAL_WORLD_SIZE": str(self.nproc),
               "CPR_RESTART": str(self.restarts[rank])}
        if self.nproc > 1:  # as torchrun does: N workers each spinning every core's thread would thrash
            env.setdefault("OMP_NUM_THREADS", "1")
        env.pop("MASTER_ADDR", None)  # the process group forms on the supervisor's store, not on rank 0
        env.pop("MASTER_PORT", None)
        self._workers[rank] = subprocess.Popen(self.command, env=env)

    def run(self) -> int:
        """Run the workers to the end; 0 when every rank finished, else the job's exit code."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            for rank in self._ranks:
                self._start(rank)
            return self._watch()
        finally:
            self._terminate()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def _watch(self) -> int:
        finished: set[int] = set()
        while len(finished) < self.nproc:
            if self.store.check([keys.STOP]):
                return self._fail(f"another node stopped the job: {self.store.get(keys.STOP).decode()}", announce=False)
            dead = self._reap(finished)
            if dead:
                time.sleep(_SIMULTANEOUS_S)  # a node losing power takes several workers at once
                dead.update(self._reap(finished))
                codes = {rank: code for rank, (code, _) in dead.items()}
                if finished:
                    return self._fail(f"rank(s) {sorted(dead)} died after other ranks had finished the job")
                stopped = [rank for rank, code in codes.items() if code == USAGE_EXIT]
                if stopped:
                    return self._fail(f"rank(s) {stopped} stopped with an error (see its message above)", USAGE_EXIT)
                over = [rank for rank in dead if self.restarts[rank] >= self.max_restarts]
                if over:
                    return self._fail(f"rank {over[0]} died {self.restarts[over[0]] + 1} times; the restart limit "
                                      f"(--max-restarts {self.max_restarts}) is reached")
                self._replace(dead)
            time.sleep(_POLL_S)
        self.store.set(keys.DONE.format(node=self.node_rank), "1")
        if self.node_rank == 0:  # the store lives here: keep it up until every node's workers are done
            deadline = time.monotonic() + _DONE_WAIT_S
            while not self.store.check([keys.DONE.format(node=n) for n in range(self.nnodes)]) and time.monotonic() < deadline:
                time.sleep(_POLL_S)
        return 0

    def _reap(self, finished: set[int]) -> dict[int, tuple[int, float]]:
        """Ranks whose worker ended since the last look with a non-zero code: (that code, when it was seen)."""
        dead = {}
        for rank, worker in list(self._workers.items()):
            code = worker.poll()
            if code is None:
                continue
            del self._workers[rank]
            if code != 0 and self.store.check([keys.FINISHED.format(rank=rank)]):
                print(f"supervisor: rank {rank} ended with code {code} after finishing its work; not replaced",
                      file=sys.stderr, flush=True)
                code = 0
            if code == 0:
                finished.add(rank)
            else:
                dead[rank] = (code, time.time())
        return dead

    def _replace(self, dead: dict[int, tuple[int, float]]) -> None:
        """Record the deaths, open the next generation and start one replacement per dead rank."""
        upcoming = int(self.store.add(keys.GENERATION, 0)) + 1
        for rank, (code, seen) in sorted(dead.items()):  # recorded first: whoever sees the generation finds them
            n = int(self.store.add(keys.DEATHS, 1))
            self.store.set(keys.DEATH.format(n=n), Death(rank, seen, code, upcoming).to_json())
        generation = int(self.store.add(keys.GENERATION, 1))
        for rank, (code, _) in sorted(dead.items()):
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            print(f"supervisor: rank {rank} died ({how}); starting a replacement (generation {generation})",
                  file=sys.stderr, flush=True)
            self.restarts[rank] += 1
            self._start(rank)

    def _fail(self, reason: str, code: int = 1, announce: bool = True) -> int:
        self.store.set(keys.STOP, reason)
        if announce:
            print(f"error: {reason}; stopping the job", file=sys.stderr, flush=True)
        return code

    def _terminate(self) -> None:
        """End the workers still running (SIGTERM, then SIGKILL after a grace period)."""
        for worker in self._workers.values():
            if worker.poll() is None:
                worker.terminate()
        deadline = time.monotonic() + _TERMINATE_GRACE_S
        for worker in self._workers.values():
            try:
                worker.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        self._workers.clear()
