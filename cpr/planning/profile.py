"""`ClusterProfile`: the failure and checkpoint-cost figures of the cluster a training job runs on."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

FAILURE_DISTRIBUTIONS = ("exponential", "weibull", "gamma")


@dataclass(frozen=True)
class ClusterProfile:
    """Failure and checkpoint-cost model of one training job.

    `mtbf_hours` is the MTBF of one node and `nodes` the job's node count, so the job fails every
    `job_mtbf_hours = mtbf_hours / nodes` on average (give `nodes=1` to state a per-job MTBF directly).
    `num_domains` is the number of failure domains (embedding parameter-server nodes); a failure loses one.
    `save_seconds` / `load_seconds` are the times to write / read the whole checkpoint; `reschedule_seconds`
    is the time to replace a failed node. Inter-failure times follow `failure_distribution` with mean
    `job_mtbf_hours` ("weibull" with `weibull_shape`, "gamma" with `gamma_shape`; shape 1 is exponential).

    Presets (`ClusterProfile.preset(name)`), derived in docs/planning.md:
      - "production": 20 nodes of 400 h MTBF (job MTBF 20 h) with 16 embedding shards, 120 h job,
        210 s save and load, 60 s reschedule. Full recovery at its Young interval costs 8.0% of job time,
        matching the CPR paper's 8.2-8.5% on a production cluster.
      - "small-cluster": 4 nodes of 200 h MTBF (job MTBF 50 h), 4 shards, 24 h job, 30 s save and load,
        30 s reschedule.
    """

    job_hours: float
    mtbf_hours: float
    save_seconds: float
    load_seconds: float
    nodes: int = 1
    num_domains: int = 1
    reschedule_seconds: float = 0.0
    failure_distribution: str = "exponential"
    weibull_shape: float = 1.0
    gamma_shape: float = 1.0

    def __post_init__(self) -> None:
        _require(self.job_hours > 0, f"job_hours must be > 0, got {self.job_hours}")
        _require(self.mtbf_hours > 0, f"mtbf_hours must be > 0, got {self.mtbf_hours}")
        _require(isinstance(self.nodes, int) and self.nodes >= 1, f"nodes must be an int >= 1, got {self.nodes!r}")
        _require(isinstance(self.num_domains, int) and self.num_domains >= 1,
                 f"num_domains must be an int >= 1, got {self.num_domains!r}")
        # A save that takes no time would make the optimal interval zero.
        _require(self.save_seconds > 0, f"save_seconds must be > 0, got {self.save_seconds}")
        _require(self.load_seconds >= 0, f"load_seconds must be >= 0, got {self.load_seconds}")
        _require(self.reschedule_seconds >= 0, f"reschedule_seconds must be >= 0, got {self.reschedule_seconds}")
        _require(self.failure_distribution in FAILURE_DISTRIBUTIONS,
                 f"failure_distribution must be one of {FAILURE_DISTRIBUTIONS}, got {self.failure_distribution!r}")
        _require(self.weibull_shape > 0, f"weibull_shape must be > 0, got {self.weibull_shape}")
        _require(self.gamma_shape > 0, f"gamma_shape must be > 0, got {self.gamma_shape}")
        for name in ("job_hours", "mtbf_hours", "save_seconds", "load_seconds", "reschedule_seconds"):
            _require(math.isfinite(getattr(self, name)), f"{name} must be finite, got {getattr(self, name)}")

    @property
    def job_mtbf_hours(self) -> float:
        """Mean time between failures of the whole job (any of its nodes)."""
        return self.mtbf_hours / self.nodes

    @property
    def expected_failures(self) -> float:
        """Expected number of failures over the job."""
        return self.job_hours / self.job_mtbf_hours

    @classmethod
    def preset(cls, name: str) -> ClusterProfile:
        """A named profile; see the class docstring and docs/planning.md."""
        if name not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(_PRESETS)}")
        return _PRESETS[name]

    def with_measured(self, save_seconds: float, load_seconds: float) -> ClusterProfile:
        """This profile with the save and load times measured for the actual model on this machine."""
        return dataclasses.replace(self, save_seconds=save_seconds, load_seconds=load_seconds)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"ClusterProfile: {message}")


_PRESETS = {
    "production": ClusterProfile(
        job_hours=120.0, mtbf_hours=400.0, nodes=20, num_domains=16,
        save_seconds=210.0, load_seconds=210.0, reschedule_seconds=60.0,
    ),
    "small-cluster": ClusterProfile(
        job_hours=24.0, mtbf_hours=200.0, nodes=4, num_domains=4,
        save_seconds=30.0, load_seconds=30.0, reschedule_seconds=30.0,
    ),
}
