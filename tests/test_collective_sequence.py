"""Each rank's sequence of collectives (what it calls and from which site) for saves, queued saves, commits,
partial and full recovery, a resume and a multi-rank rejoin after a real kill, against the sequences in
`tests/golden/collectives.json`.

Ranks meet only in collectives, so the order in which they call them is the protocol a survivor and a
replacement must share; a change of code that keeps behaviour (a re-cut) must keep it exactly. The runs
trace their collectives through `CPR_TRACE_COLLECTIVES` (see cpr/comm.py). Consecutive repeats of one entry
are counted once: an asynchronous save polls its writer once per step until it is done, as often as the
disk's speed makes it, and where those polls fall among other collectives of an asynchronous job is
left out too. `CPR_WRITE_GOLDEN=1` rewrites the golden file from this code (review the diff).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cpr import CPRCheckpointer
from cpr.comm import Coordinator
from tests.conftest import ROWS
from tests.stores import HookedStore
from tests.test_async_save import ebc_step, make_batch, plain_ebc

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "collectives.json"
SMALL = ("--model", "small", "--rows", "500", "--synthetic-rows", "12000", "--batch-size", "256", "--no-progress",
         "--log-every", "10", "--overwrite")
TIMEOUT_S = 420


def normalized(path: Path, polls: bool = True) -> list[str]:
    """A trace file as `op site` lines, consecutive repeats counted once; without `polls`, an asynchronous
    save's polls of its writer are left out (how many steps a write spans is the disk's business)."""
    out: list[str] = []
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        item = f"{entry['op']} {entry['site']}"
        if not polls and entry["site"].startswith("save.poll_"):
            continue
        if not out or out[-1] != item:
            out.append(item)
    return out


def traces(folder: Path, polls: bool = True) -> dict[str, list[str]]:
    """Every process's trace, by rank, a rank's processes (the dead one, then its replacement) in order."""
    by_rank: dict[int, list[Path]] = {}
    for path in folder.glob("rank-*-pid-*.jsonl"):
        by_rank.setdefault(int(path.name.split("-")[1]), []).append(path)
    out = {}
    for rank, paths in sorted(by_rank.items()):
        for i, path in enumerate(sorted(paths, key=lambda p: p.stat().st_mtime)):
            out[f"rank{rank}" + (f".process{i}" if len(paths) > 1 else "")] = normalized(path, polls)
    return out


def check(name: str, found: dict[str, list[str]]) -> None:
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if os.environ.get("CPR_WRITE_GOLDEN"):
        golden[name] = found
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    assert name in golden, f"no golden sequence for {name}: run with CPR_WRITE_GOLDEN=1"
    assert found == golden[name]


def cli(tmp_path: Path, *flags: str, launcher: tuple[str, ...] = (sys.executable, "-m", "cpr.train"),
        trace: Path | None = None) -> None:
    env = {**os.environ, "CPR_TRACE_COLLECTIVES": str(trace or tmp_path / "trace"), "CPR_COLLECTIVE_TIMEOUT_S": "120",
           "CPR_REJOIN_TIMEOUT_S": "300"}
    result = subprocess.run([*launcher, *SMALL, "--out", str(tmp_path / "out"), *flags], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-5000:]


def in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *flags: str, trace: Path | None = None) -> None:
    """`python -m cpr.train` of one process, run in this one (its collectives are the same; the 5 s of
    importing TorchRec in a new process are not)."""
    from cpr.train import main

    monkeypatch.setenv("CPR_TRACE_COLLECTIVES", str(trace or tmp_path / "trace"))
    assert main([*SMALL, "--out", str(tmp_path / "out"), *flags]) == 0


@pytest.mark.parametrize("name, flags", [
    ("sync-partial", ("--policy", "partial", "--steps", "30", "--failures", "2", "--sync-save", "--interval-steps", "4")),
    ("sync-full", ("--policy", "full", "--steps", "30", "--failures", "2", "--sync-save", "--interval-steps", "4")),
    ("sync-mfu-differential", ("--policy", "mfu", "--steps", "40", "--failures", "2", "--sync-save", "--differential")),
])
def test_one_process_runs(tmp_path, monkeypatch, name, flags):
    in_process(tmp_path, monkeypatch, *flags)
    check(name, traces(tmp_path / "trace"))


def test_resume(tmp_path, monkeypatch):
    flags = ("--policy", "partial", "--sync-save", "--interval-steps", "4")
    in_process(tmp_path, monkeypatch, *flags, "--steps", "10", trace=tmp_path / "first")
    in_process(tmp_path, monkeypatch, *flags, "--steps", "20", "--resume", "--failures", "1", trace=tmp_path / "resumed")
    check("resume", {"first": traces(tmp_path / "first")["rank0"], "resumed": traces(tmp_path / "resumed")["rank0"]})


@pytest.mark.parametrize("policy", ["partial", "full"])
def test_two_ranks_under_torchrun(tmp_path, policy):
    torchrun = (str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2", "-m", "cpr.train")
    cli(tmp_path, "--policy", policy, "--steps", "24", "--failures", "2", "--sync-save", "--interval-steps", "4",
        launcher=torchrun)
    check(f"torchrun2-{policy}", traces(tmp_path / "trace"))


@pytest.mark.parametrize("policy", ["partial", "full"])
def test_rejoin_after_a_real_kill(tmp_path, policy):
    cli(tmp_path, "--nproc", "2", "--policy", policy, "--steps", "30", "--sync-save", "--interval-steps", "6",
        "--kill-at", "20:1")
    found = traces(tmp_path / "trace")
    assert set(found) == {"rank0", "rank1.process0", "rank1.process1"}
    check(f"rejoin-{policy}", found)


def test_a_queued_subset_save(tmp_path):
    """An asynchronous job whose full save's write is held until the next subset save is queued behind it."""
    held, ckpt = [], None

    def slow_full_write(staging, part, step, kind):
        if kind == "full" and step > 0 and step not in held:
            held.append(step)
            deadline = time.monotonic() + 60
            while ckpt.global_step < step + 2 and time.monotonic() < deadline:  # a subset is queued behind it
                time.sleep(0.01)

    torch.manual_seed(0)
    ebc, optimizer = plain_ebc(ROWS)
    trace = tmp_path / "trace"
    ckpt = CPRCheckpointer(ebc, optimizer, HookedStore(tmp_path / "ckpt", keep_last=10, before_write=slow_full_write),
                           policy="mfu", num_domains=2, total_steps=12, interval_steps=4,
                           coordinator=Coordinator(trace=trace), policy_options={"subset_interval_steps": 1, "fraction": 0.2})
    gen = torch.Generator().manual_seed(1)
    for _ in range(11):
        ebc_step(ebc, optimizer, ckpt, make_batch(gen, rows=ROWS))
    ckpt.report()
    ckpt.close()
    assert held, "no full save was held"
    check("queued-subset", traces(trace, polls=False))
