"""Planning on the real clock, driven by a fake clock: calibration, re-plans when a measured cost moves, the
PLS promise across re-plans (cpr/realtime.py, cpr/planning/clock.py, measure.py, online.py)."""
import math

import numpy as np
import pytest

from cpr.accounting import RunLedger
from cpr.comm import Coordinator
from cpr.planning import ClusterProfile, longest_interval_steps
from cpr.planning.clock import MeasuredCosts, RealClock, full_save_reason
from cpr.planning.measure import CostMeter
from cpr.planning.online import interval_keeping_promise, rest_age_sums
from cpr.policies.base import PolicyContext, SaveDecision
from cpr.policies.basic import FullRecoveryPolicy, PartialRecoveryPolicy
from cpr.realtime import RunClock

STEPS = 2000
FULL_BYTES = 10_000_000


class FakeTime:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _run(policy_cls, step_seconds, save_seconds, mtbf_hours=1.0, nodes=1, num_domains=4, target=0.02):
    """Drive a policy on a RunClock for STEPS steps: step s takes step_seconds(s) of fake time, a save
    stalls the loop save_seconds(s) (synchronous: its stall is its whole cost). Returns the clock, the
    policy and the steps saved at."""
    now = FakeTime()
    profile = ClusterProfile.preset("production")
    clock = RunClock(RealClock(mtbf_hours=mtbf_hours, nodes=nodes), profile.__class__(
        **{**profile.__dict__, "num_domains": num_domains}), target, STEPS, now=now)
    context = PolicyContext(profile=clock.profile, plan=clock.plan, target_pls=target, total_steps=STEPS,
                            hours_per_step=clock.hours_per_step, interval_steps=None, tracker=None, layout=None,
                            tables=None)
    policy = policy_cls(STEPS)  # before calibration: no periodic save
    ledger = RunLedger(clock.hours_per_step, clock.profile.job_hours, 0.0, 0.0, 0.0, FULL_BYTES)
    clock.attach(policy, context, ledger, lambda: None, Coordinator())
    ledger.record_save(0, "full", FULL_BYTES, save_seconds(0))  # the run's first save
    saves = []
    for step in range(1, STEPS + 1):
        now.t += step_seconds(step)
        clock.step_started()
        decision = policy.decide(step)
        if decision is not None and step < STEPS:
            policy.after_save(SaveDecision("full", step=step))
            now.t += save_seconds(step)
            ledger.record_save(step, "full", FULL_BYTES, save_seconds(step))
            saves.append(step)
        clock.step_ended(step, decision)
    return clock, policy, saves


def test_full_recovery_interval_follows_a_save_cost_that_doubles():
    clock, policy, saves = _run(FullRecoveryPolicy, lambda s: 0.5, lambda s: 2.0 if s < 1000 else 4.0)
    events = clock.take_events()
    assert [e["event"] for e in events][:2] == ["plan", "plan"]  # uncalibrated, then calibrated
    first = events[1]["interval_steps"]
    # Young: sqrt(2 * 2 s * 3600 s) = 120 s = 240 half-second steps.
    assert first == round(math.sqrt(2 * 2.0 * 3600) / 0.5)
    replans = [e for e in events if e["event"] == "re-plan"]
    assert replans and "save_seconds" in replans[0]["moved"] and replans[0]["step"] > 1000
    # The median save cost moves once most saves cost 4 s; the interval then grows by sqrt(2).
    assert policy.interval_steps == round(math.sqrt(2 * 4.0 * 3600) / 0.5)
    gaps = np.diff(saves)
    assert set(gaps[:3]) == {first} and saves[-1] == replans[0]["step"] + policy.interval_steps


def test_partial_replan_keeps_the_pls_promise_when_steps_slow_down():
    # Steps twice as slow from step 600 on: a failure comes every half as many steps, so the interval must
    # shrink, and the rest of the run must make up for the ages the first 600 steps already had.
    step_seconds = lambda s: 1.0 if s < 600 else 2.0
    clock, policy, saves = _run(PartialRecoveryPolicy, step_seconds, lambda s: 0.1, mtbf_hours=4.0, target=0.005)
    events = [e for e in clock.take_events() if e["event"] != "plan" or e["step"] > 0]
    assert any(e["event"] == "re-plan" and "step_seconds" in e["moved"] for e in events)
    final = clock.costs.step_seconds
    assert final == 2.0
    max_mean_age = 0.005 * 4 * 4.0 * 3600 / final  # target * N * M, in steps of the newest measured length
    assert policy.age_sum / STEPS <= max_mean_age
    assert policy.age_sum / STEPS > 0.9 * max_mean_age  # and not by saving far more often than it needs
    assert policy.replans >= 2 and len(set(np.diff(saves))) >= 2


def test_interval_keeping_promise_is_the_longest_meeting_it():
    # From the start of a run it is the plain whole-step interval (ages s mod T over the run's step ends).
    for budget in (0.5, 3.0, 17.2):
        promised = interval_keeping_promise(budget, 500, 0, 0.0, 0)
        ages = rest_age_sums(np.arange(1, 502), 500, 0)
        assert ages[promised - 1] <= budget * 500 < (ages[promised] if promised < 501 else math.inf)
        assert abs(promised - longest_interval_steps(budget, 500)) <= 1
    # Ages already spent leave less for the rest; an age already over the budget saves every step.
    assert interval_keeping_promise(5.0, 500, 250, 250 * 8.0, 10) < interval_keeping_promise(5.0, 500, 250, 250 * 2.0, 10)
    assert interval_keeping_promise(1.0, 500, 250, 500 * 5.0, 10) == 1


def test_rest_age_sums_counts_each_step_end():
    for t, rest, offset in ((1, 7, 0), (3, 10, 2), (12, 10, 5), (4, 4, 0)):
        ages, age = [], offset
        for j in range(1, rest + 1):
            age = 0 if j % t == 0 else age + 1
            ages.append(age)
        assert rest_age_sums(np.array([t]), rest, offset)[0] == sum(ages)


def test_meter_separates_a_save_stall_from_its_persisting_slowdown():
    meter = CostMeter(full_bytes=1000)
    for _ in range(10):
        meter.record_step(0.1, None)
    meter.record_save("full", stall_seconds=0.05, persist_seconds=0.4, nbytes=1000)
    assert meter.costs().persist_slowdown_seconds == 0.4  # not measured beside steps yet: the whole write
    for _ in range(4):
        meter.record_step(0.15, "full")  # the save persisted beside 4 steps, each 50 ms slower
    costs = meter.costs()
    assert costs.step_seconds == 0.1 and costs.save_stall_seconds == 0.05
    assert costs.persist_slowdown_seconds == pytest.approx(0.2)
    assert costs.restore_seconds == pytest.approx(0.4) and not costs.restore_measured  # 1000 B at 2500 B/s
    meter.record_restore(1.5, nbytes=500)
    assert meter.costs().restore_seconds == pytest.approx(3.0) and meter.costs().restore_measured


def test_a_short_job_says_why_it_makes_no_periodic_full_save():
    costs = MeasuredCosts(0.02, 0.3, 0.2, 0.0, 0.3, False, 10, 1)
    reason = full_save_reason(100, 100, costs, RealClock(mtbf_hours=400, nodes=20))
    assert reason.startswith("no periodic full save") and "longer than the 2.0-second job" in reason
    assert RealClock(400, 20).profile(costs, 100, 2).job_hours == pytest.approx(2.0 / 3600)


def test_expected_pls_from_the_schedule_agrees_with_measured_over_seeds(tmp_path):
    """One failure per run at a random step and domain: the PLS expected from its schedule (the age of the
    domain's newest save, a 1/N share of the updates) and the PLS measured (the row-updates really lost)
    differ, seed by seed, by which rows the domain holds; over the seeds their mean difference is within
    its sampling error."""
    import random
    import statistics

    import torch

    from cpr import CPRCheckpointer
    from tests.test_checkpointer import make_batch, plain_ebc

    rows, steps, domains = [200, 120, 40], 48, 4
    differences, measured = [], []
    for seed in range(30):
        pick = random.Random(seed)
        fail_at, domain = pick.randrange(1, steps), pick.randrange(domains)
        ebc, optimizer = plain_ebc(rows)
        ckpt = CPRCheckpointer(ebc, optimizer, tmp_path / str(seed), policy="partial", num_domains=domains,
                               total_steps=steps, interval_steps=10, async_save=False)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            ckpt.observe(make_batch(gen, 16, rows))
            ckpt.step()
            if ckpt.global_step == fail_at:
                ckpt.recover([domain])
        report = ckpt.report()
        ckpt.close()
        expected = ckpt.ledger.pls_of_schedule(steps, domains)
        assert expected == pytest.approx((fail_at % 10) / domains / steps)
        differences.append(report["pls_measured"] - expected)
        measured.append(report["pls_measured"])
    error = statistics.stdev(differences) / len(differences) ** 0.5
    assert statistics.mean(measured) > 0
    assert abs(statistics.mean(differences)) <= 3 * error
