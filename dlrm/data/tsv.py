"""Streaming reader for Criteo TSV files (Kaggle `train.txt` and 1TB `day_N`: label, I1..I13, C1..C26).

Each chunk of lines is first parsed by a vectorised numpy path that also validates every field; a chunk it
rejects is parsed again line by line, which names the exact line and field of the problem (or, with
`skip_bad_rows`, drops the bad lines and counts them). Both paths apply the same rules:
- empty fields are missing (dense -> 0, categorical -> row 0), the label must be "0" or "1";
- dense values are decimal 64-bit integers, possibly negative, transformed by `log(1 + max(x, 0))`;
- categorical values are hexadecimal ids of at most 16 digits (64 bits), hashed by `id % table_rows[i]`;
- lines end in LF or CRLF; blank lines are ignored.
"""
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np

from dlrm.data.arrays import CriteoArrays
from dlrm.data.errors import CriteoDataError
from dlrm.data.schema import COLUMN_NAMES, NUM_COLUMNS, NUM_DENSE, NUM_SPARSE
from dlrm.data.transforms import hash_ids, log_dense

LAYOUTS = ("auto", "kaggle", "terabyte")
DEFAULT_CHUNK_ROWS = 65536
MAX_SKIP_REASONS = 5

_MAX_ID_DIGITS = 16  # 64-bit ids
_DENSE_RANGE = range(-(2**63), 2**63)  # 64-bit dense values
_MAX_DENSE_CHARS = 20  # a sign and 19 digits; longer text is out of range without parsing it
_MAX_SHOWN = 40  # characters of a bad value quoted in a message
_PAD = 16  # zero bytes before a chunk's first field, so every field end has two 8-byte words before it
_DENSE_COLS = slice(1, 1 + NUM_DENSE)
_SPARSE_COLS = slice(1 + NUM_DENSE, NUM_COLUMNS)
_TAB, _NL = ord("\t"), ord("\n")
_MINUS = ord("-")
_INVALID = 255
_DECIMAL = re.compile(rb"-?[0-9]+")
_HEXADECIMAL = re.compile(rb"[0-9a-fA-F]+")


def _digit_table(digits: str) -> np.ndarray:
    table = np.full(256, _INVALID, dtype=np.uint8)
    for value, char in enumerate(digits):
        table[ord(char)] = value
        table[ord(char.upper())] = value
    return table


_HEX_TABLE = _digit_table("0123456789abcdef")
_DEC_TABLE = _digit_table("0123456789")
# _KEEP_LAST_BYTES[k] keeps the last k of 8 bytes of a little-endian word (its most significant bytes).
_KEEP_LAST_BYTES = np.array([0] + [(1 << 64) - (1 << (8 * (8 - k))) for k in range(1, 9)], dtype=np.uint64)
# Pairs of g-digit numbers combine into a 2g-digit number, which fits this type.
_GROUP_DTYPES = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


@dataclass
class ReadStats:
    """What a read consumed: rows kept, rows dropped by `skip_bad_rows`, and the first few drop reasons."""

    rows_read: int = 0
    rows_skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)

    def record_skip(self, error: CriteoDataError) -> None:
        self.rows_skipped += 1
        if len(self.skip_reasons) < MAX_SKIP_REASONS:
            self.skip_reasons.append(str(error))


def tsv_files(paths: Sequence[str | Path]) -> list[Path]:
    """Files named by `paths`; a folder stands for its *.tsv, *.txt and day_* files, sorted by name."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted({f for pattern in ("*.tsv", "*.txt", "day_*") for f in p.glob(pattern) if f.is_file()})
            if not found:
                raise CriteoDataError(p, "folder holds no *.tsv, *.txt or day_* files")
            files.extend(found)
        else:
            files.append(p)
    return files


class TsvReader:
    """Iterates `CriteoArrays` chunks (at most `chunk_rows` lines each) over Criteo TSV files in order.

    `stats` is filled as iteration proceeds. Raises `CriteoDataError` on the first bad line unless
    `skip_bad_rows`; a missing or empty file raises either way. Both layouts parse the same; with `layout`
    "auto" or "kaggle" a 39-column first line is refused as the label-less Kaggle test set.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        table_rows: Sequence[int],
        *,
        layout: str = "auto",
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        skip_bad_rows: bool = False,
    ):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if len(table_rows) != NUM_SPARSE:
            raise ValueError(f"table_rows needs {NUM_SPARSE} sizes, got {len(table_rows)}")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.files = tsv_files(paths)
        self.table_rows = [int(r) for r in table_rows]
        self.layout = layout
        self.chunk_rows = chunk_rows
        self.skip_bad_rows = skip_bad_rows
        self.stats = ReadStats()

    def __iter__(self) -> Iterator[CriteoArrays]:
        for path in self.files:
            yield from self._read_file(path)

    def _read_file(self, path: Path) -> Iterator[CriteoArrays]:
        if not path.is_file():
            raise CriteoDataError(path, "no such file")
        if path.stat().st_size == 0:
            raise CriteoDataError(path, "file is empty")
        with open(path, "rb") as f:
            self._check_not_label_less(path, f.readline())
            f.seek(0)
            lines_before = 0
            rows_in_file = 0
            while lines := list(islice(f, self.chunk_rows)):
                chunk = _parse_fast(b"".join(lines), self.table_rows)
                if chunk is None:
                    chunk = self._parse_lines(path, lines, lines_before + 1)
                lines_before += len(lines)
                rows_in_file += len(chunk)
                self.stats.rows_read += len(chunk)
                yield chunk
        if rows_in_file == 0 and not self.skip_bad_rows:
            raise CriteoDataError(path, "file holds only blank lines")

    def _check_not_label_less(self, path: Path, first_line: bytes) -> None:
        # The Kaggle test.txt has no label column; each row has one column less. Refusing the whole file
        # with that diagnosis beats reporting every line as malformed.
        if self.layout != "terabyte" and len(_split_line(first_line)) == NUM_COLUMNS - 1:
            raise CriteoDataError(
                path,
                f"has {NUM_COLUMNS - 1} columns (I1..I13, C1..C26, no label): it looks like the label-less "
                f"Kaggle test set, which cannot be used for training; expected {NUM_COLUMNS} columns "
                "(label, I1..I13, C1..C26)",
                line=1,
            )

    def _parse_lines(self, path: Path, lines: list[bytes], first_line_no: int) -> CriteoArrays:
        labels: list[float] = []
        dense: list[list[float]] = []
        ids: list[list[int]] = []
        for line_no, line in enumerate(lines, start=first_line_no):
            fields = _split_line(line)
            if fields == [b""]:
                continue
            try:
                row_label, row_dense, row_ids = _parse_fields(fields)
            except _FieldError as e:
                error = CriteoDataError(path, e.reason, line=line_no, field=e.field)
                if not self.skip_bad_rows:
                    raise error from None
                self.stats.record_skip(error)
                continue
            labels.append(row_label)
            dense.append(row_dense)
            ids.append(row_ids)
        if not labels:
            return CriteoArrays.empty()
        return CriteoArrays(
            dense=log_dense(np.array(dense, dtype=np.float64)),
            sparse=hash_ids(np.array(ids, dtype=np.uint64), self.table_rows),
            labels=np.array(labels, dtype=np.float32),
        )


def load_tsv(
    paths: Sequence[str | Path],
    table_rows: Sequence[int],
    *,
    layout: str = "auto",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    skip_bad_rows: bool = False,
) -> CriteoArrays:
    """All rows of the Criteo TSV files `paths` (files or folders) as one `CriteoArrays`."""
    reader = TsvReader(paths, table_rows, layout=layout, chunk_rows=chunk_rows, skip_bad_rows=skip_bad_rows)
    return CriteoArrays.concat(list(reader))


class _FieldError(Exception):
    def __init__(self, field: str | None, reason: str):
        super().__init__(reason)
        self.field = field
        self.reason = reason


def _split_line(line: bytes) -> list[bytes]:
    return line.removesuffix(b"\n").removesuffix(b"\r").split(b"\t")


def _shown(value: bytes) -> str:
    text = value.decode("utf-8", errors="replace")
    return repr(text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "...")


def _parse_fields(fields: list[bytes]) -> tuple[float, list[float], list[int]]:
    """One row's label, raw dense values and raw ids; raises `_FieldError` naming the first bad field."""
    if len(fields) != NUM_COLUMNS:
        raise _FieldError(
            None, f"expected {NUM_COLUMNS} tab-separated columns (label, I1..I13, C1..C26), got {len(fields)}"
        )
    label = fields[0]
    if label not in (b"0", b"1"):
        raise _FieldError("label", f"{_shown(label)} is not a 0/1 label")
    dense: list[float] = []
    for name, value in zip(COLUMN_NAMES[_DENSE_COLS], fields[_DENSE_COLS]):
        if value and not _DECIMAL.fullmatch(value):
            raise _FieldError(name, f"{_shown(value)} is not an integer")
        if len(value) > _MAX_DENSE_CHARS or (value and int(value) not in _DENSE_RANGE):
            raise _FieldError(name, f"{_shown(value)} ({len(value)} characters) is out of range: dense values are 64-bit integers")
        dense.append(float(int(value)) if value else 0.0)
    ids: list[int] = []
    for name, value in zip(COLUMN_NAMES[_SPARSE_COLS], fields[_SPARSE_COLS]):
        if value and not _HEXADECIMAL.fullmatch(value):
            raise _FieldError(name, f"{_shown(value)} is not a hexadecimal id")
        if len(value) > _MAX_ID_DIGITS:
            raise _FieldError(name, f"{_shown(value)} is longer than {_MAX_ID_DIGITS} hex digits (64 bits)")
        ids.append(int(value, 16) if value else 0)
    return float(label == b"1"), dense, ids


def _parse_fast(data: bytes, table_rows: Sequence[int]) -> CriteoArrays | None:
    """Vectorised parse of whole lines; None when anything is off (the line parser then locates it).

    Fields are read as little-endian 8-byte words ending at the field's end, digits decoded by table
    lookup, and the bytes in front of the field zeroed with a mask. Handles ids of exactly 8 hex digits
    (all Criteo ids) or empty and dense values of up to 16 digits; anything else is left to the line parser.
    """
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n")
    if not data.endswith(b"\n"):
        data += b"\n"
    padded = np.frombuffer(bytes(_PAD) + data, dtype=np.uint8)  # so every field end has 16 bytes before it
    buf = padded[_PAD:]
    seps = np.flatnonzero((buf == _TAB) | (buf == _NL))
    n = len(seps) // NUM_COLUMNS
    if n == 0 or len(seps) != NUM_COLUMNS * n:
        return None
    ends = seps.reshape(n, NUM_COLUMNS)
    # n newlines, each closing a row of NUM_COLUMNS fields (this also rules out blank lines).
    if np.count_nonzero(buf[seps] == _NL) != n or not (buf[ends[:, -1]] == _NL).all():
        return None
    lengths = np.diff(seps, prepend=-1).reshape(n, NUM_COLUMNS) - 1
    ends = ends + _PAD  # as indices into padded
    words = np.ndarray((len(padded) - 7,), dtype="<u8", buffer=padded, strides=(1,))  # words[i] = padded[i:i+8]

    label_chars = padded[ends[:, 0] - 1]
    if not ((lengths[:, 0] == 1) & ((label_chars == ord("0")) | (label_chars == ord("1")))).all():
        return None
    raw_dense = _parse_decimals(padded, words, ends[:, _DENSE_COLS], lengths[:, _DENSE_COLS])
    if raw_dense is None:
        return None

    id_lengths = lengths[:, _SPARSE_COLS]
    if not ((id_lengths == 8) | (id_lengths == 0)).all():
        return None
    # An empty field's word holds earlier bytes: masked to zero, it reads as id 0 (missing).
    digits = _decode(_HEX_TABLE, words[ends[:, _SPARSE_COLS] - 8]) & _KEEP_LAST_BYTES[id_lengths]
    digit_bytes = digits.view(np.uint8)  # [n, 26, 8], most significant digit first
    if (digit_bytes > 15).any():
        return None
    id_bytes = (digit_bytes[..., 0::2] << 4) | digit_bytes[..., 1::2]  # [n, 26, 4], big-endian
    raw_ids = id_bytes.view(">u4").reshape(n, NUM_SPARSE)

    return CriteoArrays(
        dense=log_dense(raw_dense),
        sparse=hash_ids(raw_ids, table_rows),
        labels=(label_chars - ord("0")).astype(np.float32),
    )


def _decode(table: np.ndarray, words: np.ndarray) -> np.ndarray:
    """`table` applied to each byte of uint64 `words` (same shape, bytes stay in place)."""
    return table[words.view(np.uint8)].view("<u8")


def _parse_decimals(padded: np.ndarray, words: np.ndarray, ends: np.ndarray, lengths: np.ndarray) -> np.ndarray | None:
    """Values of the decimal fields ending at `ends` (indices into `padded`) as float64; None if one is invalid."""
    negative = (padded[ends - lengths] == _MINUS) & (lengths > 1)
    num_digits = lengths - negative
    num_words = (int(num_digits.max()) + 7) // 8
    if num_words > 2:
        return None
    # Most significant word first; the sign and earlier fields' bytes are masked to zero.
    parts = [
        _decode(_DEC_TABLE, words[ends - 8 * (i + 1)]) & _KEEP_LAST_BYTES[np.clip(num_digits - 8 * i, 0, 8)]
        for i in reversed(range(max(num_words, 1)))
    ]
    digits = np.stack(parts, axis=-1).view(np.uint8)  # [n, 13, 8 * words]
    if (digits > 9).any():
        return None
    values, group = digits, 1  # each element of values is a number of `group` digits
    while values.shape[-1] > 1:
        dtype = _GROUP_DTYPES[group]
        values = values[..., 0::2].astype(dtype) * dtype(10**group) + values[..., 1::2]
        group *= 2
    magnitude = values[..., 0].astype(np.float64)
    return np.where(negative, -magnitude, magnitude)
