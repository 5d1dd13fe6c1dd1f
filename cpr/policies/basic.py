"""The three baseline policies: no checkpoints, full recovery, partial recovery."""
from __future__ import annotations

from cpr.policies.base import CheckpointPolicy, PeriodicFullPolicy, SavePlan


class NoCheckpointPolicy(CheckpointPolicy):
    """Never saves; a failure cannot be recovered."""

    name = "none"
    recovery = "none"

    def decide(self, step: int) -> SavePlan | None:
        return None


class FullRecoveryPolicy(PeriodicFullPolicy):
    """Periodic full saves; a failure rolls every shard, the dense model and the reader back to the last
    save and the lost steps are trained again (Young/Daly interval)."""

    name = "full"
    recovery = "full"


class PartialRecoveryPolicy(PeriodicFullPolicy):
    """Periodic full saves; a failure reloads only the failed shards' rows and their optimizer state.
    The dense model, the other shards and the reader go on; the failed shards' updates since the save
    are lost (the interval is the longest whose expected PLS meets the target)."""

    name = "partial"
    recovery = "partial"
