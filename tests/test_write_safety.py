"""Writes never go outside the folder and a folder has one writer (issue 23.3): every file CPR writes is
opened without following links and only if it is a regular file; a run whose lock no longer guards its folder
(deleted and re-created under it) abandons its commits and says so."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from cpr.errors import LostLockError, UnsafePathError, UnwritableDirectoryError
from cpr.storage import CheckpointStore, location
from cpr.train import main
from tests.stores import HookedStore
from tests.test_storage import entries, save_full
from tests.test_train import SMALL


def _plant(path: Path, kind: str, outside: Path) -> None:
    if kind == "symlink":
        outside.write_text("precious")
        path.symlink_to(outside)
    elif kind == "dangling":
        path.symlink_to(outside)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()


KINDS = ["symlink", "dangling", "fifo", "folder"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_planted_lock_file_is_refused_with_one_line(tmp_path, kind):
    directory, outside = tmp_path / "ckpt", tmp_path / "outside.txt"
    directory.mkdir()
    _plant(directory / ".lock", kind, outside)
    with pytest.raises(UnwritableDirectoryError) as error:
        CheckpointStore(directory)
    message = str(error.value)
    assert "\n" not in message and "cannot be locked" in message and ".lock is " in message
    assert outside.read_text() == "precious" if kind == "symlink" else not outside.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_no_file_is_written_through_a_link_or_into_a_fifo(tmp_path, kind):
    path, outside = tmp_path / "manifest.json", tmp_path / "outside.txt"
    _plant(path, kind, outside)
    with pytest.raises(UnsafePathError, match="manifest.json is a"):
        location.create(path)  # a FIFO without a reader does not block the open
    with pytest.raises(UnsafePathError):
        location.create(path, append=True)
    assert outside.read_text() == "precious" if kind == "symlink" else not outside.exists()


def test_a_fifo_with_a_reader_is_refused_too(tmp_path):
    path = tmp_path / "tensors.bin"
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a reader: opening the FIFO to write would succeed
    try:
        with pytest.raises(UnsafePathError, match="tensors.bin is a FIFO"):
            location.create(path)
    finally:
        os.close(reader)


def test_a_store_that_lost_its_lock_commits_nothing(tmp_path):
    directory = tmp_path / "ckpt"
    store = CheckpointStore(directory)
    save_full(store, 1)
    shutil.rmtree(directory)  # deleted and re-created under the live store; another run takes it
    directory.mkdir()
    other = CheckpointStore(directory)
    save_full(other, 5)
    with pytest.raises(LostLockError, match=r"lost the lock .*is another file now.*step-2 full save is abandoned"):
        save_full(store, 2)
    assert entries(directory) == ["save-0000000005-full"]  # nothing of the first run's in the other's folder
    other.close()
    (directory / ".lock").unlink()
    with pytest.raises(LostLockError, match=r"\.lock is gone"):
        save_full(store, 3)
    store.close()


def test_a_run_whose_folder_is_recreated_abandons_its_saves_and_says_so(tmp_path, capsys):
    out, directory = tmp_path / "run", tmp_path / "ckpt"
    taken = []

    def recreate_at_step_2(staging, step, kind):
        if step == 2 and not taken:
            directory.rename(tmp_path / "ckpt-deleted")
            directory.mkdir()
            taken.append(CheckpointStore(directory))  # another run holds the new folder

    def store(path, keep_last, lock):
        return HookedStore(path, keep_last=keep_last, lock=lock, before_commit=recreate_at_step_2)

    code = main([*SMALL, "--synthetic-rows", "4000", "--policy", "full", "--failures", "0", "--interval-steps", "2",
                 "--sync-save", "--steps", "5", "--out", str(out), "--checkpoint-dir", str(directory)], make_store=store)
    assert code == 0  # training went on
    err = capsys.readouterr().err
    assert "the step-2 full save failed and was abandoned" in err and "lost the lock" in err
    assert "the step-4 full save failed and was abandoned" in err
    assert entries(directory) == []  # the other run's folder holds nothing of this run's
    taken[0].close()
