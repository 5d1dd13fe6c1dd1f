"""`python -m cpr.run` as a torchrun replacement, and the verdicts, heartbeats and spares of a supervised
job (on CPU over gloo; every run bounded). The plain torchrun script is tests/torchrun_script.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.test_real_failures import REPO, heal_records, summary_of, supervised

SCRIPT = REPO / "tests" / "torchrun_script.py"
TIMEOUT_S = 300


def launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cpr.run", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=TIMEOUT_S, env={**os.environ, "CPR_REJOIN_TIMEOUT_S": "120"})


def test_an_unmodified_torchrun_script_restarts_every_worker(tmp_path):
    result = launch("--standalone", "--nproc-per-node", "2", "--kill-after", "2:1", str(SCRIPT), str(tmp_path), "60")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "restarting every worker of node 0 (restart 1 of at most 3)" in result.stderr
    out = json.loads((tmp_path / "result.json").read_text())
    # Resumed from its own progress file: every step's all-reduce counted once, 2 * (1 + ... + 60).
    assert out["state"] == {"step": 60, "total": 2.0 * 60 * 61 / 2} and out["world"] == 2
    env = out["env"]
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"], env["GROUP_RANK"]) == ("0", "0", "2", "2", "0")
    assert env["TORCHELASTIC_RESTART_COUNT"] == "1" and env["TORCHELASTIC_MAX_RESTARTS"] == "3"
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"].isdigit() and env["TORCHELASTIC_RUN_ID"]


def test_a_deterministic_start_up_crash_stops_after_the_second_try(tmp_path):
    result = launch("--nproc-per-node", "2", "--max-restarts", "5", str(SCRIPT), str(tmp_path), "10", "crash")
    assert result.returncode == 1
    assert "failed the same way twice before its first step" in result.stderr
    assert result.stderr.rstrip().endswith("RuntimeError: environment variable DATA_DIR expected, but not set; stopping the job")
    assert result.stderr.count("restarting every worker") == 1  # tried twice, not --max-restarts times


def test_a_collective_mismatch_is_not_recovered(tmp_path):
    result = launch("--nproc-per-node", "2", str(SCRIPT), str(tmp_path), "10", "mismatch")
    assert result.returncode == 1 and not (tmp_path / "result.json").exists()
    assert "collective mismatch (a bug" in result.stderr
    assert "Received data size doesn't match expected size" in result.stderr.splitlines()[-1]
    assert "restarting" not in result.stderr and "replacement" not in result.stderr


def test_a_spare_takes_over_and_survivors_wait_for_it_past_the_rejoin_timeout(tmp_path):
    """The spare that takes rank 1 sleeps 8 s before it joins, past CPR_REJOIN_TIMEOUT_S=3 (the old fixed
    timeout would have lost the job): its supervisor beats for it and the survivor waits."""
    result = supervised(tmp_path, "--policy", "partial", "--interval-steps", "6", "--kill-at", "20:1",
                        supervisor_flags=("--spares", "1"),
                        env={"CPR_REJOIN_TIMEOUT_S": "3", "CPR_TEST_SLOW_JOIN": "8"})
    summary = summary_of(result, tmp_path)
    assert "rank 1 died (signal 9); spare 0:1 takes its place (generation 1)" in result.stderr
    [recovery] = summary["recoveries"]
    assert (recovery["rank"], recovery["kind"], recovery["step"]) == (1, "partial", 20)
    assert recovery["seconds_to_resume"] > 8  # it did wait for the slow spare
    [survivor] = [h for h in heal_records(tmp_path) if h["rank"] == 0]
    assert survivor["kept_state"] and survivor["before"] == survivor["after"]
    assert (tmp_path / "joined-1-1.pt").exists()
