"""The commit record of a save (`commit.json`: `SaveInfo` and its `PartRecord`s), what a commit returns
(`SaveRecord`), and the names of a save's folder and parts.

The commit record is written last, by the coordinator, once every part is durable (see store.py); it is
sealed with a checksum of its content like a part's manifest (see sealing.py) and verified field by
field when read.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from cpr.errors import CorruptCheckpointError
from .location import Folder
from .manifest import SAVE_KINDS
from .sealing import CHECKSUM_FIELD, read_text, sealed, strict_json, verify_sealed

COMMIT_FILE = "commit.json"
COMMIT_VERSION = 2  # 2: the commit record carries a content checksum, like a part's manifest
DENSE_PART = "dense"
_SAVE_NAME = re.compile(r"^save-(\d{10})-(full|subset)$")  # a save folder's name (`save_folder_name`)


def domain_part(domain: int) -> str:
    """The part name of failure domain `domain`'s rows."""
    return f"domain-{domain:05d}"


def save_folder_name(step: int, kind: str) -> str:
    return f"save-{step:010d}-{kind}"


@dataclass(frozen=True)
class PartRecord:
    """One part of a save as its commit record names it: the crc32 of its manifest, and its tensor bytes."""

    checksum: int
    nbytes: int



@dataclass(frozen=True)
class SaveInfo:
    """A committed save, as read from its `commit.json`."""

    step: int
    kind: str
    policy: str
    world_size: int
    domain_mode: str
    num_domains: int
    parts: dict[str, PartRecord]
    extra: dict[str, Any]
    created: float
    format_version: int = COMMIT_VERSION
    folder: Folder | None = field(default=None, compare=False)

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts.values())

    def to_json(self) -> str:
        data = asdict(self)
        del data["folder"]
        # Sealed like a manifest: a damaged field that still parses (the reader state, a part's crc32) is caught.
        return json.dumps(sealed(data, f"commit record of step {self.step}"), indent=1, sort_keys=True)

    @classmethod
    def read(cls, folder: Folder) -> SaveInfo:
        """Parse and verify `folder/commit.json`; any defect raises CorruptCheckpointError naming the field."""
        data = verify_sealed(strict_json(read_text(folder, COMMIT_FILE), folder, COMMIT_FILE), COMMIT_VERSION,
                             folder, COMMIT_FILE)
        try:
            if data["kind"] not in SAVE_KINDS:
                raise ValueError(f"kind {data['kind']!r} is not one of {SAVE_KINDS}")
            ints = {key: data[key] for key in ("step", "world_size", "num_domains")}
            for key, value in ints.items():
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"{key} must be a non-negative int, got {value!r}")
            parts = {}
            for name, part in data["parts"].items():
                if not re.fullmatch(r"domain-\d{5}|dense", name):
                    raise ValueError(f"part name {name!r}")
                if not all(isinstance(part[k], int) and not isinstance(part[k], bool) and part[k] >= 0
                           for k in ("checksum", "nbytes")) or set(part) != {"checksum", "nbytes"}:
                    raise ValueError(f"part {name!r} record {part!r}")
                parts[name] = PartRecord(part["checksum"], part["nbytes"])
            if not isinstance(data["extra"], dict) or not isinstance(data["policy"], str) \
                    or data["domain_mode"] not in ("virtual", "ranks"):
                raise ValueError("extra, policy or domain_mode has the wrong type")
            if type(data["created"]) not in (int, float):
                raise ValueError(f"created must be a number, got {data['created']!r}")
            if set(data) != {f.name for f in fields(cls) if f.name != "folder"} | {CHECKSUM_FIELD}:
                raise ValueError(f"fields {sorted(data)}")
            return cls(step=ints["step"], kind=data["kind"], policy=data["policy"], world_size=ints["world_size"],
                       domain_mode=data["domain_mode"], num_domains=ints["num_domains"], parts=parts,
                       extra=data["extra"], created=float(data["created"]), folder=folder)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise CorruptCheckpointError(folder, COMMIT_FILE, f"malformed field: {e!r}") from e


@dataclass(frozen=True)
class SaveRecord:
    """What one committed save wrote and how long the commit took."""

    path: Folder
    step: int
    kind: str
    nbytes: int
    seconds: float

