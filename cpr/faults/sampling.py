"""Inter-failure times drawn from a profile's distribution, all with mean = the job MTBF."""
import math

import numpy as np

from cpr.planning import ClusterProfile


def sample_gaps(profile: ClusterProfile, rng: np.random.Generator, size: int) -> np.ndarray:
    """`size` i.i.d. inter-failure times in hours, mean `profile.job_mtbf_hours`."""
    mean = profile.job_mtbf_hours
    if profile.failure_distribution == "exponential":
        return rng.exponential(mean, size)
    if profile.failure_distribution == "weibull":
        # numpy's Weibull has scale 1 and mean Gamma(1 + 1/k); rescale to the wanted mean.
        shape = profile.weibull_shape
        return rng.weibull(shape, size) * (mean / math.gamma(1.0 + 1.0 / shape))
    # gamma: mean = shape * scale
    return rng.gamma(profile.gamma_shape, mean / profile.gamma_shape, size)
