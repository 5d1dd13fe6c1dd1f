"""Seeded failure injection schedules for emulating a cluster's failures during training."""
from .sampling import sample_gaps
from .schedule import Failure, FailureSchedule, hours_per_step

__all__ = ["Failure", "FailureSchedule", "hours_per_step", "sample_gaps"]
