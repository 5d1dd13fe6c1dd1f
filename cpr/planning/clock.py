"""The clock a run is planned on: the emulated job's, or the wall clock of a real one.

An *emulated* run (`--failures`, failures drawn from a profile, the experiments) stretches its steps over
the profile's job (`hours_per_step = job_hours / total_steps`) and charges saves and loads the profile's
costs. A *real* run (a user's loop, real kills, torchrun without `--failures`) plans on its wall clock:
the cluster's per-node MTBF and node count, and the costs this run measured (`MeasuredCosts`, from
`cpr.planning.measure.CostMeter`): a step, what a full save costs the training loop, what a restore costs.
Both give a `ClusterProfile` and the hours one step stands for, so every planner (Young/Daly, the PLS
target, the prioritized plans) is the same arithmetic on either clock. Pure arithmetic: nothing here reads
a clock.
"""
from __future__ import annotations

from dataclasses import dataclass

from .profile import ClusterProfile

CLOCK_KINDS = ("emulated", "real")
_SECONDS_PER_HOUR = 3600.0
# A save the meter saw cost nothing (a tiny model on a fast disk) still costs something: the planner's
# Young interval needs a save time above 0.
_MIN_SAVE_SECONDS = 1e-6


@dataclass(frozen=True)
class MeasuredCosts:
    """What this run measured, in seconds (see `cpr.planning.measure.CostMeter`).

    `save_stall_seconds` is the training loop's stall for one full save (the whole write for a synchronous
    save); `persist_slowdown_seconds` what training lost to an asynchronous full save persisting beside it;
    `subset_save_seconds` the same two for one subset save; `restore_seconds` a full restore, measured or
    estimated from the read bandwidth measured so far (`restore_measured` says which).
    """

    step_seconds: float
    save_stall_seconds: float
    persist_slowdown_seconds: float
    subset_save_seconds: float
    restore_seconds: float
    restore_measured: bool
    steps_measured: int
    saves_measured: int

    @property
    def save_seconds(self) -> float:
        """What one full save costs the training loop: its stall and the slowdown while it persists."""
        return self.save_stall_seconds + self.persist_slowdown_seconds


@dataclass(frozen=True)
class EmulatedClock:
    """The emulated job's clock: the run's steps span `profile.job_hours`."""

    kind = "emulated"

    def describe(self, profile: ClusterProfile, total_steps: int) -> str:
        return (f"emulated clock: {total_steps} steps stand for a {profile.job_hours:g}-hour job of the profile "
                f"(MTBF {profile.job_mtbf_hours:g} h, saves {profile.save_seconds:g} s)")


@dataclass(frozen=True)
class RealClock:
    """The wall clock of a real job on a cluster of `nodes` nodes, each failing every `mtbf_hours` on
    average; `reschedule_seconds` is what replacing a failed node costs beside the restore (0: unknown)."""

    mtbf_hours: float
    nodes: int = 1
    reschedule_seconds: float = 0.0

    kind = "real"

    def __post_init__(self) -> None:
        if not self.mtbf_hours > 0 or not isinstance(self.nodes, int) or self.nodes < 1 or self.reschedule_seconds < 0:
            raise ValueError(f"RealClock: need mtbf_hours > 0, nodes an int >= 1 and reschedule_seconds >= 0, got "
                             f"{self.mtbf_hours}, {self.nodes!r}, {self.reschedule_seconds}")

    @property
    def job_mtbf_seconds(self) -> float:
        return self.mtbf_hours * _SECONDS_PER_HOUR / self.nodes

    def profile(self, costs: MeasuredCosts, total_steps: int, num_domains: int) -> ClusterProfile:
        """The cluster profile of this job as measured: it lasts `total_steps` steps of the measured length."""
        return ClusterProfile(
            job_hours=total_steps * costs.step_seconds / _SECONDS_PER_HOUR,
            mtbf_hours=self.mtbf_hours, nodes=self.nodes, num_domains=num_domains,
            save_seconds=max(costs.save_seconds, _MIN_SAVE_SECONDS), load_seconds=costs.restore_seconds,
            reschedule_seconds=self.reschedule_seconds,
        )

    @staticmethod
    def hours_per_step(costs: MeasuredCosts) -> float:
        return costs.step_seconds / _SECONDS_PER_HOUR

    def describe(self, costs: MeasuredCosts | None, total_steps: int) -> str:
        head = f"real clock: {self.nodes} node(s) of {self.mtbf_hours:g} h MTBF (a failure every {self.job_mtbf_seconds:,.0f} s)"
        if costs is None:
            return f"{head}; not calibrated yet (no periodic save before calibration)"
        restore = "measured" if costs.restore_measured else "estimated from the read bandwidth"
        return (f"{head}; measured step {costs.step_seconds * 1e3:.2f} ms ({total_steps} steps = "
                f"{total_steps * costs.step_seconds:,.1f} s), full save {costs.save_seconds:.3f} s (stall "
                f"{costs.save_stall_seconds:.3f} + persisting {costs.persist_slowdown_seconds:.3f}), restore "
                f"{costs.restore_seconds:.3f} s ({restore})")


def full_save_reason(interval_steps: int, total_steps: int, costs: MeasuredCosts, clock: RealClock) -> str:
    """Why full recovery saves as often as it does on the real clock (the CLI prints it)."""
    young = (2.0 * max(costs.save_seconds, _MIN_SAVE_SECONDS) * clock.job_mtbf_seconds) ** 0.5
    job = total_steps * costs.step_seconds
    if interval_steps >= total_steps:
        return (f"no periodic full save: Young's interval sqrt(2 x {costs.save_seconds:.3g} s x "
                f"{clock.job_mtbf_seconds:,.0f} s) = {young:,.1f} s is longer than the {job:,.1f}-second job, so a "
                "save would cost more than the retraining it can save")
    return (f"a full save every {interval_steps} steps: Young's interval sqrt(2 x {costs.save_seconds:.3g} s x "
            f"{clock.job_mtbf_seconds:,.0f} s) = {young:,.1f} s of {costs.step_seconds * 1e3:.2f}-ms steps")
