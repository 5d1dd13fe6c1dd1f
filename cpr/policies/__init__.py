"""Checkpoint policies: when to save, what to save, and which recovery a failure gets."""
from __future__ import annotations

from typing import Any, Mapping

from cpr.planning import PlanResult
from cpr.policies.base import CheckpointPolicy, PeriodicFullPolicy, SavePlan
from cpr.policies.basic import FullRecoveryPolicy, NoCheckpointPolicy, PartialRecoveryPolicy
from cpr.shards import ShardLayout
from cpr.tracking import AccessTracker

POLICY_NAMES = ("none", "full", "partial")


def _steps(hours: float, hours_per_step: float) -> int:
    """An interval in emulated hours as a whole number of steps (at least one)."""
    return max(1, round(hours / hours_per_step))


def make_policy(
    name: str,
    plan: PlanResult,
    hours_per_step: float,
    interval_steps: int | None,
    tracker: AccessTracker,
    layout: ShardLayout,
    options: Mapping[str, Any],
) -> CheckpointPolicy:
    """Build a policy by name with the intervals the plan chose (or `interval_steps` if given)."""
    if name == "none":
        return NoCheckpointPolicy()
    if name == "full":
        return FullRecoveryPolicy(interval_steps or _steps(plan.full.interval_hours, hours_per_step))
    if name == "partial":
        return PartialRecoveryPolicy(interval_steps or _steps(plan.partial.interval_hours, hours_per_step))
    raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}")


__all__ = ["CheckpointPolicy", "PeriodicFullPolicy", "SavePlan", "POLICY_NAMES", "make_policy"]
