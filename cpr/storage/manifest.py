"""The metadata of one save: small dataclasses serialised to `manifest.json`.

The manifest is the only thing read to decide what a save holds; tensor files are raw bytes whose dtype,
shape, size and crc32 are recorded here, so loading never unpickles anything.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import CorruptCheckpointError

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
SAVE_KINDS = ("full", "subset")


@dataclass(frozen=True)
class TableMeta:
    """Shape of one embedding table: `rows` x `dim` of `dtype` (a torch dtype name such as "float32")."""

    rows: int
    dim: int
    dtype: str

    def __post_init__(self) -> None:
        if not (isinstance(self.rows, int) and self.rows >= 0 and isinstance(self.dim, int) and self.dim >= 1):
            raise ValueError(f"TableMeta: rows must be an int >= 0 and dim an int >= 1, "
                             f"got {self.rows!r}, {self.dim!r}")
        if not isinstance(self.dtype, str):
            raise TypeError(f"TableMeta: dtype must be a name such as 'float32', got {self.dtype!r}")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a save: stored raw in `file` (relative to the save folder)."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    checksum: int  # zlib.crc32 of the tensor's bytes
    offset: int = 0  # where the tensor's bytes start in `file` (a part keeps all its tensors in one file)


@dataclass
class Manifest:
    """Everything a save holds. `folder` is where it was read from (not serialised)."""

    step: int
    policy: str
    kind: str
    tables: dict[str, TableMeta]
    shards: dict[str, list[tuple[int, int]]]
    tensors: list[TensorEntry]
    extra: dict[str, Any]
    created: float
    nbytes: int
    format_version: int = FORMAT_VERSION
    folder: Path | None = field(default=None, compare=False)

    def entry(self, name: str) -> TensorEntry:
        """The entry of tensor `name`; KeyError naming the save when absent."""
        for entry in self.tensors:
            if entry.name == name:
                return entry
        raise KeyError(f"save {self.folder} (step {self.step}, {self.kind}) has no tensor {name!r}")

    def has(self, name: str) -> bool:
        return any(entry.name == name for entry in self.tensors)

    def to_json(self) -> str:
        data = asdict(self)
        del data["folder"]
        return json.dumps(data, separators=(",", ":"), sort_keys=True)  # compact: read on every restore

    @classmethod
    def from_json(cls, text: str, folder: Path) -> Manifest:
        """Parse a manifest; any malformed field raises CorruptCheckpointError naming the field."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CorruptCheckpointError(folder, MANIFEST_FILE, f"invalid JSON: {e}") from e
        try:
            version = data["format_version"]
            if version != FORMAT_VERSION:
                raise ValueError(f"format_version {version} is not supported (expected {FORMAT_VERSION})")
            kind = data["kind"]
            if kind not in SAVE_KINDS:
                raise ValueError(f"kind {kind!r} is not one of {SAVE_KINDS}")
            return cls(
                step=int(data["step"]),
                policy=str(data["policy"]),
                kind=kind,
                tables={name: TableMeta(**meta) for name, meta in data["tables"].items()},
                shards={name: [(int(s), int(e)) for s, e in ranges] for name, ranges in data["shards"].items()},
                tensors=[TensorEntry(**{**t, "shape": tuple(t["shape"])}) for t in data["tensors"]],
                extra=dict(data["extra"]),
                created=float(data["created"]),
                nbytes=int(data["nbytes"]),
                format_version=version,
                folder=folder,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CorruptCheckpointError(folder, MANIFEST_FILE, f"malformed field: {e!r}") from e

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = Path(folder) / MANIFEST_FILE
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise CorruptCheckpointError(folder, MANIFEST_FILE, f"unreadable: {e}") from e
        return cls.from_json(text, Path(folder))
