"""Row composition: the newest saved version of each row of a table range, across full and subset saves.

Partial recovery reloads a failed shard's rows. With subset (delta) saves between full saves, a row's
newest version lives in the latest loadable full save or in any later subset save that wrote it; later
subsets override earlier ones row by row.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from .errors import CorruptCheckpointError
from .store import CheckpointStore, SkippedSaveWarning


def restore_rows(
    store: CheckpointStore,
    table: str,
    row_range: tuple[int, int],
    state_names: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """Newest saved rows [start, end) of `table`.

    Returns `weight` [n, dim], `opt/<state>` for each of `state_names`, and `saved_step` (int64 [n]): the
    step of the save each row came from, so the caller can count the updates a row lost. A corrupt full
    save falls back to the previous full save; a corrupt (or incomplete) subset save is skipped, its rows
    coming from older saves. Both warn with SkippedSaveWarning.
    """
    start, end = row_range
    if not 0 <= start < end:
        raise ValueError(f"row_range must satisfy 0 <= start < end, got [{start}, {end})")
    prefix = f"emb/{table}/"
    parts = ["weight"] + [f"opt/{state}" for state in state_names]

    base = store.latest_loadable("full", [prefix + part for part in parts])
    if base is None:
        raise FileNotFoundError(f"no full save in {store.directory} to restore table {table!r} from")
    rows = next(iter(base.tensors.values())).shape[0]
    if end > rows:
        raise ValueError(f"row_range [{start}, {end}) exceeds table {table!r} with {rows} rows")
    # clone: keep only the requested rows, not the whole loaded table.
    out = {part: base.tensors[prefix + part][start:end].clone() for part in parts}
    saved_step = torch.full((end - start,), base.manifest.step, dtype=torch.int64)

    for subset in store.saves("subset"):
        if subset.step <= base.manifest.step or not subset.has(prefix + "ids"):
            continue
        try:
            loaded = store.load(subset, [prefix + "ids"] + [prefix + part for part in parts])
        except (CorruptCheckpointError, KeyError) as e:
            warnings.warn(f"rows of {table!r} in {subset.folder} are not used, older saves supply them: {e}",
                          SkippedSaveWarning, stacklevel=2)
            continue
        ids = loaded[prefix + "ids"]
        in_range = (ids >= start) & (ids < end)
        local = ids[in_range] - start
        for part in parts:
            out[part][local] = loaded[prefix + part][in_range].to(out[part].dtype)
        saved_step[local] = subset.step
    out["saved_step"] = saved_step
    return out

