"""No good save is ever deleted (issue 23.2): only retention deletes, and it counts only saves verified
loadable; a failed read is retried once; a fallback sets aside (never deletes) what it skipped; a resume
that finds nothing loadable says so (exit 2) unless told to start fresh."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from cpr.errors import CorruptCheckpointError, ReadRetryWarning, SkippedSaveWarning
from cpr.storage import CheckpointStore, SaveInfo
from cpr.train import main
from tests.stores import HookedStore, eio_reads
from tests.test_storage import entries, full_parts, save_full
from tests.test_train import SMALL


def test_a_transient_eio_is_retried_once_and_reported(tmp_path):
    store = HookedStore(tmp_path, before_read=eio_reads((1, "domain-00000")))
    save_full(store, 1)
    (save,) = store.saves()
    with pytest.warns(ReadRetryWarning, match="domain-00000.*Input/output error.*retrying once"):
        loaded = store.load_part(save, "domain-00000")
    assert torch.equal(loaded.tensors["emb/t/weight"], full_parts(1)["domain-00000"].tensors["emb/t/weight"])

    store.before_read = eio_reads((1, "dense"), times=2)
    with pytest.warns(ReadRetryWarning), pytest.raises(CorruptCheckpointError, match="dense.*unreadable, twice"):
        store.load_part(save, "dense")


def test_a_missing_file_is_not_retried(tmp_path):
    store = CheckpointStore(tmp_path)
    record = save_full(store, 1)
    (record.path / "dense" / "tensors.bin").unlink()
    with warnings.catch_warnings(record=True) as caught, pytest.raises(CorruptCheckpointError, match="missing"):
        warnings.simplefilter("always")
        store.load_part(store.saves()[0], "dense")
    assert not [w for w in caught if issubclass(w.category, ReadRetryWarning)]


def _unreadable_commit(folder: Path, how: str) -> None:
    path = folder / "commit.json"
    if how == "damaged":
        path.write_text(path.read_text()[:-20])
    else:  # another COMMIT_VERSION (its checksum recomputed: a well-formed record of another format)
        data = json.loads(path.read_text())
        data["format_version"] = 99
        path.write_text(json.dumps(data))


@pytest.mark.parametrize("how", ["damaged", "version"])
def test_unreadable_old_folders_never_make_retention_delete_new_saves(tmp_path, how):
    old = CheckpointStore(tmp_path, keep_last=3)
    for step in (100, 200, 300):
        save_full(old, step)
    old.close()
    for folder in tmp_path.glob("save-*"):
        _unreadable_commit(folder, how)

    store = CheckpointStore(tmp_path, keep_last=2)
    with pytest.warns(SkippedSaveWarning):
        for step in (1, 2, 3):
            save_full(store, step)
        assert [s.step for s in store.saves()] == [2, 3]  # keep_last verified saves, the newest
    # the unreadable folders are newer than every kept save: not superseded, not deleted
    assert entries(tmp_path) == ["save-0000000002-full", "save-0000000003-full", "save-0000000100-full",
                                 "save-0000000200-full", "save-0000000300-full"]
    store.close()


def test_retention_deletes_old_unverified_folders_only_once_superseded(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    for step in (1, 2):
        save_full(store, step)
    store.close()
    store = CheckpointStore(tmp_path, keep_last=2)  # saves 1 and 2 were never read by this store
    save_full(store, 3)
    assert [s.step for s in store.saves()] == [1, 2, 3]  # one verified full save: nothing older goes yet
    save_full(store, 4)
    assert [s.step for s in store.saves()] == [3, 4]
    store.close()


def test_a_replaced_save_is_set_aside_then_removed_by_retention(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    save_full(store, 1)
    with pytest.warns(SkippedSaveWarning, match="set aside save-0000000001-full"):
        save_full(store, 1)
    assert [p.startswith("aside-save-0000000001-full-") for p in entries(tmp_path)] == [True, False]
    save_full(store, 2)
    save_full(store, 3)
    assert entries(tmp_path) == ["save-0000000002-full", "save-0000000003-full"]
    store.close()


RUN = [*SMALL, "--synthetic-rows", "4000", "--policy", "full", "--failures", "0", "--interval-steps", "2",
       "--sync-save"]


def _cli(out: Path, steps: int, *extra: str, make_store=None) -> int:
    return main([*RUN, "--steps", str(steps), "--out", str(out), *extra], make_store=make_store)


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_resume_retries_an_eio_and_a_fallback_sets_aside_what_it_skipped(tmp_path):
    first = tmp_path / "first"
    assert _cli(first, 7) == 0
    assert entries(first / "checkpoints")[-1] == "save-0000000006-full"
    for eio_reads_of_newest in (1, 2):
        out = tmp_path / f"eio-{eio_reads_of_newest}"
        shutil.copytree(first, out)
        directory = out / "checkpoints"

        def store(path, keep_last, lock, times=eio_reads_of_newest):
            return HookedStore(path, keep_last=keep_last, lock=lock,
                               before_read=eio_reads((6, "domain-00000"), times=times))

        with pytest.warns(ReadRetryWarning, match="save-0000000006-full"):
            assert _cli(out, 9, "--resume", make_store=store) == 0
        executed = _summary(out)["steps_executed"]
        aside = [name for name in entries(directory) if name.startswith("aside-")]
        if eio_reads_of_newest == 1:  # the retry read it: resumed from the newest save
            assert (executed, aside) == (3, [])
            continue
        # unreadable twice: resumed from the one before, and the skipped save is kept, set aside
        assert executed == 5
        assert [name.rsplit("-", 1)[0] for name in aside] == ["aside-save-0000000006-full"]
        skipped = SaveInfo.read(directory / aside[0])  # intact: every part still loads and verifies
        reader = CheckpointStore(directory, lock=False)
        assert all(reader.load_part(skipped, part).tensors for part in skipped.parts)
        assert [s.step for s in reader.saves()] == [4, 6, 8]  # (6 and 8 written again by the resumed run)


def test_resume_without_a_loadable_save_exits_2_saying_what_it_found(tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli(out, 9, "--keep-last", "5") == 0  # saves at steps 0, 2, 4, 6, 8
    directory = out / "checkpoints"
    for folder in directory.glob("save-*"):
        _unreadable_commit(folder, "version")
    capsys.readouterr()

    assert _cli(out, 9, "--resume") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]  # (and a warning a save)
    assert len(err) == 1 and "holds no loadable full save" in err[0] and "5 unreadable" in err[0]
    assert "format_version 99 is not supported" in err[0] and "--start-fresh" in err[0]
    assert len(entries(directory)) == 5  # nothing deleted

    # Started fresh: the unreadable saves are set aside, and only those its own verified saves supersede go.
    assert _cli(out, 5, "--resume", "--start-fresh", "--keep-last", "2") == 0
    assert _summary(out)["steps_executed"] == 5
    names = entries(directory)
    assert [name.rsplit("-", 1)[0] for name in names if name.startswith("aside-")] == [
        f"aside-save-000000000{step}-full" for step in (2, 4, 6, 8)]
    assert [name for name in names if name.startswith("save-")] == ["save-0000000002-full", "save-0000000004-full"]


def test_resume_into_an_empty_folder_or_a_new_run_over_unreadable_saves_exit_2_unless_told(tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli(out, 2, "--resume") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no loadable full save (no save folders)" in err[0]
    assert _cli(out, 2, "--resume", "--start-fresh") == 0
    assert _summary(out)["steps_executed"] == 2

    for folder in (out / "checkpoints").glob("save-*"):
        _unreadable_commit(folder, "damaged")
    capsys.readouterr()
    assert _cli(out, 2) == 2  # unreadable saves are an earlier run's too
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "holds saves of an earlier run (0 readable save(s), 1 unreadable: save-0000000000-full" in err[0]
