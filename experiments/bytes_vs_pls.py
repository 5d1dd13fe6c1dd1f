"""The trade the planner makes: checkpoint bytes written against measured PLS, for each policy.

The runs are those of `pls_vs_accuracy.py` (same flags, so `make experiments` trains them once): the small
DLRM under the `production` profile with 8 shards and its expected 6 failures, each policy planned for a
range of PLS targets. Bytes written are every save of the run (full and subset, the initial full save
included), per emulated hour. Prioritized policies should reach a given PLS with fewer bytes than plain
partial recovery.

    .venv/bin/python experiments/bytes_vs_pls.py [--quick] [--seeds ...] [--out DIR]

--quick: the built-in data set, 1 seed, 2 targets. Full: both data sets, 3 seeds, 5 targets. Writes
OUT/results.json, OUT/results.md and OUT/bytes_vs_pls.png.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments._common import (  # noqa: E402
    experiment_parser,
    RESULTS_ROOT, available_datasets, command_line, markdown_table, mean_sd, plt, run_all, write_outputs,
)
from experiments.pls_vs_accuracy import SWEEP_SHARDS, sweep_jobs  # noqa: E402

NAME = "bytes_vs_pls"
POLICIES = ("partial", "mfu", "ssu", "scar")
PAPER = ("CPR-MFU and CPR-SSU save the most-used rows more often, reaching the PLS of plain partial "
         "recovery with less checkpoint traffic, or a lower PLS for the same traffic (Maeng et al., sec. 5).")


def main(argv: list[str] | None = None) -> dict:
    parser = experiment_parser(__doc__)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES))
    parser.add_argument("--targets", type=float, nargs="+")
    parser.add_argument("--datasets", nargs="+")
    parser.add_argument("--out", type=Path, default=RESULTS_ROOT / NAME)
    args = parser.parse_args(argv)
    quick = args.quick or args.tiny
    seeds = args.seeds or ([0] if quick else [0, 1, 2])
    targets = args.targets or ([0.02, 0.1] if quick else [0.01, 0.02, 0.05, 0.1, 0.2])
    data = available_datasets(args.datasets or (["synthetic"] if quick else ["synthetic", "criteo_sample"]), tiny=args.tiny)

    keyed = sweep_jobs(data, args.policies, targets, seeds, reference=False)
    summaries = run_all([job for _, job in keyed])
    points = [{**k, "pls_measured": s["pls_measured"], "bytes_written": s["bytes_written"],
               "bytes_per_hour": s["bytes_per_hour"], "save_hours": s["overhead"]["save"]}
              for (k, _), s in zip(keyed, summaries)]
    groups = []
    for d in data:
        for policy in args.policies:
            for target in targets:
                same = [p for p in points if (p["data"], p["policy"], p["target_pls"]) == (d, policy, target)]
                if same:
                    pls, pls_sd = mean_sd([p["pls_measured"] for p in same])
                    mb, mb_sd = mean_sd([p["bytes_per_hour"] / 1e6 for p in same])
                    groups.append({"data": d, "policy": policy, "target_pls": target, "pls": pls, "pls_sd": pls_sd,
                                   "mb_per_hour": mb, "mb_per_hour_sd": mb_sd, "seeds": len(same)})
    table = markdown_table(["data", "policy", "target PLS", "seeds", "measured PLS (mean ± sd)", "MB written per emulated hour"],
                           [[g["data"], g["policy"], g["target_pls"], g["seeds"], f"{g['pls']:.4f} ± {g['pls_sd']:.4f}",
                             f"{g['mb_per_hour']:.3f} ± {g['mb_per_hour_sd']:.3f}"] for g in groups])
    findings = []
    for d in data:
        for target in targets:
            same = {g["policy"]: g for g in groups if g["data"] == d and g["target_pls"] == target}
            if "partial" in same:
                base = same["partial"]["mb_per_hour"]
                findings.append(f"{d}, target {target}: bytes per hour relative to partial: " + ", ".join(
                    f"{p} {g['mb_per_hour'] / base:.2f}x (PLS {g['pls']:.4f})" for p, g in same.items()))

    fig, axes = plt.subplots(1, max(1, len(data)), figsize=(6 * max(1, len(data)), 4.2), squeeze=False)
    for ax, d in zip(axes[0], data):
        for policy, marker in zip(args.policies, "osD^v"):
            same = [g for g in groups if g["data"] == d and g["policy"] == policy]
            ax.errorbar([g["pls"] for g in same], [g["mb_per_hour"] for g in same], xerr=[g["pls_sd"] for g in same],
                        yerr=[g["mb_per_hour_sd"] for g in same], fmt=marker + "-", capsize=3, label=policy)
        ax.set_xlabel("measured PLS (lost / all row-updates)")
        ax.set_ylabel("checkpoint MB written per emulated hour")
        ax.set_yscale("log")
        ax.set_title(f"{d}: {len(seeds)} seed(s), targets {', '.join(map(str, targets))}, {SWEEP_SHARDS} shards")
        ax.legend(fontsize=8)
    fig.tight_layout()
    results = {"command": command_line(), "seeds": seeds, "paper": PAPER, "targets": targets, "points": points,
               "groups": groups, "findings": findings}
    write_outputs(args.out, NAME, results, table, fig)
    return results


if __name__ == "__main__":
    main()
