"""Sealed metadata JSON, for a part's manifest and a save's commit record alike: each carries the sha256 of
its own content (`sealed`, `sealed_json`; checked by `verify_sealed`), and is read strictly (`read_text`,
`strict_json`: bounded size, UTF-8, no duplicate keys, no NaN or overlong numbers, bounded nesting), so
that a damaged file raises CorruptCheckpointError however it was damaged.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import files
from cpr.errors import CorruptCheckpointError
from .location import Folder

CHECKSUM_FIELD = "checksum"
MAX_MANIFEST_BYTES = 256 << 20
MAX_JSON_DEPTH = 32  # the manifest itself nests 4 deep; `extra` holds small records


def read_text(folder: Folder, file: str) -> str:
    """A metadata file of a save folder as text: a regular file inside it, bounded in size, UTF-8."""
    raw = files.read_file(folder, file, max_size=MAX_MANIFEST_BYTES)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptCheckpointError(folder, file, f"not UTF-8 text: {e}") from None


def strict_json(text: str, folder: Path, file: str) -> Any:
    """Parse metadata JSON, refusing duplicate keys, NaN/Infinity (also as 1e999), overlong integers and deep
    nesting."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise CorruptCheckpointError(folder, file, "invalid JSON: nested too deeply") from None
    except ValueError as e:  # json.JSONDecodeError, duplicate keys, NaN, overlong integers
        raise CorruptCheckpointError(folder, file, f"invalid JSON: {e}") from None


def verify_sealed(data: Any, version: int, folder: Path, file: str) -> dict[str, Any]:
    """Parsed metadata `file` as a JSON object of format `version` carrying the sha256 of its own content;
    CorruptCheckpointError naming the first problem otherwise. The version is checked before the checksum so
    that another format gets the clearer message; the nesting first, as the hashed canonical JSON is built
    recursively."""
    try:
        _check_depth(data)
        data = _object(data, file)
        found = data.get("format_version")
        if type(found) is not int or found != version:
            raise _Defect(f"format_version {_shown(found)} is not supported (expected {version})")
        checksum = data.get(CHECKSUM_FIELD)
        if not isinstance(checksum, str):
            raise _Defect(f"{CHECKSUM_FIELD} must be a string such as 'sha256:...', got {_shown(checksum)}")
        if checksum != content_checksum(data):
            raise _Defect(f"{CHECKSUM_FIELD} does not match the content: the metadata changed after it was written")
    except _Defect as e:
        raise CorruptCheckpointError(folder, file, str(e)) from None
    return data


def sealed(data: dict[str, Any], what: str) -> dict[str, Any]:
    """Metadata `data` with the checksum of its content added, for writing; ValueError naming `what` if the
    reader would refuse it for its nesting (what the reader would refuse is not written)."""
    _check_sealable(data, what)
    return {**data, CHECKSUM_FIELD: content_checksum(data)}


def sealed_json(data: dict[str, Any], what: str) -> str:
    """`sealed(data, what)` as compact JSON, encoded once (a subset save writes a manifest per domain): the
    canonical JSON the checksum is taken of, with the checksum field appended."""
    _check_sealable(data, what)
    canonical = _canonical(data)
    separator = "," if len(canonical) > 2 else ""
    return f'{canonical[:-1]}{separator}{json.dumps(CHECKSUM_FIELD)}:"{_digest(canonical)}"}}'


def _check_sealable(data: dict[str, Any], what: str) -> None:
    try:
        # Only `extra` nests freely (at depth 2); the rest has the fixed depth of its schema.
        _check_depth(data.get("extra", {}), depth=2)
    except _Defect as e:
        raise ValueError(f"{what}: {e}") from None


def content_checksum(data: Mapping[str, Any]) -> str:
    """sha256 of metadata content (a manifest, a commit record): its canonical JSON without the checksum field."""
    return _digest(_canonical(data))


def _canonical(data: Mapping[str, Any]) -> str:
    content = {key: value for key, value in data.items() if key != CHECKSUM_FIELD}
    return json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _digest(canonical: str) -> str:
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


class _Defect(Exception):
    """One field of the manifest breaks the schema; the message says which and how."""


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys in an object: {sorted({k for k in keys if keys.count(k) > 1})[:5]}")
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    # json turns 1e999 into inf, which the canonical JSON of the checksum cannot even encode.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of the range of a float")
    return value


def _check_depth(data: Any, depth: int = 1) -> None:
    """Bound the nesting (of `data` at `depth`) iteratively, before anything recursive (canonical JSON, asdict)
    sees the data."""
    stack = [(data, depth)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _Defect(f"nested more than {MAX_JSON_DEPTH} levels deep")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children)


def _object(value: Any, what: str) -> dict[str, Any]:
    if type(value) is not dict:
        raise _Defect(f"{what} must be a JSON object, got {type(value).__name__} {_shown(value)}")
    return value
