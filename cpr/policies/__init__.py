"""Checkpoint policies: when to save, what to save, and which recovery a failure gets."""
from __future__ import annotations

from typing import Callable

from cpr.choices import POLICY_NAMES
from cpr.policies.base import CheckpointPolicy, PeriodicFullPolicy, PolicyContext, SaveDecision
from cpr.policies.basic import FullRecoveryPolicy, NoCheckpointPolicy, PartialRecoveryPolicy
from cpr.policies.prioritized import MFUPolicy, SCARPolicy, SSUPolicy

# Policy name -> factory from the run's context. Each factory takes its intervals from the plan (partial
# recovery's in whole steps, see `PolicyContext.partial_steps`) unless the context carries an explicit
# `interval_steps`.
POLICY_FACTORIES: dict[str, Callable[[PolicyContext], CheckpointPolicy]] = {
    "none": lambda ctx: NoCheckpointPolicy(),
    "full": lambda ctx: FullRecoveryPolicy(ctx.interval_steps or ctx.steps(ctx.plan.full.interval_hours)),
    "partial": lambda ctx: PartialRecoveryPolicy(ctx.interval_steps or ctx.partial_steps()),
    "mfu": MFUPolicy,
    "ssu": SSUPolicy,
    "scar": SCARPolicy,
}
assert tuple(POLICY_FACTORIES) == POLICY_NAMES


def make_policy(name: str, context: PolicyContext) -> CheckpointPolicy:
    """Build the policy called `name` for a run described by `context`."""
    if name not in POLICY_FACTORIES:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}")
    return POLICY_FACTORIES[name](context)


__all__ = ["CheckpointPolicy", "PeriodicFullPolicy", "PolicyContext", "SaveDecision", "POLICY_NAMES", "make_policy"]
