"""Failure domains: which local rows of each table belong to which embedding shard.

A shard stands for one embedding parameter-server node. On one process (world size 1, what CPR runs
today) CPR emulates `num_shards` nodes by splitting every table's rows into `num_shards` contiguous ranges
of near-equal size (as TorchRec's row-wise sharding places them), so a failure of any shard touches a
1/num_shards slice of every table. A shard is a set of local rows, so a rank that owns a row-wise shard of
a multi-process plan maps onto one directly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from cpr.tables import TableInfo


@dataclass(frozen=True)
class ShardLayout:
    """`ranges[table][shard] = (start, end)`: local rows [start, end) of `table` that `shard` holds."""

    num_shards: int
    ranges: Mapping[str, tuple[tuple[int, int], ...]]

    @classmethod
    def virtual(cls, tables: Mapping[str, TableInfo], num_shards: int) -> "ShardLayout":
        """Split every table's local rows into `num_shards` contiguous ranges.

        Range k is [k * rows // n, (k + 1) * rows // n): sizes differ by at most one row, and a table
        with fewer rows than shards leaves some shards empty for it.
        """
        if num_shards < 1:
            raise ValueError(f"num_shards must be at least 1, got {num_shards}")
        ranges = {
            name: tuple(
                (k * info.local_rows // num_shards, (k + 1) * info.local_rows // num_shards)
                for k in range(num_shards)
            )
            for name, info in tables.items()
        }
        return cls(num_shards=num_shards, ranges=ranges)

    def check(self, shard: int) -> None:
        """Raise a clear error for a shard id that does not exist."""
        if not 0 <= shard < self.num_shards:
            raise ValueError(f"shard {shard} does not exist: there are {self.num_shards} shards (0..{self.num_shards - 1})")

    def rows(self, table: str, shard: int) -> tuple[int, int]:
        self.check(shard)
        return self.ranges[table][shard]

    def to_json(self) -> dict[str, list[list[int]]]:
        return {table: [list(r) for r in ranges] for table, ranges in self.ranges.items()}
