"""Real failures: worker processes SIGKILLed mid-run under the supervisor (`python -m cpr.run`), on CPU over
gloo. The survivors keep their rows (bit-identical across the recovery), the replacement gets the newest
saved version of its own rows, training completes; full recovery equals the run without failures."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpr.storage import CheckpointStore, domain_part, restore_domain

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "elastic_worker.py"
TRAIN = ("--model", "small", "--rows", "500", "--synthetic-rows", "12000", "--batch-size", "256", "--steps", "40",
         "--no-progress", "--overwrite", "--log-every", "20")
TIMEOUT_S = 420


def supervised(out: Path, *flags: str, nproc: int = 2, env: dict | None = None, script: Path = WORKER,
               supervisor_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`python -m cpr.run --nproc N script TRAIN... flags --out out`, bounded."""
    command = [sys.executable, "-m", "cpr.run", "--nproc", str(nproc), *supervisor_flags, str(script)]
    if script == WORKER:
        command += [*TRAIN, "--out", str(out), *flags]
    else:
        command += list(flags)
    environment = {**os.environ, "CPR_COLLECTIVE_TIMEOUT_S": "120", "CPR_REJOIN_TIMEOUT_S": "120", **(env or {})}
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=TIMEOUT_S)


def summary_of(result: subprocess.CompletedProcess, out: Path) -> dict:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "Traceback" not in result.stderr, result.stderr[-6000:]
    return json.loads((out / "summary.json").read_text())


def heal_records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("heal-*.json"))]


def assert_every_save_complete(checkpoints: Path, world_size: int) -> None:
    """A save folder exists only with its commit record and every rank's part (the commit is last)."""
    for folder in checkpoints.glob("save-*"):
        assert (folder / "commit.json").exists(), folder
        assert len(list(folder.glob("domain-*"))) == world_size, folder


@pytest.fixture(scope="module")
def no_failure_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("no-failure")
    return summary_of(supervised(out, "--policy", "full", "--failures", "0"), out)


def test_partial_recovery_keeps_survivors_and_restores_the_replacements_rows(tmp_path, no_failure_run):
    result = supervised(tmp_path, "--policy", "partial", "--interval-steps", "6", "--kill-at", "20:1", "--keep-last", "10")
    summary = summary_of(result, tmp_path)
    [recovery] = summary["recoveries"]
    assert (recovery["rank"], recovery["kind"], recovery["step"], recovery["dropped_steps"]) == (1, "partial", 20, 1)
    assert recovery["survivor_bytes_read"] == 0 and recovery["bytes_read"] > 0 and recovery["own_bytes"] > 0
    assert 0 < recovery["seconds_to_resume"] < TIMEOUT_S and recovery["seconds_to_rejoin"] > 0
    # The survivor never reloaded: its rows and row-wise optimizer state are bit-identical across the heal.
    [survivor] = [h for h in heal_records(tmp_path) if h["rank"] == 0]
    assert survivor["kept_state"] and survivor["before"] == survivor["after"]
    # The replacement holds the newest saved version of each of its rows: of the full save of step 18, or,
    # when that save was still being persisted as rank 1 died (a loaded machine), of step 12's: then the step
    # 18 save was abandoned on every rank.
    joined = torch.load(tmp_path / "joined-1-1.pt")
    store = CheckpointStore(tmp_path / "checkpoints", keep_last=10, lock=False)
    saves = [s for s in store.saves() if s.step <= 19]
    abandoned = [f["step"] for f in summary["failed_saves"]]
    assert (saves[-1].step, abandoned) in ((18, []), (12, [18])), (saves[-1].step, summary["failed_saves"])
    part = store.load_part(saves[-1], domain_part(1))
    rows = {table: tuple(ranges[0]) for table, ranges in part.manifest.shards.items() if ranges}
    states = {table: sorted(n.split("/")[1] for n in joined if n.startswith(f"{table}/") and n != f"{table}/weight")
              for table in rows}
    restored = restore_domain(store, saves, domain_part(1), rows=rows, state_names=states)
    for table in rows:
        assert torch.equal(joined[f"{table}/weight"], restored.rows[table]["weight"]), table
        for state in states[table]:
            assert torch.equal(joined[f"{table}/{state}"], restored.rows[table][f"opt/{state}"]), (table, state)
    assert summary["failures"][0]["lost_updates"] > 0
    assert abs(summary["auc"] - no_failure_run["auc"]) < 0.01


def test_full_recovery_equals_the_run_without_failures(tmp_path, no_failure_run):
    summary = summary_of(supervised(tmp_path, "--policy", "full", "--interval-steps", "8", "--kill-at", "21:1"), tmp_path)
    [recovery] = summary["recoveries"]
    # Rolled back to the save of step 16, or of step 8 if step 16's was still being persisted as rank 1 died.
    abandoned = [f["step"] for f in summary["failed_saves"]]
    assert (recovery["resumed_at"], abandoned) in ((16, []), (8, [16])), (recovery, summary["failed_saves"])
    assert recovery["kind"] == "full" and recovery["survivor_bytes_read"] > 0
    assert summary["logloss"] == pytest.approx(no_failure_run["logloss"], abs=1e-6)
    assert summary["auc"] == pytest.approx(no_failure_run["auc"], abs=1e-6)


def test_a_kill_during_a_save_then_rank_0_killed(tmp_path):
    """Rank 1 dies writing its part of the step-12 save; later rank 0 (the coordinator) dies too."""
    result = supervised(tmp_path, "--policy", "partial", "--interval-steps", "6", "--kill-at", "30:0",
                        env={"CPR_TEST_KILL_IN_SAVE": "12:1"})
    summary = summary_of(result, tmp_path)
    assert [(r["rank"], r["kind"]) for r in summary["recoveries"]] == [(1, "partial"), (0, "partial")]
    assert summary["steps_executed"] == summary["steps"]  # the job's steps, not rank 0's replacement's since it joined
    assert_every_save_complete(tmp_path / "checkpoints", 2)
    assert any(f["step"] == 12 for f in summary["failed_saves"])  # the interrupted save was abandoned everywhere
    assert all(h["before"] == h["after"] for h in heal_records(tmp_path) if h["kept_state"])


def test_two_ranks_killed_at_once(tmp_path):
    summary = summary_of(supervised(tmp_path, "--policy", "partial", "--interval-steps", "6",
                                    "--kill-at", "15:1", "--kill-at", "15:2", nproc=3), tmp_path)
    assert sorted(r["rank"] for r in summary["recoveries"]) == [1, 2]
    assert all(r["kind"] == "partial" and r["survivor_bytes_read"] == 0 for r in summary["recoveries"])


def test_the_replacement_dies_while_it_joins(tmp_path):
    result = supervised(tmp_path, "--policy", "partial", "--interval-steps", "6", "--kill-at", "15:1",
                        env={"CPR_TEST_KILL_JOINING": "1"})
    summary = summary_of(result, tmp_path)
    assert summary["recoveries"] and all(r["rank"] == 1 for r in summary["recoveries"])
    assert result.stderr.count("rank 1 died") >= 2  # the supervisor replaced it twice


def test_a_rank_killed_before_the_first_save_committed(tmp_path):
    """The initial save never commits: nobody has a state worth keeping, and the job starts over."""
    summary = summary_of(supervised(tmp_path, "--policy", "partial", env={"CPR_TEST_KILL_IN_SAVE": "0:1"}), tmp_path)
    assert summary["steps"] == 40 and summary["auc"] is not None


def test_a_rank_that_keeps_dying_stops_the_job_with_a_message(tmp_path):
    result = supervised(tmp_path, "--policy", "partial", "--kill-at", "10:1", supervisor_flags=("--max-restarts", "0"))
    assert result.returncode == 1
    assert "restart limit (--max-restarts 0) is reached" in result.stderr
    assert "Traceback" not in result.stderr.split("restart limit")[-1]


@pytest.mark.parametrize("flags, message", [
    (("--kill-at", "5"), "expected STEP:RANK"),
    (("--kill-at", "5:7"), "below the world size 2"),
    (("--policy", "none", "--kill-at", "5:1"), "need a checkpointing policy"),
])
def test_bad_kill_settings_get_one_line(tmp_path, flags, message):
    result = subprocess.run([sys.executable, "-m", "cpr.train", "--nproc", "2", *TRAIN, "--out", str(tmp_path),
                             "--policy", "partial", *flags], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_kills_need_a_supervisor(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cpr.train", *TRAIN, "--out", str(tmp_path), "--policy", "partial",
                             "--kill-at", "5:0"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--nproc" in result.stderr


def test_two_nodes_share_one_store(tmp_path):
    """Two supervisors ("nodes") of one job on this machine, joined through node 0's store."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = ("--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}")
    flags = ("--policy", "partial", "--interval-steps", "6", "--kill-at", "15:1")
    env = {**os.environ, "CPR_REJOIN_TIMEOUT_S": "120"}
    nodes = [subprocess.Popen([sys.executable, "-m", "cpr.run", "--nproc", "1", *endpoint, "--node-rank", str(node),
                               str(WORKER), *TRAIN, "--out", str(tmp_path), *flags], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    outputs = [node.communicate(timeout=TIMEOUT_S) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(r["rank"], r["kind"]) for r in summary["recoveries"]] == [(1, "partial")]


def test_the_example_script_survives_a_kill(tmp_path):
    result = supervised(tmp_path, "--steps", "30", "--rows", "1000", "--batch-size", "128", "--kill-at", "15:1",
                        "--checkpoints", str(tmp_path / "checkpoints"), script=REPO / "examples" / "train_dlrm.py")
    assert result.returncode == 0, result.stderr[-5000:]
    assert "done: 30 steps, 1 recoveries (rank 1 at step 15: partial" in result.stdout
    assert "survivors 0)" in result.stdout
