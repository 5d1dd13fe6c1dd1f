"""Real failures: the same multi-rank job with no failure and with worker processes really killed (SIGKILL),
recovered by full, partial and mfu: AUC, wall-clock lost, bytes read, and how long the job stood still.

Each run is `python -m cpr.train --nproc R` (the supervisor of `cpr.elastic.supervisor` replaces only the killed
rank). Kills fall at a third and two thirds of the run on ranks 1 and 2 (rank 1 twice with 2 ranks). The
time to resume is split into its phases (`RecoveryRecord.phases`): the survivors noticing, the replacement
process starting (Python, imports, data), the rendezvous, rebuilding the model on the new group, and the
restore.

    .venv/bin/python experiments/real_failures.py [--quick] [--ranks 2 3 4] [--out DIR]

--quick: 3 ranks, 90 steps. Full: 2, 3 and 4 ranks, 150 steps. Writes OUT/results.json, OUT/results.md and
OUT/real_failures.png.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments._common import (  # noqa: E402
    REPO, RESULTS_ROOT, command_line, experiment_parser, markdown_table, mean_sd, plt, write_outputs,
)

NAME = "real_failures"
POLICIES = ("none", "full", "partial", "mfu")
PHASES = ("survivors_notice", "replacement_start", "rendezvous", "build", "restore")
FLAGS = ("--model", "small", "--rows", "2000", "--synthetic-rows", "60000", "--batch-size", "256", "--lr", "0.01",
         "--embedding-lr", "0.05", "--no-progress", "--overwrite", "--failures", "0", "--clock", "emulated")
TINY_FLAGS = ("--model", "small", "--rows", "300", "--synthetic-rows", "6000", "--batch-size", "256",
              "--no-progress", "--overwrite", "--failures", "0", "--clock", "emulated")
# The emulated clock: the saves of the runs in docs/results.md (the production profile's plan over the run's
# steps). On the real clock (the default for --kill-at) the production MTBF of 20 h plans no periodic save in
# a run of a minute; experiments/goodput.py plans real runs with their MTBF.
PAPER = ("Partial recovery reloads only the failed node's embedding rows; the other nodes keep training "
         "state in memory, so recovery reads a fraction of the model and no computation is redone "
         "(Maeng et al., sec. 3).")


def kills_for(ranks: int, steps: int) -> list[tuple[int, int]]:
    return [(steps // 3, 1), (2 * steps // 3, 2 % ranks or 1)]


def run_job(policy: str, ranks: int, steps: int, tiny: bool, folder: Path) -> dict:
    kills = [] if policy == "none" else kills_for(ranks, steps)
    command = [sys.executable, "-m", "cpr.train", "--nproc", str(ranks), *(TINY_FLAGS if tiny else FLAGS),
               "--steps", str(steps), "--policy", policy, "--out", str(folder)]
    for step, rank in kills:
        command += ["--kill-at", f"{step}:{rank}"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{policy} with {ranks} ranks failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    summary = json.loads((folder / "summary.json").read_text())
    print(f"  {policy:8s} {ranks} ranks: AUC {summary['auc']:.4f}, {len(summary['recoveries'])} recoveries, "
          f"{seconds:.0f} s", flush=True)
    return {"policy": policy, "ranks": ranks, "steps": steps, "kills": kills, "auc": summary["auc"],
            "logloss": summary["logloss"], "job_seconds": seconds, "wall_seconds": summary["wall_seconds"],
            "steps_executed": summary["steps_executed"], "recoveries": summary["recoveries"],
            "lost_steps": sum(f["lost_steps"] for f in summary["failures"]), "pls_measured": summary["pls_measured"]}


def main(argv: list[str] | None = None) -> dict:
    parser = experiment_parser(__doc__)
    parser.add_argument("--ranks", type=int, nargs="+")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES),
                        help="none (no kill, the baseline) is always run")
    parser.add_argument("--out", type=Path, default=RESULTS_ROOT / NAME)
    args = parser.parse_args(argv)
    ranks_list = args.ranks or ([2] if args.tiny else [3] if args.quick else [2, 3, 4])
    steps = args.steps or (12 if args.tiny else 90 if args.quick else 150)
    policies = ["none", *(p for p in args.policies if p != "none")]

    runs = []
    with tempfile.TemporaryDirectory(prefix="cpr-real-failures-") as scratch:
        for ranks in ranks_list:
            for policy in policies:
                print(f"[{len(runs) + 1}/{len(ranks_list) * len(policies)}] {policy}, {ranks} ranks, {steps} steps",
                      flush=True)
                runs.append(run_job(policy, ranks, steps, args.tiny, Path(scratch) / f"{policy}-{ranks}"))

    rows, findings = [], [PAPER]
    for run in runs:
        base = next(r for r in runs if r["ranks"] == run["ranks"] and r["policy"] == "none")
        run["wall_lost_seconds"] = run["wall_seconds"] - base["wall_seconds"]
        run["auc_loss"] = base["auc"] - run["auc"]
        recoveries = run["recoveries"]
        resume = mean_sd([r["seconds_to_resume"] for r in recoveries])[0] if recoveries else None
        run["phases"] = {p: mean_sd([r["phases"][p] for r in recoveries if r["phases"].get(p) is not None])[0]
                         for p in PHASES} if recoveries else {}
        rows.append([run["policy"], run["ranks"], len(recoveries), f"{run['auc']:.4f}", f"{run['auc_loss']:+.4f}",
                     f"{run['wall_lost_seconds']:+.1f}", run["lost_steps"],
                     "–" if resume is None else f"{resume:.1f}",
                     f"{sum(r['bytes_read'] for r in recoveries):,}", f"{sum(r['own_bytes'] for r in recoveries):,}",
                     f"{sum(r['survivor_bytes_read'] for r in recoveries):,}",
                     ", ".join(f"{p} {v:.1f}" for p, v in run["phases"].items()) or "–"])
    table = markdown_table(["policy", "ranks", "kills", "AUC", "AUC lost", "wall clock over none (s, saves included)",
                            "steps retrained",
                            "s to resume (mean)", "bytes read by replacements", "their own bytes",
                            "bytes read by survivors", "where the resume time went (s, mean)"], rows)
    for ranks in ranks_list:
        at = {r["policy"]: r for r in runs if r["ranks"] == ranks}
        if not {"partial", "full"} <= set(at):
            continue
        partial, full = at["partial"], at["full"]
        findings.append(
            f"{ranks} ranks: partial recovery stood the job still {sum(r['seconds_to_resume'] for r in partial['recoveries']):.1f} s "
            f"for its {len(partial['recoveries'])} kills ({partial['auc_loss']:+.4f} AUC against no failure), and its survivors "
            f"read {sum(r['survivor_bytes_read'] for r in partial['recoveries']):,} bytes; full recovery stood still "
            f"{sum(r['seconds_to_resume'] for r in full['recoveries']):.1f} s, then retrained {full['lost_steps']} steps, its "
            f"survivors reading {sum(r['survivor_bytes_read'] for r in full['recoveries']):,} bytes. Most of the stall is the "
            f"replacement process starting (Python, torch and TorchRec imports, the data): "
            f"{statistics.mean(r['phases']['replacement_start'] for r in partial['recoveries']):.1f} s per kill.")

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels, bottoms = [], []
    recovered = [r for r in runs if r["recoveries"]]
    for i, run in enumerate(recovered):
        labels.append(f"{run['policy']}\n{run['ranks']} ranks")
        bottom = 0.0
        for j, phase in enumerate(PHASES):
            value = max(0.0, run["phases"].get(phase) or 0.0)
            left.bar(i, value, bottom=bottom, color=f"C{j}", label=phase if i == 0 else None)
            bottom += value
        bottoms.append(bottom)
    left.set_xticks(range(len(labels)), labels)
    left.set_ylabel("seconds from the kill until training resumed (mean per kill)")
    left.set_title("Time to resume after a SIGKILL, by phase")
    left.legend(fontsize=8)
    width = 0.4
    right.bar([i - width / 2 for i in range(len(recovered))],
              [sum(r["bytes_read"] for r in run["recoveries"]) / 1e6 for run in recovered], width, label="replacements")
    right.bar([i + width / 2 for i in range(len(recovered))],
              [sum(r["survivor_bytes_read"] for r in run["recoveries"]) / 1e6 for run in recovered], width, label="survivors")
    right.set_xticks(range(len(labels)), labels)
    right.set_ylabel("MB read from checkpoints (all kills of the run)")
    right.set_title("Bytes read to recover")
    right.legend()
    figure.tight_layout()
    results = {"command": command_line(), "paper": PAPER, "seeds": [0], "ranks": ranks_list, "steps": steps, "runs": runs,
               "findings": findings}
    write_outputs(args.out, NAME, results, table, figure)
    return results


if __name__ == "__main__":
    main()
