"""Copy-on-write row snapshots: whatever training changes after the snapshot (having preserved the rows first,
as the lookup hook does), every read gives the rows as they were at the snapshot."""
from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cpr.snapshot import RowSnapshot

ROWS, DIM = 50, 3


def _lookup(snapshot: RowSnapshot, ids: torch.Tensor) -> None:
    """What the lookup hook does before a step changes rows `ids` of table "t" (feature "f")."""
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=ids, lengths=torch.tensor([ids.numel()]))
    snapshot.preserve_lookups(kjt, {"f": "t"})


def _live() -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return {"t": {"weight": torch.randn(ROWS, DIM, generator=gen), "momentum": torch.rand(ROWS, generator=gen)}}


ids = st.lists(st.integers(0, ROWS - 1), min_size=1, max_size=10)
steps = st.lists(st.tuples(ids, st.integers(0, ROWS // 4)), max_size=12)


@given(steps=steps, by_ids=st.booleans())
def test_reads_give_the_rows_at_the_snapshot_whatever_changed_since(steps, by_ids):
    """The writer reads each row once (by range or by ids), a few rows after each step: every row read is as
    at the snapshot."""
    live = _live()
    at_snapshot = {name: value.clone() for name, value in live["t"].items()}
    snapshot = RowSnapshot(live, "copy_on_write")
    order = torch.randperm(ROWS, generator=torch.Generator().manual_seed(len(steps))) if by_ids else torch.arange(ROWS)
    position = 0
    for changed, count in [*steps, ([0], ROWS)]:  # the last read takes the rest
        changed = torch.tensor(changed)
        _lookup(snapshot, changed)  # the step's lookups, then the step changes those rows
        for value in live["t"].values():
            value[changed] += 1.0
        end = min(position + count, ROWS)
        rows = order[position:end]
        read = snapshot.select("t", rows) if by_ids else snapshot.rows("t", position, end)
        for name, value in at_snapshot.items():
            assert torch.equal(read[name], value[rows])
        position = end
    snapshot.release()
    assert not snapshot.preserving


def test_a_writer_thread_reads_the_snapshot_while_training_changes_the_rows():
    rows = 4000
    gen = torch.Generator().manual_seed(1)
    live = {"t": {"weight": torch.randn(rows, DIM, generator=gen), "momentum": torch.rand(rows, generator=gen)}}
    at_snapshot = {name: value.clone() for name, value in live["t"].items()}
    snapshot = RowSnapshot(live, "copy_on_write")
    reads: list[dict[str, torch.Tensor]] = []

    def writer() -> None:
        for start in range(0, rows, 10):
            reads.append(snapshot.rows("t", start, start + 10))

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while thread.is_alive():
            changed = torch.randint(0, rows, (64,), generator=gen)
            _lookup(snapshot, changed)
            for value in live["t"].values():
                value.index_add_(0, changed, torch.ones_like(value[changed]))
    finally:
        thread.join(timeout=30)
    assert not thread.is_alive() and len(reads) == rows // 10
    for name, value in at_snapshot.items():
        assert torch.equal(torch.cat([read[name] for read in reads]), value)
    assert not torch.equal(live["t"]["weight"], at_snapshot["weight"])  # training did change the rows
    assert snapshot.preserved_bytes > 0


def test_a_view_snapshot_reads_the_live_rows_and_preserves_nothing():
    live = _live()
    snapshot = RowSnapshot(live, "view")
    assert not snapshot.preserving
    _lookup(snapshot, torch.tensor([1, 2]))
    rows = snapshot.rows("t", 0, 5)["weight"]
    assert rows.data_ptr() == live["t"]["weight"].data_ptr() and snapshot.preserved_bytes == 0
    copy = RowSnapshot(live, "copy").rows("t", 0, 5)["weight"]
    assert copy.data_ptr() != rows.data_ptr() and torch.equal(copy, rows)


def test_an_id_outside_the_table_raises_and_preserves_nothing():
    snapshot = RowSnapshot(_live(), "copy_on_write")
    with pytest.raises(RuntimeError, match=f"id {ROWS} at value position 1"):
        _lookup(snapshot, torch.tensor([3, ROWS]))
    assert snapshot.preserved_bytes == 0
