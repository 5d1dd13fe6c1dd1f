"""Where a run's state starts from: a fresh start (with the initial save a failure before the first periodic
save restores from), a resume after a crash (the newest loadable full save), or, for a replacement of a dead
rank, nothing yet (its state comes in the rejoin)."""
from __future__ import annotations

from cpr.errors import EarlierRunError
from cpr.policies.base import SaveDecision
from cpr.save import SavePipeline

from .strategies import RecoveryStrategy


def start_run(strategy: RecoveryStrategy, pipeline: SavePipeline, resume: bool, overwrite: bool, joining: bool) -> None:
    """Bring the live state to where the run starts (collective; the folder is locked already).

    `resume`: everything, the step and the reader included, from the newest full save every rank can load, if
    any. A new run in a folder holding an earlier run's saves is an EarlierRunError unless `overwrite` (then
    they are deleted): mixing two runs' saves would restore rows of the other run. `joining`: a replacement
    of a dead rank, which learns the staging tag with the survivors in the rejoin.
    """
    restorer = strategy.restorer
    coordinator, store = restorer.coordinator, restorer.store
    if joining:
        return
    pipeline.staging_tag = coordinator.broadcast(store.writer_tag(), site="start.staging_tag")
    saves = store.saves()
    if resume and restorer.rollback(saves, resume=True) is not None:
        return
    if saves and not resume:
        if not overwrite:
            raise EarlierRunError(
                f"checkpoint folder {store.directory} holds {len(saves)} saves of an earlier run (newest at "
                f"step {saves[-1].step}); resume it, or start over deleting them (--overwrite / overwrite=True)")
        coordinator.all_gather(None, site="start.overwrite_barrier")  # every rank has looked before the saves go
        if coordinator.is_coordinator:
            store.discard_after(-1)
    if strategy.keeps_checkpoints:
        # A failure before the first periodic save must still find the domain's rows somewhere: the
        # initial save is committed before training starts.
        pipeline.save(SaveDecision("full", reason="initial state"))
        pipeline.flush()
