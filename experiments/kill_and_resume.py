"""Real failures: SIGKILL the training process at random moments (saves included) and resume it.

Runs `python -m cpr.train` in a child process, kills it with SIGKILL after a random delay, restarts it
with `--resume` (it continues from the newest loadable full save), and repeats until the run completes.
Then it trains the same configuration without interruption and compares: with full recovery and CPU
determinism the resumed model must match the uninterrupted one exactly.

    .venv/bin/python experiments/kill_and_resume.py --kills 3 --out runs/kill_and_resume
"""
from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _train(options: list[str], out: Path, resume: bool, kill_after: float | None) -> int:
    """One child process; returns its exit code (negative: killed by that signal)."""
    cmd = [sys.executable, "-m", "cpr.train", *options, "--out", str(out), "--no-progress"] + (["--resume"] if resume else [])
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    if proc.returncode not in (0, -signal.SIGKILL):
        raise SystemExit(f"training failed (exit {proc.returncode}):\n{proc.stderr.read()}")
    return proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/kill_and_resume")
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs to deliver before letting the run finish")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--min-delay", type=float, default=6.0, help="seconds before the earliest kill (start-up takes some)")
    parser.add_argument("--max-delay", type=float, default=15.0)
    parser.add_argument("--train-args", default="--model small --rows 2000 --synthetic-rows 30000 --batch-size 256 --lr 0.01 "
                        "--embedding-lr 0.05 --policy full --failures 0 --steps 3000 --interval-steps 100",
                        help="options of the run (quoted)")
    args = parser.parse_args()
    out = Path(args.out)
    options = args.train_args.split()
    rng = random.Random(args.seed)

    started = time.perf_counter()
    kills, resumed = [], False
    while True:
        delay = rng.uniform(args.min_delay, args.max_delay) if len(kills) < args.kills else None
        code = _train(options, out / "killed", resumed, delay)
        resumed = True
        if code == 0:
            break
        kills.append(round(delay, 2))
    interrupted_s = time.perf_counter() - started
    interrupted = json.loads((out / "killed" / "summary.json").read_text())

    started = time.perf_counter()
    _train(options, out / "uninterrupted", False, None)
    clean_s = time.perf_counter() - started
    clean = json.loads((out / "uninterrupted" / "summary.json").read_text())

    report = {
        "kills_after_s": kills,
        "auc_resumed": interrupted["auc"],
        "auc_uninterrupted": clean["auc"],
        "identical": abs(interrupted["auc"] - clean["auc"]) < 1e-6 and abs(interrupted["logloss"] - clean["logloss"]) < 1e-6,
        "wall_s_with_kills": round(interrupted_s, 1),
        "wall_s_uninterrupted": round(clean_s, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    if not report["identical"]:
        raise SystemExit("the resumed run differs from the uninterrupted one")


if __name__ == "__main__":
    main()
