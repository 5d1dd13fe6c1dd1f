"""Failure domains: which local rows of each table each domain holds, as this process sees them.

A domain is what fails as one: an embedding parameter-server node. CPR knows two kinds:

* `ranks` (a multi-rank job): a domain is a rank, and it holds whatever the TorchRec sharding plan put
  there (whole tables for table-wise sharding, a row slice of every table for row-wise, nothing of some
  tables). This process holds exactly one domain, its own rank; the others' rows live elsewhere.
* `virtual` (one process, for experiments): `num_shards` emulated nodes, every table's local rows split
  into `num_shards` contiguous ranges of near-equal size (as row-wise sharding would place them), so one
  failure touches a 1/num_shards slice of every table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

from cpr.tables import TableInfo

DomainMode = Literal["virtual", "ranks"]
# Each emulated shard is a parameter-server node holding a 1/num_shards slice of every table; the layout
# and every save's metadata grow with their number, and beyond this many a shard is a handful of rows.
MAX_VIRTUAL_SHARDS = 1024


@dataclass(frozen=True)
class ShardLayout:
    """`ranges[table][domain] = (start, end)`: local rows [start, end) of `table` that `domain` holds here.

    `local` lists the domains this process holds (all of them when virtual, its rank otherwise); a domain
    held by another rank has empty ranges here. `row_offsets[table]` is the global row of local row 0.
    """

    num_shards: int
    ranges: Mapping[str, tuple[tuple[int, int], ...]]
    mode: DomainMode = "virtual"
    local: tuple[int, ...] = ()
    row_offsets: Mapping[str, int] | None = None

    @classmethod
    def virtual(cls, tables: Mapping[str, TableInfo], num_shards: int) -> "ShardLayout":
        """Split every table's local rows into `num_shards` contiguous ranges.

        Range k is [k * rows // n, (k + 1) * rows // n): sizes differ by at most one row, and a table
        with fewer rows than shards leaves some shards empty for it.
        """
        if not 1 <= num_shards <= MAX_VIRTUAL_SHARDS:
            raise ValueError(f"num_shards must be in [1, {MAX_VIRTUAL_SHARDS}], got {num_shards}")
        ranges = {
            name: tuple(
                (k * info.local_rows // num_shards, (k + 1) * info.local_rows // num_shards)
                for k in range(num_shards)
            )
            for name, info in tables.items()
        }
        return cls(num_shards, ranges, "virtual", tuple(range(num_shards)),
                   {name: info.row_offset for name, info in tables.items()})

    @classmethod
    def ranks(cls, tables: Mapping[str, TableInfo], rank: int, world_size: int) -> "ShardLayout":
        """One domain per rank; this process (rank `rank`) holds all of its local rows as domain `rank`."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        ranges = {
            name: tuple((0, info.local_rows) if k == rank else (0, 0) for k in range(world_size))
            for name, info in tables.items()
        }
        return cls(world_size, ranges, "ranks", (rank,), {name: info.row_offset for name, info in tables.items()})

    def check(self, shard: int) -> None:
        """Raise a clear error for a domain id that does not exist."""
        if not 0 <= shard < self.num_shards:
            kind = "ranks" if self.mode == "ranks" else "shards"
            raise ValueError(f"shard {shard} does not exist: there are {self.num_shards} {kind} (0..{self.num_shards - 1})")

    def rows(self, table: str, shard: int) -> tuple[int, int]:
        self.check(shard)
        return self.ranges[table][shard]

    def held(self, shard: int) -> dict[str, tuple[int, int]]:
        """The local rows [start, end) of every table of which `shard` holds some here."""
        self.check(shard)
        return {table: ranges[shard] for table, ranges in self.ranges.items() if ranges[shard][1] > ranges[shard][0]}

    def global_rows(self, table: str, shard: int) -> tuple[int, int]:
        """The rows of `table` that `shard` holds here, as global row ids."""
        start, end = self.rows(table, shard)
        offset = (self.row_offsets or {}).get(table, 0)
        return start + offset, end + offset

    def describe(self) -> str:
        if self.mode == "ranks":
            return f"{self.num_shards} ranks, each a failure domain holding its shards of the sharding plan"
        return f"{self.num_shards} emulated shards in one process, each a 1/{self.num_shards} row range of every table"

    def to_json(self) -> dict[str, list[list[int]]]:
        return {table: [list(r) for r in ranges] for table, ranges in self.ranges.items()}
