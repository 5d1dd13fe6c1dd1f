"""The record of each real death a rejoin answered: who died, what it cost, and where the time went."""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

from cpr.accounting import RecoveryRecord
from cpr.checkpointer import CPRCheckpointer
from cpr.recovery import RejoinResult

from .membership import Membership


@dataclass(frozen=True)
class HealTimes:
    """When (time.time()) this process reached each stage of a heal: noticed the death (survivors only),
    started forming the group, joined it, rebuilt the model, restored its state."""

    noticed: float | None
    started: float
    joined: float
    built: float
    restored: float


@dataclass(frozen=True)
class RankHeal:
    """What each rank tells the others of its heal."""

    restored: float
    bytes_read: int
    own_bytes: int
    dropped_steps: int
    times: dict[str, float | None]


def record_recoveries(ckpt: CPRCheckpointer, membership: Membership, result: RejoinResult, dropped_steps: int,
                      times: HealTimes) -> None:
    """Every rank records the same `RecoveryRecord` per death this rejoin answered, with where the time
    went (see `RecoveryRecord.phases`). Collective."""
    mine = RankHeal(times.restored, result.bytes_read, ckpt.tables.nbytes(), dropped_steps, asdict(times))
    done: list[RankHeal] = ckpt.coordinator.all_gather(mine, site="heal.times")
    survivors = [rank for rank in range(len(done)) if rank not in result.replaced]
    last = max((r.generation for r in ckpt.ledger.recoveries), default=0)
    dropped = max(d.dropped_steps for d in done)
    for death in membership.deaths_since(last):
        own = done[death.rank].times
        noticed = [done[r].times["noticed"] for r in survivors if done[r].times["noticed"] is not None]
        phases = {
            "survivors_notice": max(noticed) - death.time if noticed else None,
            "replacement_start": own["started"] - death.time,  # process start, imports, data
            "rendezvous": own["joined"] - own["started"],
            "build": max(d.times["built"] - d.times["joined"] for d in done),
            "restore": max(d.times["restored"] - d.times["built"] for d in done),
        }
        record = RecoveryRecord(
            rank=death.rank, step=result.failed_at + dropped, kind=result.kind,
            generation=death.generation,
            seconds_to_resume=max((done[r].restored for r in survivors), default=done[death.rank].restored) - death.time,
            seconds_to_rejoin=done[death.rank].restored - death.time,
            bytes_read=done[death.rank].bytes_read, own_bytes=done[death.rank].own_bytes,
            survivor_bytes_read=sum(done[r].bytes_read for r in survivors),
            dropped_steps=dropped, resumed_at=result.step, phases=phases,
        )
        ckpt.ledger.record_recovery(record)
        if ckpt.coordinator.is_coordinator:
            print(f"rank {record.rank} died at step {record.step}: {record.kind} recovery, training resumed at "
                  f"step {record.resumed_at} after {record.seconds_to_resume:.1f} s (replacement read "
                  f"{record.bytes_read:,} bytes, survivors {record.survivor_bytes_read:,})", file=sys.stderr, flush=True)
