"""The three baseline policies: no checkpoints, full recovery, partial recovery."""
from __future__ import annotations

from cpr.planning import expected_lost_steps
from cpr.policies.base import CheckpointPolicy, PeriodicFullPolicy, SaveDecision


class NoCheckpointPolicy(CheckpointPolicy):
    """Never saves; a failure cannot be recovered."""

    name = "none"
    recovery = "none"

    def decide(self, step: int) -> SaveDecision | None:
        return None


class FullRecoveryPolicy(PeriodicFullPolicy):
    """Periodic full saves; a failure rolls every shard, the dense model and the reader back to the last
    save and the lost steps are trained again (Young/Daly interval)."""

    name = "full"
    recovery = "full"


class PartialRecoveryPolicy(PeriodicFullPolicy):
    """Periodic full saves; a failure reloads only the failed domains' rows and their optimizer state.
    The dense model, the other domains and the reader go on; the failed domains' updates since the save
    are lost (the interval is the longest whose expected PLS meets the target)."""

    name = "partial"
    recovery = "partial"

    def expected_pls(self, failures: int, num_domains: int, total_steps: int) -> float:
        # Saves and failures both fall on step ends, so a failure finds the shard 0 .. T-1 steps past its
        # save: about (T - 1) / 2, not the continuous T / 2 (10% less at T = 11).
        return failures * expected_lost_steps(self.interval_steps, total_steps) / (num_domains * total_steps)
