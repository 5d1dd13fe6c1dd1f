"""Prioritized checkpoints at equal bytes written: PLS and AUC of `partial`, `mfu`, `ssu` and `scar`.

For each dataset (the built-in Zipf set, and the real Criteo rows when present) it trains the small DLRM
with `python -m cpr.train` settings: once without failures (the reference AUC), then with the same seeded
failure schedule under each policy. `partial` saves every T_partial (the interval that meets
--target-pls); its bytes per emulated hour, B_full / T_partial, is the budget the other policies get:
`cpr.planning.plan_for_budget` picks their T_full, T_sub and r (or p) with the least expected PLS within
it, from the accesses of the calibration window (the first 5% of the run's batches), and they run with
those settings pinned. Prints one JSON object (and writes it to --out):

    {"config": {...}, "datasets": {"synthetic": {"none": {...}, "partial": {...}, "mfu": {...}, ...},
     "criteo_sample": {...} or {"skipped": "..."}}, "tracking_bytes": {...}, "targets": {...}}

Per policy: pls_measured, pls_expected, auc, auc_loss (no-failure AUC minus this AUC), bytes_per_hour
(measured, incl. the initial full save), planned_bytes_per_hour (the budget model), settings.
`tracking_bytes` is for the `kaggle` config: 26 tables at the full Kaggle cardinalities (no training).

    .venv/bin/python benchmarks/policies.py [--steps 160] [--failures 8] [--data FILE] [--out FILE]

Defaults: the `small` model, 160 steps, tables capped at 2,000 rows, 16 shards, 8 failures, PLS target
0.02; batch 256 on 60,000 synthetic rows, 64 on the Criteo sample's 9,000 training rows. About 3
minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
from pathlib import Path
from typing import Any

from cpr.planning import AccessProfile, ClusterProfile, plan_for_budget
from cpr.policies.prioritized import CALIBRATION_FRACTION, subset_row_bytes
from cpr.domains import DomainLayout
from cpr.tables import EmbeddingTables
from cpr.tracking import AccessTracker
from cpr.options import parse_args
from cpr.train import quiet_dependencies, run
from dlrm.data import open_dataset
from dlrm.data.loader import BatchLoader
from dlrm.data.schema import KAGGLE_CARDINALITIES, SPARSE_NAMES, table_rows
from dlrm.model import MODEL_CONFIGS, build_model, build_optimizer, default_device, ensure_process_group, wrap_dmp

REPO = Path(__file__).resolve().parents[1]
CRITEO_SAMPLE = REPO.parent / "shared" / "data" / "criteo" / "kaggle_train_sample.tsv"
PRIORITIZED = ("mfu", "ssu", "scar")
KNOB_FLAG = {"mfu": ("--save-fraction", "fraction"), "scar": ("--save-fraction", "fraction"),
             "ssu": ("--sample-rate", "sample_rate")}


def calibration_access(flags: list[str], steps: int, num_domains: int) -> tuple[AccessProfile, dict[str, int]]:
    """Per-row accesses of the run's first calibration batches (no training), and the bytes per subset
    row, from the same data and model tables `cpr.train.run` builds for `flags`."""
    args = parse_args(flags)
    rows = table_rows(args.rows)
    dataset = open_dataset(args.data, data_format=args.data_format, table_rows=rows, eval_fraction=args.eval_fraction,
                           synthetic_rows=args.synthetic_rows, zipf_alpha=args.zipf_alpha, seed=args.seed)
    device = default_device()
    ensure_process_group(device)
    model = wrap_dmp(build_model(MODEL_CONFIGS[args.model], rows), device, args.embedding_optimizer, args.lr)
    build_optimizer(model, args.lr)
    tables = EmbeddingTables(model)
    tracker = AccessTracker({n: i.local_rows for n, i in tables.tables.items()}, tables.feature_to_table)
    window = math.ceil(CALIBRATION_FRACTION * steps)
    loader, seen = BatchLoader(dataset.train, args.batch_size), 0
    while seen < window:
        for batch in loader:
            tracker.observe(batch.sparse_features)
            seen += 1
            if seen == window:
                break
    layout = DomainLayout.virtual(tables.tables, num_domains)
    counts = {t: tracker.counts(t) for t in tables.tables}
    return AccessProfile.from_counts(counts, layout.ranges, window), subset_row_bytes(tables)


def result(summary: dict[str, Any], reference_auc: float) -> dict[str, Any]:
    return {
        "pls_measured": summary["pls_measured"],
        "pls_expected": summary["pls_expected"],
        "auc": summary["auc"],
        "auc_loss": reference_auc - summary["auc"],
        "bytes_per_hour": summary["bytes_per_hour"],
        "bytes_written": summary["bytes_written"],
        "checkpoints": {kind: sum(c["kind"] == kind for c in summary["checkpoints"]) for kind in ("full", "subset")},
        "failures": len(summary["failures"]),
        "policy_memory_bytes": summary["policy_memory_bytes"],
        "settings": summary["policy_settings"],
    }


def compare(name: str, data_flags: list[str], batch_size: int, opts: argparse.Namespace, work: Path) -> dict[str, Any]:
    """No-failure reference, `partial`, and the prioritized policies at partial's bytes per hour."""
    flags = [*data_flags, "--model", "small", "--batch-size", str(batch_size), "--rows", str(opts.rows),
             "--steps", str(opts.steps), "--seed", str(opts.seed), "--target-pls", str(opts.target_pls),
             "--num-shards", str(opts.num_shards), "--no-progress"]
    reference = run(parse_args([*flags, "--out", str(work / name / "none")]))
    failing = [*flags, "--failures", str(opts.failures)]
    partial = run(parse_args([*failing, "--policy", "partial", "--out", str(work / name / "partial")]))
    out: dict[str, Any] = {"none": {"auc": reference["auc"], "logloss": reference["logloss"]},
                           "partial": result(partial, reference["auc"])}
    profile = dataclasses.replace(ClusterProfile.preset("production"), num_domains=opts.num_shards)
    steps = partial["steps"]
    hours_per_step = profile.job_hours / steps
    full_bytes = partial["checkpoints"][0]["bytes"]  # the initial full save
    budget = full_bytes / (partial["policy_settings"]["interval_steps"] * hours_per_step)
    out["partial"]["planned_bytes_per_hour"] = budget
    access, row_bytes = calibration_access(flags, steps, opts.num_shards)
    for policy in PRIORITIZED:
        chosen = plan_for_budget(policy, access, profile, budget, hours_per_step, steps, full_bytes, row_bytes)
        pinned = ["--interval-steps", str(chosen.full_interval_steps)]
        if chosen.subset_interval_steps:
            flag, field = KNOB_FLAG[policy]
            pinned += ["--subset-interval-steps", str(chosen.subset_interval_steps), flag, str(getattr(chosen, field))]
        summary = run(parse_args([*failing, "--policy", policy, *pinned, "--out", str(work / name / policy)]))
        out[policy] = {**result(summary, reference["auc"]), "planned_bytes_per_hour": chosen.bytes_per_hour,
                       "budget_plan_expected_pls": chosen.expected_pls}
    return out


def kaggle_tracking_bytes(ssu_capacity: int) -> dict[str, Any]:
    """Tracking state for 26 tables at the Kaggle cardinalities: MFU counters vs SSU sets."""
    tables = {f"t_{f}": rows for f, rows in zip(SPARSE_NAMES, KAGGLE_CARDINALITIES)}
    features = {f: f"t_{f}" for f in SPARSE_NAMES}
    mfu = AccessTracker(tables, features, mode="mfu").memory_breakdown()
    ssu = AccessTracker(tables, features, mode="ssu", ssu_capacity=ssu_capacity).memory_breakdown()
    return {
        "mfu": mfu["counters"],
        "ssu": ssu["ssu_sets"],
        "ssu_capacity": ssu_capacity,
        "ssu_over_mfu": ssu["ssu_sets"] / mfu["counters"],
        "rows": sum(KAGGLE_CARDINALITIES),
    }


def targets(datasets: dict[str, Any], tracking: dict[str, Any]) -> dict[str, Any]:
    met: dict[str, Any] = {}
    for name, res in datasets.items():
        if "partial" not in res:
            continue
        partial = res["partial"]
        for policy in ("mfu", "ssu"):
            met[f"{name}/{policy}: pls <= partial/2"] = res[policy]["pls_measured"] <= partial["pls_measured"] / 2
            met[f"{name}/{policy}: auc_loss < partial's"] = res[policy]["auc_loss"] < partial["auc_loss"]
    met["ssu tracking <= 5% of mfu"] = tracking["ssu_over_mfu"] <= 0.05
    return met


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=160, help="training steps per run")
    p.add_argument("--failures", type=int, default=8, help="failures injected (same seeded schedule for every policy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-pls", type=float, default=0.02, help="sets partial's interval, hence the byte budget")
    p.add_argument("--num-shards", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--criteo-batch-size", type=int, default=64,
                   help="batch size on the Criteo sample (9,000 training rows: 64 makes 141 batches an epoch)")
    p.add_argument("--rows", type=int, default=2_000, help="cap on rows per table")
    p.add_argument("--synthetic-rows", type=int, default=60_000)
    p.add_argument("--data", default=str(CRITEO_SAMPLE), help="real Criteo Kaggle-format rows")
    p.add_argument("--out", help="also write the JSON here")
    opts = p.parse_args()
    quiet_dependencies()
    datasets: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cpr-policies-") as tmp:
        work = Path(tmp)
        datasets["synthetic"] = compare("synthetic", ["--synthetic-rows", str(opts.synthetic_rows)], opts.batch_size, opts, work)
        if Path(opts.data).exists():
            datasets["criteo_sample"] = compare("criteo_sample", ["--data", opts.data], opts.criteo_batch_size, opts, work)
        else:
            datasets["criteo_sample"] = {"skipped": f"{opts.data} is absent"}
    capacity = datasets["synthetic"]["ssu"]["settings"].get("ssu_capacity") or 8192
    tracking = kaggle_tracking_bytes(capacity)
    report = {"config": vars(opts), "datasets": datasets, "tracking_bytes": tracking,
              "targets": targets(datasets, tracking)}
    text = json.dumps(report, indent=2, default=float)
    print(text)
    if opts.out:
        Path(opts.out).write_text(text)


if __name__ == "__main__":
    main()
