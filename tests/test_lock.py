"""One writer per checkpoint folder: a lock naming its holder, released when the holder dies, and a run
that removes only its own or dead runs' temporary folders."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from cpr.storage import CheckpointStore, DirectoryLockedError
from cpr.storage.lock import DirectoryLock, live_holder, writer_tag
from cpr.train import main
from tests.test_storage import REPO, entries, save_full
from tests.test_train import SMALL

HOLDER = textwrap.dedent("""
    import sys, time
    from cpr.storage import CheckpointStore
    store = CheckpointStore(sys.argv[1])
    print("locked", flush=True)
    time.sleep(120)
""")


@pytest.fixture
def holder(tmp_path):
    """A live process holding the lock of tmp_path/ckpt: (the process, the folder, its token)."""
    directory = tmp_path / "ckpt"
    with subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], cwd=REPO,
                          stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}) as child:
        try:
            assert child.stdout.readline().strip() == "locked"
            token = live_holder(directory).token
            yield child, directory, token
        finally:
            child.kill()
            child.wait(timeout=30)


def test_a_second_store_stops_at_once_naming_the_holder(holder):
    child, directory, _ = holder
    with pytest.raises(DirectoryLockedError) as error:
        CheckpointStore(directory)
    assert f"pid {child.pid} on host" in str(error.value) and str(directory) in str(error.value)


def test_a_killed_holder_does_not_block_the_next_run(holder):
    child, directory, token = holder
    (directory / f".tmp-save-0000000009-full-{token}-{child.pid}-0123abcd").mkdir()  # its save in progress
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert live_holder(directory) is None
    store = CheckpointStore(directory)
    save_full(store, 1)
    # the dead writer's leftover folder is gone, the lock file stays
    assert entries(directory) == ["save-0000000001-full"]


def test_a_store_without_the_lock_keeps_a_live_writers_temporary_folder(holder):
    child, directory, token = holder
    live = directory / f".tmp-save-0000000009-full-{token}-{child.pid}-0123abcd"
    live.mkdir()
    store = CheckpointStore(directory, lock=False)  # another writer of the holder's job
    assert store.token == token
    save_full(store, 1)
    names = entries(directory)
    assert live.name in names and "save-0000000001-full" in names


def test_leftovers_of_a_dead_run_are_removed_and_close_releases(tmp_path):
    store = CheckpointStore(tmp_path)
    left = tmp_path / f".tmp-save-0000000005-full-{writer_tag(store.token)}"
    left.mkdir()
    save_full(store, 1)
    with pytest.raises(DirectoryLockedError, match=f"pid {os.getpid()}"):
        CheckpointStore(tmp_path)  # a live store of this process holds it
    store.close()
    assert live_holder(tmp_path) is None
    CheckpointStore(tmp_path).close()  # the next run removes what the ended one left
    assert entries(tmp_path) == ["save-0000000001-full"]


def test_an_unreachable_store_does_not_block_the_next_one(tmp_path):
    store = CheckpointStore(tmp_path)
    store.cycle = store  # only the cyclic garbage collector can free it
    del store
    CheckpointStore(tmp_path)


def test_lock_records_the_holder(tmp_path):
    lock = DirectoryLock.acquire(tmp_path)
    holder = live_holder(tmp_path)
    assert (holder.pid, holder.token) == (os.getpid(), lock.token)
    lock.release()


def test_cli_second_run_exits_2_with_one_line(holder, tmp_path, capsys):
    child, directory, _ = holder
    code = main([*SMALL, "--synthetic-rows", "2000", "--steps", "2", "--policy", "full", "--failures", "0",
                 "--checkpoint-dir", str(directory), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "is in use by another run" in err and f"pid {child.pid}" in err
