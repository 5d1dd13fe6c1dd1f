"""The paper's premise: PLS predicts the accuracy cost of partial recovery. AUC loss against measured PLS.

For each data set and seed the small DLRM trains once without failures (the reference AUC) and once per
(policy, PLS target) with the same seeded failures: exactly the profile's expected count (6) under the
`production` profile with 8 embedding shards, so that targets up to 0.2 are reachable within a run. Target
0 is full recovery (nothing lost, the lost steps retrained). AUC loss = reference AUC - AUC. A
least-squares line AUC loss = slope * PLS + intercept is fitted per data set, with its R^2.

    .venv/bin/python experiments/pls_vs_accuracy.py [--quick] [--seeds ...] [--out DIR]

--quick: plain partial recovery, 2 seeds, 6 targets, both data sets (28 runs; about 4 minutes on 2 idle
cores). Full: partial, mfu and ssu, 4 seeds. Writes OUT/results.json ({"points": [{"data", "policy",
"seed", "target_pls", "pls_measured", "auc_loss", ...}], "fits": {...}}), OUT/results.md and
OUT/pls_vs_accuracy.png.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments._common import (  # noqa: E402
    experiment_parser,
    MODEL_FLAGS, RESULTS_ROOT, Job, available_datasets, command_line, expected_failures, linear_fit, markdown_table,
    mean_sd, plt, run_all, write_outputs,
)

NAME = "pls_vs_accuracy"
TARGETS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)
SWEEP_SHARDS = 8
PAPER = ("PLS, the portion of lost samples, predicts the accuracy cost of partial recovery: accuracy falls "
         "with PLS, and small PLS (around 0.02-0.1) costs little accuracy (Maeng et al., MLSys 2021, sec. 3-4).")


def sweep_jobs(data: dict[str, tuple[str, ...]], policies: Sequence[str], targets: Sequence[float],
               seeds: Sequence[int], reference: bool = True) -> list[tuple[dict[str, Any], Job]]:
    """(key, job) for every data set, seed and (policy, target); target 0 is one full-recovery run and,
    with `reference`, each (data set, seed) gets a run without failures (policy none)."""
    out = []
    for dname, dflags in data.items():
        base = (*MODEL_FLAGS, *dflags, "--profile", "production", "--num-shards", str(SWEEP_SHARDS))
        failures = ("--failures", str(expected_failures(base)))
        for seed in seeds:
            common = (*base, "--seed", str(seed))
            if reference:
                out.append(({"data": dname, "policy": "none", "seed": seed, "target_pls": None},
                            Job(f"{dname} seed {seed} reference (no failures)", (*common, "--policy", "none"))))
            for target in targets:
                for policy in (["full"] if target == 0 else policies):
                    flags = (*common, *failures, "--policy", policy)
                    if target:
                        flags += ("--target-pls", str(target))
                    out.append(({"data": dname, "policy": policy, "seed": seed, "target_pls": target},
                                Job(f"{dname} seed {seed} {policy} target {target}", flags)))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = experiment_parser(__doc__)
    parser.add_argument("--policies", nargs="+")
    parser.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    parser.add_argument("--datasets", nargs="+", default=["synthetic", "criteo_sample"])
    parser.add_argument("--out", type=Path, default=RESULTS_ROOT / NAME)
    args = parser.parse_args(argv)
    quick = args.quick or args.tiny
    seeds = args.seeds or list(range(2 if quick else 4))
    policies = args.policies or (["partial"] if quick else ["partial", "mfu", "ssu"])
    data = available_datasets(args.datasets, tiny=args.tiny)

    keyed = sweep_jobs(data, policies, args.targets, seeds)
    summaries = run_all([job for _, job in keyed])
    reference = {(k["data"], k["seed"]): s["auc"] for (k, _), s in zip(keyed, summaries) if k["policy"] == "none"}
    points = [{**k, "pls_measured": s["pls_measured"], "pls_expected": s["pls_expected"],
               "auc": s["auc"], "auc_loss": reference[(k["data"], k["seed"])] - s["auc"],
               "bytes_written": s["bytes_written"], "overhead_fraction": s["overhead"]["total_fraction"]}
              for (k, _), s in zip(keyed, summaries) if k["policy"] != "none"]

    fits = {d: linear_fit([p["pls_measured"] for p in points if p["data"] == d],
                          [p["auc_loss"] for p in points if p["data"] == d]) for d in data}
    rows = []
    for d in data:
        for target in args.targets:
            for policy in (["full"] if target == 0 else policies):
                chosen = [p for p in points if (p["data"], p["policy"], p["target_pls"]) == (d, policy, target)]
                if chosen:
                    pls, pls_sd = mean_sd([p["pls_measured"] for p in chosen])
                    loss, loss_sd = mean_sd([p["auc_loss"] for p in chosen])
                    rows.append([d, policy, target, len(chosen), f"{pls:.4f} ± {pls_sd:.4f}", f"{loss:+.4f} ± {loss_sd:.4f}"])
    table = markdown_table(["data", "policy", "target PLS", "seeds", "measured PLS (mean ± sd)", "AUC loss (mean ± sd)"], rows)
    table += "\n\n" + markdown_table(["data", "fit: AUC loss = slope x PLS + intercept", "R²", "points"],
                                     [[d, f"{f['slope']:.4f} x PLS {f['intercept']:+.4f}", f"{f['r2']:.3f}", f["n"]]
                                      for d, f in fits.items()])
    findings = [f"{d}: AUC loss = {f['slope']:.4f} x PLS {f['intercept']:+.5f}, R² = {f['r2']:.3f} over {f['n']} runs "
                f"({len(seeds)} seeds)" for d, f in fits.items()]

    fig, axes = plt.subplots(1, max(1, len(data)), figsize=(6 * max(1, len(data)), 4.2), squeeze=False)
    for ax, d in zip(axes[0], data):
        for policy, marker in zip(["full", *policies], "osD^v"):
            chosen = [p for p in points if p["data"] == d and p["policy"] == policy]
            ax.scatter([p["pls_measured"] for p in chosen], [p["auc_loss"] for p in chosen], marker=marker, alpha=0.35)
            means = []
            for target in sorted({p["target_pls"] for p in chosen}):
                same = [p for p in chosen if p["target_pls"] == target]
                means.append((*mean_sd([p["pls_measured"] for p in same]), *mean_sd([p["auc_loss"] for p in same])))
            if means:
                ax.errorbar([m[0] for m in means], [m[2] for m in means], xerr=[m[1] for m in means],
                            yerr=[m[3] for m in means], fmt=marker, capsize=3, label=f"{policy} (mean ± sd per target)")
        fit = fits[d]
        if fit["n"] >= 2 and fit["slope"] == fit["slope"]:
            xs = [0, max(p["pls_measured"] for p in points if p["data"] == d)]
            ax.plot(xs, [fit["slope"] * x + fit["intercept"] for x in xs], "k--",
                    label=f"fit: {fit['slope']:.3f} x PLS {fit['intercept']:+.4f}, R² {fit['r2']:.2f}")
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_xlabel("measured PLS (lost / all row-updates)")
        ax.set_ylabel("AUC loss (no-failure AUC - AUC)")
        ax.set_title(f"{d}: {len(seeds)} seeds, {SWEEP_SHARDS} shards")
        ax.legend(fontsize=7)
    fig.tight_layout()
    results = {"command": command_line(), "seeds": seeds, "paper": PAPER, "policies": policies,
               "targets": args.targets, "num_shards": SWEEP_SHARDS, "points": points, "fits": fits, "findings": findings}
    write_outputs(args.out, NAME, results, table, fig)
    return results


if __name__ == "__main__":
    main()
