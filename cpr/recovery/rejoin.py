"""The collectives that bring a re-formed group (survivors of a rank's death and its replacement) to one
state, in the one order every rank runs them (see `cpr.elastic` for how the group re-forms).

    every rank:  states (who survived, at which step) -> the folder's saves settle the saves in flight ->
                 the coordinator's staging tag -> the job's record from the lowest survivor ->
                 the strategy's rejoin (partial: a survivor's live state to the replacements, then
                 everyone's outcome; full: a rollback on every rank)
    no survivor: the job restarts from its newest full save (or a new initial save)
"""
from __future__ import annotations

from typing import Mapping

from cpr.policies.base import SaveDecision
from cpr.save import SavePipeline

from .strategies import RecoveryStrategy, RejoinResult, RejoinRound


def rejoin(strategy: RecoveryStrategy, pipeline: SavePipeline, has_state: bool,
           replaced_progress: Mapping[int, tuple[int, int]]) -> RejoinResult:
    """Bring every rank of a re-formed group to one state (collective: survivors call it with `has_state`,
    replacements without). `replaced_progress[rank]` is what each replaced rank last published, (row-updates
    served, updates since their rows' saves): the replacement continues the count, the loss goes into the
    record."""
    restorer = strategy.restorer
    coordinator, store, state, ledger = restorer.coordinator, restorer.store, restorer.state, restorer.ledger
    states = coordinator.all_gather((has_state, state.step), site="rejoin.states")
    saves = store.saves()  # every survivor has finished its commit attempt: the folder is settled
    pipeline.settle_interrupted(saves)
    pipeline.staging_tag = coordinator.broadcast(store.writer_tag(), site="rejoin.staging_tag")
    survivors = [rank for rank, (alive, _) in enumerate(states) if alive]
    replaced = tuple(rank for rank, (alive, _) in enumerate(states) if not alive)
    if not has_state and coordinator.rank in replaced_progress:
        ledger.total_updates = replaced_progress[coordinator.rank][0]
    if not survivors:
        rolled_back = restorer.rollback(saves, resume=True)
        if rolled_back is None:
            pipeline.save(SaveDecision("full", reason="initial state"))
            pipeline.flush()
        return RejoinResult("restart", state.step, max(step for _, step in states),
                            rolled_back.bytes_read if rolled_back else 0, replaced)
    source = survivors[0]
    ledger.adopt_events(coordinator.broadcast(ledger, src=source, site="rejoin.ledger"))
    return strategy.rejoin(RejoinRound(has_state, replaced, source, states[source][1], saves, replaced_progress))
