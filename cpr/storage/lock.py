"""One writer per checkpoint directory: an advisory lock, and which temporary folders are whose.

`DIR/.lock` is locked with `flock` on an open descriptor. The kernel drops the lock when the process ends,
however it ends, so a killed run never blocks the next one; the file is never deleted (deleting a lock file
races with a process that just opened it). It holds the holder's pid, host, start time and token, for the
message a second run gets. One lock is held per job (by its coordinator); other writers of the same job
adopt the holder's token.

Temporary and trash folders carry their writer's tag, `<token>-<pid>`. A store removes only the ones this
process left (a failed or interrupted save) and those whose token no live holder has: a dead run's.
"""
from __future__ import annotations

import fcntl
import gc
import json
import os
import re
import socket
import stat
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from cpr.errors import DirectoryLockedError, UnsafePathError, UnwritableDirectoryError

from .location import open_regular

LOCK_FILE = ".lock"
_TAG = re.compile(r"-([0-9a-f]{16})-(\d+)-[0-9a-f]{8}$")  # <token>-<pid>-<unique> at the end of a folder name


@dataclass(frozen=True)
class LockHolder:
    """Who holds a directory's lock."""

    pid: int
    host: str
    started: float
    token: str

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on host {self.host}, started {started}"


class DirectoryLock:
    """The held lock of one checkpoint directory; `release()` (or the process ending) gives it up."""

    def __init__(self, directory: Path, fd: int, holder: LockHolder):
        self.directory = directory
        self.holder = holder
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, directory: str | os.PathLike) -> DirectoryLock:
        """Lock `directory` (which must exist); DirectoryLockedError naming the holder if another has it."""
        directory = Path(directory)
        try:
            fd = open_regular(directory / LOCK_FILE, os.O_RDWR)
        except UnsafePathError as err:
            raise UnwritableDirectoryError(f"checkpoint directory {directory} cannot be locked: {err}") from None
        try:
            locked = _try_flock(fd, fcntl.LOCK_EX)
            if not locked and (holder := _read_holder(fd)) is not None and holder.pid == os.getpid():
                # Held by this process: possibly by a store that is unreachable but not yet collected
                # (a reference cycle keeps its descriptor open). A live store keeps it.
                gc.collect()
                locked = _try_flock(fd, fcntl.LOCK_EX)
            if not locked:
                holder = _read_holder(fd)
                raise DirectoryLockedError(directory, holder.describe() if holder else "holder unknown")
            holder = LockHolder(os.getpid(), socket.gethostname(), time.time(), uuid.uuid4().hex[:16])
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(asdict(holder)).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(directory, fd, holder)

    @property
    def token(self) -> str:
        return self.holder.token

    def lost(self) -> str | None:
        """Why this lock no longer guards `directory`, or None while it does: `.lock` there must still be the
        file it locked (a folder deleted and re-created under a live run has another one, or none, and
        another run may lock it)."""
        if self._fd is None:
            return "it was released"
        try:
            now = os.stat(self.directory / LOCK_FILE, follow_symlinks=False)
        except OSError as err:
            return f"{self.directory / LOCK_FILE} is gone ({err.strerror}): the folder was deleted or re-created"
        held = os.fstat(self._fd)
        if (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
            return f"{self.directory / LOCK_FILE} is another file now: the folder was re-created, maybe by another run"
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor of the open file drops the flock
            self._fd = None

    def __del__(self) -> None:
        self.release()


def live_holder(directory: str | os.PathLike) -> LockHolder | None:
    """The current holder of `directory`'s lock, or None when no live process holds it.

    Raises DirectoryLockedError when it is held but the holder cannot be read (it is writing its record).
    """
    try:
        fd = os.open(Path(directory) / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as err:  # a link, a folder: no holder can be told
        raise DirectoryLockedError(Path(directory), f"holder unknown: {LOCK_FILE} is unreadable ({err.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DirectoryLockedError(Path(directory), f"holder unknown: {LOCK_FILE} is not a regular file")
        if _try_flock(fd, fcntl.LOCK_SH):
            return None  # nobody holds it (our shared lock goes with the descriptor)
        holder = _read_holder(fd)
        if holder is None:
            raise DirectoryLockedError(Path(directory), "holder unknown")
        return holder
    finally:
        os.close(fd)


def job_token(directory: str | os.PathLike) -> str:
    """The token a writer without the lock tags its folders with: the holder's (its job's), else a new one."""
    try:
        holder = live_holder(directory)
    except DirectoryLockedError:
        holder = None
    return holder.token if holder else uuid.uuid4().hex[:16]


def writer_tag(token: str) -> str:
    """`<token>-<pid>-<unique>`: the suffix of a temporary folder name that says who wrote it."""
    return f"{token}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def abandoned(directory: str | os.PathLike, names: Iterable[str], own_token: str) -> list[str]:
    """Those of the temporary folder `names` that this process left or whose writer is dead.

    A folder of another live writer (another process with the holder's token) is never among them; when
    the holder cannot be told, only this process's own folders are.
    """
    try:
        holder = live_holder(directory)
        live_token: str | None = holder.token if holder else None
        others_known = True
    except DirectoryLockedError:
        live_token, others_known = None, False
    pid = str(os.getpid())
    out = []
    for name in names:
        match = _TAG.search(name)
        if match and match[1] == own_token and match[2] == pid:
            out.append(name)
        elif others_known and (match is None or match[1] != live_token):
            out.append(name)
    return out


def _try_flock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_holder(fd: int) -> LockHolder | None:
    try:
        data = json.loads(os.pread(fd, 4096, 0))
        return LockHolder(int(data["pid"]), str(data["host"]), float(data["started"]), str(data["token"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
