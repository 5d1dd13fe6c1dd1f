"""Why MFU works: the access skew of each data set, and MFU's r / SSU's p sensitivity.

Skew: every embedding row's accesses over the training split (tables capped at 2,000 rows as in the other
experiments), rows of all 26 tables ranked by accesses: the share of accesses that go to the top x% of
rows. Sensitivity: the small DLRM under the `production` profile with its expected 6 failures and a PLS
target, MFU with the fraction r pinned and SSU with the sampling rate p pinned (the planner still picks
T_full and T_sub and re-plans them online): the measured PLS and the checkpoint bytes each setting needs
to meet the target.

    .venv/bin/python experiments/access_skew.py [--quick] [--seeds ...] [--out DIR]

--quick: 1 seed, 2 values of r and p. Full: 3 seeds, 5 values each. Writes OUT/results.json,
OUT/results.md and OUT/access_skew.png.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments._common import (  # noqa: E402
    experiment_parser,
    MODEL_FLAGS, RESULTS_ROOT, Job, available_datasets, command_line, expected_failures, markdown_table, mean_sd, plt,
    run_all, write_outputs,
)

NAME = "access_skew"
ROW_SHARES = (0.001, 0.01, 0.05, 0.1, 0.2, 0.5)
PAPER = ("Embedding accesses are highly skewed: a small fraction of rows receives most accesses, so saving "
         "the most-frequently-used rows (MFU) more often removes most of the lost updates; SSU approximates "
         "MFU by sampling accesses (Maeng et al., sec. 5).")


def access_curve(flags: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(share of rows, share of accesses) with rows of every table ranked by their accesses, descending."""
    from cpr.options import parse_args
    from dlrm.data import open_dataset
    from dlrm.data.schema import table_rows

    args = parse_args([*flags, "--out", str(RESULTS_ROOT / "cache" / "unused")])
    rows = table_rows(args.rows)
    dataset = open_dataset(args.data, data_format=args.data_format, table_rows=rows, eval_fraction=args.eval_fraction,
                           synthetic_rows=args.synthetic_rows, zipf_alpha=args.zipf_alpha, seed=args.seed)
    sparse = dataset.train.sparse
    counts = np.concatenate([np.bincount(sparse[:, i], minlength=r) for i, r in enumerate(rows)])
    ranked = np.sort(counts)[::-1]
    return np.arange(1, len(ranked) + 1) / len(ranked), np.cumsum(ranked) / ranked.sum()


def main(argv: list[str] | None = None) -> dict:
    parser = experiment_parser(__doc__)
    parser.add_argument("--fractions", type=float, nargs="+", help="MFU r values")
    parser.add_argument("--sample-rates", type=float, nargs="+", help="SSU p values")
    parser.add_argument("--datasets", nargs="+", default=["synthetic", "criteo_sample"])
    parser.add_argument("--target-pls", type=float, default=0.02)
    parser.add_argument("--out", type=Path, default=RESULTS_ROOT / NAME)
    args = parser.parse_args(argv)
    quick = args.quick or args.tiny
    seeds = args.seeds or ([0] if quick else [0, 1, 2])
    fractions = args.fractions or ([0.005, 0.05] if quick else [0.002, 0.005, 0.02, 0.05, 0.1])
    rates = args.sample_rates or ([0.01, 0.2] if quick else [0.01, 0.05, 0.1, 0.2, 0.5])
    data = available_datasets(args.datasets, tiny=args.tiny)

    skew, curves = [], {}
    for dname, dflags in data.items():
        x, y = access_curve((*MODEL_FLAGS, *dflags))
        curves[dname] = (x, y)
        skew.append({"data": dname, "rows": len(x), **{f"top_{s:g}": float(np.interp(s, x, y)) for s in ROW_SHARES}})
        print(f"{dname}: top 1% of rows get {100 * np.interp(0.01, x, y):.1f}% of the accesses", flush=True)

    keyed = []
    for dname, dflags in data.items():
        base = (*MODEL_FLAGS, *dflags, "--profile", "production", "--target-pls", str(args.target_pls))
        failures = ("--failures", str(expected_failures(base)))
        for policy, flag, values in (("mfu", "--save-fraction", fractions), ("ssu", "--sample-rate", rates)):
            for value in values:
                for seed in seeds:
                    keyed.append(((dname, policy, value, seed), Job(f"{dname} {policy} {flag} {value} seed {seed}",
                                  (*base, *failures, "--policy", policy, flag, str(value), "--seed", str(seed)))))
    summaries = run_all([job for _, job in keyed])
    sensitivity = []
    for (dname, policy, value, seed), s in zip([k for k, _ in keyed], summaries):
        sensitivity.append({"data": dname, "policy": policy, "knob": value, "seed": seed, "pls_measured": s["pls_measured"],
                            "bytes_per_hour": s["bytes_per_hour"]})
    groups = []
    for dname in data:
        for policy, values in (("mfu", fractions), ("ssu", rates)):
            for value in values:
                same = [r for r in sensitivity if (r["data"], r["policy"], r["knob"]) == (dname, policy, value)]
                pls, pls_sd = mean_sd([r["pls_measured"] for r in same])
                mb, mb_sd = mean_sd([r["bytes_per_hour"] / 1e6 for r in same])
                groups.append({"data": dname, "policy": policy, "knob": value, "pls": pls, "pls_sd": pls_sd,
                               "mb_per_hour": mb, "mb_per_hour_sd": mb_sd})

    table = markdown_table(["data", "rows", *(f"top {100 * s:g}% of rows" for s in ROW_SHARES)],
                           [[s["data"], s["rows"], *(f"{100 * s[f'top_{r:g}']:.1f}%" for r in ROW_SHARES)] for s in skew])
    table += "\n\n" + markdown_table(
        ["data", "policy", "r or p", "measured PLS (mean ± sd)", f"MB per emulated hour to meet target {args.target_pls}"],
        [[g["data"], g["policy"], g["knob"], f"{g['pls']:.4f} ± {g['pls_sd']:.4f}", f"{g['mb_per_hour']:.3f} ± {g['mb_per_hour_sd']:.3f}"]
         for g in groups])
    findings = [f"{s['data']}: the top 1% of rows get {100 * s['top_0.01']:.1f}% of accesses, the top 10% {100 * s['top_0.1']:.1f}%"
                for s in skew]
    for dname in data:
        for policy in ("mfu", "ssu"):
            same = [g for g in groups if g["data"] == dname and g["policy"] == policy]
            best = min(same, key=lambda g: g["mb_per_hour"])
            findings.append(f"{dname} {policy}: cheapest pinned {'r' if policy == 'mfu' else 'p'} = {best['knob']} "
                            f"({best['mb_per_hour']:.3f} MB/h, PLS {best['pls']:.4f})")

    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    for dname, (x, y) in curves.items():
        left.plot(100 * x, 100 * y, label=dname)
    uniform = np.geomspace(min(x[0] for x, _ in curves.values()) * 100, 100, 50) if curves else np.array([1, 100])
    left.plot(uniform, uniform, "k:", label="no skew (x% of rows get x%)")
    left.set_xscale("log")
    left.set_xlabel("top x% of embedding rows (ranked by accesses)")
    left.set_ylabel("% of all accesses")
    left.set_title("access skew (training split, all 26 tables)")
    left.legend(fontsize=8)
    for ax, policy, label in ((mid, "mfu", "MFU fraction r"), (right, "ssu", "SSU sampling rate p")):
        twin = ax.twinx()
        for dname, color in zip(data, ("tab:blue", "tab:orange")):
            same = [g for g in groups if g["data"] == dname and g["policy"] == policy]
            ax.errorbar([g["knob"] for g in same], [g["mb_per_hour"] for g in same], yerr=[g["mb_per_hour_sd"] for g in same],
                        fmt="o-", color=color, capsize=3, label=f"{dname}: MB/h")
            twin.errorbar([g["knob"] for g in same], [g["pls"] for g in same], yerr=[g["pls_sd"] for g in same],
                          fmt="s--", color=color, alpha=0.6, capsize=3, label=f"{dname}: PLS")
        twin.axhline(args.target_pls, color="k", linestyle=":", label=f"target {args.target_pls}")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("checkpoint MB per emulated hour (circles)")
        twin.set_ylabel("measured PLS (squares)")
        ax.set_title(f"{policy}: {label} pinned, {len(seeds)} seed(s)")
        lines = ax.get_legend_handles_labels()
        more = twin.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7)
    fig.tight_layout()
    results = {"command": command_line(), "seeds": seeds, "paper": PAPER, "skew": skew, "sensitivity": sensitivity,
               "groups": groups, "findings": findings}
    write_outputs(args.out, NAME, results, table, fig)
    return results


if __name__ == "__main__":
    main()
