"""Crash-consistent checkpoint folders: raw tensor files described by a JSON manifest."""
from .compose import restore_rows
from .errors import CorruptCheckpointError, DirectoryLockedError, UnwritableDirectoryError
from .manifest import Manifest, TableMeta, TensorEntry
from .store import CheckpointStore, LoadedSave, SaveRecord, SkippedSaveWarning

__all__ = [
    "CheckpointStore",
    "CorruptCheckpointError",
    "DirectoryLockedError",
    "LoadedSave",
    "Manifest",
    "SaveRecord",
    "SkippedSaveWarning",
    "TableMeta",
    "TensorEntry",
    "UnwritableDirectoryError",
    "restore_rows",
]
