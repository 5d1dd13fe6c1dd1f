"""What goes into a save's parts: from a decision and a snapshot of the rows, each domain's part contents.

Pure bookkeeping over tensors: names (`cpr.storage.names`), DCP chunks of a full save, the codec of the
embedding weights. Nothing here writes a file or talks to another rank; the pipeline (`pipeline.py`)
persists what this makes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch

from cpr import dense
from cpr.choices import QUANTIZE_CHOICES
from cpr.domains import DomainLayout
from cpr.policies.base import SaveDecision
from cpr.snapshot import RowSnapshot
from cpr.storage import PartContent, TableMeta, codecs, domain_part
from cpr.storage.dcp_format import table_chunks
from cpr.storage.names import POLICY_PREFIX, ids_name, weight_name
from cpr.tables import EmbeddingTables

# `quantize="auto"` follows Check-N-Run: every restore puts the quantization error of the restored rows into
# the model and the errors of successive restores add up, so a job that expects few restores can store fewer
# bits. Here: 4 bits while the job expects at most AUTO_INT4_MAX_RESTORES restores (failures over the job, from
# the cluster profile), 8 bits beyond.
AUTO_INT4_MAX_RESTORES = 4


def weight_codec(quantize: str, expected_restores: float, shapes: Mapping[str, tuple[str, int]]) -> str:
    """The codec of embedding weights in saves for `--quantize` `quantize`, given the job's expected
    restores and each table's (dtype name, dim); ValueError if a table cannot be stored so."""
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
    if quantize == "none":
        return "raw"
    codec = quantize
    if quantize == "auto":
        fits_int4 = all(codecs.problem("int4", dtype, (1, dim)) is None for dtype, dim in shapes.values())
        codec = "int4" if expected_restores <= AUTO_INT4_MAX_RESTORES and fits_int4 else "int8"
    for table, (dtype, dim) in shapes.items():
        problem = codecs.problem(codec, dtype, (1, dim))
        if problem:
            raise ValueError(f"quantize={quantize!r}: table {table!r}: {problem}")
    return codec


@dataclass(frozen=True)
class SelectedRows:
    """A subset save's rows of one table: ascending local ids, their tensors' rows by name (copies), and each
    local domain's [low, high) slice of both."""

    ids: torch.Tensor
    copies: dict[str, torch.Tensor]
    cuts: dict[int, tuple[int, int]]


class PartMaker:
    """Makes this process's parts of a save: one per local domain, and the dense part.

    Args:
        layout: the failure domains and the rows each holds here.
        tables: the live tables (their shapes, row offsets and row-wise states).
        quantize, expected_restores: how embedding weights are stored (see `weight_codec`).
    """

    def __init__(self, layout: DomainLayout, tables: EmbeddingTables, quantize: str = "none",
                 expected_restores: float = 0.0) -> None:
        self.layout, self.tables = layout, tables
        self.table_meta = {
            name: TableMeta(rows=info.local_rows, dim=info.dim,
                            dtype=str(tables.weight(name).dtype).removeprefix("torch."))
            for name, info in tables.tables.items()
        }
        self.weight_codec = weight_codec(quantize, expected_restores,
                                         {t: (meta.dtype, meta.dim) for t, meta in self.table_meta.items()})

    def domain_parts(self, decision: SaveDecision, snapshot: RowSnapshot, selected: Mapping[str, SelectedRows],
                     ledger: dict[str, Any] | None) -> Iterator[tuple[str, PartContent]]:
        """This process's domain parts of a save, made one part at a time from its snapshot (a subset's from its
        `selected` rows); the first carries `ledger`, this process's record of the run, in a full save."""
        for i, domain in enumerate(self.layout.local):
            content = self.domain_part(domain, decision, selected, snapshot)
            if content is not None and i == 0 and ledger is not None:
                # This process's record of the run so far: a resumed run continues it (every rank keeps its own).
                content = dataclasses.replace(content, extra={"ledger": ledger})
            if content is not None:
                yield domain_part(domain), content

    def domain_part(self, domain: int, decision: SaveDecision, selected: Mapping[str, SelectedRows],
                    snapshot: RowSnapshot) -> PartContent | None:
        """Domain `domain`'s rows (all of them, or its share of a subset's `selected` rows) with their
        row-wise state; the weights stored with `weight_codec`."""
        tensors: dict[str, torch.Tensor] = {}
        tables: dict[str, TableMeta] = {}
        rows: dict[str, tuple[int, int]] = {}
        chunks = {}
        for table, (start, end) in self.layout.held(domain).items():
            if decision.kind == "full":
                tensors.update(snapshot.rows(table, start, end))
                info = self.tables.tables[table]
                chunks.update(table_chunks(table, info.state_key, info.rows, self.layout.global_rows(table, domain)[0],
                                           tensors))
            else:
                if table not in selected:
                    continue
                chosen = selected[table]
                low, high = chosen.cuts[domain]
                if low == high:
                    continue
                tensors[ids_name(table)] = chosen.ids[low:high] - start
                tensors.update({name: rows_copy[low:high] for name, rows_copy in chosen.copies.items()})
            tables[table] = dataclasses.replace(self.table_meta[table], rows=end - start)
            rows[table] = self.layout.global_rows(table, domain)
        if decision.kind == "subset" and not tensors:
            return None
        stored = {weight_name(table): self.weight_codec for table in tables} if self.weight_codec != "raw" else {}
        return PartContent(tensors, tables, rows, codecs=stored, chunks=chunks)

    def selected_rows(self, decision: SaveDecision, snapshot: RowSnapshot) -> dict[str, SelectedRows]:
        """A subset save's rows of each local table read from the snapshot (one index_select per tensor, not
        one per domain): ascending ids, the copies by tensor name, and each local domain's slice of them."""
        selected = {}
        for table, ids in decision.rows.items():
            if table not in self.tables.tables:
                continue
            ids = ids.to(torch.int64).sort().values
            copies = snapshot.select(table, ids)
            bounds = torch.tensor([self.layout.ranges[table][d] for d in self.layout.local], dtype=torch.int64)
            cuts = dict(zip(self.layout.local, map(tuple, torch.searchsorted(ids, bounds.reshape(-1, 2)).tolist())))
            selected[table] = SelectedRows(ids, copies, cuts)
        return selected

    @staticmethod
    def dense_part(dense_state: Mapping[str, torch.Tensor], policy_tensors: Mapping[str, torch.Tensor]) -> PartContent:
        """The dense part of a full save: dense parameters, dense optimizer state and RNG (`TrainingState.
        capture_dense`), and the policy's state tensors."""
        return PartContent({**dense_state, **{POLICY_PREFIX + k: v for k, v in policy_tensors.items()}},
                           chunks=dense.chunks(dense_state))

    def subset_row_bytes(self, table: str) -> int:
        """What one row of `table` takes in a subset save: its stored weight, row-wise states and id."""
        per_row = codecs.stored_nbytes(self.weight_codec, self.tables.weight(table).dtype, (1, self.table_meta[table].dim))
        return per_row + sum(state[0].nbytes for state in self.tables.row_states(table).values()) + 8
