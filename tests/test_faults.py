import dataclasses
import json
import math

import numpy as np
import pytest

from cpr.faults import FailureSchedule, hours_per_step, sample_gaps
from cpr.planning import ClusterProfile

PROFILE = ClusterProfile(job_hours=100.0, mtbf_hours=40.0, nodes=4, num_domains=8, save_seconds=60.0, load_seconds=60.0)


def test_same_seed_same_schedule_other_seed_another():
    a = FailureSchedule.from_profile(PROFILE, 1000, seed=3, count=6)
    assert a == FailureSchedule.from_profile(PROFILE, 1000, seed=3, count=6)
    assert a.failures != FailureSchedule.from_profile(PROFILE, 1000, seed=4, count=6).failures


@pytest.mark.parametrize("distribution", ["exponential", "weibull", "gamma"])
def test_count_gives_exactly_that_many_failures_in_range(distribution):
    profile = dataclasses.replace(PROFILE, failure_distribution=distribution, weibull_shape=0.6, gamma_shape=2.0)
    for seed in range(20):
        schedule = FailureSchedule.from_profile(profile, 500, seed=seed, count=7)
        steps = [f.step for f in schedule]
        assert len(schedule) == 7
        assert all(1 <= s < 500 for s in steps) and steps == sorted(set(steps))
        assert all(0 < f.hour < profile.job_hours for f in schedule)
        assert all(0 <= f.domain < profile.num_domains for f in schedule)


def test_failures_never_land_on_step_zero_or_share_a_step():
    moved_from_zero = 0
    for seed in range(50):
        schedule = FailureSchedule.from_profile(PROFILE, 3, seed=seed, count=2)
        assert [f.step for f in schedule] == [1, 2]
        moved_from_zero += schedule.failures[0].hour < hours_per_step(PROFILE, 3)
    assert moved_from_zero > 0  # some sampled failure did fall in step 0 and was moved


def test_hours_map_linearly_onto_steps():
    schedule = FailureSchedule.from_profile(PROFILE, 10_000, seed=0, count=5)
    for failure in schedule:
        assert failure.step == max(1, math.floor(failure.hour / hours_per_step(PROFILE, 10_000)))


# Sample means are checked against the configured MTBF within 5 standard errors (std / sqrt(n)).
@pytest.mark.parametrize("distribution, std_over_mean", [
    ("exponential", 1.0),
    ("weibull", math.sqrt(math.gamma(1 + 2 / 0.6) / math.gamma(1 + 1 / 0.6) ** 2 - 1)),
    ("gamma", 1 / math.sqrt(2.0)),
])
def test_mean_inter_failure_time_is_the_job_mtbf(distribution, std_over_mean):
    profile = dataclasses.replace(PROFILE, failure_distribution=distribution, weibull_shape=0.6, gamma_shape=2.0)
    n = 20_000
    gaps = sample_gaps(profile, np.random.default_rng(0), n)
    assert abs(gaps.mean() - profile.job_mtbf_hours) < 5 * std_over_mean * profile.job_mtbf_hours / math.sqrt(n)

    # The same through a whole renewal-process schedule spanning ~5000 MTBFs.
    long_job = dataclasses.replace(profile, job_hours=5000 * profile.job_mtbf_hours)
    schedule = FailureSchedule.from_profile(long_job, 10**8, seed=1)
    hours = np.array([f.hour for f in schedule])
    gaps = np.diff(hours, prepend=0.0)
    assert abs(gaps.mean() - profile.job_mtbf_hours) < 5 * std_over_mean * profile.job_mtbf_hours / math.sqrt(len(gaps))
    domains = np.bincount([f.domain for f in schedule], minlength=profile.num_domains)
    assert len(domains) == profile.num_domains and domains.min() > 0


def test_at_iteration_and_json():
    schedule = FailureSchedule.from_profile(PROFILE, 200, seed=5, count=3)
    first = schedule.failures[0]
    assert schedule.at(first.step) == [first]
    failing = {f.step for f in schedule}
    assert all(schedule.at(s) == [] for s in range(200) if s not in failing)
    data = json.loads(schedule.to_json())
    assert (data["total_steps"], data["seed"], len(data["failures"])) == (200, 5, 3)
    assert data["failures"][0] == {"step": first.step, "shard": first.domain, "hour": first.hour}


def test_empty_schedule_has_no_failures():
    empty = FailureSchedule.empty()
    assert len(empty) == 0 and empty.at(1) == [] and json.loads(empty.to_json())["failures"] == []


def test_invalid_requests_raise():
    with pytest.raises(ValueError, match="count"):
        FailureSchedule.from_profile(PROFILE, 10, seed=0, count=10)
    with pytest.raises(ValueError, match="total_steps"):
        FailureSchedule.from_profile(PROFILE, 1, seed=0)
    with pytest.raises(ValueError, match="expects 250.0 failures"):
        FailureSchedule.from_profile(dataclasses.replace(PROFILE, mtbf_hours=1.6), 100, seed=0)
