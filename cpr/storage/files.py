"""Opening the files of a save folder: only regular files directly inside it, never more bytes than declared.

Metadata names a file; a tampered or damaged name must not make the loader read elsewhere (`..`, absolute
paths, symbolic links) or block (a FIFO or a device). The folder itself is opened without following a
symbolic link and the file relative to it, so neither component can lead out of the checkpoint directory.
A folder of an fsspec filesystem (location.py) is read through fsspec under the same name and size rules.
"""
from __future__ import annotations

import errno
import os
import re
import stat

from cpr.errors import CorruptCheckpointError
from .location import Folder, RemoteFolder

# A single path component of safe characters that is not hidden, "." or "..".
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")
_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def plain_name_problem(name: object) -> str | None:
    """Why `name` cannot name a file of a save folder, or None when it can."""
    if not isinstance(name, str):
        return f"file name must be a string, got {type(name).__name__}"
    if not _PLAIN_NAME.fullmatch(name):
        return f"file name {name[:80]!r} is not a plain name inside the save folder"
    return None


def read_file(folder: Folder, name: str, *, size: int | None = None, max_size: int | None = None,
              offset: int = 0, length: int | None = None) -> bytearray:
    """The bytes of regular file `name` directly inside `folder`, which must be exactly `size` bytes, or at
    most `max_size`: all of them, or `length` bytes from `offset` (one tensor of a part's file).

    Anything else (a missing file, a symbolic link, a FIFO, a device, another size) raises
    CorruptCheckpointError naming the folder and the file.
    """
    problem = plain_name_problem(name)
    if problem:
        raise CorruptCheckpointError(folder, str(name)[:80], problem)
    if isinstance(folder, RemoteFolder):
        return _read_remote(folder, name, size, max_size, offset, length)
    try:
        folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        # With O_DIRECTORY, a symbolic link to a folder is refused as "not a directory": name the link instead.
        reason = _reason(OSError(errno.ELOOP, "")) if e.errno == errno.ENOTDIR and os.path.islink(folder) else _reason(e)
        raise CorruptCheckpointError(folder, name, f"save folder cannot be opened: {reason}") from e
    try:
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below as not regular.
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder_fd)
        except OSError as e:
            raise CorruptCheckpointError(folder, name, _reason(e)) from e
    finally:
        os.close(folder_fd)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        kind = next((what for is_kind, what in _FILE_KINDS if is_kind(info.st_mode)), "not a regular file")
        raise CorruptCheckpointError(folder, name, f"is {kind}")
    with open(fd, "rb", buffering=0) as f:
        if size is not None and info.st_size != size:
            raise CorruptCheckpointError(folder, name, f"size {info.st_size} bytes, manifest says {size}")
        if max_size is not None and info.st_size > max_size:
            raise CorruptCheckpointError(folder, name, f"size {info.st_size} bytes exceeds the limit of {max_size}")
        length = info.st_size - offset if length is None else length
        if offset + length > info.st_size:
            raise CorruptCheckpointError(folder, name, f"size {info.st_size} bytes, too short for {length} bytes "
                                         f"at offset {offset}")
        buffer = bytearray(length)
        view, done = memoryview(buffer), 0
        try:
            f.seek(offset)
            while done < len(buffer) and (n := f.readinto(view[done:])):
                done += n
            extra = f.read(1) if offset + length == info.st_size else b""
        except OSError as e:
            raise CorruptCheckpointError(folder, name, f"unreadable: {_reason(e)}") from e
    if done != len(buffer) or extra:
        raise CorruptCheckpointError(folder, name, f"changed size while being read ({info.st_size} bytes at open)")
    return buffer


def _read_remote(folder: RemoteFolder, name: str, size: int | None, max_size: int | None, offset: int,
                 length: int | None) -> bytearray:
    """`read_file` for a folder of an fsspec filesystem: the same size rules; only files are read."""
    path = folder / name
    try:
        info = folder.fs.info(path.path)
    except FileNotFoundError as e:
        raise CorruptCheckpointError(folder, name, "file missing") from e
    if info.get("type") != "file":
        raise CorruptCheckpointError(folder, name, f"is {info.get('type')}, not a file")
    actual = int(info["size"])
    if size is not None and actual != size:
        raise CorruptCheckpointError(folder, name, f"size {actual} bytes, manifest says {size}")
    if max_size is not None and actual > max_size:
        raise CorruptCheckpointError(folder, name, f"size {actual} bytes exceeds the limit of {max_size}")
    length = actual - offset if length is None else length
    if offset + length > actual:
        raise CorruptCheckpointError(folder, name, f"size {actual} bytes, too short for {length} bytes at offset "
                                     f"{offset}")
    try:
        data = folder.fs.cat_file(path.path, start=offset, end=offset + length)
    except OSError as e:
        raise CorruptCheckpointError(folder, name, f"unreadable: {e}") from e
    if len(data) != length:
        raise CorruptCheckpointError(folder, name, f"changed size while being read ({actual} bytes at first)")
    return bytearray(data)


def _reason(error: OSError) -> str:
    if error.errno == errno.ENOENT:
        return "file missing"
    if error.errno == errno.ELOOP:
        return "is a symbolic link (only regular files inside the save folder are read)"
    if error.errno == errno.ENOTDIR:
        return "is not a directory"
    return f"unreadable: {error.strerror or error}"
