"""Crash-consistent multi-part checkpoint folders: raw tensor files described by JSON manifests, one
commit record per save."""
from .compose import CheckpointMismatchError, RestoredDomain, check_part_rows, load_newest, restore_domain
from cpr.errors import CorruptCheckpointError, DirectoryLockedError, UnwritableDirectoryError
from .manifest import Manifest, TableMeta, TensorEntry
from .store import (
    DENSE_PART,
    CheckpointStore,
    LoadedPart,
    PartContent,
    PartRecord,
    WrittenPart,
    SaveInfo,
    SaveRecord,
    SkippedSaveWarning,
    domain_part,
)

__all__ = [
    "DENSE_PART",
    "CheckpointMismatchError",
    "CheckpointStore",
    "CorruptCheckpointError",
    "DirectoryLockedError",
    "LoadedPart",
    "Manifest",
    "PartContent",
    "PartRecord",
    "WrittenPart",
    "RestoredDomain",
    "SaveInfo",
    "SaveRecord",
    "SkippedSaveWarning",
    "TableMeta",
    "TensorEntry",
    "UnwritableDirectoryError",
    "check_part_rows",
    "domain_part",
    "load_newest",
    "restore_domain",
]
