"""Live views of a model's embedding tables and their row-wise optimizer state.

CPR saves and restores embedding rows in place, so it needs the tensors that training really updates:
for a `DistributedModelParallel` model these are the local shards of the fused tables (fbgemm keeps
weights and optimizer state in its own buffers; the `ShardedTensor`s of `state_dict()` are views of
them), for a plain module the `EmbeddingBagCollection` parameters and the state its optimizer keeps
for them. Nothing here copies a table.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from cpr.errors import UnsupportedShardingError

_WEIGHT_KEY = re.compile(r"(?:^|\.)embedding_bags\.([^.]+)\.weight$")


@dataclass(frozen=True)
class TableInfo:
    """One embedding table as this process holds it.

    `row_offset`/`local_rows` place the local rows inside the global table: a rank that owns a row-wise
    shard holds rows [row_offset, row_offset + local_rows). Row ids used everywhere in CPR are local.
    """

    name: str
    rows: int
    dim: int
    row_offset: int
    local_rows: int
    features: tuple[str, ...]
    state_key: str


def _local_tensor(value: torch.Tensor, table: str = "") -> tuple[torch.Tensor, int] | None:
    """The local rows of a (possibly sharded) tensor and their offset in the global table; None when this
    rank holds no shard of it (table-wise sharding puts whole tables on other ranks)."""
    if isinstance(value, ShardedTensor):
        shards = value.local_shards()
        if not shards:
            return None
        if len(shards) > 1:
            raise UnsupportedShardingError(
                f"table {table!r} has {len(shards)} shards on this rank: CPR supports table-wise, row-wise and "
                "table-row-wise plans (one row slice of a table per rank), not column-wise ones")
        offsets = shards[0].metadata.shard_offsets
        row_offset = offsets[0]
        if value.dim() > 1 and (offsets[1] != 0 or shards[0].tensor.shape[-1] != value.size(-1)):
            raise UnsupportedShardingError(
                f"table {table!r} is sharded column-wise: CPR restores whole rows, so every shard must hold "
                "all columns of its rows (use a table-wise or row-wise plan)")
        return shards[0].tensor, int(row_offset)
    return value, 0


def _feature_map(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Table name -> feature names, from every (sharded or plain) EmbeddingBagCollection in the model."""
    features: dict[str, tuple[str, ...]] = {}
    for module in model.modules():
        configs = getattr(module, "_embedding_bag_configs", None)
        if configs is None and hasattr(module, "embedding_bag_configs"):
            configs = module.embedding_bag_configs()
        for config in configs or ():
            features[config.name] = tuple(config.feature_names)
    return features


class EmbeddingTables:
    """The embedding tables of a model, with live weight and row-wise optimizer-state views.

    Works with a DMP-wrapped model (fused kernel, in-backward optimizer) and with a plain module whose
    `EmbeddingBagCollection` parameters are stepped by `optimizer`. Only tables this rank holds rows of
    are listed: in a multi-rank job a rank may hold no table at all.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self._model = model
        self._optimizer = optimizer
        feature_map = _feature_map(model)
        tables: dict[str, TableInfo] = {}
        self._weights: dict[str, torch.Tensor] = {}
        state = model.state_dict()
        self.shapes: dict[str, tuple[int, int]] = {}  # (rows, dim) of every table of the model, held here or not
        for key, value in state.items():
            match = _WEIGHT_KEY.search(key)
            if match is None:
                continue
            name = match.group(1)
            self.shapes[name] = (int(value.size(0)), int(value.size(1)))
            found = _local_tensor(value, name)
            if found is None:
                continue
            local, row_offset = found
            rows = value.size(0)
            tables[name] = TableInfo(
                name=name,
                rows=int(rows),
                dim=int(value.size(1)),
                row_offset=row_offset,
                local_rows=int(local.shape[0]),
                features=feature_map.get(name, ()),
                state_key=key,
            )
            # The views stay valid for the model's life: fbgemm and nn.Parameter update in place.
            self._weights[name] = local
        if not any(_WEIGHT_KEY.search(key) for key in state):
            raise ValueError("the model holds no EmbeddingBagCollection tables for CPR to checkpoint")
        self.tables: dict[str, TableInfo] = tables
        self._params = dict(model.named_parameters())
        self._fused_states = self._fused_row_states()

    def _fused_row_states(self) -> dict[str, dict[str, torch.Tensor]] | None:
        """fbgemm's per-row optimizer state of each fused table, or None for a model without fused tables.

        fbgemm allocates this state with the tables and updates it in place, so the views taken here stay
        live, unlike a plain optimizer's state, which appears lazily at its first step.
        """
        fused = getattr(self._model, "fused_optimizer", None)
        if fused is None:
            return None
        state = fused.state_dict()["state"]
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, info in self.tables.items():
            prefix = f"{name}."
            out[name] = {
                key.removeprefix(prefix): _local_tensor(value, name)[0]
                for key, value in state.get(info.state_key, {}).items()
                if isinstance(value, torch.Tensor) and _local_tensor(value, name) is not None
            }
        return out

    def view(self, other: EmbeddingTables) -> None:
        """View `other`'s tables from now on (the same tables of a rebuilt model, see `TrainingState.move_to`):
        everyone holding this object then sees them."""
        self.__dict__.update(other.__dict__)

    @property
    def fused(self) -> bool:
        """Whether fbgemm's fused kernel updates the rows (in the backward pass): then a step changes exactly
        the rows it looks up, whereas a plain optimizer may step rows it did not look up (Adam's momentum)."""
        return self._fused_states is not None

    @property
    def feature_to_table(self) -> dict[str, str]:
        return {feature: info.name for info in self.tables.values() for feature in info.features}

    def is_embedding_key(self, state_key: str) -> bool:
        """Whether a `model.state_dict()` key is one of the tables (saved row-wise, not as dense state)."""
        return _WEIGHT_KEY.search(state_key) is not None

    def weight(self, table: str) -> torch.Tensor:
        """The local rows of `table`, as the tensor training updates."""
        return self._weights[table]

    def row_states(self, table: str) -> dict[str, torch.Tensor]:
        """Optimizer state indexed by the table's local rows (e.g. row-wise Adagrad's `momentum1`).

        Fused (DMP) tables report fbgemm's state; plain parameters report whatever tensors their optimizer
        keeps with a leading dimension equal to the local row count. State that is not per row (a step
        counter) belongs to the dense snapshot instead.
        """
        if self._fused_states is not None:
            return self._fused_states.get(table, {})
        if self._optimizer is None:
            return {}
        info = self.tables[table]
        param = self._params[info.state_key]
        return {
            name: value
            for name, value in self._optimizer.state.get(param, {}).items()
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == info.local_rows
        }

    def row_state_ids(self) -> set[int]:
        """`id()`s of every row-wise state tensor, so dense snapshots can leave them out."""
        return {id(t) for name in self.tables for t in self.row_states(name).values()}

    def nbytes(self, rows: Mapping[str, tuple[int, int]] | None = None) -> int:
        """Bytes of local rows and their row-wise optimizer state: all of them, or the local row ranges
        [start, end) that `rows` gives per table (a domain's, `DomainLayout.held`)."""
        total = 0
        for name in self.tables if rows is None else rows:
            start, end = (0, None) if rows is None else rows[name]
            total += sum(t[start:end].nbytes for t in (self.weight(name), *self.row_states(name).values()))
        return total
