"""The built-in data cache: where generated data sets are kept, how large it may grow, how to clear it.

The root is `$CPR_CACHE`, else `~/.cache/cpr`. Each entry is one generated file; using an entry marks it
used (its access time). When a new entry is made, the least recently used ones are deleted until the cache
holds at most `$CPR_CACHE_MAX_MB` megabytes (default 1024); the new entry itself is always kept.

    python -m dlrm.cache            # list the entries and their total size
    python -m dlrm.cache --clear    # delete them all
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
import warnings
from pathlib import Path

DEFAULT_MAX_MB = 1024
_TEMP = re.compile(r"^\..+\.(\d+)\.tmp$")  # `.<name>.<pid>.tmp`: an entry being written by process <pid>


def cache_root() -> Path:
    root = os.environ.get("CPR_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "cpr"


def default_cache_dir() -> Path:
    """Where the synthetic set is cached: `$CPR_CACHE/synthetic`, else `~/.cache/cpr/synthetic`."""
    return cache_root() / "synthetic"


def cache_megabytes(text: str) -> float:
    """A `$CPR_CACHE_MAX_MB` value as megabytes; ValueError unless it is a size from 0 up."""
    megabytes = float(text)
    if not 0 <= megabytes < 2**43:  # also rejects nan and inf
        raise ValueError(f"{text!r} is not a size in megabytes")
    return megabytes


def max_bytes() -> int:
    """The size bound from `$CPR_CACHE_MAX_MB` (a bad value warns and the default applies; the command line
    refuses it before it starts, see `cpr.environment`)."""
    text = os.environ.get("CPR_CACHE_MAX_MB")
    if text is None:
        return DEFAULT_MAX_MB << 20
    try:
        megabytes = cache_megabytes(text)
    except ValueError:
        warnings.warn(f"CPR_CACHE_MAX_MB={text!r} is not a size in megabytes; using {DEFAULT_MAX_MB}", stacklevel=2)
        return DEFAULT_MAX_MB << 20
    return int(megabytes * (1 << 20))


def temp_path(path: Path) -> Path:
    """The name an entry is written under before it is renamed into place."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def entries(directory: Path) -> list[Path]:
    """The complete entries of a cache folder, least recently used first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if not p.name.startswith(".") and p.is_file() and not p.is_symlink()]
    return sorted(found, key=lambda p: p.stat().st_atime)


def mark_used(path: Path) -> None:
    """Record a use of `path` in its access time (set explicitly: `relatime` mounts would not)."""
    os.utime(path, (time.time(), path.stat().st_mtime))


def prune(directory: Path, keep: Path, limit: int | None = None) -> list[Path]:
    """Delete dead writers' temporary files, then the least recently used entries beyond `limit` bytes (default
    `max_bytes()`), never `keep`. Returns what was deleted."""
    limit = max_bytes() if limit is None else limit
    deleted = [p for p in directory.iterdir() if _abandoned_temp(p)]
    found = entries(directory)
    total = sum(p.stat().st_size for p in found)
    for path in found:
        if total <= limit:
            break
        if path != keep:
            total -= path.stat().st_size
            deleted.append(path)
    for path in deleted:
        path.unlink(missing_ok=True)
    return deleted


def clear(root: Path) -> tuple[int, int]:
    """Delete every entry (and dead writers' temporary files) under `root`; (files, bytes) deleted."""
    doomed = [p for folder in _folders(root) for p in (*entries(folder), *filter(_abandoned_temp, folder.iterdir()))]
    size = sum(p.stat().st_size for p in doomed)
    for path in doomed:
        path.unlink(missing_ok=True)
    return len(doomed), size


def _folders(root: Path) -> list[Path]:
    """The cache root and its data-set folders (`synthetic/`, ...)."""
    if not root.is_dir():
        return []
    return [root, *(d for d in root.iterdir() if d.is_dir() and not d.is_symlink())]


def _abandoned_temp(path: Path) -> bool:
    match = _TEMP.match(path.name)
    if match is None:
        return False
    try:
        os.kill(int(match[1]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlrm.cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clear", action="store_true", help="delete every cached file")
    args = parser.parse_args(argv)
    root = cache_root()
    if args.clear:
        count, size = clear(root)
        print(f"deleted {count} files ({size / 2**20:.1f} MB) from {root}")
        return 0
    files = [p for folder in _folders(root) for p in entries(folder)]
    for path in files:
        print(f"{path.stat().st_size / 2**20:10.1f} MB  {path}")
    print(f"{sum(p.stat().st_size for p in files) / 2**20:.1f} MB in {len(files)} files under {root} "
          f"(bound {max_bytes() / 2**20:.0f} MB per folder, CPR_CACHE_MAX_MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
