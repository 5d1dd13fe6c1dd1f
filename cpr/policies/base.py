"""The policy interface: a policy decides *what* to save at a step and *how* a failure is recovered.

Policies never touch tensors or files. `CPRCheckpointer` asks `decide(step)` after every training step and
turns a `SaveDecision` into a storage write; on a failure it reads `recovery` to choose between rolling the
whole job back (`"full"`) and reloading only the failed domains' rows (`"partial"`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Mapping

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cpr.planning import partial_interval_steps

if TYPE_CHECKING:
    from cpr.comm import Coordinator
    from cpr.planning import ClusterProfile, PlanResult
    from cpr.domains import DomainLayout
    from cpr.tables import EmbeddingTables
    from cpr.tracking import AccessTracker

SaveKind = Literal["full", "subset"]
RecoveryKind = Literal["none", "full", "partial"]


@dataclass(frozen=True)
class SaveDecision:
    """One save: every row of every table (`full`), or for `subset` the local row ids per table."""

    kind: SaveKind
    rows: Mapping[str, torch.Tensor] = field(default_factory=dict)
    reason: str = ""
    step: int = 0  # the training step the save holds (set by the checkpointer when it takes the snapshot)
    # A subset standing in for a periodic full save: the rows changed since their last save (see the
    # checkpointer's `differential`). After it, as after a full save, every row's current value is saved.
    differential: bool = False

    def __post_init__(self) -> None:
        if self.kind == "full" and self.rows:
            raise ValueError("a full save takes every row; rows are only for subset saves")
        if self.differential and self.kind != "subset":
            raise ValueError("a differential save is a subset save")

    @property
    def saves_every_row(self) -> bool:
        """After this save every row's current value is saved: a full save or a differential one."""
        return self.kind == "full" or self.differential


@dataclass(frozen=True)
class PolicyContext:
    """What a policy may consult to decide: the run's plan and shape, and the shared access counts.

    `tracker` is the checkpointer's MFU-mode tracker: per-row accesses since each row's last save (reset
    by the checkpointer after every save and recovery). Policies read it, never reset it.
    """

    profile: "ClusterProfile"
    plan: "PlanResult"
    target_pls: float
    total_steps: int
    hours_per_step: float
    interval_steps: int | None
    tracker: "AccessTracker"
    layout: "DomainLayout"
    tables: "EmbeddingTables"
    options: Mapping[str, Any] = field(default_factory=dict)
    coordinator: "Coordinator | None" = None  # plans that must agree across ranks gather through it

    def steps(self, hours: float) -> int:
        """An interval in emulated hours as a whole number of steps (at least one)."""
        return max(1, round(hours / self.hours_per_step))

    def partial_steps(self) -> int:
        """Plain partial recovery's save interval: the longest whole-step interval whose expected PLS meets
        the target (`cpr.planning.partial_interval_steps`)."""
        return partial_interval_steps(self.profile, self.target_pls, self.total_steps)


class CheckpointPolicy(ABC):
    """Decides when to save and what; says which recovery a failure gets."""

    name: ClassVar[str]
    recovery: ClassVar[RecoveryKind]

    def observe(self, kjt: KeyedJaggedTensor) -> None:
        """See a batch's lookups (after the shared tracker has counted them); for policies with state
        of their own, such as SSU's sampled ids."""

    def after_save(self, plan: SaveDecision) -> None:
        """Told when the checkpointer has taken the snapshot of a save this policy decided (its write and
        commit may still be under way; a full save the policy decided may have been written as a
        differential one: see `SaveDecision.saves_every_row`)."""

    def save_failed(self, plan: SaveDecision) -> None:
        """Told when a save this policy decided could not be written and was abandoned: what `after_save`
        assumed is undone, so the next decision retries."""

    @abstractmethod
    def decide(self, step: int) -> SaveDecision | None:
        """The save to make now that `step` training steps are done, or None."""

    def settings(self) -> dict[str, Any]:
        """The policy's chosen settings, for reports."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What the policy decided so far (its plan), as JSON-ready data kept in every save, so a resumed run
        decides as the uninterrupted one would."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any], step: int) -> None:
        """Take back a `state_dict()` saved in the full save of step `step` that the run resumes from."""

    def memory_bytes(self) -> int:
        """Memory the policy keeps to decide (e.g. access counters), beyond the model."""
        return 0

    def expected_pls(self, failures: int, num_domains: int, total_steps: int) -> float:
        """Expected portion of lost row-updates after `failures` failures at uniformly random steps of a
        `total_steps` run, each taking one of `num_domains` domains back to its newest saved rows."""
        return 0.0

    def replan(self, context: PolicyContext, step: int) -> None:
        """Plan again from `step` on with `context` (a real run's measured costs, see `cpr.realtime`),
        keeping what was promised for the steps already trained. Collective: every rank re-plans at once."""


class PeriodicFullPolicy(CheckpointPolicy):
    """A full save every `interval_steps` steps (and none when it is 0)."""

    def __init__(self, interval_steps: int) -> None:
        if interval_steps < 0:
            raise ValueError(f"interval_steps must be >= 0, got {interval_steps}")
        self.interval_steps = interval_steps
        # Saves fall every interval from the anchor: step 0, or the step of the last re-plan.
        self.anchor = 0
        self.replans = 0
        self._last_save = 0
        self.age_sum = 0  # sum over the step ends decided so far of the steps since the newest full save

    def decide(self, step: int) -> SaveDecision | None:
        due = bool(self.interval_steps) and step > self.anchor and (step - self.anchor) % self.interval_steps == 0
        self.age_sum += 0 if due else max(0, step - self._last_save)
        return SaveDecision("full", reason=f"every {self.interval_steps} steps") if due else None

    def after_save(self, plan: SaveDecision) -> None:
        self._last_save = plan.step

    def age_now(self, step: int) -> int:
        """Steps since the newest full save this policy decided, at the end of `step`."""
        return max(0, step - self._last_save)

    def settings(self) -> dict[str, Any]:
        return {"interval_steps": self.interval_steps, **({"replans": self.replans} if self.replans else {})}

    def state_dict(self) -> dict[str, Any]:
        # Only a re-planned run has a plan of its own to keep; an emulated one plans again the same way.
        return {"interval_steps": self.interval_steps, "anchor": self.anchor, "age_sum": self.age_sum,
                "replans": self.replans} if self.replans else {}

    def load_state_dict(self, state: Mapping[str, Any], step: int) -> None:
        self._last_save = step
        if "anchor" in state:
            self.interval_steps, self.anchor = int(state["interval_steps"]), int(state["anchor"])
            self.age_sum, self.replans = int(state["age_sum"]), int(state["replans"])

    def expected_pls(self, failures: int, num_domains: int, total_steps: int) -> float:
        # A failure at a uniformly random step loses on average half an interval of its domain's updates,
        # and a domain takes 1/num_domains of them: T / (2 * N * MTBF) with MTBF = total_steps / failures.
        return failures * self.interval_steps / (2 * num_domains * total_steps)
