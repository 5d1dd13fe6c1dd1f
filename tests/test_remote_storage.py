"""Checkpoint locations given as fsspec URLs: `memory://` (fsspec's in-memory filesystem) goes through fsspec,
`file://` takes the local fast path; saves, commits, loads, retention and corruption fallback work on both,
and DCP reads the full saves through its FsspecReader."""
from __future__ import annotations

import uuid
import warnings
from pathlib import Path

import fsspec
import pytest
import torch
import torch.distributed.checkpoint as dcp

from cpr import CPRCheckpointer
from cpr.storage import CheckpointStore, SkippedSaveWarning
from cpr.storage.location import RemoteFolder
from tests.test_checkpointer import make_batch, snapshot, train_step
from tests.test_dcp_format import fresh_dmp, plain
from tests.test_storage import restore, save_full, save_subset


@pytest.fixture
def memory_url():
    """A fresh folder of fsspec's process-wide in-memory filesystem, removed afterwards."""
    path = f"/cpr-test-{uuid.uuid4().hex[:8]}"
    yield f"memory://{path}"
    fs = fsspec.filesystem("memory")
    if fs.exists(path):
        fs.rm(path, recursive=True)


def test_a_memory_url_goes_through_fsspec_and_a_file_url_takes_the_local_path(memory_url, tmp_path):
    assert isinstance(CheckpointStore(memory_url).directory, RemoteFolder)
    local = CheckpointStore(f"file://{tmp_path}")
    assert local.directory == tmp_path and (tmp_path / ".lock").exists()  # fsync'd, locked local folder


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_saves_commit_compose_and_retire_at_a_url(memory_url, tmp_path, scheme):
    url = memory_url if scheme == "memory" else f"file://{tmp_path}"
    store = CheckpointStore(url, keep_last=2)
    for step in (10, 20):
        save_full(store, step)
    save_subset(store, 25, [1, 3])
    rows = restore(store)
    assert rows["saved_step"].tolist() == [20, 25, 20, 25, 20]
    assert torch.equal(rows["weight"][1], torch.full((4,), 25.0))
    save_full(store, 30)  # retention: the two newest full saves, and the subsets after the older one
    assert [(s.step, s.kind) for s in store.saves()] == [(20, "full"), (25, "subset"), (30, "full")]
    store.discard_after(20)
    assert [s.step for s in store.saves()] == [20]


def test_a_damaged_remote_save_is_skipped_for_the_previous_one(memory_url):
    store = CheckpointStore(memory_url)
    save_full(store, 10)
    newest = save_full(store, 20)
    fs = fsspec.filesystem("memory")
    tensors = f"{newest.path.path}/domain-00000/tensors.bin"
    data = bytearray(fs.cat_file(tensors))
    data[-1] ^= 0xFF
    fs.pipe_file(tensors, bytes(data))
    with pytest.warns(SkippedSaveWarning, match="save-0000000020-full.*crc32"):
        assert restore(store)["saved_step"].tolist() == [10] * 5


def test_a_job_recovers_from_a_memory_url_and_dcp_loads_its_full_save(process_group, memory_url):
    model, optimizer = fresh_dmp(seed=0)
    ckpt = CPRCheckpointer(model, optimizer, memory_url, policy="full", num_domains=3, total_steps=100,
                           interval_steps=4)
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        train_step(model, optimizer, ckpt, make_batch(gen))
    ckpt.flush()
    rows = snapshot(ckpt)
    expected = {key: plain(value).clone() for key, value in model.state_dict().items()}
    train_step(model, optimizer, ckpt, make_batch(gen))
    assert ckpt.recover([1]).step == 4
    for key, value in snapshot(ckpt).items():
        assert torch.equal(value, rows[key]), key

    newest = ckpt.store.saves()[-1]
    assert str(newest.folder).startswith("memory://")
    fresh, _ = fresh_dmp(seed=5)
    state = fresh.state_dict()
    dcp.load(state, checkpoint_id=str(newest.folder))  # DCP's FsspecReader
    for key, value in fresh.state_dict().items():
        assert torch.equal(plain(value), expected[key]), key
    ckpt.close()


def test_dcp_reads_a_full_save_through_a_file_url(process_group, tmp_path):
    model, optimizer = fresh_dmp(seed=0)
    ckpt = CPRCheckpointer(model, optimizer, f"file://{tmp_path}", policy="full", num_domains=2, total_steps=100)
    expected = {key: plain(value).clone() for key, value in model.state_dict().items()}
    fresh, _ = fresh_dmp(seed=7)
    state = fresh.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=f"file://{ckpt.store.saves()[-1].folder}")
    for key, value in fresh.state_dict().items():
        assert torch.equal(plain(value), expected[key]), key
    assert isinstance(ckpt.store.directory, Path)
