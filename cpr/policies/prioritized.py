"""CPR-MFU, CPR-SSU and SCAR: full saves every T_full steps and, in between, a subset of rows every T_sub.

All three recover partially: a failed shard's rows come back row by row from the newest full or subset
save that holds them, so rows saved often lose few updates. They differ in which rows a subset holds:

* `mfu`: the top fraction r of each shard's rows by accesses since their last save (the checkpointer's
  access counters, 4 bytes per row).
* `ssu`: the rows whose accesses an SSU tracker sampled with probability p since the last subset save (a
  bounded set of ids per table, memory independent of the table size).
* `scar`: the top fraction r of each shard's rows by how far they moved since their last save (L2 norm of
  weight minus saved weight; a copy of the saved rows is kept to measure it). A baseline from the SCAR
  system, beyond the CPR paper.

Settings come from `cpr.planning.prioritized` at a calibration step (the first ~5% of the run, before the
first planned full save), once access frequencies have been measured; until then the policy saves like
plain partial recovery. Afterwards the policy measures the ages a failure would find and re-plans so that
the run meets its PLS target whatever the model got wrong (docs/prioritized.md, online re-planning). Explicit settings in the context (`interval_steps`, options `fraction`,
`sample_rate`, `subset_interval_steps`) win over the planner. Derivation: docs/prioritized.md.

This module names the policies; they live in prioritized_base.py (what the three share: calibration,
planning, the age meter, re-planning), top_fraction.py (MFU, SCAR) and ssu.py (SSU).
"""
from __future__ import annotations

from cpr.policies.prioritized_base import CALIBRATION_FRACTION, REPLAN_FRACTION, PrioritizedPolicy, subset_row_bytes
from cpr.policies.ssu import CALIBRATION_SAMPLE, SSUPolicy
from cpr.policies.top_fraction import MFUPolicy, SCARPolicy

__all__ = [
    "CALIBRATION_FRACTION",
    "CALIBRATION_SAMPLE",
    "MFUPolicy",
    "PrioritizedPolicy",
    "REPLAN_FRACTION",
    "SCARPolicy",
    "SSUPolicy",
    "subset_row_bytes",
]
