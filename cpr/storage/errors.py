"""Exceptions raised by the checkpoint store."""
from pathlib import Path

from . import location


class CorruptCheckpointError(RuntimeError):
    """A save folder whose manifest or tensor file is missing, truncated, malformed, or fails its checksum."""

    def __init__(self, folder: Path, file: str, reason: str):
        self.folder = location.folder(folder)
        self.file = file
        self.reason = reason
        super().__init__(f"corrupt checkpoint {self.folder}: {file}: {reason}")


class UnwritableDirectoryError(OSError):
    """The checkpoint directory cannot be created or written to."""


class DirectoryLockedError(RuntimeError):
    """Another live process holds the lock of the checkpoint directory (one writer per directory)."""

    def __init__(self, directory: Path, holder: str):
        self.directory = Path(directory)
        self.holder = holder
        super().__init__(f"checkpoint directory {self.directory} is in use by another run ({holder}); "
                         "wait for that run to end or use another checkpoint directory")
