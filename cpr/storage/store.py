"""Crash-consistent, multi-part checkpoint folders with one commit record, and retention.

A save is `DIR/save-<step:010d>-<kind>/`. It holds one folder per *part* and `commit.json`:

* `domain-<d:05d>/`: the rows of failure domain `d` (weights and row-wise optimizer state; for a subset
  save, also the ids of the rows it holds, relative to the domain's first row), written by whichever
  process holds the domain, in parallel with the others;
* `dense/`: dense parameters, dense optimizer state and RNG, written once (by the coordinator).

A part is a folder with `manifest.json` and `tensors.bin`, its tensors back to back (see `manifest.py`,
`tensor_io.py`): one file and one fsync per part whatever the number of tables. In a full save each tensor
is a torch.save record and the save folder is also a torch.distributed.checkpoint checkpoint
(`dcp_format.py`): its `.metadata` is written by the coordinator at commit, before `commit.json`.
Writers stage their parts under `DIR/.tmp-save-...-<token>/`, fsyncing every file and part folder. Only
when every part is durable does the coordinator write `.metadata` and `commit.json` (naming each part with
the crc32 of its manifest), fsync them and the staging folder (every part's entry in it), rename the staging
folder into place and fsync `DIR`, as DCP writes its metadata last: a save either is complete under its
final name or does not exist. Deletion renames to `DIR/.trash-...` before removing, for the same reason.
`DIR` may also be an fsspec URL (see location.py). The commit record and the save and part names are
in commit.py, the checks of what a writer puts in a part in checks.py.

One job per directory: the coordinator's store holds the directory's lock (see lock.py), and only
temporary folders of this job or of a dead one are removed.
"""
from __future__ import annotations

import errno
import json
import numbers
import os
import time
import uuid
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from cpr.errors import CorruptCheckpointError, LostLockError, ReadRetryWarning, SkippedSaveWarning, UnwritableDirectoryError

from . import location, retention, tensor_io
from .checks import _check_layout, _check_rows
from .commit import (  # noqa: F401  (COMMIT_VERSION, DENSE_PART, domain_part: re-exported, as before)
    COMMIT_FILE,
    COMMIT_VERSION,
    DENSE_PART,
    PartRecord,
    SaveInfo,
    SaveRecord,
    domain_part,
    save_folder_name,
)
from .dcp_format import CHUNKS, Chunk, write_metadata
from .location import Folder
from .lock import DirectoryLock, abandoned, job_token, writer_tag
from .manifest import MANIFEST_FILE, SAVE_KINDS, Manifest, TableMeta, TensorEntry, file_size
from .retention import FolderListing, SaveFolder
from .sealing import read_text

_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
TENSOR_FILE = "tensors.bin"


@dataclass(frozen=True)
class WrittenPart:
    """A part a writer has made durable: its commit record entry, and its manifest (a full save's DCP metadata
    is built from its parts' manifests, handed to the commit rather than read back)."""

    record: PartRecord
    manifest: Manifest


@dataclass(frozen=True)
class PartContent:
    """What a writer puts in one part: tensors, the tables they belong to, and each table's global rows.

    `rows[table] = (start, end)`: the global rows of `table` the part holds (a domain's slice; empty for
    the dense part). In a subset part, `emb/<table>/ids` are relative to `start`.
    """

    tensors: Mapping[str, torch.Tensor]
    tables: Mapping[str, TableMeta] = field(default_factory=dict)
    rows: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)  # JSON-ready data of the writer, kept in the manifest
    codecs: Mapping[str, str] = field(default_factory=dict)  # tensor name -> codec when not "raw" (see codecs.py)
    # tensor name -> the state-dict entry it is a chunk of, for the DCP metadata of a full save (see dcp_format.py)
    chunks: Mapping[str, Chunk] = field(default_factory=dict)


@dataclass
class LoadedPart:
    """One part's manifest with the tensors loaded (and verified) from it; `bytes_read` counts the files."""

    manifest: Manifest
    tensors: dict[str, torch.Tensor]
    bytes_read: int


def _remove_retired(trash: Folder) -> None:
    try:
        location.remove_tree(trash, ignore_errors=False)
    except FileNotFoundError:
        pass  # removed already (its folder was deleted meanwhile)
    except OSError as e:  # the next run of this folder removes it (see `_remove_stale`)
        warnings.warn(f"could not remove the retired save {trash}: {e}", stacklevel=1)


class CheckpointStore:
    """Stages, commits, lists, verifies, loads and retires multi-part saves under one directory.

    Every process of a job opens the store on the same directory; only the coordinator (rank 0) commits,
    removes stale temporary folders and applies retention. Retention after every commit: the newest
    `keep_last` full saves verified loadable, and everything newer than the oldest of them (subsets are deltas
    on top of a full save; see retention.py: a folder never read is not counted, and nothing but retention
    deletes a save). Keep `keep_last >= 2` to be able to fall back past a corrupt newest full save.

    With `lock` (the coordinator's store; the default) the store holds the directory's lock until `close()`
    or the process ends, and a second locking store raises DirectoryLockedError naming the holder.
    `lock=False` is for the other writers of a job whose coordinator holds the lock.
    """

    def __init__(self, directory: str | os.PathLike, keep_last: int = 3, lock: bool = True) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = location.folder(directory)
        self.keep_last = keep_last
        # A retired save is renamed out of the way at once and its files removed by this thread: freeing a
        # full save's blocks takes a sixth of the time of writing one, and nothing needs to wait for it.
        self._remover = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpr-remove")
        self._verified: set[tuple[int, str]] = set()  # (step, kind) of the saves known loadable (retention.py)
        probe = self.directory / f".probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with location.create(probe) as f:
                f.write(b"probe")
                location.make_durable(f)
            probe.unlink()
        except OSError as e:
            raise UnwritableDirectoryError(f"checkpoint directory {self.directory} is not writable: {e}") from e
        # A remote folder has no lock (see location.py): its runs are told apart by a fresh token each.
        remote = isinstance(self.directory, location.RemoteFolder)
        self._lock = DirectoryLock.acquire(self.directory) if lock and not remote else None
        self.token = self._lock.token if self._lock else uuid.uuid4().hex[:16] if remote else job_token(self.directory)
        if self._lock is not None:
            self._remove_stale()

    def close(self) -> None:
        """Finish removing retired saves and give up the directory's lock (also done when the process ends)."""
        self._remover.shutdown(wait=True)
        if self._lock is not None:
            self._lock.release()

    # -- writing ---------------------------------------------------------------------------------------

    def writer_tag(self) -> str:
        """A staging-folder suffix naming this job (its lock token) and this writer; every rank of a job stages
        under the coordinator's."""
        return writer_tag(self.token)

    def stage(self, step: int, kind: str, tag: str) -> Folder:
        """The staging folder of a save; every writer of the save passes the same `tag` (see `writer_tag`)."""
        if kind not in SAVE_KINDS:
            raise ValueError(f"kind must be one of {SAVE_KINDS}, got {kind!r}")
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        staging = self.directory / f"{_TMP_PREFIX}{save_folder_name(int(step), kind)}-{tag}"
        staging.mkdir(exist_ok=True)
        return staging

    def write_part(self, staging: Folder, part: str, step: int, kind: str, policy: str,
                   content: PartContent) -> WrittenPart:
        """Write one part into `staging` and make it durable; a failure removes what this part wrote."""
        tables = {name: meta if isinstance(meta, TableMeta) else TableMeta(**meta) for name, meta in content.tables.items()}
        rows = {table: (int(start), int(end)) for table, (start, end) in content.rows.items()}
        _check_layout(kind, content.tensors, tables)
        _check_rows(rows, tables)
        folder = staging / part
        try:
            folder.mkdir()
            # Full saves are DCP checkpoints: each tensor a torch.save serialization (see dcp_format.py).
            entries = self.write_tensors(folder / TENSOR_FILE, content, torch_save=kind == "full")
            extra = {**content.extra, "part": part}
            if content.chunks:
                extra[CHUNKS] = {name: chunk.to_json() for name, chunk in content.chunks.items()}
            manifest = Manifest(
                step=step, policy=policy, kind=kind, tables=tables, shards={t: [r] for t, r in rows.items()},
                tensors=entries, extra=extra, created=time.time(), nbytes=sum(e.nbytes for e in entries),
            )
            text = manifest.to_json().encode()
            with location.create(folder / MANIFEST_FILE) as f:
                f.write(text)
                location.make_durable(f)
            # The staging folder's own entry for this part is made durable once, by the commit (below).
            location.sync_folder(folder)
        except BaseException as e:
            location.remove_tree(folder)
            e.add_note(f"writing part {part} of the step-{step} {kind} save in {staging} failed; earlier saves in "
                       f"{self.directory} are untouched")
            raise
        return WrittenPart(PartRecord(checksum=zlib.crc32(text), nbytes=manifest.nbytes), manifest)

    def write_tensors(self, path: Folder, content: PartContent, torch_save: bool) -> list[TensorEntry]:
        """Write a part's tensors into its one file and make it durable (see `tensor_io.write_tensors`); a
        subclass may wrap it (a failure here is a failure of the part's write)."""
        return tensor_io.write_tensors(path, content.tensors, content.codecs, torch_save=torch_save)

    def commit(self, staging: Folder, step: int, kind: str, policy: str, parts: Mapping[str, WrittenPart],
               world_size: int = 1, domain_mode: str = "virtual", num_domains: int = 1,
               extra: Mapping[str, Any] | None = None) -> SaveRecord:
        """Write the commit record last and move the save into place; then apply retention.

        Call only when every part in `parts` (as its writer's `write_part` returned it) is durable in
        `staging`. A save of the same step and kind is replaced. On failure the staging folder is removed and
        earlier saves stay as they were.
        """
        started = time.perf_counter()
        extra = dict(extra or {})
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as e:
            raise TypeError(f"extra must be JSON-serialisable (lists, dicts, numbers, strings): {e}") from e
        info = SaveInfo(step=step, kind=kind, policy=policy, world_size=world_size, domain_mode=domain_mode,
                        num_domains=num_domains, parts={name: part.record for name, part in parts.items()},
                        extra=extra, created=time.time())
        final = self.directory / save_folder_name(step, kind)
        try:
            self._check_lock(step, kind)
            if kind == "full":  # DCP's metadata, from every rank's parts, before the commit record
                write_metadata(staging, {name: part.manifest for name, part in parts.items()}, str(final))
            with location.create(staging / COMMIT_FILE) as f:
                f.write(info.to_json().encode())
                location.make_durable(f)
            location.sync_folder(staging)  # every part's folder entry and the commit record's, in one fsync
            self._check_lock(step, kind)  # again at the point of no return
            if final.exists():  # replaced: set aside, never deleted but by retention
                self.set_aside(SaveFolder(final, step, kind))
            location.rename(staging, final)
            location.sync_folder(self.directory)
        except BaseException as e:
            self.abandon(staging)
            e.add_note(f"committing the step-{step} {kind} save to {final} failed; its staging folder was "
                       f"removed and earlier saves in {self.directory} are untouched")
            raise
        self.mark_loadable(step, kind)
        try:
            self._apply_retention()
        except Exception as e:  # the save is committed: a full or read-only disk only keeps older saves longer
            warnings.warn(f"retention after the step-{step} {kind} save failed: {e!r}", stacklevel=2)
        return SaveRecord(final, step, kind, info.nbytes, time.perf_counter() - started)

    def _check_lock(self, step: int, kind: str) -> None:
        """LostLockError (an OSError: the save is abandoned) when this store's lock no longer guards the folder."""
        reason = self._lock.lost() if self._lock is not None else None
        if reason:
            raise LostLockError(f"this run lost the lock of {self.directory} ({reason}); the step-{step} {kind} save "
                                "is abandoned: a run without its folder's lock commits nothing")

    def abandon(self, staging: Folder) -> None:
        """Remove a staging folder that will not be committed."""
        location.remove_tree(staging)

    def save(self, step: int, kind: str, policy: str, parts: Mapping[str, PartContent],
             extra: Mapping[str, Any] | None = None, **commit_args: Any) -> SaveRecord:
        """Stage, write every part and commit, in one process (world size 1)."""
        staging = self.stage(step, kind, self.writer_tag())
        try:
            records = {name: self.write_part(staging, name, step, kind, policy, content) for name, content in parts.items()}
            return self.commit(staging, step, kind, policy, records, extra=extra, **commit_args)
        except BaseException:
            self.abandon(staging)
            raise

    def discard_after(self, step: int) -> list[Folder]:
        """Delete every save newer than `step`, set-aside ones too; only on the user's request (a new run told
        to start over, `overwrite`). Returns what was deleted."""
        doomed = [f.path for f in retention.list_folders(self.directory) if f.step > step]
        for path in doomed:
            self._delete(path)
        return doomed

    def set_aside_after(self, step: int) -> list[Folder]:
        """Set aside every save newer than `step` (after going back to it: they describe a future that is gone,
        and a fallback may have skipped them as unreadable); returns their new names."""
        return [self.set_aside(f) for f in self._folders() if f.step > step]

    def set_aside(self, folder: SaveFolder) -> Folder:
        """Take a save out of the folder's list without deleting it (see retention.py); its new path."""
        target = self.directory / retention.aside_name(folder)
        location.rename(folder.path, target)
        location.sync_folder(self.directory)
        self._verified.discard(folder.key)
        warnings.warn(f"set aside {folder.path.name} as {target.name}: retention removes it once superseded",
                      SkippedSaveWarning, stacklevel=2)
        return target

    def mark_loadable(self, step: int, kind: str) -> None:
        """The save of `step` and `kind` was verified loadable (committed here, or read back whole by every
        rank): retention counts it."""
        self._verified.add((step, kind))

    # -- reading ---------------------------------------------------------------------------------------

    def saves(self, kind: str | None = None) -> list[SaveInfo]:
        """Commit records of the committed saves (of `kind`, if given), oldest step first.

        A folder whose commit record is unreadable is skipped with a SkippedSaveWarning.
        """
        return [info for info in self.listing().saves if kind is None or info.kind == kind]

    def listing(self) -> FolderListing:
        """The committed saves and the save folders that cannot be read (each warned of with a
        SkippedSaveWarning)."""
        found, unreadable = [], {}
        for folder in self._folders():
            try:
                info = SaveInfo.read(folder.path)
                if (info.step, info.kind) != folder.key:
                    raise CorruptCheckpointError(folder.path, COMMIT_FILE, f"says step {info.step} ({info.kind}), "
                                                 f"folder name says step {folder.step} ({folder.kind})")
            except CorruptCheckpointError as e:
                warnings.warn(f"skipping save: {e}", SkippedSaveWarning, stacklevel=3)
                unreadable[folder.path.name] = f"{e.file}: {e.reason}"
                continue
            found.append(info)
        return FolderListing(found, unreadable)

    def load_part(self, save: SaveInfo, part: str, names: Iterable[str] | None = None) -> LoadedPart:
        """Tensors of one part of a committed save (all, or `names`), each verified against its size and crc32,
        and the part's manifest against the commit record.

        A read that fails with an I/O error (EIO, a remote store's error) is retried once, with a
        ReadRetryWarning. Raises CorruptCheckpointError naming the folder and file, or KeyError for a part or
        name it lacks.
        """
        try:
            return self.read_part(save, part, names)
        except (OSError, CorruptCheckpointError) as e:
            if not _io_error(e):
                raise
            warnings.warn(f"reading part {part} of {save.folder} failed ({e}); retrying once", ReadRetryWarning,
                          stacklevel=2)
        try:
            return self.read_part(save, part, names)
        except OSError as e:
            raise CorruptCheckpointError(save.folder / part, type(e).__name__, f"unreadable, twice: {e}") from e

    def read_part(self, save: SaveInfo, part: str, names: Iterable[str] | None = None) -> LoadedPart:
        """One attempt of `load_part` (a subclass may wrap it: a failure here is a failed read)."""
        if part not in save.parts:
            raise KeyError(f"save {save.folder} (step {save.step}, {save.kind}) has no part {part!r}")
        folder = save.folder / part
        manifest, manifest_bytes = self._part_manifest(folder, save.parts[part])
        entries = manifest.tensors if names is None else [manifest.entry(name) for name in names]
        tensors = {entry.name: tensor_io.read_tensor(folder, entry, file_size(manifest.tensors, entry.file))
                   for entry in entries}
        return LoadedPart(manifest, tensors, manifest_bytes + sum(entry.nbytes for entry in entries))

    @staticmethod
    def _part_manifest(folder: Folder, record: PartRecord) -> tuple[Manifest, int]:
        """The verified manifest of the part in `folder`, whose commit record (or writer) says `record`, and
        its size."""
        text = read_text(folder, MANIFEST_FILE)
        if zlib.crc32(text.encode()) != record.checksum:
            raise CorruptCheckpointError(folder, MANIFEST_FILE, "crc32 differs from the commit record")
        return Manifest.from_json(text, folder), len(text)

    # -- housekeeping ----------------------------------------------------------------------------------

    def _folders(self) -> list[SaveFolder]:
        """Every save folder (not those set aside), by step; full before subset at the same step."""
        return [f for f in retention.list_folders(self.directory) if not f.aside]

    def _delete(self, path: Folder) -> None:
        # Renamed first so that a crash mid-removal never leaves a partial folder under a save name.
        trash = self.directory / f"{_TRASH_PREFIX}{path.name}-{writer_tag(self.token)}"
        location.rename(path, trash)
        location.sync_folder(self.directory)
        self._remover.submit(_remove_retired, trash)

    def _remove_stale(self) -> None:
        """Remove temp and trash folders left by this process or by a run killed mid-save or mid-delete."""
        names = [path.name for path in self.directory.iterdir() if path.name.startswith((_TMP_PREFIX, _TRASH_PREFIX))]
        for name in abandoned(self.directory, names, self.token):
            location.remove_tree(self.directory / name)

    def _apply_retention(self) -> None:
        for folder in retention.superseded(retention.list_folders(self.directory), self._verified, self.keep_last):
            self._delete(folder.path)
            if not folder.aside:
                self._verified.discard(folder.key)


def _io_error(error: BaseException) -> bool:
    """Whether a failed read may succeed when retried: an I/O error, not a missing file or bad content."""
    cause = error if isinstance(error, OSError) else error.__cause__
    return isinstance(cause, OSError) and cause.errno not in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR)
