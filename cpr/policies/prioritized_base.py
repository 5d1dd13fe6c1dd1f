"""What CPR-MFU, CPR-SSU and SCAR share (see prioritized.py): `PrioritizedPolicy`, which calibrates, plans
with `cpr.planning.prioritized`, measures the ages a failure would find (`_AgeMeter`) and re-plans online,
and the bytes a subset save writes per row (`subset_row_bytes`). Which rows a subset holds is left to the
subclasses (top_fraction.py, ssu.py).
"""
from __future__ import annotations

import math
import time
from abc import abstractmethod
from dataclasses import fields
from typing import Any, Callable, ClassVar, Mapping

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cpr.planning import expected_lost_steps
from cpr.planning.prioritized import AccessProfile, PrioritizedPlan, plan_prioritized
from cpr.policies.base import CheckpointPolicy, PolicyContext, SaveDecision
from cpr.tables import EmbeddingTables

CALIBRATION_FRACTION = 0.05
_ID_BYTES = 8  # a subset save stores one int64 id per row


def subset_row_bytes(tables: EmbeddingTables) -> dict[str, int]:
    """Bytes a subset save writes per row of each table: weight, row-wise optimizer state and the id."""
    out = {}
    for table in tables.tables:
        weight = tables.weight(table)
        states = tables.row_states(table).values()
        per_row = weight[0].nbytes if weight.shape[0] else 0
        per_row += sum(s[0].nbytes for s in states if s.shape[0])
        out[table] = per_row + _ID_BYTES
    return out


class _AgeMeter:
    """The ages a failure would really find. After every step it takes the accesses not yet saved (the
    checkpointer's counters summed over every row: what failing all domains at once would lose), that
    step's accesses, and what the plan's model predicted for the step; sums over steps make the access-
    weighted mean age measured over the run (`measured_age`) and its ratio to the model (`correction`)."""

    def __init__(self) -> None:
        self.steps = 0
        self.unsaved = 0.0  # sum over steps of the unsaved accesses after the step's saves
        self.accesses = 0.0  # accesses made over those steps
        self.modelled = 0.0  # since planning: sum over steps of accesses x the model's age for the step
        self.unsaved_modelled = 0.0  # since planning: the unsaved accesses of those same steps

    def record(self, unsaved: float, accesses: float, model_age: float | None) -> None:
        self.steps += 1
        self.unsaved += unsaved
        self.accesses += accesses
        if model_age is not None:
            self.modelled += accesses * model_age
            self.unsaved_modelled += unsaved

    @property
    def measured_age(self) -> float | None:
        return self.unsaved / self.accesses if self.accesses else None

    @property
    def correction(self) -> float | None:
        """Measured over modelled ages since planning (None before there is anything to compare)."""
        return self.unsaved_modelled / self.modelled if self.modelled > 0 else None


# Every REPLAN_FRACTION of the run the measured ages are compared with the model; the settings are
# re-planned when the target the model must aim at moved by more than _REPLAN_TOLERANCE.
REPLAN_FRACTION = 0.05
_REPLAN_TOLERANCE = 0.05
_CORRECTION_RANGE = (1 / 3, 3.0)  # how far the measured ages may move the model's aim
_CATCH_UP_RANGE = (0.25, 4.0)  # the rest of the run aims within these multiples of the whole-run goal


class PrioritizedPolicy(CheckpointPolicy):
    """Full saves every `full_interval_steps`, subset saves of `select_rows()` every `subset_interval_steps`
    (counted from the last full save), planned at `calibration_step` and re-planned online.

    The plan's model predicts the access-weighted age of the rows' newest saves; the policy measures the
    real one (`_AgeMeter`). Every REPLAN_FRACTION of the run it scales the model by measured / predicted
    age since planning (which absorbs what the model gets wrong: the rotation of MFU's set, SCAR's
    ranking by movement, rates misjudged in a short calibration window, accesses that drift) and re-plans
    so that the whole run's mean age, including the steps already done, meets the target.
    """

    recovery = "partial"
    knob_option: ClassVar[str]  # the context option that pins the planner's knob (r or p)

    def __init__(self, context: PolicyContext) -> None:
        self.context = context
        options = context.options
        knob = options.get(self.knob_option)
        subset = options.get("subset_interval_steps")
        if knob is not None and not 0 < knob <= 1:
            raise ValueError(f"option {self.knob_option!r} must be in (0, 1], got {knob}")
        longest = min(context.total_steps, context.interval_steps or context.total_steps)
        if subset is not None and not 1 <= subset < longest:
            raise ValueError(f"option 'subset_interval_steps' must be in [1, {longest}) (shorter than the run and "
                             f"the full-save interval), got {subset}")
        self.pinned: dict[str, Any] = {
            key: value for key, value in
            (("full_interval_steps", context.interval_steps), (self.knob_option, knob), ("subset_interval_steps", subset))
            if value is not None
        }
        self.full_interval_steps = context.interval_steps or context.partial_steps()
        self.subset_interval_steps = 0
        self.calibration_step = max(1, min(math.ceil(CALIBRATION_FRACTION * context.total_steps), self.full_interval_steps))
        self.replan_every = max(1, math.ceil(REPLAN_FRACTION * context.total_steps))
        self.plan: PrioritizedPlan | None = None
        self.replans = 0
        self._access: AccessProfile | None = None
        self._model_target = context.target_pls  # the target handed to the model at the last (re)plan
        self._promised_age: float | None = None
        self._meter = _AgeMeter()
        self._step_accesses = 0
        self._pending_unsaved: float | None = None  # this step's unsaved accesses, folded in next step
        self._step = 0
        self._last_full = self._previous_full = 0
        self._full_bytes = 0
        self._row_bytes: dict[str, int] = {}
        self.planning_seconds = 0.0  # spent in the planner (the calibration's plan and every re-plan)

    # -- the whole-run goal -----------------------------------------------------------------------------
    @property
    def _age_per_pls(self) -> float:
        """N * M in steps: PLS = A / (N * M)."""
        ctx = self.context
        return ctx.profile.num_domains * ctx.profile.job_mtbf_hours / ctx.hours_per_step

    # -- deciding ----------------------------------------------------------------------------------------
    def observe(self, kjt: KeyedJaggedTensor) -> None:
        self._step_accesses += kjt.values().numel()

    def decide(self, step: int) -> SaveDecision | None:
        self._fold_previous_step()
        self._step = step
        if self.plan is None and step >= self.calibration_step:
            self._calibrate(window=step - self._last_full)
        elif self.plan is not None and step % self.replan_every == 0 and len(self.pinned) < 3:
            self._replan(step)
        self._pending_unsaved = self._unsaved()
        since_full = step - self._last_full
        if since_full >= self.full_interval_steps:
            return SaveDecision("full", reason=f"every {self.full_interval_steps} steps")
        if self.subset_interval_steps and since_full % self.subset_interval_steps == 0:
            # Returned even when empty here: in a multi-rank job the save is collective and other ranks
            # may have rows to save; the checkpointer skips a subset that is empty everywhere.
            return SaveDecision("subset", rows=self.select_rows(), reason=f"{self.name} rows every {self.subset_interval_steps} steps")
        return None

    def after_save(self, plan: SaveDecision) -> None:
        if plan.saves_every_row:
            self._previous_full, self._last_full = self._last_full, plan.step
        self._pending_unsaved = self._unsaved()

    def save_failed(self, plan: SaveDecision) -> None:
        if plan.saves_every_row and self._last_full == plan.step:
            self._last_full = self._previous_full  # the full save is due again: the next step retries it

    def _unsaved(self) -> float:
        return float(self.context.tracker.pending_total())

    def _fold_previous_step(self) -> None:
        if self._pending_unsaved is None:
            return
        model_age = self.plan.age_at(self._step - self._last_full) if self.plan is not None and self.plan.age_at else None
        self._meter.record(self._pending_unsaved, self._step_accesses, model_age)
        self._pending_unsaved, self._step_accesses = None, 0

    def _calibrate(self, window: int) -> None:
        self._access, self._full_bytes, self._row_bytes = self._job_access(max(1, window))
        self._plan_for(self.context.target_pls, correction=1.0)

    def _job_access(self, window: int) -> tuple[AccessProfile, int, dict[str, int]]:
        """The whole job's access profile, model bytes and subset bytes per row of each table.

        In a multi-rank job every rank measured only its own rows; planning from all of them gathered in
        rank order gives every rank the same plan, so their saves stay in step.
        """
        ctx = self.context
        coordinator = ctx.coordinator
        if coordinator is None or coordinator.world_size == 1:
            return self.access_profile(window), ctx.tables.nbytes(), subset_row_bytes(ctx.tables)
        try:
            groups = [g for g in self.access_profile(window).groups if g.rows > 0]
        except ValueError:
            groups = []  # this rank's rows saw no access in the window; the others' decide the plan
        gathered = coordinator.all_gather((groups, ctx.tables.nbytes(), subset_row_bytes(ctx.tables)), site="policy.job_access")
        access = AccessProfile([g for rank_groups, _, _ in gathered for g in rank_groups], window)
        row_bytes = {table: n for _, _, per_table in gathered for table, n in per_table.items()}
        return access, sum(n for _, n, _ in gathered), row_bytes

    def _job_meter(self) -> _AgeMeter:
        """The ages measured over every rank's rows (each rank meters its own), the same on every rank."""
        coordinator = self.context.coordinator
        if coordinator is None or coordinator.world_size == 1:
            return self._meter
        job = _AgeMeter()
        for meter in coordinator.all_gather(self._meter, site="policy.job_meter"):
            job.unsaved += meter.unsaved
            job.accesses += meter.accesses
            job.modelled += meter.modelled
            job.unsaved_modelled += meter.unsaved_modelled
        job.steps = self._meter.steps
        return job

    def replan(self, context: PolicyContext, step: int) -> None:
        # The goal N * M * target moves with the measured clock; the ages measured so far stay.
        self.context = context
        if self.plan is not None and len(self.pinned) < 3:
            self._replan(step, force=True)

    def _replan(self, step: int, force: bool = False) -> None:
        """Re-aim the model so that the whole run's measured mean age meets the goal N * M * target."""
        meter = self._job_meter()
        correction = meter.correction
        rest = self.context.total_steps - step
        if force and (correction is None or not meter.accesses):
            self._plan_for(self._model_target, 1.0)  # nothing measured against the model yet: the same aim
            self.replans += 1
            return
        if correction is None or rest <= 0 or not meter.accesses:
            return
        correction = min(max(correction, _CORRECTION_RANGE[0]), _CORRECTION_RANGE[1])
        goal = self.context.target_pls * self._age_per_pls
        rest_accesses = meter.accesses / meter.steps * rest
        wanted = (goal * (meter.accesses + rest_accesses) - meter.unsaved) / rest_accesses
        wanted = min(max(wanted, _CATCH_UP_RANGE[0] * goal), _CATCH_UP_RANGE[1] * goal)
        target = min(max(wanted / correction / self._age_per_pls, 1e-9), 0.999)
        if force or abs(target / self._model_target - 1) > _REPLAN_TOLERANCE:
            self._plan_for(target, correction)
            self.replans += 1

    def _plan_for(self, target: float, correction: float) -> None:
        started = time.perf_counter()
        ctx = self.context
        knob = self.pinned.get(self.knob_option)
        subset = self.pinned.get("subset_interval_steps")
        if self.plan is not None and self.stateful_knobs():
            # Changing p or T_sub would rebuild the SSU sets mid-interval: keep them, re-plan T_full.
            knob, subset = self.plan.sample_rate, self.plan.subset_interval_steps
        self.plan = plan_prioritized(
            self.name,
            self._access,
            ctx.profile,
            target,
            ctx.hours_per_step,
            ctx.total_steps,
            full_bytes=self._full_bytes,
            row_bytes=self._row_bytes,
            knobs=None if knob is None else [knob],
            subset_intervals=None if subset is None else [subset],
            full_interval_steps=self.pinned.get("full_interval_steps"),
        )
        self._model_target = target
        # What the run is promised: the whole-run goal when the policy may steer towards it and the model
        # can meet it, else the model's age for the settings (corrected by the measured ages).
        steering = len(self.pinned) < 3 and self.plan.meets_target
        self._promised_age = ctx.target_pls * self._age_per_pls if steering else self.plan.mean_age_steps * correction
        self.full_interval_steps = self.plan.full_interval_steps
        self.subset_interval_steps = self.plan.subset_interval_steps
        self.apply_plan(self.plan)
        self.planning_seconds += time.perf_counter() - started

    def stateful_knobs(self) -> bool:
        """True when the knob and T_sub now in use hold state that a re-plan must not change."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """The plan's inputs and the ages measured so far (the access profile as tensors, the rest JSON)."""
        state: dict[str, Any] = {
            "full_interval_steps": self.full_interval_steps, "subset_interval_steps": self.subset_interval_steps,
            "replans": self.replans, "model_target": self._model_target,
            "meter": {k: getattr(self._meter, k) for k in ("steps", "unsaved", "accesses", "modelled", "unsaved_modelled")},
            "full_bytes": self._full_bytes, "row_bytes": self._row_bytes,
        }
        if self._access is not None:
            state.update(self._access.to_tensors())
        return state

    def load_state_dict(self, state: Mapping[str, Any], step: int) -> None:
        # Resumed from the full save of `step`: counters, samples and saved copies all start from that save.
        self._step = self._last_full = step
        self._pending_unsaved, self._step_accesses = None, 0
        if "access_rates" not in state:
            return  # saved before calibration: the resumed run calibrates as the first one would have
        self._access = AccessProfile.from_tensors(state)
        self._full_bytes, self._row_bytes = int(state["full_bytes"]), dict(state["row_bytes"])
        for key, value in state["meter"].items():
            setattr(self._meter, key, value)
        correction = self._meter.correction or 1.0
        self._plan_for(float(state["model_target"]), min(max(correction, _CORRECTION_RANGE[0]), _CORRECTION_RANGE[1]))
        self.replans = int(state["replans"])
        self.full_interval_steps = int(state["full_interval_steps"])
        self.subset_interval_steps = int(state["subset_interval_steps"])

    @abstractmethod
    def access_profile(self, window: int) -> AccessProfile:
        """Access frequencies measured over the `window` steps of calibration."""

    def apply_plan(self, plan: PrioritizedPlan) -> None:
        """Take the planned knob (r or p) into use."""

    @abstractmethod
    def select_rows(self) -> dict[str, torch.Tensor]:
        """Local row ids to save now per table (tables with no rows left out)."""

    def _per_domain(self, pick: Callable[[str, tuple[int, int]], torch.Tensor]) -> dict[str, torch.Tensor]:
        """`pick(table, shard_range)` for every shard of every table, concatenated per table."""
        rows = {}
        for table, ranges in self.context.layout.ranges.items():
            ids = torch.cat([pick(table, r) for r in ranges if r[1] > r[0]] or [torch.zeros(0, dtype=torch.int64)])
            if ids.numel():
                rows[table] = ids
        return rows

    # -- reporting --------------------------------------------------------------------------------------
    def mean_age_steps(self) -> float:
        """The access-weighted mean age of the rows' newest saves the run is planned to have: the goal
        N * M * target when the plan meets it, else the plan's; plain partial recovery's until planned."""
        if self._promised_age is None:
            return expected_lost_steps(self.full_interval_steps, self.context.total_steps)
        return self._promised_age

    def expected_pls(self, failures: int, num_domains: int, total_steps: int) -> float:
        # Each failure loses, on average, the accesses of one shard's rows over their mean age.
        return failures * self.mean_age_steps() / (num_domains * total_steps)

    def settings(self) -> dict[str, Any]:
        self._fold_previous_step()
        hours = self.context.hours_per_step
        out: dict[str, Any] = {
            "full_interval_steps": self.full_interval_steps,
            "full_interval_hours": self.full_interval_steps * hours,
            "subset_interval_steps": self.subset_interval_steps,
            "subset_interval_hours": self.subset_interval_steps * hours,
            "calibration_step": self.calibration_step,
            "pinned": self.pinned,
            "target_pls": self.context.target_pls,
            "replans": self.replans,
            "planning_seconds": self.planning_seconds,  # this process's, calibration included
            "measured_mean_age_steps": self._meter.measured_age,
            "age_correction": self._meter.correction,
        }
        if self.plan is not None:
            plan = {f.name: getattr(self.plan, f.name) for f in fields(self.plan) if f.name != "age_at"}
            out.update({f"planned_{k}": v for k, v in plan.items() if k not in ("full_interval_steps", "subset_interval_steps")})
        return out
