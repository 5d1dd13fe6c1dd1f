"""Failure domains: which local rows of each table each domain holds, as this process sees them.

A domain is what fails as one: an embedding parameter-server node. CPR knows two kinds:

* `ranks` (a multi-rank job): a domain is a rank, and it holds whatever the TorchRec sharding plan put
  there (whole tables for table-wise sharding, a row slice of every table for row-wise, nothing of some
  tables). This process holds exactly one domain, its own rank; the others' rows live elsewhere.
* `virtual` (one process, for experiments): `num_domains` emulated nodes, every table's local rows split
  into `num_domains` contiguous ranges of near-equal size (as row-wise sharding would place them), so one
  failure touches a 1/num_domains slice of every table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

from cpr.choices import MAX_VIRTUAL_DOMAINS
from cpr.tables import TableInfo

DomainMode = Literal["virtual", "ranks"]


@dataclass(frozen=True)
class DomainLayout:
    """`ranges[table][domain] = (start, end)`: local rows [start, end) of `table` that `domain` holds here.

    `local` lists the domains this process holds (all of them when virtual, its rank otherwise); a domain
    held by another rank has empty ranges here. `row_offsets[table]` is the global row of local row 0.
    """

    num_domains: int
    ranges: Mapping[str, tuple[tuple[int, int], ...]]
    mode: DomainMode = "virtual"
    local: tuple[int, ...] = ()
    row_offsets: Mapping[str, int] | None = None

    @classmethod
    def virtual(cls, tables: Mapping[str, TableInfo], num_domains: int) -> "DomainLayout":
        """Split every table's local rows into `num_domains` contiguous ranges.

        Range k is [k * rows // n, (k + 1) * rows // n): sizes differ by at most one row, and a table
        with fewer rows than domains leaves some domains empty for it.
        """
        if not 1 <= num_domains <= MAX_VIRTUAL_DOMAINS:
            raise ValueError(f"num_domains must be in [1, {MAX_VIRTUAL_DOMAINS}], got {num_domains}")
        ranges = {
            name: tuple(
                (k * info.local_rows // num_domains, (k + 1) * info.local_rows // num_domains)
                for k in range(num_domains)
            )
            for name, info in tables.items()
        }
        return cls(num_domains, ranges, "virtual", tuple(range(num_domains)),
                   {name: info.row_offset for name, info in tables.items()})

    @classmethod
    def ranks(cls, tables: Mapping[str, TableInfo], rank: int, world_size: int) -> "DomainLayout":
        """One domain per rank; this process (rank `rank`) holds all of its local rows as domain `rank`."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        ranges = {
            name: tuple((0, info.local_rows) if k == rank else (0, 0) for k in range(world_size))
            for name, info in tables.items()
        }
        return cls(world_size, ranges, "ranks", (rank,), {name: info.row_offset for name, info in tables.items()})

    def check(self, domain: int) -> None:
        """Raise a clear error for a domain id that does not exist (named as the CLI names them: shards)."""
        if not 0 <= domain < self.num_domains:
            kind = "ranks" if self.mode == "ranks" else "shards"
            raise ValueError(f"shard {domain} does not exist: there are {self.num_domains} {kind} (0..{self.num_domains - 1})")

    def rows(self, table: str, domain: int) -> tuple[int, int]:
        self.check(domain)
        return self.ranges[table][domain]

    def held(self, domain: int) -> dict[str, tuple[int, int]]:
        """The local rows [start, end) of every table of which `domain` holds some here."""
        self.check(domain)
        return {table: ranges[domain] for table, ranges in self.ranges.items() if ranges[domain][1] > ranges[domain][0]}

    def global_rows(self, table: str, domain: int) -> tuple[int, int]:
        """The rows of `table` that `domain` holds here, as global row ids."""
        start, end = self.rows(table, domain)
        offset = (self.row_offsets or {}).get(table, 0)
        return start + offset, end + offset

    def describe(self) -> str:
        if self.mode == "ranks":
            return f"{self.num_domains} ranks, each a failure domain holding its shards of the sharding plan"
        return f"{self.num_domains} emulated shards in one process, each a 1/{self.num_domains} row range of every table"

    def to_json(self) -> dict[str, list[list[int]]]:
        return {table: [list(r) for r in ranges] for table, ranges in self.ranges.items()}
