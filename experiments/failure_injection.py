"""Emulated failures: accuracy and overhead of each policy against full recovery, at planned intervals.

Every policy trains the same model on the same data and meets the same seeded failure schedule drawn from
the cluster profile (default: `production`, calibrated so that full recovery costs about 8% of job time).
Full recovery saves at the Young/Daly interval and retrains what a failure loses; partial recovery (and
CPR-MFU/SSU, when available) saves at the longest interval whose expected PLS meets the target and loses
the failed shard's recent updates instead. The CPR paper's anchor: overhead 8.2-8.5% (full) against
0.53-0.68% (CPR) at equal accuracy.

    .venv/bin/python experiments/failure_injection.py --out runs/failure_injection [--data FILE] [--policies full partial mfu]

Writes OUT/results.json, OUT/results.md (a table) and OUT/overhead_vs_auc.png.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cpr.policies import POLICY_NAMES  # noqa: E402
from cpr.train import parse_args, quiet_dependencies, run  # noqa: E402


def _percent(fraction: float | None) -> str:
    return "–" if fraction is None else f"{100 * fraction:.2f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/failure_injection")
    parser.add_argument("--data", help="a Criteo file (default: the built-in synthetic set)")
    parser.add_argument("--policies", nargs="+", default=[p for p in POLICY_NAMES if p != "none"])
    parser.add_argument("--profile", default="production")
    parser.add_argument("--target-pls", type=float, default=0.02)
    parser.add_argument("--failures", type=int, help="exact failure count (default: drawn from the profile)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-args", default="--model small --rows 20000 --synthetic-rows 200000 --batch-size 512 "
                        "--lr 0.01 --embedding-lr 0.05", help="options passed to every run (quoted)")
    args = parser.parse_args()
    quiet_dependencies()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    common = args.train_args.split() + ["--profile", args.profile, "--target-pls", str(args.target_pls),
                                        "--seed", str(args.seed), "--no-progress"]
    if args.data:
        common += ["--data", args.data]
    if args.failures is not None:
        common += ["--failures", str(args.failures)]

    results = {"no_failure": run(parse_args([*common, "--policy", "none", "--out", str(out / "none")]))}
    for policy in args.policies:
        results[policy] = run(parse_args([*common, "--policy", policy, "--out", str(out / policy)]))

    reference = results["no_failure"]
    rows = []
    for name, summary in results.items():
        rows.append({
            "policy": name,
            "auc": summary["auc"],
            "auc_loss": reference["auc"] - summary["auc"],
            "logloss": summary["logloss"],
            "failures": len(summary["failures"]),
            "pls_expected": summary["pls_expected"],
            "pls_measured": summary["pls_measured"],
            "overhead_fraction": summary["overhead"]["total_fraction"],
            # The interval plan covers full and partial recovery; the prioritized policies plan their own
            # settings (see their policy_settings) and get no figure here.
            "planned_overhead_fraction": (summary["plan"][name]["overhead"]["total_fraction"] if name in ("full", "partial") else None),
            "bytes_written": summary["bytes_written"],
        })
    (out / "results.json").write_text(json.dumps({"profile": args.profile, "target_pls": args.target_pls, "runs": rows}, indent=2))

    header = "| policy | AUC | AUC loss | failures | PLS expected | PLS measured | overhead | planned | bytes written |"
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['auc']:.4f} | {r['auc_loss']:+.4f} | {r['failures']} | {r['pls_expected']:.4f} | "
                     f"{r['pls_measured']:.4f} | {100 * r['overhead_fraction']:.2f}% | {_percent(r['planned_overhead_fraction'])} | "
                     f"{r['bytes_written']:,} |")
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    print(table)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(100 * r["overhead_fraction"], r["auc"])
        ax.annotate(r["policy"], (100 * r["overhead_fraction"], r["auc"]), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("fault-tolerance overhead (% of job time, emulated)")
    ax.set_ylabel("eval AUC")
    ax.set_title(f"profile {args.profile}, target PLS {args.target_pls}")
    fig.tight_layout()
    fig.savefig(out / "overhead_vs_auc.png", dpi=120)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'overhead_vs_auc.png'}")


if __name__ == "__main__":
    main()
