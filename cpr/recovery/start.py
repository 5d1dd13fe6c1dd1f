"""Where a run's state starts from: a fresh start (with the initial save a failure before the first periodic
save restores from), a resume after a crash (the newest loadable full save), or, for a replacement of a dead
rank, nothing yet (its state comes in the rejoin)."""
from __future__ import annotations

from cpr.errors import CorruptCheckpointError, EarlierRunError, NothingToResumeError
from cpr.policies.base import SaveDecision
from cpr.save import SavePipeline

from .strategies import RecoveryStrategy


def start_run(strategy: RecoveryStrategy, pipeline: SavePipeline, resume: bool, overwrite: bool, joining: bool,
              start_fresh: bool = False) -> None:
    """Bring the live state to where the run starts (collective; the folder is locked already).

    `resume`: everything, the step and the reader included, from the newest full save every rank can load; a
    folder without one is a NothingToResumeError saying what it holds, unless `start_fresh`. A new run in a
    folder holding an earlier run's saves (readable or not) is an EarlierRunError unless `overwrite` (then they
    are deleted) or `start_fresh` (then they are set aside, see cpr/storage/retention.py): mixing two runs'
    saves would restore rows of the other run. `joining`: a replacement of a dead rank, which learns the
    staging tag with the survivors in the rejoin.
    """
    restorer = strategy.restorer
    coordinator, store = restorer.coordinator, restorer.store
    if joining:
        return
    pipeline.staging_tag = coordinator.broadcast(store.writer_tag(), site="start.staging_tag")
    listing = store.listing()
    found = bool(listing.saves or listing.unreadable)
    if resume:
        try:
            if restorer.rollback(listing.saves, resume=True) is not None:
                return
            problem = ""
        except CorruptCheckpointError as err:  # raised alike on every rank (the ranks agree on each save)
            problem = f"; {err}"
        if not start_fresh:
            raise NothingToResumeError(
                f"resume: checkpoint folder {store.directory} holds no loadable full save ({listing.describe()}"
                f"{problem}); to start from step 0 anyway pass --start-fresh (start_fresh=True): what the folder "
                "holds is set aside, not deleted")
    elif found and not (overwrite or start_fresh):
        raise EarlierRunError(
            f"checkpoint folder {store.directory} holds saves of an earlier run ({listing.describe()}); resume it "
            "(--resume), start over setting them aside (--start-fresh) or deleting them (--overwrite / overwrite=True)")
    if found:
        coordinator.all_gather(None, site="start.overwrite_barrier")  # every rank has looked before the saves go
        if coordinator.is_coordinator and overwrite and not resume:
            store.discard_after(-1)
        elif coordinator.is_coordinator:
            store.set_aside_after(-1)
    if strategy.keeps_checkpoints:
        # A failure before the first periodic save must still find the domain's rows somewhere: the
        # initial save is committed before training starts.
        pipeline.save(SaveDecision("full", reason="initial state"))
        pipeline.flush()
