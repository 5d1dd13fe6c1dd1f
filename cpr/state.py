"""`TrainingState`: the live state of a training job that CPR saves and brings back.

The embedding rows with their row-wise optimizer state (`EmbeddingTables`: the tensors training really
updates), the dense parameters and optimizer state with the RNG (`cpr.dense`), the data reader's position
and the step. Everything that puts saved or peer values back into the live model goes through here, and
copies *into* the live tensors (never replaces them), so DMP, fbgemm and the optimizers keep the objects
they hold.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import _init_optim_state
from torch.distributed.checkpoint.stateful import Stateful

from cpr import dense
from cpr.storage.names import state_name, weight_name
from cpr.tables import EmbeddingTables


@dataclass(frozen=True)
class LiveState:
    """What a replacement for a dead rank takes from a survivor: everything but the rows, as training has it
    now (the rows it restores from storage)."""

    step: int
    reader: dict[str, Any] | None
    dense: dict[str, torch.Tensor]
    policy: dict[str, Any]


class TrainingState:
    """The model, its optimizer, the reader and the step, as CPR sees them.

    Optimizers such as Adam create their state at the first step; every save (the initial one too) and every
    load must find it, so it is created here, as torch.distributed.checkpoint does (a step with zero
    gradients and learning rate 0, which leaves the parameters as they are).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, reader: Stateful | None = None) -> None:
        _init_optim_state(optimizer)
        self.model, self.optimizer, self.reader = model, optimizer, reader
        self.tables = EmbeddingTables(model, optimizer)
        self.step = 0  # training steps done

    # -- reading the live state --------------------------------------------------------------------------
    def row_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every local table's live per-row tensors (weight, row-wise optimizer state) by their save names."""
        return {table: {weight_name(table): self.tables.weight(table),
                        **{state_name(table, s): v for s, v in self.tables.row_states(table).items()}}
                for table in self.tables.tables}

    def capture_dense(self) -> dict[str, torch.Tensor]:
        """Copies of the dense parameters, the non-row optimizer state and the RNG state."""
        return dense.capture(self.model, self.optimizer, self.tables)

    def reader_state(self) -> dict[str, Any] | None:
        return self.reader.state_dict() if self.reader is not None else None

    def full_tensors(self) -> dict[str, torch.Tensor]:
        """Every row and its row-wise state by save name, and the dense state (see `state_dict`)."""
        tensors = {name: value for named in self.row_tensors().values() for name, value in named.items()}
        tensors.update(self.capture_dense())
        return tensors

    def live(self, policy_state: dict[str, Any]) -> LiveState:
        return LiveState(self.step, self.reader_state(), self.capture_dense(), policy_state)

    # -- writing into the live state ------------------------------------------------------------------------
    def write_rows(self, table: str, start: int, end: int, weight: torch.Tensor,
                   states: Mapping[str, torch.Tensor]) -> None:
        """Copy `weight` and the row-wise `states` (by state name) into local rows [start, end) of `table`;
        every row-wise state the table has must be given."""
        with torch.no_grad():
            self.tables.weight(table)[start:end].copy_(weight)
            for state, value in self.tables.row_states(table).items():
                value[start:end].copy_(states[state])

    def write_saved_rows(self, table: str, start: int, end: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """`write_rows` from tensors named as saves name them (`weight_name`, `state_name`)."""
        states = {state: tensors[state_name(table, state)] for state in self.tables.row_states(table)}
        self.write_rows(table, start, end, tensors[weight_name(table)], states)

    def restore_dense(self, tensors: Mapping[str, torch.Tensor]) -> None:
        dense.restore(tensors, self.model, self.optimizer, self.tables)

    def load_reader(self, state: dict[str, Any] | None) -> None:
        """Put the reader where `state` (its `state_dict()`) says, if there is a reader and a state."""
        if self.reader is not None and state is not None:
            self.reader.load_state_dict(state)

    def load_full_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Take back `full_tensors()`: every local row of every table, and the dense state."""
        for table, info in self.tables.tables.items():
            self.write_saved_rows(table, 0, info.local_rows, tensors)
        self.restore_dense(tensors)

    def adopt(self, live: LiveState) -> None:
        """A replacement takes a survivor's step, reader position and dense state (not its policy's)."""
        self.step = int(live.step)
        self.load_reader(live.reader)
        self.restore_dense(live.dense)

    def move_to(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Carry this state into `model` and `optimizer`, the same model rebuilt with the same sharding plan
        (around a re-formed process group): rows, row-wise and dense optimizer state are copied in memory,
        nothing is read from a save. Whoever holds `tables` sees the rebuilt model's tables after it."""
        _init_optim_state(optimizer)
        retained = self.capture_dense()
        moved = EmbeddingTables(model, optimizer)
        if moved.tables != self.tables.tables:
            raise ValueError("the rebuilt model holds other tables or rows than this one: it was not sharded "
                             "with the same plan")
        rows = {table: (self.tables.weight(table), self.tables.row_states(table)) for table in moved.tables}
        self.tables.view(moved)  # from here on the live tables are the rebuilt model's
        for table, (weight, states) in rows.items():
            self.write_rows(table, 0, moved.tables[table].local_rows, weight, states)
        self.model, self.optimizer = model, optimizer
        self.restore_dense(retained)
