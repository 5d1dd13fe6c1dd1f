"""Rows by global row range, whatever plan wrote them: the reader behind a resume at another world size or
sharding plan (and a shrink onto fewer ranks).

Every domain part's manifest names the global rows it holds of each table (`Manifest.shards`), so the rows a
new owner needs, [start, end) of a table, are the union of the overlaps of that range with the saved parts'
ranges, whichever plan and world size wrote them. A full save supplies every row; later subset saves
override the rows they hold (their ids are relative to their part's first row), so the result is each row's
newest saved version, as `compose.restore_domain` gives for one domain of an unchanged plan. Only the parts
that overlap a wanted range are read, and of them only the tensors of the wanted tables.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from cpr.errors import CheckpointMismatchError, CorruptCheckpointError, SkippedSaveWarning

from .manifest import Manifest
from .names import ids_name, state_name, weight_name
from .store import DENSE_PART, CheckpointStore, SaveInfo


@dataclass(frozen=True)
class SavedTable:
    """A table as a save holds it over all its parts: its global row count and row width."""

    rows: int
    dim: int


@dataclass
class GlobalRows:
    """Rows read by global range: `tensors[name]` by save name (`weight_name`, `state_name`) over the wanted
    rows of each table, `saved_step[table]` the step of the save each row came from, `bytes_read` by this
    process (manifests included)."""

    tensors: dict[str, torch.Tensor]
    saved_step: dict[str, torch.Tensor]
    bytes_read: int


def part_manifests(store: CheckpointStore, save: SaveInfo) -> tuple[dict[str, Manifest], int]:
    """The manifest of every domain part of `save` (no tensors read) and the bytes read for them."""
    manifests, nbytes = {}, 0
    for part in sorted(save.parts):
        if part == DENSE_PART:
            continue
        loaded = store.load_part(save, part, names=())
        manifests[part], nbytes = loaded.manifest, nbytes + loaded.bytes_read
    return manifests, nbytes


def saved_tables(manifests: Mapping[str, Manifest]) -> dict[str, SavedTable]:
    """Each table of a full save's parts: rows (the end of its last range) and width."""
    tables: dict[str, SavedTable] = {}
    for manifest in manifests.values():
        for table, ranges in manifest.shards.items():
            if not ranges:
                continue
            end = max(int(r[1]) for r in ranges)
            rows = max(end, tables[table].rows) if table in tables else end
            tables[table] = SavedTable(rows, int(manifest.tables[table].dim))
    return tables


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int] | None:
    low, high = max(a[0], b[0]), min(a[1], b[1])
    return (low, high) if low < high else None


def _names(table: str, states: Sequence[str]) -> list[str]:
    return [weight_name(table), *(state_name(table, s) for s in states)]


def read_global_rows(store: CheckpointStore, full: SaveInfo, subsets: Sequence[SaveInfo],
                     rows: Mapping[str, tuple[int, int]], state_names: Mapping[str, Sequence[str]],
                     manifests: Mapping[str, Manifest] | None = None) -> GlobalRows:
    """The newest saved version of global rows `rows[table] = (start, end)` with their row-wise `state_names`,
    from the full save `full` and the `subsets` newer than it (in step order).

    CheckpointMismatchError when the full save does not cover a wanted range or lacks a wanted state (another
    model or optimizer wrote it); a corrupt or incomplete subset part is skipped with SkippedSaveWarning, older
    saves supplying its rows. `manifests`: `full`'s part manifests, if read already.
    """
    bytes_read = 0
    if manifests is None:
        manifests, bytes_read = part_manifests(store, full)
    out: dict[str, torch.Tensor] = {}
    saved_step: dict[str, torch.Tensor] = {}
    covered = {table: 0 for table in rows}
    for part, manifest in manifests.items():
        wanted = {t: o for t, (start, end) in rows.items() for r in manifest.shards.get(t, ())[:1]
                  if (o := _overlap((start, end), (int(r[0]), int(r[1])))) is not None}
        if not wanted:
            continue
        names = [n for t in wanted for n in _names(t, state_names.get(t, ()))]
        missing = [n for n in names if not manifest.has(n)]
        if missing:
            raise CheckpointMismatchError(f"{manifest.folder} lacks {missing[:3]}: the checkpoint was written with "
                                          "another embedding optimizer or model")
        loaded = store.load_part(full, part, names)
        bytes_read += loaded.bytes_read
        for table, (low, high) in wanted.items():
            first, (start, end) = int(manifest.shards[table][0][0]), rows[table]
            for name in _names(table, state_names.get(table, ())):
                value = loaded.tensors[name]
                if name not in out:
                    out[name] = torch.empty((end - start, *value.shape[1:]), dtype=value.dtype)
                out[name][low - start:high - start] = value[low - first:high - first]
            saved_step.setdefault(table, torch.full((end - start,), full.step, dtype=torch.int64))
            covered[table] += high - low
    short = {t: (covered[t], end - start) for t, (start, end) in rows.items() if covered[t] != end - start}
    if short:
        raise CheckpointMismatchError(f"{full.folder} holds other rows than this model (table: rows found, rows "
                                      f"wanted): {dict(list(short.items())[:3])}")
    for subset in subsets:
        if subset.kind != "subset" or subset.step <= full.step:
            continue
        bytes_read += _apply_subset(store, subset, rows, state_names, out, saved_step)
    return GlobalRows(out, saved_step, bytes_read)


def _apply_subset(store: CheckpointStore, subset: SaveInfo, rows: Mapping[str, tuple[int, int]],
                  state_names: Mapping[str, Sequence[str]], out: dict[str, torch.Tensor],
                  saved_step: dict[str, torch.Tensor]) -> int:
    """Override `out` with the rows of `subset` inside the wanted ranges; the bytes read."""
    bytes_read = 0
    try:
        manifests, bytes_read = part_manifests(store, subset)
    except CorruptCheckpointError as e:
        warnings.warn(f"{subset.folder} is not used, older saves supply its rows: {e}", SkippedSaveWarning, stacklevel=3)
        return bytes_read
    for part, manifest in manifests.items():
        wanted = {t: int(r[0]) for t, (start, end) in rows.items() for r in manifest.shards.get(t, ())[:1]
                  if manifest.has(ids_name(t)) and _overlap((start, end), (int(r[0]), int(r[1]))) is not None}
        if not wanted:
            continue
        names = [n for t in wanted for n in (ids_name(t), *_names(t, state_names.get(t, ())))]
        try:
            loaded = store.load_part(subset, part, names)
        except (CorruptCheckpointError, KeyError) as e:
            warnings.warn(f"{part} of {subset.folder} is not used, older saves supply its rows: {e}",
                          SkippedSaveWarning, stacklevel=3)
            continue
        bytes_read += loaded.bytes_read
        for table, first in wanted.items():
            start, end = rows[table]
            ids = loaded.tensors[ids_name(table)].to(torch.int64) + first
            keep = (ids >= start) & (ids < end)
            target = ids[keep] - start
            for name in _names(table, state_names.get(table, ())):
                out[name][target] = loaded.tensors[name][keep].to(out[name].dtype)
            saved_step[table][target] = subset.step
    return bytes_read
