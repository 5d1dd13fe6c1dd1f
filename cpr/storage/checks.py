"""Write-side checks of a part's content: the `emb/<table>/...` tensor layout of a full or subset save,
and each table's global row range, rejected before anything is written."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .manifest import TableMeta


def _check_layout(kind: str, tensors: Mapping[str, torch.Tensor], tables: Mapping[str, TableMeta]) -> None:
    """Reject tensors that break the `emb/<table>/...` convention that row composition relies on."""
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
    for table in tables:
        if "/" in table:
            raise ValueError(f"table name {table!r} must not contain '/'")
    by_table: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        parts = name.split("/", 2)
        if parts[0] == "emb":
            if len(parts) < 3:
                raise ValueError(f"tensor {name!r}: embedding tensors are named emb/<table>/<what>")
            by_table.setdefault(parts[1], {})[parts[2]] = tensor
    check = _check_full_table if kind == "full" else _check_subset_table
    for table, parts in by_table.items():
        check(table, parts, tables.get(table))


def _check_full_table(table: str, parts: Mapping[str, torch.Tensor], meta: TableMeta | None) -> None:
    """Every tensor of a table in a full save has one entry per row; the weight is rows x dim."""
    if meta and "weight" in parts and tuple(parts["weight"].shape) != (meta.rows, meta.dim):
        raise ValueError(f"full save: emb/{table}/weight has shape {list(parts['weight'].shape)}, "
                         f"table {table!r} is {meta.rows}x{meta.dim}")
    rows = meta.rows if meta else parts["weight"].shape[0] if "weight" in parts else None
    for what, tensor in parts.items():
        if tensor.dim() == 0 or (rows is not None and tensor.shape[0] != rows):
            raise ValueError(f"full save: emb/{table}/{what} has shape {list(tensor.shape)}, expected {rows} rows")


def _check_subset_table(table: str, parts: Mapping[str, torch.Tensor], meta: TableMeta | None) -> None:
    """A table in a subset save has distinct in-range int64 `ids` and one entry per id in every tensor."""
    ids = parts.get("ids")
    if ids is None:
        raise ValueError(f"subset save: emb/{table}/ids is required alongside {sorted(parts)}")
    if ids.dtype != torch.int64 or ids.dim() != 1:
        raise ValueError(f"subset save: emb/{table}/ids must be a 1-d int64 tensor, got {ids.dtype}{list(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or (meta and int(ids.max()) >= meta.rows)):
        raise ValueError(f"subset save: emb/{table}/ids out of range [0, {meta.rows if meta else '...'})")
    # Ascending ids (CPR's own) are distinct at the cost of one comparison; others are made unique to tell.
    ascending = ids.numel() < 2 or bool((ids[1:] > ids[:-1]).all())
    if not ascending and torch.unique(ids).numel() != ids.numel():
        raise ValueError(f"subset save: emb/{table}/ids has duplicate rows")
    for what, tensor in parts.items():
        if tensor.dim() == 0 or tensor.shape[0] != ids.numel():
            raise ValueError(f"subset save: emb/{table}/{what} has shape {list(tensor.shape)}, "
                             f"expected {ids.numel()} rows like emb/{table}/ids")


def _check_rows(rows: Mapping[str, tuple[int, int]], tables: Mapping[str, TableMeta]) -> None:
    """A part's global row range of each table spans exactly the table's rows in the part."""
    for table, (start, end) in rows.items():
        expected = tables[table].rows if table in tables else end - start
        # An empty range is allowed: a domain may hold no rows of a small table.
        if not 0 <= start <= end or end - start != expected:
            raise ValueError(f"rows [{start}, {end}) of table {table!r} do not span its {expected} rows in the part")
