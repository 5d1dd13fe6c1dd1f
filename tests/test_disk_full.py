"""A save the disk refuses, however the refusal surfaces, is abandoned and training goes on (issue 23.1).

torch.save's zip writer turns a failed write (ENOSPC on a full disk, EIO) into `RuntimeError: [enforce fail at
inline_container.cc:672] unexpected pos ...`, the OSError kept only as its context; every such error of the
write path abandons that save on every rank, is reported (a warning, `failed_saves`) and the next save retries.
A real failure inside torch.save is made without privileges: a file-size limit (RLIMIT_FSIZE) makes the
kernel refuse writes past it with EFBIG, as a full disk refuses them with ENOSPC.
"""
from __future__ import annotations

import errno
import os
import resource
import shutil
import signal

import pytest
import torch

from cpr import CPRCheckpointer
from cpr.loop import MetricsLog
from tests.stores import HookedStore
from tests.test_checkpointer import ebc_step, make_batch, plain_ebc

ROWS = [64, 48, 32]


def torch_zip_writer_error() -> RuntimeError:
    """What torch.save raises when its file's write fails with ENOSPC (tried on a 4 MiB tmpfs)."""
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        try:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        except RuntimeError as error:
            return error


FAULTS = {
    "torch zip writer": (torch_zip_writer_error, "No space left on device"),
    "ENOSPC": (lambda: OSError(errno.ENOSPC, "No space left on device"), "No space left"),
    "EDQUOT": (lambda: OSError(errno.EDQUOT, "Disk quota exceeded"), "quota"),
    "EIO": (lambda: OSError(errno.EIO, "Input/output error"), "Input/output"),
    "EROFS": (lambda: OSError(errno.EROFS, "Read-only file system"), "Read-only"),
    "serializer error": (lambda: ValueError("some other serializer error"), "serializer error"),
}


def _job(tmp_path, async_save: bool, rows: list[int] = ROWS, **hooks):
    torch.manual_seed(0)
    ebc, optimizer = plain_ebc(rows, dim=16)
    store = HookedStore(tmp_path / "ckpt", keep_last=10, **hooks)
    ckpt = CPRCheckpointer(ebc, optimizer, store, policy="full", num_domains=2, total_steps=20, interval_steps=2,
                           async_save=async_save)
    return ebc, optimizer, ckpt


def _train(job, steps: int, gen: torch.Generator) -> None:
    ebc, optimizer, ckpt = job
    for _ in range(steps):
        ebc_step(ebc, optimizer, ckpt, make_batch(gen, rows=ROWS))
    ckpt.flush()


def _every_part_loads(ckpt: CPRCheckpointer) -> list[int]:
    """The steps of the committed saves, each read back whole (every part verified)."""
    for save in ckpt.store.saves():
        for part in save.parts:
            ckpt.store.load_part(save, part)
    return [save.step for save in ckpt.store.saves()]


def _no_staging_left(ckpt: CPRCheckpointer) -> bool:
    return not [p for p in ckpt.store.directory.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_write_error_abandons_the_save_and_training_goes_on(tmp_path, fault, async_save, capsys):
    make_error, says = FAULTS[fault]

    def fails_at_step_2(staging, part, step, kind):
        if step == 2:
            raise make_error()

    job = _job(tmp_path, async_save, before_write=fails_at_step_2)
    _train(job, 5, torch.Generator().manual_seed(1))
    ckpt = job[2]
    assert ckpt.global_step == 5  # training went on
    assert "step-2 full save failed" in capsys.readouterr().err
    (failed,) = ckpt.ledger.failed_saves
    assert (failed.step, failed.kind) == (2, "full") and says in failed.error, failed.error
    assert _every_part_loads(ckpt) == [0, 4]  # the committed save before it is intact; the next one went through
    assert _no_staging_left(ckpt)


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_a_commit_error_of_the_zip_writer_kind_abandons_the_save(tmp_path, async_save, capsys):
    def fails_at_step_2(staging, step, kind):
        if step == 2:
            raise torch_zip_writer_error()

    job = _job(tmp_path, async_save, before_commit=fails_at_step_2)
    _train(job, 5, torch.Generator().manual_seed(1))
    ckpt = job[2]
    assert [(f.step, "No space left" in f.error) for f in ckpt.ledger.failed_saves] == [(2, True)]
    assert _every_part_loads(ckpt) == [0, 4]
    assert _no_staging_left(ckpt)


def test_ctrl_c_in_a_write_is_not_swallowed(tmp_path):
    def interrupted_at_step_2(staging, part, step, kind):
        if step == 2:
            raise KeyboardInterrupt

    job = _job(tmp_path, async_save=False, before_write=interrupted_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        _train(job, 3, torch.Generator().manual_seed(1))
    assert job[2].ledger.failed_saves == []


def test_a_checkpoint_folder_deleted_under_the_run_fails_its_saves_not_the_run(tmp_path, capsys):
    job = _job(tmp_path, async_save=True)
    gen = torch.Generator().manual_seed(1)
    _train(job, 1, gen)
    shutil.rmtree(tmp_path / "ckpt")
    _train(job, 4, gen)
    ckpt = job[2]
    assert ckpt.global_step == 5
    assert [f.step for f in ckpt.ledger.failed_saves] == [2, 4]
    assert "save failed" in capsys.readouterr().err


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_a_real_refused_write_inside_torch_save_is_abandoned(tmp_path, async_save):
    """The kernel refuses a write in the middle of torch.save's record (EFBIG past RLIMIT_FSIZE): torch raises
    its RuntimeError, the save is abandoned, and once writes succeed again the next save commits."""
    job = _job(tmp_path, async_save, rows=[4096, 48, 32])  # rows beyond a write buffer: torch.save writes them
    gen = torch.Generator().manual_seed(1)
    _train(job, 1, gen)  # the step-0 save is committed
    ckpt = job[2]
    (first,) = ckpt.store.saves()
    largest = max(p.stat().st_size for p in first.folder.rglob("tensors.bin"))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a refused write, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (largest // 2, hard))
    try:
        _train(job, 3, gen)  # the saves of steps 2 and 4 are refused mid-record
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    _train(job, 2, gen)
    assert ckpt.global_step == 6
    assert [f.step for f in ckpt.ledger.failed_saves] == [2, 4]
    for failed in ckpt.ledger.failed_saves:  # the error, with the kernel's reason under it
        assert "RuntimeError: [enforce fail" in failed.error and "File too large" in failed.error, failed.error
    assert _every_part_loads(ckpt) == [0, 6]
    assert _no_staging_left(ckpt)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full (every write to it fails with ENOSPC)")
def test_a_full_out_folder_stops_the_metrics_log_not_the_run(capsys):
    metrics = MetricsLog("/dev/full")
    metrics.write({"step": 1})
    metrics.write({"step": 2})
    metrics.close()
    assert capsys.readouterr().err.count("metrics.jsonl cannot be written (No space left on device)") == 1
