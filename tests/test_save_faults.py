"""Only regular files directly inside a save's folders are read, and a kill during a subset save keeps the
previous saves loadable.

A save is `save-<step>-<kind>/` holding `commit.json` and one folder per part (`domain-00000/`, ...), each with
`manifest.json` and `tensors.bin`. Every one of these five must be refused when it is a symbolic link, a
FIFO, a device or larger than allowed; the save is then skipped and the previous one loads.
"""
from __future__ import annotations

import os
import shutil
import signal
import textwrap
import zlib

import pytest

from cpr.storage import CheckpointStore, CorruptCheckpointError, SkippedSaveWarning, TensorEntry, tensor_io
from cpr.storage.manifest import MANIFEST_FILE, MAX_MANIFEST_BYTES
from cpr.storage.store import COMMIT_FILE, TENSOR_FILE
from tests.test_metadata_props import (
    MOMENTUM,
    PART,
    commit_data,
    entry_of,
    falls_back,
    manifest_data,
    recommit,
    write_commit,
    write_manifest,
)
from tests.test_storage import entries, kill_mid_save, restore, save_full, save_subset, tensor_file

# What each damaged thing is, relative to a save's folder.
TARGETS = {"save folder": ".", "part folder": PART, TENSOR_FILE: f"{PART}/{TENSOR_FILE}",
           MANIFEST_FILE: f"{PART}/{MANIFEST_FILE}", COMMIT_FILE: COMMIT_FILE}
FILES = [TENSOR_FILE, MANIFEST_FILE, COMMIT_FILE]


def two_saves(tmp_path):
    """A store with full saves 1 and 2 under tmp_path/ckpt; (store, the newest save's record)."""
    store = CheckpointStore(tmp_path / "ckpt")
    save_full(store, 1)
    return store, save_full(store, 2)


def point_entry_at(record, name: str, file: str, content: bytes) -> None:
    """Re-declare tensor `name` of domain 0 as all of `file` with `content`'s size and crc32, and reseal and
    recommit the manifest: only the file-name rule stands between the loader and `file`."""
    part = record.path / PART
    data = manifest_data(part)
    entry_of(data, name).update(file=file, nbytes=len(content), checksum=zlib.crc32(content), dtype="uint8",
                                shape=[len(content)], offset=0, payload_offset=0)
    data["nbytes"] = sum(t["nbytes"] for t in data["tensors"])
    write_manifest(part, data, "recommitted")


@pytest.mark.parametrize("file", ["../../../outside.bin", "/etc/hostname", "sub/x.bin", "..", ".hidden"])
def test_names_leading_outside_the_folder_are_refused(tmp_path, file):
    store, newest = two_saves(tmp_path)
    (tmp_path / "outside.bin").write_bytes(b"secret\n")
    point_entry_at(newest, MOMENTUM, file, b"secret\n")
    assert "not a plain name" in falls_back(store, 1)


def test_read_tensor_refuses_a_path_even_from_a_hand_made_entry(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"1234")
    (tmp_path / "save").mkdir()
    entry = TensorEntry("x", "../x.bin", "uint8", (4,), 4, zlib.crc32(b"1234"))
    with pytest.raises(CorruptCheckpointError, match="not a plain name"):
        tensor_io.read_tensor(tmp_path / "save", entry, 4)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_a_symlink_to_an_identical_copy_outside_is_refused(tmp_path, target):
    store, newest = two_saves(tmp_path)
    inside = (newest.path / TARGETS[target]).resolve()
    outside = tmp_path / "copy"
    (shutil.copytree if inside.is_dir() else shutil.copy2)(inside, outside)
    (shutil.rmtree if inside.is_dir() else os.unlink)(inside)
    inside.symlink_to(outside, target_is_directory=outside.is_dir())
    message = falls_back(store, 1)
    assert "save-0000000002-full" in message and "symbolic link" in message, message


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
@pytest.mark.parametrize("file", FILES)
def test_special_files_are_refused_without_blocking(tmp_path, file, kind):
    store, newest = two_saves(tmp_path)
    path = newest.path / TARGETS[file]
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)  # opening it for reading would wait for a writer forever without O_NONBLOCK
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")  # a device reachable only through a link
    message = falls_back(store, 1)
    assert {"fifo": "is a FIFO", "directory": "is a directory", "device": "symbolic link"}[kind] in message, message


def test_a_tensor_file_longer_than_declared_is_refused(tmp_path):
    store, newest = two_saves(tmp_path)
    path = tensor_file(newest, PART, MOMENTUM)
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"\0" * 4)
    assert f"size {size + 4} bytes, manifest says {size}" in falls_back(store, 1)


@pytest.mark.parametrize("file", [MANIFEST_FILE, COMMIT_FILE])
def test_metadata_files_are_size_bounded(tmp_path, file):
    store, newest = two_saves(tmp_path)
    path = newest.path / TARGETS[file]
    os.truncate(path, MAX_MANIFEST_BYTES + 1)  # sparse: nothing of it is read
    if file == MANIFEST_FILE:
        recommit(path.parent)  # the commit record names these bytes: only the bound refuses them
    assert f"exceeds the limit of {MAX_MANIFEST_BYTES}" in falls_back(store, 1)


# -- kill during a subset save ------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys, time
    from cpr.storage import CheckpointStore, tensor_io
    from tests.test_storage import save_full, save_subset

    store = CheckpointStore(sys.argv[1])
    save_full(store, 1)
    save_subset(store, 2, [1, 2])
    real_write = tensor_io.write_tensors

    def write_then_stall(path, tensors, *args, **kwargs):
        entries = real_write(path, tensors, *args, **kwargs)
        print("mid-save", flush=True)  # the parent kills us here: a part written, no commit record yet
        time.sleep(60)
        return entries

    tensor_io.write_tensors = write_then_stall
    save_subset(store, 3, [2, 3])
""")


def test_sigkill_during_a_subset_save_keeps_the_composition(tmp_path):
    assert kill_mid_save(CHILD, str(tmp_path)) == -signal.SIGKILL
    assert any(name.startswith(".tmp-save-0000000003-subset") for name in entries(tmp_path))
    store = CheckpointStore(tmp_path)  # the killed run's lock does not block
    rows = restore(store)
    assert rows["saved_step"].tolist() == [1, 2, 2, 1, 1]
    assert rows["weight"][:, 0].tolist() == [1.0, 2.0, 2.0, 1.0, 1.0]
    save_subset(store, 4, [0])
    assert entries(tmp_path) == ["save-0000000001-full", "save-0000000002-subset", "save-0000000004-subset"]


@pytest.mark.parametrize("damage", ["flip", "manifest", "resealed manifest", "commit record"])
def test_a_damaged_subset_save_gives_its_rows_from_older_saves(tmp_path, damage):
    store = CheckpointStore(tmp_path)
    save_full(store, 10)
    save_subset(store, 20, [1, 2])
    newest = save_subset(store, 30, [2, 3])
    part = newest.path / PART
    if damage == "flip":
        ids = entry_of(manifest_data(part), "emb/t/ids")
        path = tensor_file(newest, PART, "emb/t/ids")
        data = bytearray(path.read_bytes())
        data[ids["offset"]] ^= 1
        path.write_bytes(bytes(data))
    elif damage == "commit record":
        write_commit(newest.path, {**commit_data(newest.path), "step": 31}, reseal=False)
    else:
        write_manifest(part, {**manifest_data(part), "step": 31}, "stale" if damage == "manifest" else "resealed")
    with pytest.warns(SkippedSaveWarning, match="save-0000000030-subset"):
        rows = restore(store)
    assert rows["saved_step"].tolist() == [10, 20, 20, 10, 10]
