"""Exceptions raised by the checkpoint store."""
from pathlib import Path


class CorruptCheckpointError(RuntimeError):
    """A save folder whose manifest or tensor file is missing, truncated, or fails its checksum."""

    def __init__(self, folder: Path, file: str, reason: str):
        self.folder = Path(folder)
        self.file = file
        self.reason = reason
        super().__init__(f"corrupt checkpoint {self.folder}: {file}: {reason}")


class UnwritableDirectoryError(OSError):
    """The checkpoint directory cannot be created or written to."""
