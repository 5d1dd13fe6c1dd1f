"""Every error CPR raises on purpose, in one place.

Each says in one line what went wrong and what to change, so a command-line tool prints it and exits instead
of showing a traceback: catching `CPRError` catches them all. Each also keeps the builtin base it always had
(`ValueError`, `RuntimeError`, `OSError`), so code that caught those still does.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class CPRError(Exception):
    """An error of CPR's own, with a message meant for the person running the job."""


class UsageError(CPRError, ValueError):
    """An invalid option or setting, reported before any training starts."""


class RecoveryError(CPRError, RuntimeError):
    """A failure that this run cannot recover from (no policy, or no loadable checkpoint)."""


class EarlierRunError(CPRError, ValueError):
    """A new run was pointed at a checkpoint folder holding an earlier run's saves."""


class NothingToResumeError(CPRError, ValueError):
    """A resume found no loadable full save in the checkpoint folder (and was not told to start fresh)."""


class CheckpointMismatchError(CPRError, ValueError):
    """A checkpoint written by a job of another shape (world size, sharding plan, tables)."""


class CorruptCheckpointError(CPRError, RuntimeError):
    """A save folder whose manifest or tensor file is missing, truncated, malformed, or fails its checksum."""

    def __init__(self, folder: str | os.PathLike | Any, file: str, reason: str):
        self.folder = Path(folder) if isinstance(folder, str) else folder  # a Path, or a remote folder
        self.file = file
        self.reason = reason
        super().__init__(f"corrupt checkpoint {self.folder}: {file}: {reason}")

    def __reduce__(self):  # picklable (gathered across ranks) despite its own arguments
        return type(self), (self.folder, self.file, self.reason)


class UnwritableDirectoryError(CPRError, OSError):
    """The checkpoint directory cannot be created or written to."""


class OutputError(CPRError, OSError):
    """The run's output folder (`--out`) could not be written (it was deleted or made read-only meanwhile)."""


class UnsafePathError(CPRError, OSError):
    """A file CPR writes is not a regular file (a symbolic link, a FIFO, a folder): it is not written."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.path, self.what = Path(path), what
        super().__init__(f"{self.path} is {what}: CPR writes only regular files, never through a link; remove it")

    def __reduce__(self):
        return type(self), (self.path, self.what)


class LostLockError(CPRError, OSError):
    """This run no longer holds its checkpoint directory's lock (the folder was deleted or re-created)."""


class DirectoryLockedError(CPRError, RuntimeError):
    """Another live process holds the lock of the checkpoint directory (one writer per directory)."""

    def __init__(self, directory: str | os.PathLike, holder: str):
        self.directory = Path(directory)
        self.holder = holder
        super().__init__(f"checkpoint directory {self.directory} is in use by another run ({holder}); "
                         "wait for that run to end or use another checkpoint directory")

    def __reduce__(self):
        return type(self), (self.directory, self.holder)


class CoordinationError(CPRError, RuntimeError):
    """A collective among the ranks failed or timed out (a rank died, hangs, or disagrees)."""


class MembershipError(CPRError, RuntimeError):
    """The job could not (re-)form its process group in time, or a supervisor stopped it."""


class UnsupportedShardingError(CPRError, ValueError):
    """A sharding plan CPR cannot checkpoint row by row (column-wise shards)."""


class SkippedSaveWarning(UserWarning):
    """A save was passed over because it is corrupt (an older one is used instead), or set aside."""


class ReadRetryWarning(UserWarning):
    """A read of a save failed with an I/O error and is tried once more."""
