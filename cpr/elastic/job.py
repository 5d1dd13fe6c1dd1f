"""Real failures: a rank's process dies, a replacement joins, and the survivors keep their memory.

`ElasticJob` owns one worker's side of the recovery state machine of a job run under the supervisor
(`python -m cpr.run`, `python -m cpr.train --nproc N`):

    training --(a peer dies: a collective fails)--> leave the broken group --(the supervisor opens the
    next generation)--> join it --> rebuild the model with the same plan around the new group -->
    survivors: `CPRCheckpointer.reattach` (state copied in memory); replacement: a joining checkpointer
    --> `CPRCheckpointer.rejoin` (collective: partial or full recovery, `cpr.recovery.rejoin`) --> training

The step in flight when the peer died is dropped (its updates are not trained again) and counted. A death
during any of it (the replacement dying while it joins, a second kill) starts the cycle again in the next
generation; every wait is bounded. Without a supervisor the job is a plain run: same code, no healing.
`JobHooks` are told of each transition (tests inject faults there; users can monitor).
"""
from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed import collective_utils as torchrec_collectives

from cpr.accounting import RecoveryRecord
from cpr.checkpointer import CPRCheckpointer
from cpr.comm import release_process_group
from cpr.environment import setting
from cpr.errors import CoordinationError, MembershipError, RecoveryError

from .kills import kills_from_env
from .membership import Membership
from .records import HealTimes, record_recoveries
from .verdict import is_collective_mismatch

# How long a rank whose collective failed waits for a supervisor to report a death before it takes the
# error for what it is (a supervisor sees a death within a fraction of a second).
DEATH_NOTICE_S = setting("CPR_DEATH_NOTICE_S")

ModelBuilder = Callable[[], "tuple[nn.Module, torch.optim.Optimizer]"]
CheckpointerFactory = Callable[[nn.Module, torch.optim.Optimizer, bool], CPRCheckpointer]


def is_peer_failure(error: BaseException) -> bool:
    """Whether `error` is how a collective reports a peer that died: CPR's own collectives raise
    CoordinationError, torch's raise its distributed errors, and gloo's transport plain RuntimeErrors
    naming the connection it lost."""
    if is_collective_mismatch(str(error)):
        return False  # a bug on every rank, not a peer's death: healing it would train on inconsistent state
    if isinstance(error, (CoordinationError, dist.DistError)):
        return True
    message = str(error)
    return type(error) is RuntimeError and any(s in message for s in ("gloo", "Connection", "NCCL", "connection"))


class JobHooks:
    """Told of the transitions of an `ElasticJob` (subclass and override what you need; each is a no-op).

    `has_state`: whether this process keeps its state across the transition (a survivor) or has none yet (a
    replacement, or a process whose first group broke before the job's first save)."""

    def before_heal(self, job: ElasticJob, has_state: bool) -> None:
        """A peer's death was noticed; the job is about to leave its broken group."""

    def after_heal(self, job: ElasticJob, has_state: bool) -> None:
        """The job trains again in a re-formed group (`job.heals` counts this heal)."""

    def before_join(self, job: ElasticJob, has_state: bool) -> None:
        """This process is about to join the newest generation's group."""

    def after_form(self, job: ElasticJob, has_state: bool) -> None:
        """This process's state is in the group it joined (after the rejoin, in a later generation)."""


@dataclass
class StepOutcome:
    """What became of a step run under `ElasticJob.training_step`: `healed` if a peer died meanwhile (the step
    was dropped and the job healed: re-read `job.model` and `job.optimizer`, and re-create batch iterators,
    since full recovery rewinds the reader), with the `recoveries` recorded for it."""

    healed: bool = False
    recoveries: list[RecoveryRecord] = field(default_factory=list)


class ElasticJob:
    """One worker of a supervised job whose ranks may die and be replaced one at a time.

    Args:
        build: builds the model and its optimizer on the current process group (a DMP model sharded by a
            deterministic plan: every rank and every rebuild gets the same one). Called at the start and
            again after each re-formed group.
        checkpointer: makes this rank's `CPRCheckpointer` for a model and optimizer; its third argument is
            `joining` (pass it on: True in a replacement).
        membership: this worker's place in the job (default: the one its supervisor gave it; None when no
            supervisor started the process: then nothing is healed).
        kills: injected failures, (step, rank): that rank's process SIGKILLs itself as it starts that step,
            once per job (with those of `python -m cpr.run --kill-at`).
        hooks: told of every transition (see `JobHooks`).
    """

    def __init__(self, build: ModelBuilder, checkpointer: CheckpointerFactory, membership: Membership | None = None,
                 kills: Iterable[tuple[int, int]] = (), hooks: JobHooks | None = None) -> None:
        self._build, self._make_checkpointer = build, checkpointer
        self.membership = membership if membership is not None else Membership.from_env()
        self.kills = frozenset(kills) | frozenset(kills_from_env())  # the script's own and `cpr.run --kill-at`
        self._stepped = False
        self.hooks = hooks or JobHooks()
        self.heals = 0  # how many times this process re-formed its group after a death
        self.replacement = False  # whether this process replaced a dead one (it joined a running job)
        self.ckpt: CPRCheckpointer | None = None
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._noticed: float | None = None
        if self.membership is None:
            self.model, self.optimizer = build()
            self.ckpt = checkpointer(self.model, self.optimizer, False)
            return
        try:
            self._form(has_state=False, dropped_steps=0)
        except RuntimeError as err:  # a rank died before the job's first save committed
            if isinstance(err, MembershipError) or not is_peer_failure(err):
                raise
            self._heal(err, has_state=False, dropped_steps=0)

    @property
    def step(self) -> int:
        return self.ckpt.global_step

    def report(self) -> dict:
        """The job's accounting (`CPRCheckpointer.report`, collective), and this rank's work is done: should
        its process die from here on (while exiting, say), the supervisor does not replace it."""
        report = self.ckpt.report()
        if self.membership is not None:
            self.membership.mark_finished()
        return report

    def close(self) -> None:
        """Commit the save in flight, stop the checkpointer's writer and, in a supervised job, destroy the
        process group the job formed (a caller's own group stays theirs). Call once training is done."""
        self.ckpt.close()
        if self.membership is not None:
            self.model = self.optimizer = self.ckpt = None  # what holds the group goes before it
            release_process_group()

    @contextmanager
    def training_step(self) -> Iterator[StepOutcome]:
        """Wrap one training step (forward, backward, optimizer step and `ckpt.step()`). If a peer dies
        meanwhile, the step is dropped and the job healed before this returns: the outcome says so."""
        outcome = StepOutcome()
        if self.membership is None:
            yield outcome
            return
        self._inject_kill(self.ckpt.global_step + 1)
        started_at, recorded = self.ckpt.global_step, len(self.ckpt.ledger.recoveries)
        try:
            yield outcome
        except RuntimeError as err:
            if not is_peer_failure(err):
                raise
            # A failure inside `ckpt.step()` comes after the step's own updates: then nothing is dropped.
            self._heal(err, has_state=True, dropped_steps=1 if self.ckpt.global_step == started_at else 0)
            outcome.healed, outcome.recoveries = True, self.ckpt.ledger.recoveries[recorded:]
            return
        self.membership.publish_progress(self.ckpt.ledger.total_updates, self.ckpt.unsaved_updates())
        if not self._stepped:
            self._stepped = True
            self.membership.mark_stepped()

    # -- the state machine -------------------------------------------------------------------------------
    def _inject_kill(self, step: int) -> None:
        if (step, self.membership.rank) in self.kills and self.membership.claim_kill(step):
            print(f"[rank {self.membership.rank}] injected failure: killing this process (SIGKILL) at step {step}",
                  file=sys.stderr, flush=True)
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    def _heal(self, error: BaseException, has_state: bool, dropped_steps: int) -> None:
        """Leave the broken group, wait for the supervisor's next generation and form it; again on every
        further death meanwhile. Re-raises `error` when no death is reported (it was not a peer's)."""
        self.hooks.before_heal(self, has_state and self.ckpt is not None)
        self._noticed = time.time()
        while True:
            generation = self.membership.generation
            self.membership.leave()
            if not self.membership.await_next_generation(generation, DEATH_NOTICE_S):
                raise error
            try:
                self._form(has_state, dropped_steps)
                self.heals += 1
                self.hooks.after_heal(self, has_state)
                return
            except RuntimeError as err:
                # Whatever forming the group raised (a dead peer surfaces as gloo, store or c10d errors alike),
                # a death reported meanwhile explains it; the loop waits for one and re-raises without.
                if isinstance(err, (MembershipError, RecoveryError)):
                    raise
                error = err
                has_state = has_state and self.ckpt is not None

    def _form(self, has_state: bool, dropped_steps: int) -> None:
        """Join the newest generation, build the model on its group and bring this rank's state into it."""
        self.hooks.before_join(self, has_state)
        started = time.time()
        generation = self.membership.join()
        joined = time.time()
        rng = torch.get_rng_state()  # building initialises weights at random: a survivor's stream goes on as it was
        # DMP's first construction in a process broadcasts TorchRec's collective-validation flag, later ones
        # skip it: a survivor building DMP again must take part again, or it is one collective out of step with
        # the replacement, which builds DMP for the first time.
        torchrec_collectives._INITIALIZED = False
        model, optimizer = self._build()
        built = time.time()
        if has_state:
            torch.set_rng_state(rng)
            self.ckpt.reattach(model, optimizer)
        else:
            if self.ckpt is not None:  # a replacement that failed to join: its half-joined checkpointer goes
                self.ckpt.close(flush=False)
            self.replacement = generation > 0
            self.ckpt = self._make_checkpointer(model, optimizer, self.replacement)
        self.model, self.optimizer = model, optimizer
        if generation > 0:
            progress = {rank: self.membership.progress(rank) for rank in range(self.membership.world_size)}
            result = self.ckpt.rejoin(has_state, progress)
            times = HealTimes(noticed=self._noticed if has_state else None, started=started, joined=joined,
                              built=built, restored=time.time())
            record_recoveries(self.ckpt, self.membership, result, dropped_steps, times)
        self.membership.publish_progress(self.ckpt.ledger.total_updates, self.ckpt.unsaved_updates())
        self.hooks.after_form(self, has_state)
