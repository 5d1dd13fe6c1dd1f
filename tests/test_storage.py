"""The multi-part checkpoint store: commit records, parts, row composition, corruption and crash safety.

The saves here have two failure domains of one 10-row table `t`: domain 0 holds rows [0, 5), domain 1
rows [5, 10); every value in a save is its step, so the source of a composed row is visible.
"""
import errno
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
    CheckpointMismatchError,
    CheckpointStore,
    CorruptCheckpointError,
    PartContent,
    SkippedSaveWarning,
    TableMeta,
    UnwritableDirectoryError,
    load_newest,
    restore_domain,
    tensor_io,
)

REPO = Path(cpr.__file__).parents[1]  # the child process must import the same `cpr` as this test
ROWS, DIM = 10, 4
DOMAINS = {"domain-00000": (0, 5), "domain-00001": (5, 10)}


def meta(rows: int) -> dict[str, TableMeta]:
    return {"t": TableMeta(rows, DIM, "float32")}


def full_parts(step: int) -> dict[str, PartContent]:
    parts = {
        name: PartContent(
            {"emb/t/weight": torch.full((end - start, DIM), float(step)),
             "emb/t/opt/momentum": torch.full((end - start,), float(step))},
            meta(end - start), {"t": (start, end)})
        for name, (start, end) in DOMAINS.items()
    }
    parts["dense"] = PartContent({"dense/w": torch.full((3, 2), float(step))})
    return parts


def subset_parts(step: int, ids: list[int]) -> dict[str, PartContent]:
    """A subset save of global rows `ids`, split over the domains that hold them."""
    parts = {}
    for name, (start, end) in DOMAINS.items():
        own = [i - start for i in ids if start <= i < end]
        if own:
            parts[name] = PartContent(
                {"emb/t/ids": torch.tensor(own, dtype=torch.int64),
                 "emb/t/weight": torch.full((len(own), DIM), float(step)),
                 "emb/t/opt/momentum": torch.full((len(own),), float(step))},
                meta(end - start), {"t": (start, end)})
    return parts


def save_full(store: CheckpointStore, step: int):
    return store.save(step, "full", "partial", full_parts(step), extra={"reader": step}, num_domains=2)


def save_subset(store: CheckpointStore, step: int, ids: list[int]):
    return store.save(step, "subset", "partial", subset_parts(step, ids), num_domains=2)


def restore(store: CheckpointStore, part: str = "domain-00000") -> dict[str, torch.Tensor]:
    """Domain `part`'s newest rows of `t`, as `weight`, `opt/momentum` and `saved_step`."""
    restored = restore_domain(store, store.saves(), part, {"t": DOMAINS[part]}, {"t": ["momentum"]})
    return {**restored.rows["t"], "saved_step": restored.saved_step["t"]}


def entries(directory: Path) -> list[str]:
    """What a checkpoint folder holds besides its lock file and retired saves, sorted (a retired save is
    renamed `.trash-...` at once and deleted by the store's background thread, some time later)."""
    return sorted(p.name for p in directory.iterdir() if p.name != ".lock" and not p.name.startswith(".trash-"))


def tensor_file(record, part: str, name: str) -> Path:
    store = CheckpointStore(record.path.parent, lock=False)
    (save,) = [s for s in store.saves() if s.folder == record.path]
    manifest = store.load_part(save, part).manifest
    return manifest.folder / manifest.entry(name).file


def test_full_save_round_trip_keeps_tensors_and_metadata(tmp_path):
    store = CheckpointStore(tmp_path)
    dense = {
        "dense/w": torch.full((3, 2), 7.0),
        "dense/bf16": torch.randn(5, 3).to(torch.bfloat16),
        "dense/scalar": torch.tensor(3.5),
        "dense/mask": torch.tensor([True, False, True]),
        "dense/strided": torch.arange(12, dtype=torch.int32).reshape(3, 4).t(),
        "dense/empty": torch.zeros(0, 2),
    }
    parts = {**full_parts(7), "dense": PartContent(dense)}
    record = store.save(7, "full", "full", parts, extra={"rng": [1, 2, 3], "reader": {"offset": 42}},
                        world_size=1, domain_mode="virtual", num_domains=2)
    assert record.path == tmp_path / "save-0000000007-full"
    # Each tensor of a full save is a torch.save serialization of it (a DCP checkpoint): its bytes and a frame.
    assert record.nbytes == sum((record.path / part / "tensors.bin").stat().st_size for part in parts)
    assert record.nbytes > sum(t.numel() * t.element_size() for p in parts.values() for t in p.tensors.values())

    (save,) = store.saves()
    assert (save.step, save.kind, save.policy, save.num_domains) == (7, "full", "full", 2)
    assert set(save.parts) == {"domain-00000", "domain-00001", "dense"}
    assert save.extra == {"rng": [1, 2, 3], "reader": {"offset": 42}}
    domain = store.load_part(save, "domain-00001")
    assert domain.manifest.tables == meta(5) and domain.manifest.shards == {"t": [(5, 10)]}
    loaded = store.load_part(save, "dense").tensors
    assert loaded.keys() == dense.keys()
    for name, tensor in dense.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    assert store.load_part(save, "dense", names=["dense/w"]).tensors.keys() == {"dense/w"}


def test_subset_save_round_trip_and_layout_checks(tmp_path):
    store = CheckpointStore(tmp_path)
    save_subset(store, 3, [1, 4, 9])
    (save,) = store.saves("subset")
    assert set(save.parts) == {"domain-00000", "domain-00001"}
    assert store.load_part(save, "domain-00000").tensors["emb/t/ids"].tolist() == [1, 4]
    loaded = store.load_part(save, "domain-00001").tensors
    assert loaded["emb/t/ids"].tolist() == [4]  # row 9 is row 4 of domain 1
    assert torch.equal(loaded["emb/t/weight"], torch.full((1, DIM), 3.0))

    with pytest.raises(ValueError, match="duplicate"):
        save_subset(store, 4, [1, 1])
    with pytest.raises(ValueError, match="out of range"):
        store.save(4, "subset", "partial", {"domain-00000": PartContent(
            {"emb/t/ids": torch.tensor([5]), "emb/t/weight": torch.zeros(1, DIM)}, meta(5), {"t": (0, 5)})})
    bad = subset_parts(4, [1, 2])
    bad["domain-00000"].tensors["emb/t/weight"] = torch.zeros(3, DIM)
    with pytest.raises(ValueError, match="emb/t/weight"):
        store.save(4, "subset", "partial", bad)
    with pytest.raises(ValueError, match="table 't' is 5x4"):
        store.save(4, "full", "full", {"domain-00000": PartContent(
            {"emb/t/weight": torch.zeros(5, DIM + 1)}, meta(5), {"t": (0, 5)})})
    with pytest.raises(ValueError, match="do not span"):
        store.save(4, "full", "full", {"domain-00000": PartContent(
            {"emb/t/weight": torch.zeros(5, DIM)}, meta(5), {"t": (0, 6)})})
    with pytest.raises(TypeError, match="JSON"):
        store.save(4, "full", "full", {}, extra={"x": object()})
    assert [s.step for s in store.saves()] == [3]
    assert entries(tmp_path) == ["save-0000000003-subset"]


def test_composition_takes_the_newest_version_of_each_row(tmp_path):
    store = CheckpointStore(tmp_path)
    save_full(store, 10)
    save_subset(store, 20, [1, 3, 5])
    save_subset(store, 30, [3, 7, 9])

    rows = restore(store, "domain-00000")
    # rows 0..4: 3 from step 30 (30 overrides 20), 1 from step 20, the rest from the full save
    expected = [10, 20, 10, 30, 10]
    assert rows["saved_step"].dtype == torch.int64
    assert rows["saved_step"].tolist() == expected
    assert torch.equal(rows["weight"], torch.tensor(expected, dtype=torch.float32)[:, None].expand(5, DIM))
    assert rows["opt/momentum"].tolist() == expected
    assert restore(store, "domain-00001")["saved_step"].tolist() == [20, 10, 30, 10, 30]


def test_a_domain_restore_reads_only_that_domains_bytes(tmp_path):
    store = CheckpointStore(tmp_path)
    save_full(store, 10)
    save_subset(store, 20, [7])
    restored = restore_domain(store, store.saves(), "domain-00000", {"t": (0, 5)}, {"t": ["momentum"]})
    own = store.saves()[0].parts["domain-00000"].nbytes  # rows and momentum of domain 0, as stored
    assert own <= restored.bytes_read <= 1.2 * own + 1024  # plus the part's manifest, nothing of domain 1
    with pytest.raises(CheckpointMismatchError, match="another sharding plan"):
        restore_domain(store, store.saves(), "domain-00000", {"t": (0, 4)}, {"t": []})


def test_rows_by_global_range_span_parts_and_take_the_newest_version(tmp_path):
    """The reshard reader: global rows 3..8 cross both domains' parts; later subsets override row by row."""
    from cpr.storage.reshard import read_global_rows

    store = CheckpointStore(tmp_path)
    save_full(store, 10)
    save_subset(store, 20, [1, 3, 5])
    save_subset(store, 30, [3, 7, 9])
    full, *subsets = store.saves()
    got = read_global_rows(store, full, subsets, {"t": (3, 8)}, {"t": ["momentum"]})
    expected = [30, 10, 20, 10, 30]
    assert got.saved_step["t"].tolist() == expected
    assert torch.equal(got.tensors["emb/t/weight"], torch.tensor(expected, dtype=torch.float32)[:, None].expand(5, DIM))
    assert got.tensors["emb/t/opt/momentum"].tolist() == expected
    with pytest.raises(CheckpointMismatchError, match="other rows"):
        read_global_rows(store, full, (), {"t": (3, 12)}, {"t": []})
    with pytest.raises(CheckpointMismatchError, match="another embedding optimizer"):
        read_global_rows(store, full, (), {"t": (0, 2)}, {"t": ["momentum2"]})


def test_composition_ignores_subsets_older_than_the_full_save(tmp_path):
    store = CheckpointStore(tmp_path)
    save_full(store, 10)
    save_subset(store, 15, [1, 2])
    save_full(store, 20)
    save_subset(store, 25, [2])
    assert restore(store)["saved_step"].tolist()[:3] == [20, 20, 25]


def test_composition_skips_a_corrupt_subset_and_warns(tmp_path):
    store = CheckpointStore(tmp_path)
    save_full(store, 10)
    save_subset(store, 20, [1, 3])
    newest = save_subset(store, 30, [3, 4])
    path = tensor_file(newest, "domain-00000", "emb/t/opt/momentum")
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))

    with pytest.warns(SkippedSaveWarning, match="save-0000000030-subset"):
        rows = restore(store)
    # nothing of save 30 is used, not even its intact weight file
    assert rows["saved_step"].tolist() == [10, 20, 10, 20, 10]
    assert rows["weight"][:, 0].tolist() == rows["saved_step"].float().tolist()


def test_retention_keeps_what_composition_needs(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    save_full(store, 0)
    save_subset(store, 5, [0])
    save_full(store, 10)
    save_subset(store, 15, [1])
    newest_full = save_full(store, 20)
    save_subset(store, 25, [2])
    assert [(s.step, s.kind) for s in store.saves()] == [(10, "full"), (15, "subset"), (20, "full"), (25, "subset")]
    assert entries(tmp_path) == sorted(s.folder.name for s in store.saves())
    store.close()  # waits for the retired saves to be deleted
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".trash-")]
    store = CheckpointStore(tmp_path, keep_last=2)

    tensor_file(newest_full, "domain-00000", "emb/t/weight").write_bytes(b"")
    with pytest.warns(SkippedSaveWarning, match="save-0000000020-full"):
        rows = restore(store)
    # full 20 is unusable: full 10 plus the subsets after it (15 and 25) rebuild the rows
    assert rows["saved_step"].tolist()[:4] == [10, 15, 25, 10]


def test_flipped_byte_truncation_missing_file_and_tampered_manifest_are_detected(tmp_path):
    store = CheckpointStore(tmp_path)
    save_full(store, 1)
    for damage in ("flip", "truncate", "delete", "manifest", "commit"):
        # every value of domain 0's weight is 2.0 in the new save and 1.0 in the old
        record = save_full(store, 2)
        path = tensor_file(record, "domain-00000", "emb/t/weight")
        if damage == "flip":
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x01
            path.write_bytes(bytes(data))
        elif damage == "truncate":
            with open(path, "r+b") as f:
                f.truncate(path.stat().st_size - 3)
        elif damage == "delete":
            path.unlink()
        elif damage == "manifest":  # a valid manifest that is not the one the commit record names
            manifest = path.parent / "manifest.json"
            manifest.write_text(manifest.read_text().replace('"policy":"partial"', '"policy":"partiaL"'))
        else:
            (record.path / "commit.json").write_text('{"step": 2, "kind": ')
        with pytest.warns(SkippedSaveWarning, match="save-0000000002-full"):
            save, loaded = load_newest(store, store.saves(), "domain-00000")
        assert save.step == 1, damage
        assert torch.equal(loaded.tensors["emb/t/weight"], torch.full((5, DIM), 1.0))


def test_no_loadable_save_is_an_error_and_no_save_is_not_found(tmp_path):
    store = CheckpointStore(tmp_path)
    with pytest.raises(FileNotFoundError, match="no full save"):
        load_newest(store, store.saves(), "domain-00000")
    record = save_full(store, 1)
    tensor_file(record, "domain-00000", "emb/t/weight").unlink()
    with pytest.warns(SkippedSaveWarning), pytest.raises(CorruptCheckpointError, match="no loadable domain-00000"):
        load_newest(store, store.saves(), "domain-00000")


def test_unwritable_directory_fails_at_construction(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UnwritableDirectoryError, match=str(blocker / "ckpt")):
        CheckpointStore(blocker / "ckpt")


def test_failure_mid_save_removes_the_staging_folder_and_keeps_earlier_saves(tmp_path):
    class DiskFullOnSecondPart(CheckpointStore):
        calls = 0

        def write_tensors(self, path, content, torch_save):
            self.calls += 1
            if self.calls == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write_tensors(path, content, torch_save)

    store = CheckpointStore(tmp_path)
    save_full(store, 1)
    store.close()
    store = DiskFullOnSecondPart(tmp_path)
    with pytest.raises(OSError, match="No space left") as error:
        save_full(store, 2)
    assert any("step-2" in note and "untouched" in note for note in error.value.__notes__)
    assert entries(tmp_path) == ["save-0000000001-full"]
    assert [s.step for s in store.saves()] == [1]


def test_resaving_a_step_replaces_it_and_discard_after_removes_newer_saves(tmp_path):
    store = CheckpointStore(tmp_path)
    save_full(store, 1)
    save_full(store, 2)
    store.save(2, "full", "full", {"dense": PartContent({"dense/w": torch.ones(2)})})
    assert set(store.saves()[-1].parts) == {"dense"}
    save_subset(store, 3, [0])
    # the replaced save was set aside (see retention.py); discard_after, the user's request, deletes it too
    assert [p.name.removesuffix(p.name[-9:]) if p.name.startswith("aside-") else p.name for p in store.discard_after(1)] \
        == ["save-0000000002-full", "aside-save-0000000002-full", "save-0000000003-subset"]
    assert [s.step for s in store.saves()] == [1]


CHILD = textwrap.dedent("""
    import sys, time
    import torch
    from cpr.storage import CheckpointStore, PartContent, tensor_io

    store = CheckpointStore(sys.argv[1])
    big = {"dense/w": torch.arange(1 << 18, dtype=torch.float32).reshape(-1, 64), "dense/v": torch.ones(8)}
    store.save(1, "full", "full", {"dense": PartContent(big)})
    real_write = tensor_io.write_tensors

    def write_then_stall(path, tensors, *args, **kwargs):
        entries = real_write(path, tensors, *args, **kwargs)
        print("mid-save", flush=True)  # the parent kills us here: tensors written, no commit record yet
        time.sleep(60)
        return entries

    tensor_io.write_tensors = write_then_stall
    store.save(2, "full", "full", {"dense": PartContent({name: t + 1 for name, t in big.items()})})
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
    (save,) = store.saves()
    assert save.step == 1
    loaded = store.load_part(save, "dense").tensors
    assert torch.equal(loaded["dense/w"], torch.arange(1 << 18, dtype=torch.float32).reshape(-1, 64))
    save_full(store, 3)
    assert entries(tmp_path) == ["save-0000000001-full", "save-0000000003-full"]


def test_composing_good_saves_warns_nothing(tmp_path):
    store = CheckpointStore(tmp_path)
    save_full(store, 1)
    save_subset(store, 2, [4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert restore(store)["saved_step"].tolist() == [1, 1, 1, 1, 2]


def test_a_forked_child_writes_full_saves_with_its_own_checksum_thread(tmp_path):
    """Large records have their crc32 computed on a helper thread; a child forked after the parent wrote one
    (and so started that thread) must not hand work to the parent's thread, which it does not have."""
    import time

    from cpr.storage import tensor_io

    big = {"w": torch.arange(1 << 19, dtype=torch.float32)}  # 2 MiB: above the overlapped-crc32 size
    parent = tensor_io.write_tensors(tmp_path / "parent.bin", big, torch_save=True)
    pid = os.fork()
    if pid == 0:
        child = tensor_io.write_tensors(tmp_path / "child.bin", big, torch_save=True)
        os._exit(0 if child[0].checksum == parent[0].checksum else 1)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert done[0] == pid and os.waitstatus_to_exitcode(done[1]) == 0


@pytest.mark.parametrize("torch_save", [False, True])
def test_large_records_start_their_writeback_and_read_back_unchanged(tmp_path, monkeypatch, torch_save):
    """A large record asks the disk to start writing it (sync_file_range) before the part's fsync; what is
    read back is what was written. On Linux the call must be found, or saves silently lose the overlap."""
    from cpr.storage import location

    if sys.platform == "linux":
        assert location.sync_file_range() is not None
    calls = []
    monkeypatch.setattr(location, "sync_file_range", lambda: lambda fd, offset, nbytes, flags: calls.append(flags))
    tensors = {"big": torch.arange(1 << 19, dtype=torch.float32), "small": torch.arange(8, dtype=torch.int64)}
    entries = tensor_io.write_tensors(tmp_path / "tensors.bin", tensors, torch_save=torch_save)
    assert calls == [location.SYNC_FILE_RANGE_WRITE]  # the large record only
    size = sum(entry.nbytes for entry in entries)
    assert (tmp_path / "tensors.bin").stat().st_size == size
    for entry in entries:
        assert torch.equal(tensor_io.read_tensor(tmp_path, entry, size), tensors[entry.name])
