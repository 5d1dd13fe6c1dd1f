"""`AccessTracker`: per-table access state for CPR's partial checkpoints.

CPR-MFU keeps an int32 access counter per row and saves the most-frequently-used rows more often; CPR-SSU
gets the same effect by sub-sampling accesses into a bounded set of row ids per table (memory independent
of the table size). An MFU counter restarts from 0 when its row is saved, so "updated since last save" is
count > 0: MFU takes exactly 4 bytes per row. All per-batch work is one call into the `cpr._C` ops.
"""
from __future__ import annotations

import math
from typing import Any, Literal, Mapping

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cpr.tracking._ops import ops

TrackingMode = Literal["mfu", "ssu"]
RowRange = tuple[int, int]

_EMPTY_SLOT = -1
_STAT_SIZE, _STAT_OVERFLOW = 0, 1


def _ssu_slots(capacity: int) -> int:
    """Slots of an SSU set: the power of two >= 2 * capacity, so the set is at most half full and probe
    sequences stay short."""
    return 1 << (2 * capacity - 1).bit_length()


class AccessTracker:
    """Access counts since each row's last save (MFU) or sampled accessed ids (SSU) for some tables.

    Args:
        tables: table name -> number of rows. Ids of a table are its global row ids in [0, rows).
        feature_to_table: KJT feature name -> table name (several features may share a table).
        mode: "mfu" (int32 counters, 4 bytes/row) or "ssu" (a set of at most `ssu_capacity` sampled ids
            per table).
        ssu_rate: probability with which SSU samples each access; a row accessed a times since the last
            `sampled()` is missing from the set with probability (1 - ssu_rate) ** a (while not full).
        ssu_capacity: most ids an SSU set holds; further new ids are dropped and counted (`ssu_overflow`).
        seed: seed of SSU sampling; sampling is a hash of (seed, observe step, position, id), so it is
            reproducible and independent of the thread count and device.
        device: where the state lives; must be the device of the observed KJTs' values.
    """

    def __init__(
        self,
        tables: Mapping[str, int],
        feature_to_table: Mapping[str, str],
        mode: TrackingMode = "mfu",
        ssu_rate: float = 0.05,
        ssu_capacity: int = 8192,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if mode not in ("mfu", "ssu"):
            raise ValueError(f"mode must be 'mfu' or 'ssu', got {mode!r}")
        if not 0.0 <= ssu_rate <= 1.0:
            raise ValueError(f"ssu_rate must be in [0, 1], got {ssu_rate}")
        if ssu_capacity < 1:
            raise ValueError(f"ssu_capacity must be >= 1, got {ssu_capacity}")
        for name, rows in tables.items():
            if rows < 0:
                raise ValueError(f"table {name!r} has a negative row count {rows}")
        for feature, table in feature_to_table.items():
            if table not in tables:
                raise ValueError(f"feature {feature!r} maps to unknown table {table!r}; tables: {sorted(tables)}")
        self.mode: TrackingMode = mode
        self.ssu_rate = float(ssu_rate)
        self.ssu_capacity = int(ssu_capacity)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.table_rows: dict[str, int] = {name: int(rows) for name, rows in tables.items()}
        self.feature_to_table: dict[str, str] = dict(feature_to_table)
        self._table_index = {name: i for i, name in enumerate(self.table_rows)}
        self._rows_list = list(self.table_rows.values())
        self._feature_maps: dict[tuple[str, ...], list[int]] = {}
        self._step = 0
        self._counts: list[torch.Tensor] = []
        self._slots: list[torch.Tensor] = []
        self._stats: list[torch.Tensor] = []
        self._pending = 0  # the counters' sum, kept as they change (MFU): accesses not yet saved
        if mode == "mfu":
            self._counts = [torch.zeros(rows, dtype=torch.int32, device=self.device) for rows in self._rows_list]
        else:
            slots = _ssu_slots(self.ssu_capacity)
            self._slots = [torch.full((slots,), _EMPTY_SLOT, dtype=torch.int64, device=self.device) for _ in tables]
            self._stats = [torch.zeros(2, dtype=torch.int64, device=self.device) for _ in tables]

    @classmethod
    def from_module(cls, module: nn.Module, **kwargs: Any) -> AccessTracker:
        """A tracker for every table of every `EmbeddingBagCollection` in `module`, plain or sharded by
        `DistributedModelParallel` (its `ShardedEmbeddingBagCollection`s keep the tables' configs).
        `kwargs` go to the constructor."""
        from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

        tables: dict[str, int] = {}
        feature_to_table: dict[str, str] = {}
        for path, sub in module.named_modules():
            if isinstance(sub, EmbeddingBagCollection):
                configs = sub.embedding_bag_configs()
            elif isinstance(sub, ShardedEmbeddingBagCollection):
                configs = list(sub._table_name_to_config.values())
            else:
                continue
            for config in configs:
                if config.name in tables:
                    raise ValueError(f"table {config.name!r} of {path!r} appears in more than one collection")
                tables[config.name] = config.num_embeddings
                for feature in config.feature_names:
                    feature_to_table[feature] = config.name
        if not tables:
            raise ValueError(f"no EmbeddingBagCollection found in {type(module).__name__}")
        return cls(tables, feature_to_table, **kwargs)

    # Per batch.

    def observe(self, kjt: KeyedJaggedTensor) -> None:
        """Record every access of a batch (all features, one op call). Raises on ids outside a table's
        rows, recording nothing of that batch."""
        values = kjt.values().contiguous()
        if values.device != self.device:
            raise ValueError(f"KJT values are on {values.device} but the tracker's state is on {self.device}")
        key_offsets = kjt.offset_per_key()
        feature_tables = self._feature_table_indices(tuple(kjt.keys()))
        if self.mode == "mfu":
            ops.count_accesses(self._counts, self._rows_list, values, key_offsets, feature_tables)
            self._pending += values.numel()
        else:
            ops.sample_accesses(
                self._slots, self._stats, self._rows_list, values, key_offsets, feature_tables,
                self.seed, self._step, self.ssu_rate, self.ssu_capacity,
            )
        self._step += 1

    def _feature_table_indices(self, keys: tuple[str, ...]) -> list[int]:
        indices = self._feature_maps.get(keys)
        if indices is None:
            unknown = [k for k in keys if k not in self.feature_to_table]
            if unknown:
                raise KeyError(f"KJT features {unknown} are not mapped to a tracked table")
            indices = [self._table_index[self.feature_to_table[k]] for k in keys]
            self._feature_maps[keys] = indices
        return indices

    # Queries.

    def _index(self, table: str) -> int:
        if table not in self._table_index:
            raise KeyError(f"unknown table {table!r}; tracked tables: {sorted(self._table_index)}")
        return self._table_index[table]

    def _range(self, table: str, row_range: RowRange | None) -> RowRange:
        rows = self.table_rows[table]
        if row_range is None:
            return 0, rows
        start, end = int(row_range[0]), int(row_range[1])
        if not 0 <= start <= end <= rows:
            raise ValueError(f"row_range {row_range} is not within table {table!r} rows [0, {rows})")
        return start, end

    def counts(self, table: str, rows: torch.Tensor | None = None) -> torch.Tensor:
        """A copy of the table's int32 access counters, of every row or of `rows` (MFU mode only)."""
        i = self._index(table)
        if self.mode != "mfu":
            raise RuntimeError("counts() needs mode='mfu'; an SSU tracker keeps sampled ids, not per-row counts")
        return self._counts[i].clone() if rows is None else self._counts[i][rows.to(torch.int64)]

    def dirty_rows(self, table: str, row_range: RowRange | None = None) -> torch.Tensor:
        """Ascending int64 ids of rows accessed since they were last marked saved: those with count > 0
        (MFU only)."""
        i = self._index(table)
        if self.mode != "mfu":
            raise RuntimeError("dirty_rows() needs mode='mfu'; an SSU tracker keeps no per-row state")
        start, end = self._range(table, row_range)
        return self._counts[i][start:end].nonzero().squeeze(1).add_(start)

    def hottest(
        self, table: str, fraction: float | None = None, k: int | None = None, row_range: RowRange | None = None
    ) -> torch.Tensor:
        """Ascending ids of the `k` (or ceil(fraction * rows in range)) most-accessed rows in the range;
        rows never accessed since their last save are not returned, ties go to the lower id. MFU only."""
        i = self._index(table)
        if self.mode != "mfu":
            raise RuntimeError("hottest() needs mode='mfu'; use sampled() with an SSU tracker")
        if (fraction is None) == (k is None):
            raise ValueError("give exactly one of fraction and k")
        start, end = self._range(table, row_range)
        if fraction is not None:
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(f"fraction must be in [0, 1], got {fraction}")
            k = math.ceil(fraction * (end - start))
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        return ops.select_hottest(self._counts[i], start, end, k)

    def sampled(self, table: str, clear: bool = True) -> torch.Tensor:
        """Ascending ids sampled since the last clear (SSU only); `clear` empties the set."""
        i = self._index(table)
        if self.mode != "ssu":
            raise RuntimeError("sampled() needs mode='ssu'; use hottest() with an MFU tracker")
        slots = self._slots[i]
        ids = slots[slots != _EMPTY_SLOT].sort().values
        if clear:
            slots.fill_(_EMPTY_SLOT)
            self._stats[i].zero_()
        return ids

    def ssu_overflow(self, table: str) -> int:
        """Sampled new ids dropped since the last clear because the table's set was full."""
        i = self._index(table)
        if self.mode != "ssu":
            raise RuntimeError("ssu_overflow() needs mode='ssu'")
        return int(self._stats[i][_STAT_OVERFLOW])

    # After a save.

    def mark_saved(self, table: str, rows: torch.Tensor | None = None, row_range: RowRange | None = None) -> None:
        """Reset the counters of `rows` (or of `row_range`, or of the whole table) to 0, which also makes
        them clean for `dirty_rows()` (MFU only)."""
        i = self._index(table)
        if self.mode != "mfu":
            raise RuntimeError("mark_saved() needs mode='mfu'; an SSU tracker keeps no per-row state")
        if rows is not None and row_range is not None:
            raise ValueError("give rows or row_range, not both")
        if rows is not None:
            rows = rows.to(device=self.device, dtype=torch.int64)
            # Read before the reset; clamped so that bad ids reach the op's own check (which changes nothing).
            unique = rows.unique().clamp(0, max(self.table_rows[table] - 1, 0))
            cleared = int(self._counts[i][unique].sum()) if rows.numel() else 0
            ops.mark_saved_rows(self._counts[i], rows)
        else:
            start, end = self._range(table, row_range)
            cleared = int(self._counts[i][start:end].sum())
            ops.mark_saved_range(self._counts[i], start, end)
        self._pending -= cleared

    def take_counts(self) -> dict[str, torch.Tensor]:
        """Every table's counters, which restart from 0 (MFU only): what a save of every row clears, to give
        back with `add_counts` should it fail. Fresh counters are swapped in, nothing is copied or summed."""
        if self.mode != "mfu":
            raise RuntimeError("take_counts() needs mode='mfu'")
        taken = dict(zip(self.table_rows, self._counts))
        self._counts = [torch.zeros_like(counts) for counts in self._counts]
        self._pending = 0
        return taken

    def pending_total(self) -> int:
        """Accesses not yet saved, over every row: the counters' sum, kept as they change (MFU only)."""
        if self.mode != "mfu":
            raise RuntimeError("pending_total() needs mode='mfu'")
        return self._pending

    def add_counts(self, table: str, counts: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Give back accesses a save cleared (`counts` of every row, or of `rows`) when that save failed: they
        are pending again (MFU only). Counters saturate as in counting."""
        i = self._index(table)
        if self.mode != "mfu":
            raise RuntimeError("add_counts() needs mode='mfu'")
        live = self._counts[i] if rows is None else self._counts[i][rows.to(device=self.device, dtype=torch.int64)]
        total = (live.to(torch.int64) + counts.to(self.device, torch.int64)).clamp_(max=torch.iinfo(torch.int32).max)
        self._pending += int(total.sum() - live.to(torch.int64).sum())
        if rows is None:
            self._counts[i].copy_(total)
        else:
            self._counts[i][rows.to(device=self.device, dtype=torch.int64)] = total.to(torch.int32)

    # Footprint and checkpointing.

    def memory_breakdown(self) -> dict[str, int]:
        """Bytes of state by kind: counters (4/row, MFU), SSU sets (independent of the table sizes)."""

        def total(tensors: list[torch.Tensor]) -> int:
            return sum(t.numel() * t.element_size() for t in tensors)

        return {
            "counters": total(self._counts),
            "ssu_sets": total(self._slots) + total(self._stats),
        }

    def memory_bytes(self) -> int:
        """Bytes of all tracking state."""
        return sum(self.memory_breakdown().values())

    def state_dict(self) -> dict[str, Any]:
        """The tracker's state as tensors (copies), keyed by table name."""
        state: dict[str, Any] = {"mode": self.mode, "step": self._step, "tables": {}}
        for name, i in self._table_index.items():
            if self.mode == "mfu":
                state["tables"][name] = {"counts": self._counts[i].clone()}
            else:
                state["tables"][name] = {"slots": self._slots[i].clone(), "stats": self._stats[i].clone()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict()` of a tracker with the same mode, tables and SSU capacity."""
        if state.get("mode") != self.mode:
            raise ValueError(f"state_dict is for mode {state.get('mode')!r}, this tracker is {self.mode!r}")
        if set(state["tables"]) != set(self._table_index):
            raise ValueError(f"state_dict tables {sorted(state['tables'])} != tracked {sorted(self._table_index)}")
        if self.mode == "mfu":
            fields = {"counts": self._counts}
        else:
            fields = {"slots": self._slots, "stats": self._stats}
        for name, i in self._table_index.items():
            for field, tensors in fields.items():
                saved = state["tables"][name][field]
                if saved.shape != tensors[i].shape or saved.dtype != tensors[i].dtype:
                    raise ValueError(
                        f"state_dict tables[{name!r}][{field!r}] is {saved.dtype}{list(saved.shape)}, "
                        f"expected {tensors[i].dtype}{list(tensors[i].shape)}"
                    )
        for name, i in self._table_index.items():
            for field, tensors in fields.items():
                tensors[i].copy_(state["tables"][name][field])
        self._step = int(state["step"])
        self._pending = int(sum(int(c.sum()) for c in self._counts))
