"""Checkpoint-interval planning for full and partial recovery from a cluster's failure profile."""
from .plan import (
    IntervalPlan,
    OverheadBreakdown,
    PlanResult,
    expected_lost_steps,
    expected_pls,
    full_recovery_overhead,
    longest_interval_steps,
    partial_interval,
    partial_interval_steps,
    partial_recovery_overhead,
    plan,
    young_daly_interval,
)
from .prioritized import AccessProfile, PrioritizedPlan, plan_for_budget, plan_prioritized
from .profile import FAILURE_DISTRIBUTIONS, ClusterProfile

__all__ = [
    "AccessProfile",
    "FAILURE_DISTRIBUTIONS",
    "ClusterProfile",
    "IntervalPlan",
    "OverheadBreakdown",
    "PlanResult",
    "PrioritizedPlan",
    "expected_lost_steps",
    "expected_pls",
    "full_recovery_overhead",
    "longest_interval_steps",
    "partial_interval",
    "partial_interval_steps",
    "partial_recovery_overhead",
    "plan",
    "plan_for_budget",
    "plan_prioritized",
    "young_daly_interval",
]
