"""One strategy per recovery kind (`none`, `full`, `partial`: the policy's `recovery`), for emulated failures
(a domain's rows revert inside a live job) and real ones (a rank's process died and was replaced) alike.

* `full`: everything returns to the last full save, the step and the reader too, and the lost steps are
  trained again (every rank rolls back, survivors of a real failure too).
* `partial`: only the failed domains' rows and their optimizer state get their newest saved version (full
  and subset saves composed row by row); the dense model, the other domains and the reader go on. A
  replacement for a dead rank takes everything but its rows from the lowest surviving rank.
* `none`: no checkpoint, nothing to recover from.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Mapping, Sequence

from cpr.accounting import FailureEvent
from cpr.errors import CheckpointMismatchError, CorruptCheckpointError, RecoveryError
from cpr.policies.base import CheckpointPolicy, RecoveryKind
from cpr.save import SavePipeline
from cpr.state import LiveState
from cpr.storage import SaveInfo

from .restore import DomainRestore, Restorer

# What a failed read of a domain's saves raises: the domain cannot be restored (on any rank, then).
RESTORE_ERRORS = (CorruptCheckpointError, FileNotFoundError, CheckpointMismatchError)


@dataclass(frozen=True)
class RecoveryResult:
    """What a recovery did; `step` is the step training continues from (earlier than before for `full`)."""

    kind: str
    step: int
    failures: tuple[FailureEvent, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class RejoinResult:
    """What a rejoin did in a re-formed group: `kind` is `partial` (the replaced ranks restored their own
    rows, the survivors kept theirs), `full` (every rank rolled back to the last full save) or `restart` (no
    rank had state: the newest full save, or the initial state). `bytes_read` were read by this process."""

    kind: str
    step: int  # where training goes on
    failed_at: int  # the steps done when the group broke
    bytes_read: int
    replaced: tuple[int, ...]


@dataclass(frozen=True)
class RejoinRound:
    """A re-formed group that has settled its saves and agreed on its record (see `rejoin.py`)."""

    has_state: bool  # this rank survived (it kept its memory); a replacement has none
    replaced: tuple[int, ...]
    source: int  # the lowest surviving rank
    failed_at: int  # the steps the survivors had done
    saves: Sequence[SaveInfo]
    replaced_progress: Mapping[int, tuple[int, int]]  # (updates, unsaved) each replaced rank last published


class RecoveryStrategy(ABC):
    """How failures are recovered under one recovery kind.

    Args:
        restorer: reads saves back into the live state.
        pipeline: the saves in flight (an emulated failure strikes between saves: they commit first).
        policy: its state goes back with a rollback, or over from a survivor.
    """

    kind: ClassVar[RecoveryKind]
    keeps_checkpoints: ClassVar[bool] = True  # whether the run saves at all (an initial save before training)
    reads_subset_saves: ClassVar[bool] = False  # whether a restore composes subset saves (differential ones)

    def __init__(self, restorer: Restorer, pipeline: SavePipeline, policy: CheckpointPolicy) -> None:
        self.restorer, self.pipeline, self.policy = restorer, pipeline, policy

    def recover(self, failed: Sequence[int]) -> RecoveryResult:
        """Recover from the emulated failure of domains `failed` (collective). The save in flight is completed
        first, so a seeded run restores from the same saves however fast the disk is (a real failure would
        lose the dying domain's part of that save, and the save with it)."""
        self.pipeline.flush()
        return self._recover(failed, self.restorer.store.saves())  # every commit record parsed once per recovery

    def _recover(self, failed: Sequence[int], saves: Sequence[SaveInfo]) -> RecoveryResult:
        raise NotImplementedError

    @abstractmethod
    def rejoin(self, round_: RejoinRound) -> RejoinResult:
        """Bring every rank of a re-formed group to one state (collective)."""

    def expected_pls(self, failures: int, num_domains: int, total_steps: int) -> float:
        """The portion of lost samples these failures are expected to cost (none, when nothing is lost)."""
        return 0.0


class NoRecovery(RecoveryStrategy):
    kind = "none"
    keeps_checkpoints = False

    def recover(self, failed: Sequence[int]) -> RecoveryResult:
        raise RecoveryError(f"policy {self.policy.name!r} keeps no checkpoint, so shard failures cannot be recovered")

    def rejoin(self, round_: RejoinRound) -> RejoinResult:
        raise RecoveryError(f"policy {self.policy.name!r} keeps no checkpoint: rank(s) {list(round_.replaced)} cannot "
                            "be restored")


class FullRecovery(RecoveryStrategy):
    kind = "full"

    def _recover(self, failed: Sequence[int], saves: Sequence[SaveInfo]) -> RecoveryResult:
        step = self.restorer.state.step
        events, _ = self.restorer.roll_back_for(failed, step, saves)
        return RecoveryResult("full", self.restorer.state.step, events)

    def rejoin(self, round_: RejoinRound) -> RejoinResult:
        _, bytes_read = self.restorer.roll_back_for(round_.replaced, round_.failed_at, round_.saves)
        return RejoinResult("full", self.restorer.state.step, round_.failed_at, bytes_read, round_.replaced)


class PartialRecovery(RecoveryStrategy):
    kind = "partial"
    reads_subset_saves = True

    def _recover(self, failed: Sequence[int], saves: Sequence[SaveInfo]) -> RecoveryResult:
        restorer, state = self.restorer, self.restorer.state
        events = []
        for domain in failed:
            here = domain in restorer.layout.local
            agreement = restorer.coordinator.agree(
                lambda: restorer.restore_domain(domain, saves) if here else DomainRestore(0, state.step, 0),
                expected=RESTORE_ERRORS, site="recover.partial.outcome")
            problem = agreement.first()
            if problem is not None:
                raise RecoveryError(f"shard {domain} cannot be restored: {problem.message}")
            outcomes = agreement.values
            event = FailureEvent(state.step, domain, "partial", min(o.oldest_step for o in outcomes),
                                 lost_updates=sum(o.lost_updates for o in outcomes), lost_steps=0,
                                 loaded_bytes=sum(o.bytes_read for o in outcomes))
            restorer.ledger.record_failure(event)
            events.append(event)
        return RecoveryResult("partial", state.step, tuple(events))

    def rejoin(self, round_: RejoinRound) -> RejoinResult:
        """Under partial recovery a replacement restores its own domains' newest saved rows and takes the step,
        reader position, dense model and optimizer and policy state from the lowest surviving rank; survivors
        change nothing."""
        restorer, state = self.restorer, self.restorer.state
        coordinator = restorer.coordinator
        live = coordinator.broadcast(state.live(self.policy.state_dict()) if coordinator.rank == round_.source else None,
                                     src=round_.source, site="rejoin.live_state")
        agreement = coordinator.agree(
            lambda: self._adopt(live, round_.saves) if not round_.has_state else DomainRestore(0, round_.failed_at, 0),
            expected=(*RESTORE_ERRORS, KeyError), site="rejoin.outcome")
        state.step = round_.failed_at
        problem = agreement.first()
        if problem is not None:
            raise RecoveryError(f"rank(s) {list(round_.replaced)} cannot be restored: {problem.message}")
        for rank in round_.replaced:
            restored = agreement.values[rank]
            restorer.ledger.record_failure(FailureEvent(
                round_.failed_at, rank, "partial", restored.oldest_step,
                lost_updates=round_.replaced_progress.get(rank, (0, 0))[1], lost_steps=0,
                loaded_bytes=restored.bytes_read))
        return RejoinResult("partial", round_.failed_at, round_.failed_at, agreement.local.bytes_read, round_.replaced)

    def _adopt(self, live: LiveState, saves: Sequence[SaveInfo]) -> DomainRestore:
        """A replacement's state: its domains' newest saved rows, the survivor's everything else."""
        restorer, state = self.restorer, self.restorer.state
        state.adopt(live)
        bytes_read, oldest = 0, state.step
        for domain in restorer.layout.local:
            restored = restorer.restore_domain(domain, saves)
            bytes_read, oldest = bytes_read + restored.bytes_read, min(oldest, restored.oldest_step)
        # The policy's schedule counts from the newest save holding every row, as the survivors' does.
        every_row = [s.step for s in saves if s.kind == "full" or s.extra.get("every_row")]
        self.policy.load_state_dict(live.policy, max(every_row, default=0))
        return DomainRestore(0, oldest, bytes_read)

    def expected_pls(self, failures: int, num_domains: int, total_steps: int) -> float:
        return self.policy.expected_pls(failures, num_domains, total_steps)


STRATEGIES: dict[str, type[RecoveryStrategy]] = {s.kind: s for s in (NoRecovery, FullRecovery, PartialRecovery)}

