"""Crash-consistent checkpoint folders with retention.

A save is `DIR/save-<step:010d>-<kind>/` holding `manifest.json` and one raw file per tensor. It is
written under `DIR/.tmp-...`, every file and the folder fsynced, then renamed into place and `DIR`
fsynced: a save folder either is complete or does not exist under its final name. Deletion renames to
`DIR/.trash-...` before removing, for the same reason. One writer per directory: a store holds the
directory's lock (see lock.py) and removes only temporary folders it or a dead run left.
"""
from __future__ import annotations

import json
import numbers
import os
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import tensor_io
from .errors import CorruptCheckpointError, UnwritableDirectoryError
from .lock import DirectoryLock, abandoned, job_token, writer_tag
from .manifest import MANIFEST_FILE, SAVE_KINDS, Manifest, TableMeta

_SAVE_NAME = re.compile(r"^save-(\d{10})-(full|subset)$")
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"


class SkippedSaveWarning(UserWarning):
    """A save was passed over because it is corrupt; an older one is used instead."""


@dataclass(frozen=True)
class SaveRecord:
    """What one `CheckpointStore.save` wrote and how long it took."""

    path: Path
    step: int
    kind: str
    nbytes: int
    seconds: float


@dataclass
class LoadedSave:
    """A save's manifest with the tensors that were loaded (and verified) from it."""

    manifest: Manifest
    tensors: dict[str, torch.Tensor]


def save_folder_name(step: int, kind: str) -> str:
    return f"save-{step:010d}-{kind}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_name(index: int, name: str) -> str:
    # The index keeps names unique; the sanitised tensor name keeps the folder readable.
    return f"{index:05d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)[:80]}.bin"


def _check_layout(kind: str, tensors: Mapping[str, torch.Tensor], tables: Mapping[str, TableMeta]) -> None:
    """Reject tensors that break the `emb/<table>/...` convention that row composition relies on."""
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
    for table in tables:
        if "/" in table:
            raise ValueError(f"table name {table!r} must not contain '/'")
    by_table: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        parts = name.split("/", 2)
        if parts[0] == "emb":
            if len(parts) < 3:
                raise ValueError(f"tensor {name!r}: embedding tensors are named emb/<table>/<what>")
            by_table.setdefault(parts[1], {})[parts[2]] = tensor
    check = _check_full_table if kind == "full" else _check_subset_table
    for table, parts in by_table.items():
        check(table, parts, tables.get(table))


def _check_full_table(table: str, parts: Mapping[str, torch.Tensor], meta: TableMeta | None) -> None:
    """Every tensor of a table in a full save has one entry per row; the weight is rows x dim."""
    if meta and "weight" in parts and tuple(parts["weight"].shape) != (meta.rows, meta.dim):
        raise ValueError(f"full save: emb/{table}/weight has shape {list(parts['weight'].shape)}, "
                         f"table {table!r} is {meta.rows}x{meta.dim}")
    rows = meta.rows if meta else parts["weight"].shape[0] if "weight" in parts else None
    for what, tensor in parts.items():
        if tensor.dim() == 0 or (rows is not None and tensor.shape[0] != rows):
            raise ValueError(f"full save: emb/{table}/{what} has shape {list(tensor.shape)}, expected {rows} rows")


def _check_subset_table(table: str, parts: Mapping[str, torch.Tensor], meta: TableMeta | None) -> None:
    """A table in a subset save has distinct in-range int64 `ids` and one entry per id in every tensor."""
    ids = parts.get("ids")
    if ids is None:
        raise ValueError(f"subset save: emb/{table}/ids is required alongside {sorted(parts)}")
    if ids.dtype != torch.int64 or ids.dim() != 1:
        raise ValueError(f"subset save: emb/{table}/ids must be a 1-d int64 tensor, got {ids.dtype}{list(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or (meta and int(ids.max()) >= meta.rows)):
        raise ValueError(f"subset save: emb/{table}/ids out of range [0, {meta.rows if meta else '...'})")
    if torch.unique(ids).numel() != ids.numel():
        raise ValueError(f"subset save: emb/{table}/ids has duplicate rows")
    for what, tensor in parts.items():
        if tensor.dim() == 0 or tensor.shape[0] != ids.numel():
            raise ValueError(f"subset save: emb/{table}/{what} has shape {list(tensor.shape)}, "
                             f"expected {ids.numel()} rows like emb/{table}/ids")


def _check_shards(shards: Mapping[str, Sequence[tuple[int, int]]], tables: Mapping[str, TableMeta]) -> None:
    for table, ranges in shards.items():
        for start, end in ranges:
            rows = tables[table].rows if table in tables else end
            # An empty range is allowed: a shard may own no rows of a small table.
            if not 0 <= start <= end <= rows:
                raise ValueError(f"shard [{start}, {end}) of table {table!r} is not a row range within [0, {rows}]")


class CheckpointStore:
    """Saves, lists, verifies, loads and retires checkpoint folders under one directory.

    Retention after every save: the newest `keep_last` full saves, and every subset save newer than the
    oldest of them (subsets are deltas on top of a full save). Keep `keep_last >= 2` to be able to fall
    back past a corrupt newest full save.

    With `lock` (the default) the store holds the directory's lock until `close()` or the process ends,
    and a second locking store raises DirectoryLockedError naming the holder. `lock=False` is for the
    other writers of a job whose coordinator holds the lock.
    """

    def __init__(self, directory: str | os.PathLike, keep_last: int = 3, lock: bool = True):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        probe = self.directory / f".probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(b"probe")
                os.fsync(f.fileno())
            probe.unlink()
        except OSError as e:
            raise UnwritableDirectoryError(f"checkpoint directory {self.directory} is not writable: {e}") from e
        self._lock = DirectoryLock.acquire(self.directory) if lock else None
        self._token = self._lock.token if self._lock else job_token(self.directory)

    def close(self) -> None:
        """Give up the directory's lock (also done when the process ends)."""
        if self._lock is not None:
            self._lock.release()

    # -- writing ---------------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        kind: str,
        policy: str,
        tensors: Mapping[str, torch.Tensor],
        tables: Mapping[str, TableMeta | Mapping[str, Any]] | None = None,
        shards: Mapping[str, Sequence[tuple[int, int]]] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> SaveRecord:
        """Write one save atomically, then apply retention. A save of the same step and kind is replaced.

        On any failure (disk full included) the temporary folder is removed, earlier saves are left as
        they were, and the exception is re-raised with a note naming the save.
        """
        started = time.perf_counter()
        if kind not in SAVE_KINDS:
            raise ValueError(f"kind must be one of {SAVE_KINDS}, got {kind!r}")
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        step = int(step)
        tables = {name: meta if isinstance(meta, TableMeta) else TableMeta(**meta)
                  for name, meta in (tables or {}).items()}
        shards = {table: [(int(s), int(e)) for s, e in ranges] for table, ranges in (shards or {}).items()}
        extra = dict(extra or {})
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as e:
            raise TypeError(f"extra must be JSON-serialisable (lists, dicts, numbers, strings): {e}") from e
        _check_layout(kind, tensors, tables)
        _check_shards(shards, tables)

        self._remove_stale()
        name = save_folder_name(step, kind)
        final = self.directory / name
        tmp = self.directory / f"{_TMP_PREFIX}{name}-{writer_tag(self._token)}"
        tmp.mkdir()
        try:
            entries = [
                tensor_io.write_tensor(tmp / _file_name(i, tensor_name), tensor_name, tensor)
                for i, (tensor_name, tensor) in enumerate(tensors.items())
            ]
            manifest = Manifest(
                step=step, policy=policy, kind=kind, tables=tables, shards=shards, tensors=entries,
                extra=extra, created=time.time(), nbytes=sum(e.nbytes for e in entries),
            )
            with open(tmp / MANIFEST_FILE, "w") as f:
                f.write(manifest.to_json())
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            if final.exists():
                self._delete(final)
            os.rename(tmp, final)
            _fsync_dir(self.directory)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            e.add_note(f"checkpoint save of step {step} ({kind}) to {final} failed; its temporary folder was "
                       f"removed and earlier saves in {self.directory} are untouched")
            raise
        self._apply_retention()
        return SaveRecord(final, step, kind, manifest.nbytes, time.perf_counter() - started)

    def discard_after(self, step: int) -> list[Path]:
        """Delete every save newer than `step` (e.g. after rolling back to it); returns what was deleted."""
        doomed = [path for path, save_step, _ in self._folders() if save_step > step]
        for path in doomed:
            self._delete(path)
        return doomed

    # -- reading ---------------------------------------------------------------------------------------

    def saves(self, kind: str | None = None) -> list[Manifest]:
        """Manifests of the complete saves (of `kind`, if given), oldest step first.

        A folder whose manifest is unreadable is skipped with a SkippedSaveWarning.
        """
        manifests = []
        for path, step, folder_kind in self._folders():
            if kind is not None and folder_kind != kind:
                continue
            try:
                manifest = Manifest.read(path)
                if (manifest.step, manifest.kind) != (step, folder_kind):
                    raise CorruptCheckpointError(path, MANIFEST_FILE, f"says step {manifest.step} "
                                                 f"({manifest.kind}), folder name says step {step} ({folder_kind})")
            except CorruptCheckpointError as e:
                warnings.warn(f"skipping save: {e}", SkippedSaveWarning, stacklevel=2)
                continue
            manifests.append(manifest)
        return manifests

    def load(self, save: Manifest | str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Tensors of one save (all, or `names`), each verified against its size and crc32.

        Raises CorruptCheckpointError naming the folder and file, or KeyError for a name the save lacks.
        """
        manifest = save if isinstance(save, Manifest) else Manifest.read(Path(save))
        entries = manifest.tensors if names is None else [manifest.entry(name) for name in names]
        return {entry.name: tensor_io.read_tensor(manifest.folder, entry) for entry in entries}

    def latest_loadable(self, kind: str | None = None, names: Iterable[str] | None = None) -> LoadedSave | None:
        """The newest save (of `kind`) whose tensors (all, or `names`) load and verify.

        Corrupt saves are skipped with a SkippedSaveWarning. Returns None when there is no save at all;
        raises CorruptCheckpointError when saves exist but none is loadable.
        """
        names = None if names is None else list(names)
        skipped = []
        for manifest in reversed(self.saves(kind)):
            try:
                return LoadedSave(manifest, self.load(manifest, names))
            except CorruptCheckpointError as e:
                warnings.warn(f"skipping save, falling back to an older one: {e}", SkippedSaveWarning, stacklevel=2)
                skipped.append(manifest.folder.name)
        if skipped:
            raise CorruptCheckpointError(self.directory, ", ".join(skipped), "no loadable save remains")
        return None

    # -- housekeeping ----------------------------------------------------------------------------------

    def _folders(self) -> list[tuple[Path, int, str]]:
        """(path, step, kind) of every save folder, by step; full before subset at the same step."""
        found = []
        for path in self.directory.iterdir():
            match = _SAVE_NAME.match(path.name)
            if match and path.is_dir():
                found.append((path, int(match[1]), match[2]))
        return sorted(found, key=lambda f: (f[1], f[2] != "full"))

    def _delete(self, path: Path) -> None:
        # Renamed first so that a crash mid-removal never leaves a partial folder under a save name.
        trash = self.directory / f"{_TRASH_PREFIX}{path.name}-{writer_tag(self._token)}"
        os.rename(path, trash)
        _fsync_dir(self.directory)
        shutil.rmtree(trash)

    def _remove_stale(self) -> None:
        """Remove temp and trash folders left by this process or by a run killed mid-save or mid-delete."""
        names = [path.name for path in self.directory.iterdir() if path.name.startswith((_TMP_PREFIX, _TRASH_PREFIX))]
        for name in abandoned(self.directory, names, self._token):
            shutil.rmtree(self.directory / name, ignore_errors=True)

    def _apply_retention(self) -> None:
        folders = self._folders()
        fulls = [f for f in folders if f[2] == "full"]
        kept_fulls = fulls[-self.keep_last:]
        if not kept_fulls:
            return  # subsets without a full save below them are kept: nothing supersedes them yet
        oldest_kept = kept_fulls[0][1]
        for path, step, kind in folders:
            if (kind == "full" and (path, step, kind) not in kept_fulls) or (kind == "subset" and step <= oldest_kept):
                self._delete(path)
