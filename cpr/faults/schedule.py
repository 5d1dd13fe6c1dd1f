"""Seeded failure schedules: failures of an emulated cluster mapped onto the steps of a training run.

The run spans the emulated job: cluster hour h in [0, job_hours) is training step
floor(h / job_hours * total_steps). Failures form a renewal process whose i.i.d. inter-failure times
follow the profile's distribution with mean = job MTBF; each failure hits one failure domain (an
embedding parameter-server node), uniform in [0, num_domains).
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from cpr.planning import ClusterProfile

from .sampling import sample_gaps


@dataclass(frozen=True)
class Failure:
    """Domain `domain` fails just before training step `step` (cluster time `hour`)."""

    step: int
    domain: int  # a failure domain: an emulated row range, or a rank
    hour: float

    def to_json(self) -> dict:
        return {"step": self.step, "shard": self.domain, "hour": self.hour}  # (the CLI's name for a domain)


def hours_per_step(profile: ClusterProfile, total_steps: int) -> float:
    """Emulated cluster hours one training step stands for."""
    return profile.job_hours / total_steps


@dataclass(frozen=True)
class FailureSchedule:
    """Failures of one run, by step, at most one per step."""

    failures: tuple[Failure, ...]
    total_steps: int
    job_hours: float
    seed: int | None
    _by_step: dict[int, Failure] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_step", {f.step: f for f in self.failures})

    @classmethod
    def from_profile(
        cls, profile: ClusterProfile, total_steps: int, seed: int, count: int | None = None
    ) -> FailureSchedule:
        """Sample a schedule.

        count=None: a renewal process over [0, job_hours); the number of failures is random (mean
        job_hours / MTBF_job). count=N: exactly N failures, spread by the same distribution: N+1 gaps are
        drawn and their cumulative sums rescaled so that the (N+1)-th lands on job_hours.

        A failure mapped to step 0 moves to step 1 (there is nothing to recover before training). Several
        failures mapped to one step are spread onto the nearest later free steps (earlier ones at the end
        of the run), keeping their order and sampled hours; more failures than steps 1..total_steps-1 is
        an error.
        """
        if not isinstance(total_steps, int) or total_steps < 2:
            raise ValueError(f"total_steps must be an int >= 2, got {total_steps!r}")
        if count is not None and not 0 <= count <= total_steps - 1:
            raise ValueError(f"count must be in [0, {total_steps - 1}] for {total_steps} steps, got {count}")
        if count is None and profile.expected_failures > total_steps - 1:
            raise ValueError(f"the profile expects {profile.expected_failures:.1f} failures over the job, more than "
                             f"the {total_steps - 1} steps that can fail; use more steps or a larger MTBF")
        rng = np.random.default_rng(seed)
        hours = _renewal_hours(profile, rng) if count is None else _spread_hours(profile, rng, count)
        if len(hours) > total_steps - 1:
            raise ValueError(f"sampled {len(hours)} failures but only steps 1..{total_steps - 1} can fail")
        domains = rng.integers(0, profile.num_domains, size=len(hours))
        steps = _distinct_steps(np.floor(hours / hours_per_step(profile, total_steps)).astype(np.int64), total_steps)
        failures = tuple(Failure(int(s), int(d), float(h)) for s, d, h in zip(steps, domains, hours))
        return cls(failures, total_steps, profile.job_hours, seed)

    @classmethod
    def empty(cls) -> FailureSchedule:
        """A schedule with no failures (a run without fault injection)."""
        return cls((), 0, 0.0, None)

    def at(self, step: int) -> list[Failure]:
        """Failures to inject before `step` (zero or one)."""
        failure = self._by_step.get(step)
        return [] if failure is None else [failure]

    def __iter__(self) -> Iterator[Failure]:
        return iter(self.failures)

    def __len__(self) -> int:
        return len(self.failures)

    def to_json(self) -> str:
        return json.dumps({
            "total_steps": self.total_steps,
            "job_hours": self.job_hours,
            "seed": self.seed,
            "failures": [f.to_json() for f in self.failures],
        })


def _renewal_hours(profile: ClusterProfile, rng: np.random.Generator) -> np.ndarray:
    """Failure times of a renewal process on [0, job_hours)."""
    batch = math.ceil(2 * profile.expected_failures) + 16
    chunks, elapsed = [], 0.0
    while elapsed < profile.job_hours:
        times = elapsed + np.cumsum(sample_gaps(profile, rng, batch))
        chunks.append(times)
        elapsed = float(times[-1])
    times = np.concatenate(chunks)
    return times[times < profile.job_hours]


def _spread_hours(profile: ClusterProfile, rng: np.random.Generator, count: int) -> np.ndarray:
    """Exactly `count` failure times in (0, job_hours) with the distribution's relative spacing."""
    times = np.cumsum(sample_gaps(profile, rng, count + 1))
    return times[:count] / times[count] * profile.job_hours


def _distinct_steps(steps: np.ndarray, total_steps: int) -> np.ndarray:
    """Sorted steps made distinct and within [1, total_steps - 1], each moved as little as possible."""
    index = np.arange(len(steps))
    # Push each step past its predecessor: s'_i = max_j<=i (s_j + i - j), and at least 1.
    forward = np.maximum.accumulate(np.maximum(steps, 1) - index) + index
    # Leave room at the end: the i-th of n failures can be no later than total_steps - (n - i).
    latest = total_steps - len(steps) + index
    return np.minimum(forward, latest)
