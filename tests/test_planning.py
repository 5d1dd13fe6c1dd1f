import dataclasses
import math

import pytest

from cpr.planning import (
    ClusterProfile,
    expected_lost_steps,
    expected_pls,
    full_recovery_overhead,
    partial_interval,
    partial_interval_steps,
    plan,
    young_daly_interval,
)


def profile(**overrides) -> ClusterProfile:
    base = dict(job_hours=100.0, mtbf_hours=200.0, nodes=4, num_domains=8,
                save_seconds=360.0, load_seconds=720.0, reschedule_seconds=180.0)
    return ClusterProfile(**{**base, **overrides})


def test_job_mtbf_is_node_mtbf_over_nodes():
    assert profile().job_mtbf_hours == 50.0
    assert profile().expected_failures == 2.0


def test_young_interval_value():
    # sqrt(2 * 0.1 h * 50 h)
    assert young_daly_interval(profile()) == pytest.approx(math.sqrt(10.0))
    assert plan(profile(), 0.01).full.interval_hours == pytest.approx(math.sqrt(10.0))


def test_full_overhead_breakdown_at_the_young_interval():
    t = young_daly_interval(profile())
    overhead = full_recovery_overhead(profile(), t)
    assert overhead.save == pytest.approx(0.1 / t)
    assert overhead.lost_compute == pytest.approx(t / 2 / 50)
    assert overhead.load == pytest.approx(0.2 / 50)
    assert overhead.reschedule == pytest.approx(0.05 / 50)
    # at the optimum save and lost compute are equal: total = sqrt(2 O_save / M) + (O_load + O_res) / M
    assert overhead.total_fraction == pytest.approx(math.sqrt(2 * 0.1 / 50) + 0.25 / 50)


def test_partial_interval_meets_the_target_pls_exactly_at_the_boundary():
    p = profile()
    t = partial_interval(p, 0.02)
    assert t == pytest.approx(2 * 8 * 50 * 0.02)
    assert expected_pls(t, p) == pytest.approx(0.02)
    assert expected_pls(t * 1.001, p) > 0.02
    result = plan(p, 0.02).partial
    assert result.interval_hours == pytest.approx(t) and result.expected_pls == pytest.approx(0.02)
    assert result.overhead.lost_compute == 0.0
    assert result.overhead.load == pytest.approx(0.2 / 8 / 50)


@pytest.mark.parametrize("total_steps", [2, 7, 106, 141, 600])
def test_expected_lost_steps_is_the_mean_over_the_steps_a_failure_can_fall_on(total_steps):
    """Failure hours are uniform over the job: steps 0 .. S-1 each with probability 1/S, step 0 moved to
    step 1 (cpr.faults.schedule); saves at 0, k, 2k, ... come before a failure at the same step end."""
    for k in range(1, total_steps + 1):
        enumerated = sum(max(s, 1) % k for s in range(total_steps)) / total_steps
        assert expected_lost_steps(k, total_steps) == pytest.approx(enumerated), k


@pytest.mark.parametrize("total_steps, target", [(106, 0.02), (141, 0.02), (106, 0.01), (141, 0.1), (400, 0.05)])
def test_partial_interval_steps_is_the_longest_that_meets_the_target(total_steps, target):
    p = ClusterProfile.preset("production")
    failures = p.expected_failures

    def pls(k: int) -> float:
        return failures * expected_lost_steps(k, total_steps) / (p.num_domains * total_steps)

    k = partial_interval_steps(p, target, total_steps)
    assert pls(k) <= target
    assert all(pls(longer) > target for longer in range(k + 1, total_steps + 1))


def test_partial_interval_steps_is_longer_than_the_rounded_hours_where_whole_steps_allow():
    # 106 steps of the production profile: T_partial = 12.8 h = 11.3 steps rounds to 11 (0.86x the target
    # in whole steps); 12 steps still meet it.
    p = ClusterProfile.preset("production")
    assert round(partial_interval(p, 0.02) / (p.job_hours / 106)) == 11
    assert partial_interval_steps(p, 0.02, 106) == 12


def test_partial_interval_is_clamped_to_the_job_length():
    p = profile()
    assert partial_interval(p, 0.9) == p.job_hours
    assert expected_pls(partial_interval(p, 0.9), p) < 0.9


def test_production_preset_matches_the_papers_full_recovery_overhead():
    result = plan(ClusterProfile.preset("production"), 0.02)
    assert 0.075 <= result.full.overhead.total_fraction <= 0.085
    assert result.partial.overhead.total_fraction < result.full.overhead.total_fraction
    assert result.recommended == "partial"
    # the paper reports 0.53-0.68% for CPR on its production cluster
    assert 0.005 <= result.partial.overhead.total_fraction <= 0.007
    assert f"costs {result.partial.overhead.total_fraction:.2%}" in result.reason
    assert f"{result.full.overhead.total_fraction:.2%} for full recovery" in result.reason


def test_full_recovery_is_recommended_when_partial_saves_too_often():
    # One shard and a tiny PLS target force partial recovery to save far more often than Young's interval.
    result = plan(profile(num_domains=1), 0.0005)
    assert result.recommended == "full"
    assert result.partial.overhead.total_fraction > result.full.overhead.total_fraction


def test_with_measured_replaces_only_the_save_and_load_times():
    p = ClusterProfile.preset("production").with_measured(save_seconds=2.5, load_seconds=1.5)
    assert (p.save_seconds, p.load_seconds) == (2.5, 1.5)
    assert dataclasses.replace(p, save_seconds=210.0, load_seconds=210.0) == ClusterProfile.preset("production")


@pytest.mark.parametrize("overrides, field", [
    ({"mtbf_hours": 0.0}, "mtbf_hours"),
    ({"job_hours": -1.0}, "job_hours"),
    ({"num_domains": 0}, "num_domains"),
    ({"nodes": 0}, "nodes"),
    ({"save_seconds": 0.0}, "save_seconds"),
    ({"load_seconds": -1.0}, "load_seconds"),
    ({"reschedule_seconds": -1.0}, "reschedule_seconds"),
    ({"failure_distribution": "lognormal"}, "failure_distribution"),
    ({"failure_distribution": "weibull", "weibull_shape": 0.0}, "weibull_shape"),
])
def test_invalid_profiles_raise_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        profile(**overrides)


@pytest.mark.parametrize("target", [0.0, -0.1, 1.0, 1.5])
def test_invalid_target_pls_raises(target):
    with pytest.raises(ValueError, match="target_pls"):
        plan(profile(), target)


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="unknown preset 'datacenter'"):
        ClusterProfile.preset("datacenter")


def test_summary_says_plainly_when_measured_pls_is_off_target():
    from cpr.train import pls_verdict

    summary = {"failures": [{"recovery": "partial"}] * 8, "pls_measured": 0.0328, "pls_expected": 0.0267,
               "plan": {"target_pls": 0.02, "partial": {"expected_failures": 6.0}}}
    verdict = pls_verdict(summary)
    assert "1.64x, OFF by 64%" in verdict and "1.23x, OFF by 23%" in verdict and "8 failures" in verdict
    assert "within 5%" in pls_verdict({**summary, "pls_measured": 0.021, "pls_expected": 0.02})
    assert pls_verdict({**summary, "failures": [{"recovery": "full"}]}) == ""
    assert pls_verdict({**summary, "failures": []}) == ""
