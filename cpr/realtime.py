"""`RunClock`: which clock plans a run, and on the real clock, its measurements, calibration and re-plans.

On the emulated clock (`EmulatedClock`) the run is planned once from its profile, as it always was. On the
real clock (`RealClock`) nothing is saved periodically until the run has measured its steps for
`calibration_steps`; then every rank's `CostMeter` is gathered, the slowest rank's costs make the profile
(`RealClock.profile`), the plan is made and the policy re-plans (`CheckpointPolicy.replan`). Every
`replan_every` steps after that the costs are gathered again and the run re-plans when one moved by more
than `REPLAN_BOUND`. Plans and re-plans are kept as events for `metrics.jsonl` (`take_events`).

The meter is fed through the checkpointer's step (`step_started`, `step_ended`: the time between them is
the save machinery's, the time from one end to the next start a training step) and the run's ledger (its
saves' stalls and writes, its restores). `now` is injectable so that tests run on a fake clock.
"""
from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any, Callable

from cpr.planning import ClusterProfile, PlanResult, plan
from cpr.planning.clock import EmulatedClock, MeasuredCosts, RealClock, full_save_reason
from cpr.planning.measure import CostMeter, slowest
from cpr.planning.online import calibration_steps, moved, replan_every

if TYPE_CHECKING:
    from cpr.accounting import RunLedger
    from cpr.comm import Coordinator
    from cpr.policies.base import CheckpointPolicy, PolicyContext, SaveDecision

_HOUR = 3600.0
# Before calibration a real run's plan is made on costs under which every interval is the whole run (a
# microsecond step, a one-second save): nothing is saved periodically until the costs are measured.
_UNCALIBRATED = MeasuredCosts(step_seconds=1e-6, save_stall_seconds=1.0, persist_slowdown_seconds=0.0,
                              subset_save_seconds=1.0, restore_seconds=1.0, restore_measured=False,
                              steps_measured=0, saves_measured=0)


class RunClock:
    """The run's planning clock (see the module docstring)."""

    def __init__(self, clock: EmulatedClock | RealClock | None, profile: ClusterProfile, target_pls: float,
                 total_steps: int, now: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock if clock is not None else EmulatedClock()
        self.target_pls, self.total_steps, self._now = target_pls, total_steps, now
        self.costs: MeasuredCosts | None = None  # what the current plan was made from (real clock)
        self.replans = 0
        self.events: list[dict[str, Any]] = []
        self._meter: CostMeter | None = None
        self._ended: float | None = None
        self._seen_saves = self._seen_restores = 0
        if isinstance(self.clock, RealClock):
            profile = self.clock.profile(_UNCALIBRATED, total_steps, profile.num_domains)
        self._set_profile(profile)

    @property
    def real(self) -> bool:
        return isinstance(self.clock, RealClock)

    def _set_profile(self, profile: ClusterProfile) -> None:
        self.profile = profile
        self.plan: PlanResult = plan(profile, self.target_pls)
        self.hours_per_step = profile.job_hours / self.total_steps

    def attach(self, policy: CheckpointPolicy, context: PolicyContext, ledger: RunLedger, persisting: Callable[[], str | None],
               coordinator: Coordinator) -> None:
        """The parts of the run a real clock measures and re-plans (called once they exist)."""
        self._policy, self._context, self._ledger = policy, context, ledger
        self._persisting, self._coordinator = persisting, coordinator
        if self.real:
            self._meter = CostMeter(ledger.full_bytes)
            self.calibration_step, self.every = calibration_steps(self.total_steps), replan_every(self.total_steps)
        self.events.append({"step": 0, "event": "plan", "clock": self.clock.kind, "reason": self.reason()})

    # -- fed by the checkpointer's step ------------------------------------------------------------------
    def step_started(self) -> None:
        """A training step just ended (the checkpointer's `step()` begins)."""
        if self._meter is not None and self._ended is not None:
            self._meter.record_step(self._now() - self._ended, self._persisting())

    def step_ended(self, step: int, decision: SaveDecision | None) -> SaveDecision | None:
        """The checkpointer's `step()` is done with `step` (returns `decision`, for a one-line call)."""
        if self._meter is None:
            return decision
        self._feed()
        # The steps of the checks depend on the step alone: a replacement that joined late checks with the others.
        if step == self.calibration_step or (self.calibration_step < step < self.total_steps and step % self.every == 0):
            self._check(step)
        self._ended = self._now()
        return decision

    def _feed(self) -> None:
        ledger, world = self._ledger, self._coordinator.world_size
        for event in ledger.checkpoints[self._seen_saves:]:
            # The job's bytes are summed over the ranks; this rank wrote about its share of them.
            self._meter.record_save(event.kind, event.seconds, event.persist_seconds, event.charged_bytes // world)
        for record in ledger.recoveries[self._seen_restores:]:
            restore = record.phases.get("restore")
            if restore is not None:
                self._meter.record_restore(restore, record.bytes_read)
        self._seen_saves, self._seen_restores = len(ledger.checkpoints), len(ledger.recoveries)

    def _check(self, step: int) -> None:
        gathered = self._coordinator.all_gather((self._meter.costs(), self.costs), site="clock.costs")
        costs = slowest([measured for measured, _ in gathered])
        # The plan's costs as the ranks that made it know them: a replacement that joined since holds none
        # (the policy's plan came to it with the survivors' state) and takes them over without re-planning.
        planned = next((plan for _, plan in gathered if plan is not None), None)
        if planned is not None and self.costs is None:
            self._adopt(planned)
        if costs.step_seconds <= 0:
            return  # nothing measured yet (every step had a save persisting beside it): the next check plans
        reasons = ["calibration"] if planned is None else moved(planned, costs)
        if reasons:
            self._adopt(costs)
            self._replan(step, costs, reasons)

    def _adopt(self, costs: MeasuredCosts) -> None:
        self._set_profile(self.clock.profile(costs, self.total_steps, self.profile.num_domains))
        self.costs = costs
        self._context = dataclasses.replace(self._context, profile=self.profile, plan=self.plan,
                                            hours_per_step=self.hours_per_step)

    def _replan(self, step: int, costs: MeasuredCosts, reasons: list[str]) -> None:
        self._policy.replan(self._context, step)
        ledger = self._ledger  # the ledger's modelled overhead is in this run's hours from now on
        ledger.hours_per_step, ledger.job_hours = self.hours_per_step, self.profile.job_hours
        ledger.save_hours_full, ledger.load_hours_full = costs.save_seconds / _HOUR, costs.restore_seconds / _HOUR
        ledger.reschedule_hours = self.profile.reschedule_seconds / _HOUR
        self.replans += reasons != ["calibration"]
        settings = {k: v for k, v in self._policy.settings().items() if isinstance(v, (int, float)) and "interval" in k}
        self.events.append({"step": step, "event": "plan" if reasons == ["calibration"] else "re-plan", "clock": "real",
                            "moved": reasons, "costs": dataclasses.asdict(costs), **settings,
                            "reason": self.reason()})

    def take_events(self) -> list[dict[str, Any]]:
        """The plans made since the last call, for metrics.jsonl."""
        events, self.events = self.events, []
        return events

    # -- reporting --------------------------------------------------------------------------------------
    def reason(self) -> str:
        """Why the run saves as often as it does, in a sentence."""
        if not self.real:
            return self.clock.describe(self.profile, self.total_steps)
        if self.costs is None:
            return self.clock.describe(None, self.total_steps)
        interval = getattr(self._policy, "interval_steps", None)
        if self._policy.name == "full" and interval is not None:
            return full_save_reason(interval, self.total_steps, self.costs, self.clock)
        return self.clock.describe(self.costs, self.total_steps)

    def report(self) -> dict[str, Any]:
        return {
            "clock": self.clock.kind,
            "clock_description": (self.clock.describe(self.costs, self.total_steps) if self.real
                                  else self.clock.describe(self.profile, self.total_steps)),
            "clock_reason": self.reason(),
            "measured_costs": dataclasses.asdict(self.costs) if self.costs is not None else None,
            "replans": self.replans,
        }
