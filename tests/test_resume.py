"""A real crash: SIGKILL the training process, restart it with --resume, get the uninterrupted model."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cpr.options import parse_args
from cpr.train import run
from tests.test_train import REPO, SMALL

RUN = [*SMALL, "--policy", "full", "--failures", "0", "--steps", "300", "--interval-steps", "50"]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {path.name} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.01)


def test_sigkill_then_resume_matches_the_uninterrupted_run(tmp_path):
    baseline = run(parse_args([*RUN, "--out", str(tmp_path / "baseline")]))

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "cpr.train", *RUN, "--out", str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    try:
        _wait_for(out / "checkpoints" / "save-0000000100-full", proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists()

    resumed = run(parse_args([*RUN, "--out", str(out), "--resume"]))
    assert resumed["steps_executed"] < resumed["steps"]  # it did not start over
    assert resumed["auc"] == pytest.approx(baseline["auc"], abs=1e-6)
    assert resumed["logloss"] == pytest.approx(baseline["logloss"], abs=1e-6)
    assert json.loads((out / "summary.json").read_text())["auc"] == resumed["auc"]


MFU = [*SMALL, "--policy", "mfu", "--failures", "0", "--steps", "300", "--interval-steps", "100"]


def test_a_resumed_mfu_run_continues_the_record_and_makes_the_same_saves(tmp_path):
    baseline = run(parse_args([*MFU, "--out", str(tmp_path / "baseline")]))
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "cpr.train", *MFU, "--log-every", "10", "--out", str(out)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    try:
        _wait_for(out / "checkpoints" / "save-0000000100-full", proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    before_kill = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(line.get("step", 0) <= 100 and "train_loss" in line for line in before_kill)  # flushed as written

    resumed = run(parse_args([*MFU, "--log-every", "10", "--out", str(out), "--resume"]))
    assert resumed["steps_executed"] < resumed["steps"]  # it did not start over
    saves = [(c["step"], c["kind"]) for c in resumed["checkpoints"]]
    assert saves == [(c["step"], c["kind"]) for c in baseline["checkpoints"]]  # the whole run, same saves
    assert resumed["policy_settings"]["subset_interval_steps"] == baseline["policy_settings"]["subset_interval_steps"]
    assert resumed["total_updates"] == baseline["total_updates"]
    assert resumed["auc"] == pytest.approx(baseline["auc"], abs=1e-6)
    after = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert after[: len(before_kill)] == before_kill  # the resumed run appends to the record
