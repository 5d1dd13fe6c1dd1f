"""A shrink: the job goes on with fewer ranks after a rank is lost for good (partial recovery at a shrink).

The survivors have rebuilt the model over a new sharding plan of fewer ranks. Every row a survivor held
before comes from that survivor's memory (the rows it kept, handed to the row's new owner); only the rows no
survivor held, the lost ranks', are read from storage, their newest saved versions (the full save plus
newer subset saves, `cpr.storage.reshard`), so the bytes read are the lost rows'. Dense state is the
survivor's own (every rank holds the same). Collective over the survivors' new group.

Not wired into the supervisor yet: `ElasticJob` does not open a smaller generation (see the README).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from cpr.comm import Coordinator
from cpr.domains import DomainLayout
from cpr.state import TrainingState
from cpr.storage import CheckpointStore, SaveInfo
from cpr.storage.reshard import read_global_rows

# What a survivor kept of the old plan: table -> (global first row, tensors by save name over its rows).
KeptRows = Mapping[str, "tuple[int, Mapping[str, torch.Tensor]]"]


@dataclass(frozen=True)
class ShrinkRestore:
    """What this rank's new shards got: rows from survivors' memory, rows from storage (the lost ranks'), and
    the bytes read for them (summed over the ranks in `job_bytes_read`); `oldest_step`: of the oldest save a
    stored row came from (None: none came from storage)."""

    peer_rows: int
    stored_rows: int
    bytes_read: int
    job_bytes_read: int
    oldest_step: int | None


def kept_rows(state: TrainingState) -> dict[str, tuple[int, dict[str, torch.Tensor]]]:
    """Copies of this survivor's rows and row-wise state under the old plan, to call `shrink_restore` with
    after the model is rebuilt over the survivors."""
    return {table: (state.tables.tables[table].row_offset, {k: v.detach().clone() for k, v in tensors.items()})
            for table, tensors in state.row_tensors().items()}


def _gaps(start: int, end: int, covered: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of [start, end) outside every range of `covered`."""
    gaps, at = [], start
    for low, high in sorted(covered):
        if high <= at or low >= end:
            continue
        if low > at:
            gaps.append((at, low))
        at = max(at, high)
    if at < end:
        gaps.append((at, end))
    return gaps


def shrink_restore(state: TrainingState, layout: DomainLayout, store: CheckpointStore, saves: Sequence[SaveInfo],
                   kept: KeptRows, coordinator: Coordinator) -> ShrinkRestore:
    """Fill this rank's new shards (`state`, `layout`: the model rebuilt over the survivors): rows a survivor
    kept (`kept`, from `kept_rows` before the rebuild) from its memory, the others from the newest saves."""
    everyone = coordinator.all_gather(dict(kept), site="shrink.kept_rows")
    full = [s for s in saves if s.kind == "full"][-1]
    subsets = [s for s in saves if s.kind == "subset" and s.step > full.step]
    tables = state.tables
    peer = stored = nbytes = 0
    oldest: int | None = None
    for domain in layout.local:
        for table, (start, end) in layout.held(domain).items():
            first = layout.global_rows(table, domain)[0]
            names = [name for name in state.row_tensors()[table]]
            out = {name: torch.empty_like(value) for name, value in state.row_tensors()[table].items()}
            covered = []
            for pieces in everyone:
                if table not in pieces:
                    continue
                offset, tensors = pieces[table]
                rows = len(tensors[names[0]])
                low, high = max(offset, first), min(offset + rows, first + end - start)
                if low < high:
                    for name in names:
                        out[name][low - first:high - first] = tensors[name][low - offset:high - offset]
                    covered.append((low, high))
                    peer += high - low
            for low, high in _gaps(first, first + end - start, covered):
                read = read_global_rows(store, full, subsets, {table: (low, high)}, {table: list(tables.row_states(table))})
                for name in names:
                    out[name][low - first:high - first] = read.tensors[name]
                stored, nbytes = stored + high - low, nbytes + read.bytes_read
                step = int(read.saved_step[table].min())
                oldest = step if oldest is None else min(oldest, step)
            state.write_saved_rows(table, start, end, out)
    job_bytes = int(coordinator.sum(nbytes, site="shrink.bytes_read"))
    return ShrinkRestore(peer, stored, nbytes, job_bytes, oldest)
