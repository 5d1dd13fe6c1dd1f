"""The supervisor: starts a node's worker processes and replaces only the one that dies.

torchrun's elastic agent restarts every worker of the job when one fails; a sharded embedding table has no
replica to heal from, so restarting everyone would throw away every survivor's memory. Here the supervisor
keeps the survivors running: when a worker dies it records the death in the job's store, bumps the store's
generation and starts one replacement with the same rank (or hands the rank to a hot spare, `spares.py`).
Survivors notice (their next collective fails), re-form the process group of the new generation with the
replacement (`membership.py`), and CPR restores only the replacement's rows (`job.py`).

That needs the script to use `ElasticJob` (its workers say so in the store). Any other script gets
torchrun's semantics: a death restarts every worker of the job (`TORCHELASTIC_RESTART_COUNT` goes up), with
torchrun's environment (`workers.py`).

One supervisor per node. Node 0's hosts the job's `TCPStore` (outside the workers, so a worker's death never
takes the store with it, `stores.py`); the others connect to it (`endpoint`,
like torchrun's `--rdzv-endpoint`). A worker that exits with code 2 reported bad input or an unrecoverable
state: that is not retried; nor is a bug (`verdict.py`). A rank that dies more than `max_restarts` times
stops the whole job with a message.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import time
import uuid
from typing import Sequence

from . import heartbeat, keys, spares
from .keys import Death
from .kills import TimedKills, kills_env
from .stores import host_or_connect, split_url
from .verdict import Failure, Judge, failure_message
from .workers import SPARE_ENV, Placement, WorkerProcess, job_env, torchrun_env

USAGE_EXIT = 2  # what `python -m cpr.train` returns after one clear message: retrying cannot help
_POLL_S = 0.01
_SIMULTANEOUS_S = 0.1  # deaths this close together get one new generation
_DONE_WAIT_S = 300.0  # node 0 keeps the store up this long for the other nodes' workers to finish
_TERMINATE_GRACE_S = 10.0
_SPARE_DELAY_S = 5.0  # a new spare starts once the heal is done (or this long after it began): its imports would slow the heal


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host if host not in ("localhost",) else "127.0.0.1", 0))
        return s.getsockname()[1]


class Supervisor:
    """Runs `command` as `nproc` workers of this node and replaces any that dies.

    Args:
        command: the worker's command line (e.g. `[sys.executable, "-m", "cpr.train", ...]`).
        nproc: workers on this node; their ranks are `node_rank * nproc + i`.
        nnodes, node_rank: the job's nodes, and this one's place among them.
        endpoint: the job's store, HOST:PORT (node 0 listens there; port 0: any free port, single node only)
            or tcp://HOST:PORT.
        max_restarts: replacements allowed per rank (restart-all jobs: restarts of the job) before it stops.
        spares: hot spares kept on this node (see `spares.py`; the script must use `ElasticJob`).
        kill_at, kill_after: injected deaths, (step, rank) and (seconds, rank) (see `kills.py`).
        master_addr, master_port: what workers get as MASTER_ADDR/MASTER_PORT (default: the store's host and
            a free port per restart).
    """

    def __init__(self, command: Sequence[str], nproc: int, nnodes: int = 1, node_rank: int = 0,
                 endpoint: str | None = None, max_restarts: int = 3, spares: int = 0,
                 kill_at: Sequence[tuple[int, int]] = (), kill_after: Sequence[tuple[float, int]] = (),
                 master_addr: str | None = None, master_port: int | None = None) -> None:
        if nproc < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
            raise ValueError(f"need nproc >= 1 and 0 <= node_rank < nnodes, got {nproc}, {node_rank}, {nnodes}")
        if nnodes > 1 and endpoint is None:
            raise ValueError("a job on several nodes needs the store's endpoint (HOST:PORT) on every node")
        if max_restarts < 0 or spares < 0:
            raise ValueError(f"--max-restarts and --spares must be >= 0, got {max_restarts} and {spares}")
        if spares and not (len(command) > 1 and "python" in os.path.basename(command[0])):
            raise ValueError("--spares needs a Python script or module (-m) that uses ElasticJob")
        self.command = list(command)
        self.nproc, self.nnodes, self.node_rank = nproc, nnodes, node_rank
        self.world_size = nproc * nnodes
        for step, rank in [*kill_at, *kill_after]:
            if rank >= self.world_size:
                raise ValueError(f"--kill-at/--kill-after {step}:{rank}: the rank must be below the world size {self.world_size}")
        self.max_restarts, self.spare_count = max_restarts, spares
        self.store, self.endpoint = host_or_connect(endpoint, node_rank)
        # `add` leaves what is there: a supervisor started again (its node came back) joins the running job.
        self.rejoined = int(self.store.add(keys.STARTED.format(node=node_rank), 1)) > 1
        self.store.add(keys.GENERATION, 0)
        self.round = int(self.store.add(keys.ROUND, 0))
        self.master_addr = master_addr or (split_url(self.endpoint)[1].rpartition(":")[0]
                                           if endpoint else "127.0.0.1")
        self._fixed_master_port = master_port
        self._run_id = os.environ.get("TORCHELASTIC_RUN_ID") or uuid.uuid4().hex[:12]
        self._kills_env = kills_env(list(kill_at))
        self._timed = TimedKills([(s, r) for s, r in kill_after if self._owns(r)])
        self.restarts = {rank: 0 for rank in self._ranks}
        self._workers: dict[int, WorkerProcess] = {}
        self._spares: dict[int, WorkerProcess] = {}
        self._spare_ids = 0
        self._spare_failures = 0
        self._spares_due: float | None = None  # when to top the spares up again
        self._starting: dict[int, tuple[float, bool]] = {}  # rank: (spawned at, its first process?)
        self._beats: dict[int, float] = {}  # rank: when its supervisor last beat for it
        self._incarnations = 0
        self._judge = Judge()

    @property
    def _ranks(self) -> range:
        return range(self.node_rank * self.nproc, (self.node_rank + 1) * self.nproc)

    def _owns(self, rank: int) -> bool:
        return rank in self._ranks

    def _placement(self, rank: int, restart_count: int) -> Placement:
        return Placement(rank, rank - self.node_rank * self.nproc, self.world_size, self.nproc, self.node_rank,
                         self.nnodes, restart_count)

    def _master_port(self) -> int:
        if self._fixed_master_port is not None:
            return self._fixed_master_port
        key = keys.MASTER.format(round=self.round)
        if self.node_rank == 0 and not self.store.check([key]):
            self.store.set(key, str(_free_port(self.master_addr)))
        return int(self.store.get(key))  # other nodes wait for node 0's choice (bounded by the store's timeout)

    def _env(self) -> dict[str, str]:
        return {**job_env(self.endpoint, self.master_addr, self._master_port(), self.max_restarts, self._run_id,
                          self.nproc), **self._kills_env}

    def _spawn(self, env: dict[str, str], spare: bool = False) -> WorkerProcess:
        self._incarnations += 1
        command = self.command
        if spare:  # the same interpreter runs the script once a rank is given to it
            command = [command[0], "-m", "cpr.elastic.spare_boot", *command[1:]]
        return WorkerProcess(command, env, f"{os.getpid()}.{self._incarnations}")

    def _start(self, rank: int, first: bool = False) -> None:
        restart_count = self.round if not self._elastic() else self.restarts[rank]
        env = {**self._env(), **torchrun_env(self._placement(rank, restart_count)), "CPR_RESTART": str(self.restarts[rank])}
        self._workers[rank] = self._spawn(env)
        self._starting[rank] = (time.monotonic(), first)

    def _start_spare(self) -> None:
        self._spare_ids += 1
        placement = {k: v for k, v in torchrun_env(self._placement(self._ranks[0], 0)).items()
                     if k in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE", "ROLE_NAME")}
        env = {**self._env(), **placement, SPARE_ENV: f"{self.node_rank}:{self._spare_ids}"}
        self._spares[self._spare_ids] = self._spawn(env, spare=True)

    def _elastic(self) -> bool:
        return self.store.check([keys.ELASTIC])

    def run(self) -> int:
        """Run the workers to the end; 0 when every rank finished, else the job's exit code."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            if self.rejoined:  # this node came back: its ranks died with it
                self._replace({rank: (-signal.SIGKILL, time.time(), None) for rank in self._ranks})
            else:
                for rank in self._ranks:
                    self._start(rank, first=True)
            for _ in range(self.spare_count):
                self._start_spare()
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
            newest_round = int(self.store.add(keys.ROUND, 0))
            if newest_round > self.round:  # another node restarts the job (torchrun's semantics)
                self._restart_all(newest_round)
            self._timed.due(self._kill)
            self._tend()
            dead = self._reap(finished)
            if dead:
                time.sleep(_SIMULTANEOUS_S)  # a node losing power takes several workers at once
                dead.update(self._reap(finished))
                code = self._judge_deaths(dead, finished)
                if code is not None:
                    return code
                if self._elastic():
                    self._replace(dead)
                else:
                    if self.round >= self.max_restarts:
                        return self._fail(f"rank(s) {sorted(dead)} died; the job was restarted {self.round} times and the "
                                          f"restart limit (--max-restarts {self.max_restarts}) is reached")
                    self.store.compare_set(keys.ROUND, str(self.round), str(self.round + 1))
                    self._restart_all(int(self.store.add(keys.ROUND, 0)))
            time.sleep(_POLL_S)
        self.store.set(keys.DONE.format(node=self.node_rank), "1")
        self._warn_unused_kills()
        if self.node_rank == 0:
            # The store lives here: keep it up until every node's workers are done.
            deadline = time.monotonic() + _DONE_WAIT_S
            while not self.store.check([keys.DONE.format(node=n) for n in range(self.nnodes)]) and time.monotonic() < deadline:
                time.sleep(_POLL_S)
        return 0

    def _judge_deaths(self, dead: dict, finished: set[int]) -> int | None:
        """The job's exit code if these deaths end it (a bug, bad input, the restart limit), else None."""
        failures = []
        for rank, (code, _, worker) in sorted(dead.items()):
            stepped = (self.store.check([keys.STEPPED.format(rank=rank)])
                       and self.store.get(keys.STEPPED.format(rank=rank)).decode() == worker.incarnation)
            failures.append(Failure(rank, code, failure_message(worker.last_lines()), stepped))
        verdict = self._judge.judge_all(failures)
        if verdict is not None:
            return self._fail(verdict.reason, verdict.code)
        if finished:
            return self._fail(f"rank(s) {sorted(dead)} died after other ranks had finished the job")
        stopped = [rank for rank, (code, _, _) in dead.items() if code == USAGE_EXIT]
        if stopped:
            return self._fail(f"rank(s) {stopped} stopped with an error (see its message above)", USAGE_EXIT)
        over = [rank for rank in dead if self.restarts[rank] >= self.max_restarts]
        if over and self._elastic():
            return self._fail(f"rank {over[0]} died {self.restarts[over[0]] + 1} times; the restart limit "
                              f"(--max-restarts {self.max_restarts}) is reached")
        return None

    def _tend(self) -> None:
        """Beat for the ranks still starting, note the job's start-up time, keep the spares topped up."""
        if self._starting:
            generation = int(self.store.add(keys.GENERATION, 0))
            for rank, (spawned, first) in list(self._starting.items()):
                worker = self._workers.get(rank)
                if worker is None or worker.poll() is not None:
                    del self._starting[rank]
                elif self.store.check([keys.HERE.format(generation=generation, rank=rank)]):
                    del self._starting[rank]
                    if first:
                        self.store.set(keys.STARTUP.format(rank=rank), f"{time.monotonic() - spawned:.3f}")
                elif time.monotonic() - self._beats.get(rank, 0.0) >= heartbeat.BEAT_S:
                    heartbeat.beat(self.store, rank)
                    self._beats[rank] = time.monotonic()
        for spare_id, spare in list(self._spares.items()):
            if spare.poll() is not None:  # a spare died waiting: start another (a few times)
                del self._spares[spare_id]
                self._spare_failures += 1
                print(f"supervisor: spare {self.node_rank}:{spare_id} ended (code {spare.poll()}) before it was needed",
                      file=sys.stderr, flush=True)
                if self._spare_failures <= self.max_restarts + self.spare_count:
                    self._start_spare()
        if self._spares_due is not None and (not self._starting or time.monotonic() > self._spares_due):
            self._spares_due = None
            while len(self._spares) < self.spare_count:
                self._start_spare()

    def _reap(self, finished: set[int]) -> dict[int, tuple[int, float, WorkerProcess]]:
        """Ranks whose worker ended since the last look with a non-zero code: (that code, when, the process)."""
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
                dead[rank] = (code, time.time(), worker)
        return dead

    def _replace(self, dead: dict) -> None:
        """Record the deaths, open the next generation and give each dead rank a spare or a new process."""
        upcoming = int(self.store.add(keys.GENERATION, 0)) + 1
        for rank, (code, seen, _) in sorted(dead.items()):  # recorded first: whoever sees the generation finds them
            n = int(self.store.add(keys.DEATHS, 1))
            self.store.set(keys.DEATH.format(n=n), Death(rank, seen, code, upcoming).to_json())
        generation = int(self.store.add(keys.GENERATION, 1))
        for rank, (code, _, _) in sorted(dead.items()):
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            self.restarts[rank] += 1
            ready = [i for i, spare in self._spares.items() if spare.poll() is None and spares.offer(self.store, self.node_rank, i)]
            if ready:
                spares.assign(self.store, self.node_rank, ready[0], self._placement(rank, self.restarts[rank]))
                self._workers[rank] = self._spares.pop(ready[0])
                self._starting[rank] = (time.monotonic(), False)
                self._spares_due = time.monotonic() + _SPARE_DELAY_S
                what = f"spare {self.node_rank}:{ready[0]} takes its place"
            else:
                self._start(rank)
                what = "starting a replacement"
            print(f"supervisor: rank {rank} died ({how}); {what} (generation {generation})", file=sys.stderr, flush=True)

    def _restart_all(self, new_round: int) -> None:
        """torchrun's semantics for a script that does not use ElasticJob: every worker starts again."""
        self._stop_workers()
        self.round = new_round
        self.store.add(keys.GENERATION, 1)  # a fresh rendezvous: nothing of the last round's is reused
        print(f"supervisor: restarting every worker of node {self.node_rank} (restart {new_round} of at most "
              f"{self.max_restarts})", file=sys.stderr, flush=True)
        for rank in self._ranks:
            self._start(rank)

    def _kill(self, rank: int) -> bool:
        worker = self._workers.get(rank)
        if worker is None or worker.poll() is not None:
            return False
        worker.kill()
        return True

    def _warn_unused_kills(self) -> None:
        for part in self._kills_env.get("CPR_KILL_AT", "").split(","):
            step, _, rank = part.partition(":")
            if part and self._owns(int(rank)) and not self.store.check([keys.KILL.format(step=step, rank=rank)]):
                print(f"supervisor: warning: --kill-at {part} never happened: the script reports no steps (it does not "
                      "use ElasticJob, or ended first); --kill-after SECONDS:RANK works for any script",
                      file=sys.stderr, flush=True)

    def _fail(self, reason: str, code: int = 1, announce: bool = True) -> int:
        self.store.set(keys.STOP, reason)
        if announce:
            print(f"error: {reason}; stopping the job", file=sys.stderr, flush=True)
        return code

    def _stop_workers(self) -> None:
        """End the workers still running (SIGTERM, then SIGKILL after a grace period)."""
        for worker in self._workers.values():
            worker.terminate()
        deadline = time.monotonic() + _TERMINATE_GRACE_S
        for worker in self._workers.values():
            try:
                worker.wait(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:  # subprocess.TimeoutExpired
                worker.kill()
                worker.wait()
        self._workers.clear()
        self._starting.clear()

    def _terminate(self) -> None:
        self._workers.update({-i: spare for i, spare in self._spares.items()})
        self._spares.clear()
        self._stop_workers()
