"""The metadata of one save: small dataclasses serialised to `manifest.json`.

The manifest is the only thing read to decide what a save holds; tensor files hold each tensor's bytes
(bare, or inside a torch.save record at a recorded offset) whose dtype, shape, size and crc32 are recorded
here, so loading never unpickles anything. The metadata is verified like the data: it carries a sha256 of
its own content (see sealing.py), and every field is checked for type and range when read. Any defect,
whatever it is, raises CorruptCheckpointError naming the save folder and the reason, so the store can fall
back to an older save.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from . import codecs, files, location
from .location import Folder
from cpr.errors import CorruptCheckpointError
from .sealing import (  # noqa: F401  (the sealed-JSON helpers and limits: re-exported, as before)
    CHECKSUM_FIELD,
    MAX_JSON_DEPTH,
    MAX_MANIFEST_BYTES,
    _Defect,
    _object,
    _shown,
    content_checksum,
    read_text,
    sealed,
    sealed_json,
    strict_json,
    verify_sealed,
)

# 2: the manifest carries a content checksum; 3: a part keeps its tensors in one file; 4: each tensor names its codec;
# 5: a tensor's bytes may be a torch.save record (full saves, readable by torch.distributed.checkpoint);
# 6: int8 rows carry an fp16 scale and bias (fbgemm's n-bit "SBHalf" layout, as int4), not fp32 ones
FORMAT_VERSION = 6
MANIFEST_FILE = "manifest.json"
SAVE_KINDS = ("full", "subset")
MAX_DIMS = 64  # torch's own limit
_MAX_INT = 2**63 - 1
_CRC32_MAX = 2**32 - 1

# Every dtype a save can hold, by the name the manifest records.
DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    )
}


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
    """One tensor of a save, stored in `file` (relative to the save folder) as `codec` encodes it.

    `dtype` and `shape` are the tensor's (what decoding gives back); `nbytes` and `checksum` are of the
    stored bytes.
    """

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    checksum: int  # zlib.crc32 of the tensor's bytes
    offset: int = 0  # where the tensor's bytes start in `file` (a part keeps all its tensors in one file)
    codec: str = "raw"  # see codecs.py: "raw" (the tensor's own bytes), "int8" or "int4" (row-wise quantized)
    # Where the codec's bytes start inside the tensor's `nbytes`: 0 when they are all of them, else the storage
    # record of a torch.save serialization (see tensor_io.py), read by offset without unpickling anything.
    payload_offset: int = 0

    @property
    def payload_nbytes(self) -> int:
        """The bytes of the tensor's data as its codec stores them: `nbytes` without a torch.save record's own."""
        return codecs.stored_nbytes(self.codec, DTYPES[self.dtype], self.shape)


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
        """The entry of tensor `name`; KeyError naming the save when absent.

        A verified manifest that lacks a name the caller asks for is the caller's mistake (or a save of
        another model), not damage, so it is a KeyError rather than a CorruptCheckpointError.
        """
        for entry in self.tensors:
            if entry.name == name:
                return entry
        raise KeyError(f"save {self.folder} (step {self.step}, {self.kind}) has no tensor {name!r}")

    def has(self, name: str) -> bool:
        return any(entry.name == name for entry in self.tensors)

    @property
    def data_nbytes(self) -> int:
        """The bytes of the tensors' data as their codecs store them: `nbytes` without the file format's own
        (a torch.save record's headers)."""
        return sum(entry.payload_nbytes for entry in self.tensors)

    def to_json(self) -> str:
        # The records' fields taken one level deep: asdict's deep copies cost more than the rest of a subset save.
        data: dict[str, Any] = {name: getattr(self, name) for name in _MANIFEST_FIELDS}
        data["tables"] = {table: _fields(meta, _TABLE_FIELDS) for table, meta in self.tables.items()}
        data["tensors"] = [_fields(entry, _ENTRY_FIELDS) for entry in self.tensors]
        return sealed_json(data, f"manifest of step {self.step}")  # compact: read per restore

    @classmethod
    def from_json(cls, text: str, folder: Path) -> Manifest:
        """Parse and verify a manifest; any defect raises CorruptCheckpointError naming the save and the reason."""
        data = strict_json(text, folder, MANIFEST_FILE)
        try:
            return cls._from_checked(data, folder)
        except _Defect as e:
            raise CorruptCheckpointError(folder, MANIFEST_FILE, str(e)) from None

    @classmethod
    def read(cls, folder: Folder | str) -> Manifest:
        folder = location.folder(folder)
        return cls.from_json(read_text(folder, MANIFEST_FILE), folder)

    @classmethod
    def _from_checked(cls, data: Any, folder: Path) -> Manifest:
        data = verify_sealed(data, FORMAT_VERSION, folder, MANIFEST_FILE)
        _keys(data, _MANIFEST_KEYS, "the manifest")

        kind = data["kind"]
        if kind not in SAVE_KINDS:
            raise _Defect(f"kind {_shown(kind)} is not one of {SAVE_KINDS}")
        created = data["created"]
        if type(created) not in (int, float) or not math.isfinite(created):
            raise _Defect(f"created must be a finite number, got {_shown(created)}")
        tables = {name: _table(name, meta) for name, meta in _object(data["tables"], "tables").items()}
        shards = {name: _shard_ranges(name, ranges, tables) for name, ranges in _object(data["shards"], "shards").items()}
        tensors = [_tensor_entry(i, raw) for i, raw in enumerate(_array(data["tensors"], "tensors"))]
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise _Defect("two tensors have the same name")
        _check_tiling(tensors)
        nbytes = _int(data["nbytes"], "nbytes")
        if nbytes != sum(t.nbytes for t in tensors):
            raise _Defect(f"nbytes {nbytes} is not the sum of the tensors' sizes {sum(t.nbytes for t in tensors)}")
        return cls(
            step=_int(data["step"], "step"),
            policy=_string(data["policy"], "policy"),
            kind=kind,
            tables=tables,
            shards=shards,
            tensors=tensors,
            extra=_object(data["extra"], "extra"),
            created=float(created),
            nbytes=nbytes,
            format_version=FORMAT_VERSION,
            folder=folder,
        )


# -- the typed schema --------------------------------------------------------------------------------------

_MANIFEST_FIELDS = tuple(f.name for f in fields(Manifest) if f.name != "folder")
_TABLE_FIELDS = tuple(f.name for f in fields(TableMeta))
_ENTRY_FIELDS = tuple(f.name for f in fields(TensorEntry))
_MANIFEST_KEYS = frozenset(_MANIFEST_FIELDS) | {CHECKSUM_FIELD}
_TABLE_KEYS = frozenset(_TABLE_FIELDS)
_ENTRY_KEYS = frozenset(_ENTRY_FIELDS)


def _fields(record: Any, names: tuple[str, ...]) -> dict[str, Any]:
    return {name: getattr(record, name) for name in names}


def _array(value: Any, what: str) -> list[Any]:
    if type(value) is not list:
        raise _Defect(f"{what} must be a JSON list, got {type(value).__name__} {_shown(value)}")
    return value


def _keys(value: dict[str, Any], expected: frozenset[str], what: str) -> None:
    if value.keys() != expected:
        missing, unknown = sorted(expected - value.keys()), sorted(value.keys() - expected)
        raise _Defect(f"{what} has " + "; ".join(
            part for part in (f"missing fields {missing}" if missing else "", f"unknown fields {unknown[:5]}" if unknown else "")
            if part))


def _int(value: Any, what: str, low: int = 0, high: int = _MAX_INT) -> int:
    if type(value) is not int:  # bools and strings are not ints
        raise _Defect(f"{what} must be an integer, got {type(value).__name__} {_shown(value)}")
    if not low <= value <= high:
        raise _Defect(f"{what} {_shown(value)} is outside [{low}, {high}]")
    return value


def _string(value: Any, what: str) -> str:
    if type(value) is not str:
        raise _Defect(f"{what} must be a string, got {type(value).__name__} {_shown(value)}")
    return value


def _dtype(value: Any, what: str) -> str:
    if type(value) is not str or value not in DTYPES:
        raise _Defect(f"{what} {_shown(value)} is not a known dtype {sorted(DTYPES)}")
    return value


def _table(name: str, meta: Any) -> TableMeta:
    what = f"tables[{name!r}]"
    if "/" in name:
        raise _Defect(f"{what}: a table name holds no '/'")
    meta = _object(meta, what)
    _keys(meta, _TABLE_KEYS, what)
    return TableMeta(rows=_int(meta["rows"], f"{what}.rows"), dim=_int(meta["dim"], f"{what}.dim", low=1),
                     dtype=_dtype(meta["dtype"], f"{what}.dtype"))


def _shard_ranges(name: str, ranges: Any, tables: Mapping[str, TableMeta]) -> list[tuple[int, int]]:
    out = []
    for k, pair in enumerate(_array(ranges, f"shards[{name!r}]")):
        what = f"shards[{name!r}][{k}]"
        if len(_array(pair, what)) != 2:
            raise _Defect(f"{what} must be a [start, end] pair, got {_shown(pair)}")
        # Global rows of the table: a domain's part holds rows [start, end) of it, as many as the table has here.
        start, end = _int(pair[0], f"{what} start"), _int(pair[1], f"{what} end")
        if start > end or (name in tables and end - start != tables[name].rows):
            raise _Defect(f"{what} [{start}, {end}) is not a row range of the part's {name!r} rows")
        out.append((start, end))
    return out


def _tensor_entry(index: int, raw: Any) -> TensorEntry:
    what = f"tensors[{index}]"
    entry = _object(raw, what)
    _keys(entry, _ENTRY_KEYS, what)
    name = _string(entry["name"], f"{what}.name")
    problem = files.plain_name_problem(entry["file"])
    if problem or entry["file"] == MANIFEST_FILE:
        raise _Defect(f"{what}.file: {problem or 'is the manifest itself'}")
    dtype = _dtype(entry["dtype"], f"{what}.dtype")
    dims = _array(entry["shape"], f"{what}.shape")
    if len(dims) > MAX_DIMS:
        raise _Defect(f"{what}.shape has {len(dims)} dimensions, more than {MAX_DIMS}")
    shape = tuple(_int(d, f"{what}.shape[{k}]") for k, d in enumerate(dims))
    codec = _string(entry["codec"], f"{what}.codec")
    problem = codecs.problem(codec, dtype, shape)
    if problem:
        raise _Defect(f"{what} ({name!r}).codec: {problem}")
    nbytes = _int(entry["nbytes"], f"{what}.nbytes")
    payload_offset = _int(entry["payload_offset"], f"{what}.payload_offset")
    payload = codecs.stored_nbytes(codec, DTYPES[dtype], shape)
    fits = nbytes == payload if payload_offset == 0 else payload_offset + payload <= nbytes
    if not fits:
        raise _Defect(f"{what} ({name!r}): {nbytes} bytes do not hold {dtype}{list(shape)} as {codec} at offset "
                      f"{payload_offset}")
    checksum = _int(entry["checksum"], f"{what}.checksum", high=_CRC32_MAX)
    offset = _int(entry["offset"], f"{what}.offset")
    return TensorEntry(name=name, file=entry["file"], dtype=dtype, shape=shape, nbytes=nbytes, checksum=checksum,
                       offset=offset, codec=codec, payload_offset=payload_offset)


def _check_tiling(tensors: list[TensorEntry]) -> None:
    """Tensors sharing a file lie back to back from its first byte, in order: no gap, no overlap."""
    ends: dict[str, int] = {}
    for entry in tensors:
        if entry.offset != ends.get(entry.file, 0):
            raise _Defect(f"tensor {entry.name!r} starts at byte {entry.offset} of {entry.file}, "
                          f"expected {ends.get(entry.file, 0)}")
        ends[entry.file] = entry.offset + entry.nbytes


def file_size(tensors: list[TensorEntry], file: str) -> int:
    """The size `file` must have: the bytes of the tensors stored in it."""
    return sum(entry.nbytes for entry in tensors if entry.file == file)
