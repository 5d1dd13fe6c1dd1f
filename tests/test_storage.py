import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import cpr
from cpr.storage import (
    CheckpointStore,
    CorruptCheckpointError,
    SkippedSaveWarning,
    TableMeta,
    UnwritableDirectoryError,
    restore_rows,
    tensor_io,
)
from cpr.storage.lock import LOCK_FILE

REPO = Path(cpr.__file__).parents[1]  # the child process must import the same `cpr` as this test
ROWS, DIM = 10, 4
TABLES = {"t": TableMeta(ROWS, DIM, "float32")}


def full_tensors(step: int) -> dict[str, torch.Tensor]:
    """A full save whose every value is `step`, so the source of a composed row is visible."""
    return {
        "emb/t/weight": torch.full((ROWS, DIM), float(step)),
        "emb/t/opt/momentum": torch.full((ROWS,), float(step)),
        "dense/w": torch.full((3, 2), float(step)),
    }


def subset_tensors(step: int, ids: list[int]) -> dict[str, torch.Tensor]:
    k = len(ids)
    return {
        "emb/t/ids": torch.tensor(ids, dtype=torch.int64),
        "emb/t/weight": torch.full((k, DIM), float(step)),
        "emb/t/opt/momentum": torch.full((k,), float(step)),
    }


def save_full(store: CheckpointStore, step: int):
    return store.save(step, "full", "partial", full_tensors(step), tables=TABLES,
                      shards={"t": [(0, 5), (5, 10)]}, extra={"reader": step})


def save_subset(store: CheckpointStore, step: int, ids: list[int]):
    return store.save(step, "subset", "partial", subset_tensors(step, ids), tables=TABLES)


def entries(directory: Path) -> list[str]:
    """What a checkpoint directory holds besides its lock file."""
    return sorted(p.name for p in directory.iterdir() if p.name != LOCK_FILE)


def tensor_file(record, name: str) -> Path:
    store_manifest = json.loads((record.path / "manifest.json").read_text())
    (entry,) = [t for t in store_manifest["tensors"] if t["name"] == name]
    return record.path / entry["file"]


def test_full_save_round_trip_keeps_tensors_and_metadata(tmp_path):
    store = CheckpointStore(tmp_path)
    tensors = {
        **full_tensors(7),
        "dense/bf16": torch.randn(5, 3).to(torch.bfloat16),
        "dense/scalar": torch.tensor(3.5),
        "dense/mask": torch.tensor([True, False, True]),
        "dense/strided": torch.arange(12, dtype=torch.int32).reshape(3, 4).t(),
        "dense/empty": torch.zeros(0, 2),
    }
    record = store.save(7, "full", "full", tensors, tables=TABLES,
                        shards={"t": [(0, 5), (5, 10)]}, extra={"rng": [1, 2, 3], "reader": {"offset": 42}})
    assert record.path == tmp_path / "save-0000000007-full"
    assert record.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())

    (manifest,) = store.saves()
    assert (manifest.step, manifest.kind, manifest.policy) == (7, "full", "full")
    assert manifest.tables == TABLES
    assert manifest.shards == {"t": [(0, 5), (5, 10)]}
    assert manifest.extra == {"rng": [1, 2, 3], "reader": {"offset": 42}}
    loaded = store.load(manifest)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    assert store.load(record.path, names=["dense/w"]).keys() == {"dense/w"}


def test_subset_save_round_trip_and_layout_checks(tmp_path):
    store = CheckpointStore(tmp_path)
    save_subset(store, 3, [1, 4, 9])
    (manifest,) = store.saves("subset")
    loaded = store.load(manifest)
    assert loaded["emb/t/ids"].tolist() == [1, 4, 9]
    assert torch.equal(loaded["emb/t/weight"], torch.full((3, DIM), 3.0))

    with pytest.raises(ValueError, match="duplicate"):
        save_subset(store, 4, [1, 1])
    with pytest.raises(ValueError, match="out of range"):
        save_subset(store, 4, [ROWS])
    bad = subset_tensors(4, [1, 2])
    bad["emb/t/weight"] = torch.zeros(3, DIM)
    with pytest.raises(ValueError, match="emb/t/weight"):
        store.save(4, "subset", "partial", bad)
    with pytest.raises(ValueError, match="table 't' is 10x4"):
        store.save(4, "full", "full", {"emb/t/weight": torch.zeros(ROWS, DIM + 1)}, tables=TABLES)
    with pytest.raises(TypeError, match="JSON"):
        store.save(4, "full", "full", {}, extra={"x": object()})
    assert [m.step for m in store.saves()] == [3]


def test_composition_takes_the_newest_version_of_each_row(tmp_path):
    store = CheckpointStore(tmp_path)
    save_full(store, 10)
    save_subset(store, 20, [1, 3, 5])
    save_subset(store, 30, [3, 7, 9])

    rows = restore_rows(store, "t", (2, 8), ["momentum"])
    # rows 2..7: 3 and 7 from step 30 (30 overrides 20 for row 3), 5 from step 20, the rest from the full save
    expected = [10, 30, 10, 20, 10, 30]
    assert rows["saved_step"].dtype == torch.int64
    assert rows["saved_step"].tolist() == expected
    assert torch.equal(rows["weight"], torch.tensor(expected, dtype=torch.float32)[:, None].expand(6, DIM))
    assert rows["opt/momentum"].tolist() == expected


def test_composition_ignores_subsets_older_than_the_full_save(tmp_path):
    store = CheckpointStore(tmp_path)
    save_full(store, 10)
    save_subset(store, 15, [1, 2])
    save_full(store, 20)
    save_subset(store, 25, [2])
    assert restore_rows(store, "t", (0, 3))["saved_step"].tolist() == [20, 20, 25]


def test_composition_skips_a_corrupt_subset_and_warns(tmp_path):
    store = CheckpointStore(tmp_path)
    save_full(store, 10)
    save_subset(store, 20, [1, 3, 5])
    newest = save_subset(store, 30, [3, 7])
    path = tensor_file(newest, "emb/t/opt/momentum")
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))

    with pytest.warns(SkippedSaveWarning, match="save-0000000030-subset"):
        rows = restore_rows(store, "t", (0, ROWS), ["momentum"])
    # nothing of save 30 is used, not even its intact weight file
    assert rows["saved_step"].tolist() == [10, 20, 10, 20, 10, 20, 10, 10, 10, 10]
    assert rows["weight"][:, 0].tolist() == rows["saved_step"].float().tolist()


def test_retention_keeps_what_composition_needs(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    save_full(store, 0)
    save_subset(store, 5, [0])
    save_full(store, 10)
    save_subset(store, 15, [1])
    newest_full = save_full(store, 20)
    save_subset(store, 25, [2])
    assert [(m.step, m.kind) for m in store.saves()] == [(10, "full"), (15, "subset"), (20, "full"), (25, "subset")]
    assert entries(tmp_path) == sorted(m.folder.name for m in store.saves())

    tensor_file(newest_full, "emb/t/weight").write_bytes(b"")
    with pytest.warns(SkippedSaveWarning, match="save-0000000020-full"):
        rows = restore_rows(store, "t", (0, 4))
    # full 20 is unusable: full 10 plus the subsets after it (15 and 25) rebuild the rows
    assert rows["saved_step"].tolist() == [10, 15, 25, 10]


def test_flipped_byte_truncation_and_missing_file_are_detected(tmp_path):
    store = CheckpointStore(tmp_path)
    save_full(store, 1)
    for damage in ("flip", "truncate", "delete"):
        record = save_full(store, 2)
        path = tensor_file(record, "emb/t/weight")
        if damage == "flip":
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x01
            path.write_bytes(bytes(data))
        elif damage == "truncate":
            with open(path, "r+b") as f:
                f.truncate(path.stat().st_size - 3)
        else:
            path.unlink()
        with pytest.raises(CorruptCheckpointError) as error:
            store.load(record.path)
        assert record.path.name in str(error.value) and path.name in str(error.value), damage

        with pytest.warns(SkippedSaveWarning, match="save-0000000002-full"):
            good = store.latest_loadable("full")
        assert good.manifest.step == 1
        assert torch.equal(good.tensors["emb/t/weight"], full_tensors(1)["emb/t/weight"])


def test_bad_manifest_json_is_detected(tmp_path):
    store = CheckpointStore(tmp_path)
    save_full(store, 1)
    record = save_full(store, 2)
    (record.path / "manifest.json").write_text('{"step": 2, "kind": ')
    with pytest.raises(CorruptCheckpointError, match="manifest.json: invalid JSON"):
        store.load(record.path)
    with pytest.warns(SkippedSaveWarning, match="save-0000000002-full"):
        assert store.latest_loadable().manifest.step == 1


def test_no_loadable_save_is_an_error_and_no_save_is_none(tmp_path):
    store = CheckpointStore(tmp_path)
    assert store.latest_loadable() is None
    with pytest.raises(FileNotFoundError, match="no full save"):
        restore_rows(store, "t", (0, 1))
    record = save_full(store, 1)
    tensor_file(record, "dense/w").unlink()
    with pytest.warns(SkippedSaveWarning), pytest.raises(CorruptCheckpointError, match="no loadable save"):
        store.latest_loadable()


def test_unwritable_directory_fails_at_construction(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UnwritableDirectoryError, match=str(blocker / "ckpt")):
        CheckpointStore(blocker / "ckpt")


def test_failure_mid_save_removes_the_temp_folder_and_keeps_earlier_saves(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    save_full(store, 1)
    real_write, calls = tensor_io.write_tensor, []

    def disk_full_on_second_file(path, name, tensor):
        calls.append(name)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, name, tensor)

    monkeypatch.setattr(tensor_io, "write_tensor", disk_full_on_second_file)
    with pytest.raises(OSError, match="No space left") as error:
        save_full(store, 2)
    assert any("step 2" in note and "untouched" in note for note in error.value.__notes__)
    assert entries(tmp_path) == ["save-0000000001-full"]
    assert store.latest_loadable().manifest.step == 1


def test_resaving_a_step_replaces_it_and_discard_after_removes_newer_saves(tmp_path):
    store = CheckpointStore(tmp_path)
    save_full(store, 1)
    save_full(store, 2)
    store.save(2, "full", "full", {"dense/w": torch.ones(2)})
    assert store.load(store.saves()[-1]).keys() == {"dense/w"}
    save_subset(store, 3, [0])
    assert [p.name for p in store.discard_after(1)] == ["save-0000000002-full", "save-0000000003-subset"]
    assert [m.step for m in store.saves()] == [1]


CHILD = textwrap.dedent("""
    import sys, time
    import torch
    from cpr.storage import CheckpointStore, tensor_io

    store = CheckpointStore(sys.argv[1])
    big = {"emb/t/weight": torch.arange(1 << 18, dtype=torch.float32).reshape(-1, 64), "dense/w": torch.ones(8)}
    store.save(1, "full", "full", big)
    real_write = tensor_io.write_tensor

    def write_then_stall(path, name, tensor):
        entry = real_write(path, name, tensor)
        print("mid-save", flush=True)  # the parent kills us here: one file written, no manifest yet
        time.sleep(60)
        return entry

    tensor_io.write_tensor = write_then_stall
    store.save(2, "full", "full", {name: t + 1 for name, t in big.items()})
""")


def kill_mid_save(script: str, *args: str) -> int:
    """Run `script` in a child process, SIGKILL it once it prints "mid-save"; its exit status."""
    with subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO, stdout=subprocess.PIPE,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}) as child:
        try:
            if child.stdout.readline().strip() != "mid-save":
                raise RuntimeError("the child did not reach the middle of its save")
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.kill()
            child.wait(timeout=30)
    return child.returncode


def test_sigkill_during_a_save_leaves_the_previous_save_loadable(tmp_path):
    assert kill_mid_save(CHILD, str(tmp_path)) == -signal.SIGKILL
    assert any(p.name.startswith(".tmp-save-0000000002-full") for p in tmp_path.iterdir())

    store = CheckpointStore(tmp_path)
    loaded = store.latest_loadable()
    assert loaded.manifest.step == 1
    assert torch.equal(loaded.tensors["emb/t/weight"], torch.arange(1 << 18, dtype=torch.float32).reshape(-1, 64))
    save_full(store, 3)
    assert entries(tmp_path) == ["save-0000000001-full", "save-0000000003-full"]


def test_composing_good_saves_warns_nothing(tmp_path):
    store = CheckpointStore(tmp_path)
    save_full(store, 1)
    save_subset(store, 2, [4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert restore_rows(store, "t", (4, 5))["saved_step"].tolist() == [2]
