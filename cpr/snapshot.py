"""`RowSnapshot`: embedding rows as they were at a save's step, read by the writer while training goes on.

An asynchronous save must write the rows of its step while later steps change them. Copying every row up
front stalls training for a copy of the tables (a third of a synchronous save on the kaggle config). A
copy-on-write snapshot instead keeps the live tensors and preserves a row's values just before a step
changes it, so the training thread copies only the rows it touches while the save is written (CheckFreq
and DCP's async_save pay for the whole copy). This relies on what differential saves rely on too: TorchRec's
fused sparse optimizers change exactly the rows a step looks up, and the post-lookup hook runs in the
forward pass, before the backward pass updates them.

The writer copies the rows it needs from the live tensor, then, under the lock, overwrites the rows
preserved meanwhile with their preserved values. A row that changed during the copy was preserved before it
changed, and the writer looks at the preserved rows only after its copy, so it sees that row. The writer
reads each row once: a row read is no longer preserved, so training copies less as the write goes on.

Three modes, chosen by the checkpointer:

* `view`: a synchronous save, read at once; nothing trains until it is written, so reads are views of the
  live rows (no copy at all);
* `copy`: an asynchronous save read at once, every read a copy: a subset save (its few rows cost less to
  copy than setting up a copy-on-write snapshot, whose bookkeeping covers every row), or any save of a
  plain module (its optimizer may step rows it did not look up, and its lookups are reported whenever the
  caller likes);
* `copy_on_write`: an asynchronous full save of a model whose lookups are hooked (see above), read by the
  writer thread until `release`.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cpr.tracking._ops import ops

SnapshotMode = Literal["view", "copy_on_write", "copy"]
_LIVE, _NOT_HELD = -1, -2  # a row's slot before it is kept (see cpr/csrc/snapshot.cpp)


class RowSnapshot:
    """The rows of some tables at one step.

    `tensors[table][name]` are the live per-row tensors of `table` (its weight and row-wise optimizer
    state), all with the table's rows as their first dimension; copy-on-write needs them contiguous and in
    host memory (where CPR's users keep their tables), as `supports_copy_on_write` checks.
    """

    def __init__(self, tensors: Mapping[str, Mapping[str, torch.Tensor]], mode: SnapshotMode) -> None:
        self.mode = mode
        self._tensors = {t: dict(named) for t, named in tensors.items()}
        self._lock = threading.Lock()
        self._released = mode != "copy_on_write"  # only a copy-on-write snapshot preserves rows
        self.preserved_bytes = 0  # what training copied for this snapshot
        # While preserving, per table: each row's slot (see cpr/csrc/snapshot.cpp: not held, still live, or
        # where its kept values are), and the buffers the kept rows go to, filled from the front (allocated
        # untouched, so only the memory pages of kept rows are ever used); rows kept so far per table.
        self._slot: dict[str, torch.Tensor] = {}
        self._kept: dict[str, dict[str, torch.Tensor]] = {}
        self._table_index = {table: i for i, table in enumerate(self._tensors)}
        self._feature_tables: dict[tuple[str, ...], list[int]] = {}
        if self._released:
            return
        for table, named in self._tensors.items():
            self._slot[table] = torch.full((_rows(named),), _LIVE, dtype=torch.int32)
            self._kept[table] = {name: torch.empty_like(live) for name, live in named.items()}
        self._kept_rows = torch.zeros(len(self._tensors), dtype=torch.int64)
        self._live_list = [live for named in self._tensors.values() for live in named.values()]
        self._kept_list = [kept for named in self._kept.values() for kept in named.values()]
        counts = [len(named) for named in self._tensors.values()]
        self._tensors_of_table = [sum(counts[:i]) for i in range(len(counts) + 1)]

    @staticmethod
    def supports_copy_on_write(tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> bool:
        """Whether these live tensors can be snapshotted copy-on-write: contiguous, in host memory."""
        return all(t.device.type == "cpu" and t.is_contiguous() and t.dim() >= 1
                   for named in tensors.values() for t in named.values())

    @property
    def preserving(self) -> bool:
        """Whether a step's lookups must be reported (`preserve_lookups`) before the step changes their rows."""
        return not self._released

    def preserve_lookups(self, kjt: KeyedJaggedTensor, feature_to_table: Mapping[str, str]) -> None:
        """Preserve every row a batch looks up (its local ids per feature, `feature_to_table` naming each
        feature's table), before its step changes them: one call into cpr._C for the whole batch."""
        with self._lock:
            if self._released:
                return
            keys = tuple(kjt.keys())
            tables = self._feature_tables.get(keys)
            if tables is None:
                tables = self._feature_tables[keys] = [self._table_index[feature_to_table[k]] for k in keys]
            self.preserved_bytes += ops.preserve_rows(
                list(self._slot.values()), self._kept_rows, self._live_list, self._kept_list, self._tensors_of_table,
                kjt.values().contiguous(), kjt.offset_per_key(), tables)

    def rows(self, table: str, start: int, end: int) -> dict[str, torch.Tensor]:
        """Rows [start, end) of every per-row tensor of `table` as they were at the snapshot, by name (in
        `view` mode, views of the live tensors). Copy-on-write: read each row once (it is kept no longer)."""
        out = {name: live[start:end] for name, live in self._tensors[table].items()}
        if self.mode == "view":
            return out
        if self.mode == "copy":
            return {name: rows.clone() for name, rows in out.items()}
        out = {name: _copied(_row_bytes(rows), rows) for name, rows in out.items()}
        with self._lock:
            slots = self._slot[table].numpy()[start:end]
            self._restore_kept(out, table, slots)
            slots[slots == _LIVE] = _NOT_HELD  # read: later changes need no keeping
        return out

    def select(self, table: str, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows `ids` of every per-row tensor of `table` as they were at the snapshot, by name (new tensors).
        Copy-on-write: read each row once (it is kept no longer)."""
        if self.mode != "copy_on_write":
            return {name: live.index_select(0, ids) for name, live in self._tensors[table].items()}
        ids = ids.numpy()
        out = {name: _copied(_row_bytes(live)[ids], live[:0]) for name, live in self._tensors[table].items()}
        with self._lock:
            slots = self._slot[table].numpy()
            self._restore_kept(out, table, slots[ids])
            slots[ids[slots[ids] == _LIVE]] = _NOT_HELD  # read: later changes need no keeping
        return out

    def _restore_kept(self, out: dict[str, torch.Tensor], table: str, slots: np.ndarray) -> None:
        """Overwrite the rows of `out` (whose slots are `slots`) that were kept with their kept values."""
        changed = np.flatnonzero(slots >= 0)
        if changed.size:
            kept_at = slots[changed]
            for name, rows in out.items():
                _row_bytes(rows)[changed] = _row_bytes(self._kept[table][name])[kept_at]

    def release(self) -> None:
        """The writer has read everything: stop preserving and free the preserved rows."""
        with self._lock:
            self._released = True
            self._slot, self._kept, self._live_list, self._kept_list = {}, {}, [], []


# The writer thread reads a copy-on-write snapshot with numpy (single-threaded copies that release the GIL):
# a parallel torch op there would start a second OpenMP thread team competing with training's intra-op
# threads (see cpr/threads.py, which also keeps the writer's other torch ops on one thread).
def _row_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The rows of a contiguous CPU tensor as a (rows, bytes per row) uint8 numpy view of its memory."""
    width = math.prod(tensor.shape[1:]) * tensor.element_size()
    return tensor.detach().reshape(-1).view(torch.uint8).numpy().reshape(tensor.shape[0], width)


def _copied(rows: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A tensor of `like`'s dtype and row shape over a copy of `rows` (a `_row_bytes` array)."""
    if not rows.size:  # (numpy's empty array cannot be viewed as another dtype)
        return torch.empty((len(rows), *like.shape[1:]), dtype=like.dtype)
    return torch.from_numpy(rows.reshape(-1).copy()).view(like.dtype).reshape(len(rows), *like.shape[1:])


def _rows(named: Mapping[str, torch.Tensor]) -> int:
    return next(iter(named.values())).shape[0] if named else 0
