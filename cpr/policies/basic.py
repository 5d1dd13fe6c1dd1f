"""The three baseline policies: no checkpoints, full recovery, partial recovery."""
from __future__ import annotations

from cpr.planning import expected_lost_steps
from cpr.planning.online import interval_keeping_promise
from cpr.policies.base import CheckpointPolicy, PeriodicFullPolicy, PolicyContext, SaveDecision


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

    def replan(self, context: PolicyContext, step: int) -> None:
        if context.interval_steps is None:  # an interval given by the user stays
            self.interval_steps, self.anchor = context.steps(context.plan.full.interval_hours), step
            self.replans += 1


class PartialRecoveryPolicy(PeriodicFullPolicy):
    """Periodic full saves; a failure reloads only the failed domains' rows and their optimizer state.
    The dense model, the other domains and the reader go on; the failed domains' updates since the save
    are lost (the interval is the longest whose expected PLS meets the target)."""

    name = "partial"
    recovery = "partial"

    def replan(self, context: PolicyContext, step: int) -> None:
        # The promise: the run's mean save age at most target * N * M (in steps), the steps trained so far
        # included with the ages they had.
        if context.interval_steps is None:
            profile = context.profile
            max_age = context.target_pls * profile.num_domains * profile.job_mtbf_hours / context.hours_per_step
            self.interval_steps = interval_keeping_promise(max_age, context.total_steps, step, self.age_sum,
                                                           self.age_now(step))
            self.anchor = step
            self.replans += 1

    def expected_pls(self, failures: int, num_domains: int, total_steps: int) -> float:
        # Saves and failures both fall on step ends, so a failure finds the shard 0 .. T-1 steps past its
        # save: about (T - 1) / 2, not the continuous T / 2 (10% less at T = 11).
        # A re-planned run had the ages it had (age_sum), whatever its intervals were.
        mean_age = self.age_sum / total_steps if self.replans else expected_lost_steps(self.interval_steps, total_steps)
        return failures * mean_age / (num_domains * total_steps)
