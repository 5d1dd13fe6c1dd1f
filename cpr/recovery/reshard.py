"""Resuming a full save written by another world size or sharding plan (W ranks with plan P, resumed at W'
with plan P'): each of this process's domains reads its rows by global range from whichever saved parts hold
them (`cpr.storage.reshard`), with their row-wise (fused) optimizer state; the dense state is the same on
every plan. A save of another *model* (other tables, row counts or widths) is still refused.
"""
from __future__ import annotations

from typing import Mapping

from cpr.domains import DomainLayout
from cpr.errors import CheckpointMismatchError
from cpr.state import TrainingState
from cpr.storage import DENSE_PART, CheckpointStore, LoadedPart, SaveInfo, domain_part
from cpr.storage.reshard import part_manifests, read_global_rows, saved_tables


def same_layout(save: SaveInfo, world_size: int, layout: DomainLayout) -> bool:
    """Whether `save` was written by a job of this world size and these domains (its parts may still hold
    other rows, when another plan wrote it: `check_part_rows` sees that)."""
    return (save.world_size, save.domain_mode, save.num_domains) == (world_size, layout.mode, layout.num_domains)


def check_model(save: SaveInfo, saved: Mapping[str, tuple[int, int]], model: Mapping[str, tuple[int, int]]) -> None:
    """The save's tables (rows, dim) are the model's: CheckpointMismatchError naming the first that differ."""
    differ = sorted(t for t in set(saved) | set(model) if saved.get(t) != model.get(t))
    if differ:
        shown = {t: {"checkpoint": saved.get(t), "model": model.get(t)} for t in differ[:3]}
        raise CheckpointMismatchError(
            f"{save.folder} was written for another model: tables (rows, dim) differ: {shown}; a checkpoint "
            "reshards to another world size or plan, not to other tables")


def load_resharded(state: TrainingState, layout: DomainLayout, store: CheckpointStore, save: SaveInfo) -> dict[str, LoadedPart]:
    """This process's domains' rows of the full save `save`, read by global range whatever plan wrote it, and
    its dense part, shaped as `Restorer.load_full` returns them (each domain's tensors cover exactly the
    rows it holds now). The run's record comes from the coordinator's part of the save. The policy's state
    is taken back as saved on every rank alike (a prioritized policy's access profile then describes the old
    plan's domains until it re-plans)."""
    manifests, manifest_bytes = part_manifests(store, save)
    check_model(save, {t: (s.rows, s.dim) for t, s in saved_tables(manifests).items()}, state.tables.shapes)
    tables = state.tables
    loaded: dict[str, LoadedPart] = {}
    ledger_part = next((m for m in manifests.values() if "ledger" in m.extra), next(iter(manifests.values()), None))
    for i, domain in enumerate(layout.local):
        held = layout.held(domain)
        rows = read_global_rows(store, save, (), {t: layout.global_rows(t, domain) for t in held},
                                {t: list(tables.row_states(t)) for t in held}, manifests)
        loaded[domain_part(domain)] = LoadedPart(ledger_part, rows.tensors,
                                                 rows.bytes_read + (manifest_bytes if i == 0 else 0))
    loaded[DENSE_PART] = store.load_part(save, DENSE_PART)
    return loaded
