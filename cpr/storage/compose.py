"""Row composition: the newest saved version of each row of one failure domain, across full and subset saves.

Partial recovery reloads a failed domain's rows. Its newest version of a row lives in the latest loadable
full save or in any later subset save that wrote it; later subsets override earlier ones row by row. Only
the domain's own part of each save is read, and each commit record is parsed once per recovery (the
caller lists the saves once and passes them in).
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from cpr.errors import CheckpointMismatchError, CorruptCheckpointError, SkippedSaveWarning

from .names import ids_name, state_name, weight_name
from .store import CheckpointStore, LoadedPart, SaveInfo


@dataclass
class RestoredDomain:
    """A domain's newest saved rows: `rows[table]` maps `weight` and `opt/<state>` to tensors over the
    domain's rows of the table; `saved_step[table]` is the step of the save each row came from."""

    rows: dict[str, dict[str, torch.Tensor]]
    saved_step: dict[str, torch.Tensor]
    base_step: int
    bytes_read: int


def check_part_rows(loaded: LoadedPart, expected: Mapping[str, tuple[int, int]]) -> None:
    """The part holds exactly the tables and global rows this process holds for the domain."""
    found = {table: tuple(ranges[0]) for table, ranges in loaded.manifest.shards.items() if ranges}
    wanted = {table: tuple(rows) for table, rows in expected.items()}
    if found != wanted:
        differ = sorted(set(found.items()) ^ set(wanted.items()))[:3]
        raise CheckpointMismatchError(
            f"{loaded.manifest.folder} holds other rows than this job's domain (table, global rows) "
            f"differ: {differ}: the checkpoint was written with another sharding plan or world size")


def load_newest(store: CheckpointStore, saves: Sequence[SaveInfo], part: str) -> tuple[SaveInfo, LoadedPart]:
    """The newest full save whose `part` loads and verifies, falling back past corrupt ones with a warning."""
    skipped = []
    for save in reversed([s for s in saves if s.kind == "full" and part in s.parts]):
        try:
            return save, store.load_part(save, part)
        except CorruptCheckpointError as e:
            warnings.warn(f"skipping save, falling back to an older one: {e}", SkippedSaveWarning, stacklevel=2)
            skipped.append(save.folder.name)
    if skipped:
        raise CorruptCheckpointError(store.directory, ", ".join(skipped), f"no loadable {part} remains")
    raise FileNotFoundError(f"no full save in {store.directory} holds {part}")


def restore_domain(
    store: CheckpointStore,
    saves: Sequence[SaveInfo],
    part: str,
    rows: Mapping[str, tuple[int, int]],
    state_names: Mapping[str, Sequence[str]],
) -> RestoredDomain:
    """Newest saved rows of the domain whose part is `part`.

    `rows[table]` are the global rows the domain holds of each table (checked against the save),
    `state_names[table]` the row-wise optimizer states to restore. A corrupt full save falls back to the
    previous full save; a corrupt subset save is skipped, its rows coming from older saves. Both warn with
    SkippedSaveWarning.
    """
    base_save, base = load_newest(store, saves, part)
    check_part_rows(base, rows)
    bytes_read = base.bytes_read
    out: dict[str, dict[str, torch.Tensor]] = {}
    saved_step: dict[str, torch.Tensor] = {}
    names: dict[str, dict[str, str]] = {}
    for table in rows:
        names[table] = {"weight": weight_name(table), **{f"opt/{s}": state_name(table, s) for s in state_names.get(table, ())}}
        out[table] = {what: base.tensors[name] for what, name in names[table].items()}
        saved_step[table] = torch.full((out[table]["weight"].shape[0],), base_save.step, dtype=torch.int64)

    for subset in saves:
        if subset.kind != "subset" or subset.step <= base_save.step or part not in subset.parts:
            continue
        try:
            loaded = store.load_part(subset, part)
            check_part_rows(loaded, {t: r for t, r in rows.items() if ids_name(t) in loaded.tensors})
            missing = [name for t in rows if ids_name(t) in loaded.tensors for name in names[t].values()
                       if name not in loaded.tensors]
            if missing:
                raise KeyError(f"the part lacks {missing[:3]} beside the rows it holds")
        except (CorruptCheckpointError, KeyError) as e:
            warnings.warn(f"{part} of {subset.folder} is not used, older saves supply its rows: {e}",
                          SkippedSaveWarning, stacklevel=2)
            continue
        bytes_read += loaded.bytes_read
        for table in rows:
            ids = loaded.tensors.get(ids_name(table))
            if ids is None:
                continue
            for what, name in names[table].items():
                out[table][what][ids] = loaded.tensors[name].to(out[table][what].dtype)
            saved_step[table][ids] = subset.step
    return RestoredDomain(out, saved_step, base_save.step, bytes_read)
