"""The records a save carries from its snapshot to its commit (see `pipeline.py`)."""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from cpr.policies.base import SaveDecision
from cpr.snapshot import RowSnapshot
from cpr.storage import PartContent, WrittenPart
from cpr.storage.location import Folder

from .parts import SelectedRows


@dataclass(frozen=True)
class WriteResult:
    """One process's write of a save: the parts it made durable, or why it could not (this save is then
    abandoned everywhere), the staging folder, and how long the write took."""

    parts: dict[str, WrittenPart]
    error: str | None
    staging: Folder | None
    seconds: float


@dataclass(frozen=True)
class RankWrite:
    """What a rank tells the others of its write: its parts' records, or its error."""

    parts: dict[str, WrittenPart]
    error: str | None


@dataclass
class PendingSave:
    """A save whose snapshot is taken and whose parts are being written (or were, when `written` is set),
    then committed: every rank's part records are gathered (`gathered`), the coordinator writes the commit
    in the background (`committing`, the outcome: None or why it failed) and every rank learns the outcome.

    The domains' parts are read from `snapshot` at once (into `parts`), or made by the writer thread: from a
    copy-on-write snapshot (see cpr/snapshot.py), or from a subset's rows copied at the snapshot (`selected`)."""

    decision: SaveDecision
    snapshot: RowSnapshot
    parts: dict[str, PartContent]  # the parts taken at the snapshot (the dense part; the domains' unless read later)
    ledger: dict[str, Any] | None  # a full save's copy of this process's record, kept in its first domain part
    extra: dict[str, Any]  # the commit record's: reader position and policy state at the snapshot
    # A subset's rows, copied at the snapshot; the writer thread makes the domain parts of them.
    selected: dict[str, SelectedRows] | None = None
    counts: dict[str, torch.Tensor] = field(default_factory=dict)  # the access counters the save cleared, given back should it fail
    unsaved: int = 0  # the access counts above, summed: updates that are lost should this save not commit
    future: Future | None = None
    written: WriteResult | None = None
    gathered: list[RankWrite] | None = None
    data_bytes: int = 0  # the data every rank's parts hold (see CheckpointEvent.data_bytes), once gathered
    committing: Future | None = None
    stall_seconds: float = 0.0  # the training thread's time on this save: snapshot, preserving rows, gathering, settling

    @property
    def parts_made_by_writer(self) -> bool:
        """Whether the writer makes the domain parts (from a copy-on-write snapshot, or from a subset's copied
        rows) rather than the training thread at the snapshot."""
        return self.snapshot.preserving or self.selected is not None

    def write_result(self) -> WriteResult:
        """This rank's write, waiting for the writer thread if it is still at it."""
        return self.future.result() if self.future is not None else self.written

    def wait(self) -> None:
        """Wait for this process's parts and the coordinator's commit, if under way (errors are in their
        results): then the folder is settled for this save."""
        if self.future is not None:
            self.future.exception()
        if self.committing is not None:
            self.committing.exception()
