"""Overhead against failure rate (node MTBF) and against the number of embedding shards.

Analytic curves from `cpr.planning.plan` (docs/planning.md) for full recovery at the Young interval and
plain partial recovery at the PLS target, with emulated points: the small DLRM on the built-in data under
the `production` profile with one setting changed (--mtbf-hours or --num-shards), failures drawn from the
profile, for full, partial, mfu and ssu. For mfu and ssu the model line uses the bytes per hour their
planner chose in each run (save cost scaled by bytes, plus one shard's load and a reschedule per failure).

    .venv/bin/python experiments/overhead.py [--quick] [--seeds ...] [--out DIR]

--quick: 1 seed, 2 MTBFs, 2 shard counts. Full: 3 seeds, 5 MTBFs, 4 shard counts. Writes
OUT/results.json, OUT/results.md and OUT/overhead.png.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments._common import (  # noqa: E402
    experiment_parser,
    MODEL_FLAGS, RESULTS_ROOT, Job, available_datasets, command_line, markdown_table, mean_sd, plt, run_all,
    write_outputs,
)

NAME = "overhead"
POLICIES = ("full", "partial", "mfu", "ssu")
PAPER = ("Full recovery's overhead grows as failures become more frequent (about sqrt(2 O_save / MTBF)); "
         "partial recovery's stays small, and more shards make each failure lose less (Maeng et al., sec. 4).")


def model_overhead(profile, policy: str, target: float, summary: dict | None = None) -> float:
    """The planning model's overhead fraction for one policy on `profile`."""
    from cpr.planning import plan

    result = plan(profile, target)
    if policy in ("full", "partial"):
        return getattr(result, policy).overhead.total_fraction
    # mfu/ssu: the save cost of the bytes their planner chose, plus partial recovery's load and reschedule.
    settings = summary["policy_settings"]
    save_fraction = (settings["planned_bytes_per_hour"] * profile.save_seconds / 3600) / _full_bytes(summary)
    return save_fraction + result.partial.overhead.load + result.partial.overhead.reschedule


def _full_bytes(summary: dict) -> int:
    """Bytes of one full save in this run (its first checkpoint, the initial state)."""
    return next(c["bytes"] for c in summary["checkpoints"] if c["kind"] == "full")


def main(argv: list[str] | None = None) -> dict:
    from cpr.planning import ClusterProfile

    parser = experiment_parser(__doc__)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES))
    parser.add_argument("--mtbf-hours", type=float, nargs="+", help="node MTBFs (production: 400)")
    parser.add_argument("--shards", type=int, nargs="+", help="shard counts (production: 16)")
    parser.add_argument("--target-pls", type=float, default=0.02)
    parser.add_argument("--out", type=Path, default=RESULTS_ROOT / NAME)
    args = parser.parse_args(argv)
    quick = args.quick or args.tiny
    seeds = args.seeds or ([0] if quick else [0, 1, 2])
    mtbfs = args.mtbf_hours or ([100.0, 1600.0] if quick else [100.0, 200.0, 400.0, 800.0, 1600.0])
    shard_counts = args.shards or ([4, 32] if quick else [4, 8, 16, 32])
    dflags = available_datasets(["synthetic"], tiny=args.tiny)["synthetic"]
    base = ClusterProfile.preset("production")

    settings = [("mtbf", m, ("--mtbf-hours", str(m))) for m in mtbfs]
    settings += [("shards", n, ("--num-shards", str(n))) for n in shard_counts]
    keyed = []
    for axis, value, flags in settings:
        for policy in args.policies:
            for seed in seeds:
                job_flags = (*MODEL_FLAGS, *dflags, "--profile", "production", "--target-pls", str(args.target_pls),
                             *flags, "--policy", policy, "--seed", str(seed))
                keyed.append(((axis, value, policy, seed), Job(f"{axis} {value} {policy} seed {seed}", job_flags)))
    summaries = run_all([job for _, job in keyed])

    points = []
    for (axis, value, policy, seed), s in zip([k for k, _ in keyed], summaries):
        profile = dataclasses.replace(base, **({"mtbf_hours": value} if axis == "mtbf" else {"num_domains": value}))
        points.append({"axis": axis, "value": value, "policy": policy, "seed": seed, "failures": len(s["failures"]),
                       "overhead_fraction": s["overhead"]["total_fraction"], "pls_measured": s["pls_measured"],
                       "model_overhead_fraction": model_overhead(profile, policy, args.target_pls, s)})
    groups = []
    for axis, value, _ in settings:
        for policy in args.policies:
            same = [p for p in points if (p["axis"], p["value"], p["policy"]) == (axis, value, policy)]
            measured, sd = mean_sd([p["overhead_fraction"] for p in same])
            groups.append({"axis": axis, "value": value, "policy": policy, "overhead": measured, "overhead_sd": sd,
                           "model": mean_sd([p["model_overhead_fraction"] for p in same])[0],
                           "failures": mean_sd([p["failures"] for p in same])[0]})
    table = markdown_table(["varied", "value", "policy", "failures (mean)", "overhead emulated (mean ± sd)", "overhead model"],
                           [[g["axis"], g["value"], g["policy"], f"{g['failures']:.1f}",
                             f"{100 * g['overhead']:.2f}% ± {100 * g['overhead_sd']:.2f}%", f"{100 * g['model']:.2f}%"]
                            for g in groups])
    findings = [f"{g['axis']} {g['value']:g} {g['policy']}: emulated {100 * g['overhead']:.2f}% vs model {100 * g['model']:.2f}%"
                for g in groups if g["policy"] in ("full", "mfu")]

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = dict(zip(POLICIES, ("tab:red", "tab:blue", "tab:green", "tab:purple")))
    grid = np.geomspace(min(mtbfs) / 1.5, max(mtbfs) * 1.5, 60)
    for ax, axis, xs, field, xlabel in ((left, "mtbf", grid, "mtbf_hours", "node MTBF (hours; production 400, 20 nodes)"),
                                        (right, "shards", np.array(sorted(set(shard_counts) | {2, 64})), "num_domains",
                                         "embedding shards (production 16)")):
        for policy in args.policies:
            color = colors.get(policy)
            if policy in ("full", "partial"):
                from cpr.planning import plan

                ys = [100 * getattr(plan(dataclasses.replace(base, **{field: type(getattr(base, field))(x)}), args.target_pls),
                                    policy).overhead.total_fraction for x in xs]
                ax.plot(xs, ys, "-", color=color, label=f"{policy} model")
            same = [g for g in groups if g["axis"] == axis and g["policy"] == policy]
            if policy not in ("full", "partial"):
                ax.plot([g["value"] for g in same], [100 * g["model"] for g in same], ":", color=color, label=f"{policy} model")
            ax.errorbar([g["value"] for g in same], [100 * g["overhead"] for g in same], yerr=[100 * g["overhead_sd"] for g in same],
                        fmt="o", color=color, capsize=3, label=f"{policy} emulated ({len(seeds)} seed(s))")
        ax.set_xscale("log", base=2 if axis == "shards" else 10)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("overhead (% of job time)")
        ax.set_title(f"overhead vs {'failure rate' if axis == 'mtbf' else 'shards'}, target PLS {args.target_pls}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    results = {"command": command_line(), "seeds": seeds, "paper": PAPER, "points": points, "groups": groups, "findings": findings}
    write_outputs(args.out, NAME, results, table, fig)
    return results


if __name__ == "__main__":
    main()
