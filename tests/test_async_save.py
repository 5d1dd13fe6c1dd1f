"""Asynchronous saves: the write runs in the background and commits later; a DMP model's snapshot is copy-on-write."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from cpr import CPRCheckpointer
from cpr.save import QUEUED_SUBSET_SAVES
from cpr.storage import DENSE_PART, CheckpointStore
from cpr.storage.names import ids_name, state_name, weight_name
from tests.stores import HookedStore
from tests.test_checkpointer import ebc_step, make_batch, plain_ebc, train_step
from tests.test_storage import REPO

ROWS = [64, 48, 32]


def _job(tmp_path, name: str, async_save: bool, interval: int = 2, **hooks):
    """A small job saving through a store with the given hooks (see tests/stores.py)."""
    torch.manual_seed(0)
    ebc, optimizer = plain_ebc(ROWS)
    store = HookedStore(tmp_path / name, keep_last=10, **hooks)
    ckpt = CPRCheckpointer(ebc, optimizer, store, policy="partial", num_domains=2, total_steps=20,
                           interval_steps=interval, async_save=async_save)
    return ebc, optimizer, ckpt


def test_an_async_save_equals_a_sync_save_of_the_same_state(tmp_path):
    jobs = {mode: _job(tmp_path, mode, async_save=(mode == "async")) for mode in ("async", "sync")}
    for mode, (ebc, optimizer, ckpt) in jobs.items():
        gen = torch.Generator().manual_seed(1)
        for _ in range(7):
            ebc_step(ebc, optimizer, ckpt, make_batch(gen, rows=ROWS))
        ckpt.flush()
    saves = _same_saves(jobs["async"][2], jobs["sync"][2])
    assert [(s.step, s.kind) for s in saves] == [(0, "full"), (2, "full"), (4, "full"), (6, "full")]


def _same_saves(left: CPRCheckpointer, right: CPRCheckpointer) -> list:
    """Assert that two jobs committed the same saves, tensor for tensor; the first job's saves."""
    saves = left.store.saves()
    assert [(s.step, s.kind) for s in saves] == [(s.step, s.kind) for s in right.store.saves()]
    for a, b in zip(saves, right.store.saves()):
        assert set(a.parts) == set(b.parts)
        for part in a.parts:
            ours, theirs = left.store.load_part(a, part), right.store.load_part(b, part)
            assert ours.tensors.keys() == theirs.tensors.keys()
            for name, tensor in ours.tensors.items():
                assert torch.equal(tensor, theirs.tensors[name]), (a.step, part, name)
    return saves


def test_a_failed_background_write_undoes_the_marks(tmp_path):
    def disk_full_at_step_2(staging, part, step, kind):
        if step == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    ebc, optimizer, ckpt = _job(tmp_path, "a", async_save=True, before_write=disk_full_at_step_2)
    gen = torch.Generator().manual_seed(2)
    looked_up = {table: 0 for table in ckpt.tables.tables}
    for _ in range(3):
        batch = make_batch(gen, rows=ROWS)
        for table, feature in zip(ckpt.tables.tables, batch.sparse_features.keys()):
            looked_up[table] += batch.sparse_features[feature].values().numel()
        ebc_step(ebc, optimizer, ckpt, batch)
    ckpt.flush()
    assert [(f.step, f.kind) for f in ckpt.ledger.failed_saves] == [(2, "full")]
    # The step-2 save never committed: every access since the initial save is still pending.
    assert {t: int(ckpt.tracker.counts(t).sum()) for t in ckpt.tables.tables} == looked_up
    assert [s.step for s in ckpt.store.saves()] == [0]
    ebc_step(ebc, optimizer, ckpt, make_batch(gen, rows=ROWS))  # step 4: the next save goes through
    ckpt.flush()
    assert [s.step for s in ckpt.store.saves()] == [0, 4]


CHILD = textwrap.dedent("""
    import sys, time
    import torch
    from cpr import CPRCheckpointer
    from tests.stores import HookedStore
    from tests.test_checkpointer import ebc_step, make_batch, plain_ebc

    def stall_after_the_first_part(staging, part, step, kind):
        if step > 0 and part != "domain-00000":
            print("mid-save", flush=True)  # the parent kills us here, in the background write
            time.sleep(60)

    ebc, optimizer = plain_ebc([64, 48, 32])
    ckpt = CPRCheckpointer(ebc, optimizer, HookedStore(sys.argv[1], before_write=stall_after_the_first_part),
                           policy="partial", num_domains=2, total_steps=20, interval_steps=2)
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        batch = make_batch(gen, rows=[64, 48, 32])
        ckpt.observe(batch)
        optimizer.zero_grad()
        sum(v.sum() for v in ebc(batch.sparse_features).to_dict().values()).backward()
        optimizer.step()
        ckpt.step()
""")


def test_a_kill_during_the_background_write_leaves_the_previous_save(tmp_path):
    with subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}) as child:
        try:
            assert child.stdout.readline().strip() == "mid-save"
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.kill()
            child.wait(timeout=30)
    store = CheckpointStore(tmp_path)
    (save,) = store.saves()
    assert save.step == 0  # the initial save; the one being written never looked committed
    for part in save.parts:
        store.load_part(save, part)  # and it loads and verifies


def test_the_commit_runs_on_the_writer_thread(tmp_path):
    committed_on = []
    ebc, optimizer, ckpt = _job(tmp_path, "a", async_save=True,
                                before_commit=lambda *_: committed_on.append(threading.current_thread().name))
    gen = torch.Generator().manual_seed(5)
    for _ in range(5):
        ebc_step(ebc, optimizer, ckpt, make_batch(gen, rows=ROWS))
    ckpt.flush()
    assert [s.step for s in ckpt.store.saves()] == [0, 2, 4]
    assert len(committed_on) == 3 and all(name.startswith("cpr-save") for name in committed_on), committed_on  # 0, 2, 4


def test_no_save_is_started_at_the_jobs_last_step(tmp_path):
    torch.manual_seed(0)
    ebc, optimizer = plain_ebc(ROWS)
    ckpt = CPRCheckpointer(ebc, optimizer, tmp_path / "a", policy="partial", num_domains=2, total_steps=4,
                           interval_steps=2)
    gen = torch.Generator().manual_seed(4)
    for _ in range(4):
        ebc_step(ebc, optimizer, ckpt, make_batch(gen, rows=ROWS))
    ckpt.flush()
    assert [s.step for s in ckpt.store.saves()] == [0, 2]  # none at step 4: no failure of the job can follow it


def test_a_subset_due_while_a_full_save_is_written_is_queued_and_saves_what_a_sync_run_saves(tmp_path):
    """A subset save decided while a full save is being written does not wait for it: it is copied at once and
    written after it. The saves are those of a synchronous run."""
    options = {"subset_interval_steps": 1, "fraction": 0.2}
    jobs, queued, depths, held = {}, [], [], []

    def slow_full_write(staging, part, step, kind):
        if kind == "full" and step > 0 and step not in held:
            held.append(step)
            deadline = time.monotonic() + 60
            while len(queued) < len(held) and time.monotonic() < deadline:  # until the next subset is queued
                time.sleep(0.01)

    for mode in ("async", "sync"):
        torch.manual_seed(0)
        ebc, optimizer = plain_ebc(ROWS)
        store = HookedStore(tmp_path / mode, keep_last=10, before_write=slow_full_write if mode == "async" else None)
        ckpt = CPRCheckpointer(ebc, optimizer, store, policy="mfu", num_domains=2, total_steps=20, interval_steps=4,
                               async_save=mode == "async", policy_options=options)
        jobs[mode] = (ebc, optimizer, ckpt)
    ckpt = jobs["async"][2]
    for mode, (ebc, optimizer, job) in jobs.items():
        gen = torch.Generator().manual_seed(1)
        for _ in range(11):
            ebc_step(ebc, optimizer, job, make_batch(gen, rows=ROWS))
            in_flight = job.saves.in_flight()
            if len(in_flight) > 1 and in_flight[-1].decision.step == job.global_step:  # this step's save queued
                queued.append((job.global_step, in_flight[0].decision.step))
                depths.append(len(in_flight) - 1)
        job.flush()
    # The subset of step 5 queued behind the full save of step 4 (held until it is), and so on; the subsets
    # after it queue too while a save is in flight, at most QUEUED_SUBSET_SAVES of them.
    assert [(step, behind) for step, behind in queued if step in (5, 9)] == [(5, 4), (9, 8)]
    assert max(depths) <= QUEUED_SUBSET_SAVES
    saves = _same_saves(jobs["async"][2], jobs["sync"][2])
    assert (5, "subset") in [(s.step, s.kind) for s in saves]
    assert [(c.step, c.kind) for c in ckpt.ledger.checkpoints] == [(s.step, s.kind) for s in saves]
    for _, _, job in jobs.values():
        job.close()


@pytest.mark.parametrize("policy, options", [("partial", None), ("mfu", {"subset_interval_steps": 5})])
def test_a_save_written_while_training_changes_its_rows_holds_the_rows_of_its_step(dmp_model, tmp_path, policy,
                                                                                 options):
    """A DMP model's async save (a full save of `partial`, a copy-on-write snapshot; a subset save of `mfu`,
    copied at once): its writer is held back while three more steps change rows it holds, and it still
    writes the rows of its own step."""
    held, release = [], threading.Event()

    def held_write(staging, part, step, kind):
        if step > 0 and not held:
            held.append(step)
            assert release.wait(60)

    model, optimizer = dmp_model
    ckpt = CPRCheckpointer(model, optimizer, HookedStore(tmp_path / "ckpt", keep_last=10, before_write=held_write),
                           policy=policy, num_domains=2, total_steps=100, interval_steps=4 if options is None else 20,
                           policy_options=options)
    gen = torch.Generator().manual_seed(3)
    at_save = None
    while at_save is None:
        batch = make_batch(gen)
        optimizer.zero_grad()
        model(batch)[0].backward()
        optimizer.step()
        if ckpt.step() is not None:
            at_save = {name: value.clone() for name, value in _row_tensors(ckpt).items()}
            step = ckpt.global_step
    for _ in range(3):  # the save's writer waits meanwhile (the next save is due later)
        train_step(model, optimizer, ckpt, make_batch(gen))
    release.set()
    ckpt.flush()
    save = next(s for s in ckpt.store.saves() if s.step == step)
    live, changed = _row_tensors(ckpt), 0
    for part in save.parts:
        if part == DENSE_PART:
            continue
        loaded = ckpt.store.load_part(save, part)
        for table, (start, end) in ckpt.layout.held(int(part.removeprefix("domain-"))).items():
            ids = loaded.tensors.get(ids_name(table))
            if ids is None and save.kind == "subset":
                continue
            rows = torch.arange(start, end) if ids is None else ids + start
            for name in (n for n in at_save if n.startswith(f"emb/{table}/")):
                assert torch.equal(loaded.tensors[name], at_save[name][rows]), (part, name)
                changed += int((live[name][rows] != at_save[name][rows]).any())
    assert held and changed  # the writer really read rows that training had changed since
    ckpt.close()


def _row_tensors(ckpt: CPRCheckpointer) -> dict[str, torch.Tensor]:
    out = {}
    for table in ckpt.tables.tables:
        out[weight_name(table)] = ckpt.tables.weight(table)
        out.update({state_name(table, s): v for s, v in ckpt.tables.row_states(table).items()})
    return out


def test_the_writer_thread_runs_torch_ops_on_one_thread_and_training_keeps_its_threads(tmp_path):
    """A torch op on the writer thread must not start a second team of intra-op threads (which competed with
    training's on 2 cores: steps 1.9x slower); training's own thread count must not change."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        writer_threads = []
        ebc, optimizer, ckpt = _job(tmp_path, "a", async_save=True,
                                    before_write=lambda *_: writer_threads.append(torch.get_num_threads()))
        gen = torch.Generator().manual_seed(6)
        for _ in range(2):  # the step-2 save is written on the writer thread
            ebc_step(ebc, optimizer, ckpt, make_batch(gen, rows=ROWS))
        ckpt.flush()
        assert writer_threads and all(n == 1 for n in writer_threads)
        assert torch.get_num_threads() == 2
        ckpt.close()
    finally:
        torch.set_num_threads(threads)
