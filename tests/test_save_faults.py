"""Only regular files directly inside a save folder are read, and a kill during a subset save keeps the
previous saves loadable."""
from __future__ import annotations

import json
import os
import signal
import textwrap
import zlib

import pytest

from cpr.storage import CheckpointStore, CorruptCheckpointError, SkippedSaveWarning, TensorEntry, restore_rows, tensor_io
from cpr.storage.manifest import MANIFEST_FILE
from tests.test_metadata_props import entry_of, falls_back, manifest_data, write_manifest
from tests.test_storage import entries, kill_mid_save, save_full, save_subset, tensor_file


def point_entry_at(record, name: str, file: str, content: bytes) -> None:
    """Re-declare tensor `name` as `file` with `content`'s size and crc32, and reseal the manifest."""
    data = manifest_data(record.path)
    entry_of(data, name).update(file=file, nbytes=len(content), checksum=zlib.crc32(content),
                                dtype="uint8", shape=[len(content)])
    data["nbytes"] = sum(t["nbytes"] for t in data["tensors"])
    write_manifest(record.path, data, reseal=True)


@pytest.mark.parametrize("file", ["../../../outside.bin", "/etc/hostname", "sub/x.bin", "..", ".hidden"])
def test_names_leading_outside_the_folder_are_refused(tmp_path, file):
    store = CheckpointStore(tmp_path / "ckpt")
    save_full(store, 1)
    newest = save_full(store, 2)
    point_entry_at(newest, "dense/w", file, b"secret\n")
    assert "not a plain name" in falls_back(store, 1)


def test_read_tensor_refuses_a_path_even_from_a_hand_made_entry(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"1234")
    (tmp_path / "save").mkdir()
    entry = TensorEntry("x", "../x.bin", "uint8", (4,), 4, zlib.crc32(b"1234"))
    with pytest.raises(CorruptCheckpointError, match="not a plain name"):
        tensor_io.read_tensor(tmp_path / "save", entry)


def test_a_symlink_to_an_identical_file_outside_is_refused(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    save_full(store, 1)
    newest = save_full(store, 2)
    inside = tensor_file(newest, "dense/w")
    outside = tmp_path / "copy.bin"
    outside.write_bytes(inside.read_bytes())
    inside.unlink()
    inside.symlink_to(outside)
    assert "symbolic link" in falls_back(store, 1)


def test_a_symlinked_save_folder_is_refused(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    save_full(store, 1)
    newest = save_full(store, 2)
    elsewhere = tmp_path / "elsewhere"
    newest.path.rename(elsewhere)
    newest.path.symlink_to(elsewhere, target_is_directory=True)
    assert "save-0000000002-full" in falls_back(store, 1)


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_special_files_are_refused_without_blocking(tmp_path, kind):
    store = CheckpointStore(tmp_path / "ckpt")
    save_full(store, 1)
    newest = save_full(store, 2)
    path = tensor_file(newest, "dense/w")
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)  # opening it for reading would wait for a writer forever without O_NONBLOCK
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")  # a device reachable only through a link
    message = falls_back(store, 1)
    assert {"fifo": "is a FIFO", "directory": "is a directory", "device": "symbolic link"}[kind] in message


def test_the_manifest_is_size_bounded_and_must_be_regular(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    save_full(store, 1)
    newest = save_full(store, 2)
    manifest = newest.path / MANIFEST_FILE
    manifest.unlink()
    os.mkfifo(manifest)
    assert "is a FIFO" in falls_back(store, 1)


def test_a_file_longer_than_declared_is_refused(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    save_full(store, 1)
    newest = save_full(store, 2)
    with open(tensor_file(newest, "dense/w"), "ab") as f:
        f.write(b"\0" * 4)
    assert "manifest says 24" in falls_back(store, 1)


# -- kill during a subset save ------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys, time
    import torch
    from cpr.storage import CheckpointStore, TableMeta, tensor_io

    store = CheckpointStore(sys.argv[1])
    tables = {"t": TableMeta(10, 4, "float32")}
    store.save(1, "full", "full", {"emb/t/weight": torch.ones(10, 4)}, tables=tables)
    store.save(2, "subset", "mfu", {"emb/t/ids": torch.tensor([1, 2]), "emb/t/weight": torch.full((2, 4), 2.0)}, tables=tables)
    real_write = tensor_io.write_tensor

    def write_then_stall(path, name, tensor):
        entry = real_write(path, name, tensor)
        print("mid-save", flush=True)
        time.sleep(60)
        return entry

    tensor_io.write_tensor = write_then_stall
    store.save(3, "subset", "mfu", {"emb/t/ids": torch.tensor([2, 3]), "emb/t/weight": torch.full((2, 4), 3.0)}, tables=tables)
""")


def test_sigkill_during_a_subset_save_keeps_the_composition(tmp_path):
    assert kill_mid_save(CHILD, str(tmp_path)) == -signal.SIGKILL
    assert any(name.startswith(".tmp-save-0000000003-subset") for name in entries(tmp_path))
    store = CheckpointStore(tmp_path)  # the killed run's lock does not block
    rows = restore_rows(store, "t", (0, 4))
    assert rows["saved_step"].tolist() == [1, 2, 2, 1]
    assert rows["weight"][:, 0].tolist() == [1.0, 2.0, 2.0, 1.0]
    save_subset(store, 4, [0])
    assert entries(tmp_path) == ["save-0000000001-full", "save-0000000002-subset", "save-0000000004-subset"]


@pytest.mark.parametrize("damage", ["flip", "manifest"])
def test_a_damaged_subset_save_gives_its_rows_from_older_saves(tmp_path, damage):
    store = CheckpointStore(tmp_path)
    save_full(store, 10)
    save_subset(store, 20, [1, 2])
    newest = save_subset(store, 30, [2, 3])
    if damage == "flip":
        path = tensor_file(newest, "emb/t/ids")
        data = bytearray(path.read_bytes())
        data[0] ^= 1
        path.write_bytes(bytes(data))
    else:
        data = manifest_data(newest.path)
        data["step"] = 31
        (newest.path / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.warns(SkippedSaveWarning, match="save-0000000030-subset"):
        rows = restore_rows(store, "t", (0, 4))
    assert rows["saved_step"].tolist() == [10, 20, 20, 10]
