"""What every experiment shares: the data sets, `cpr.train` runs (cached, one progress line each),
statistics, and the files an experiment writes (results.json, results.md, a PNG).

Every run goes through `cpr.train.run(parse_args(flags))`; a run whose flags were already run is read back
from the cache (runs/experiments/cache/<hash of the flags>/summary.json), so experiments that share runs
(`make experiments`) train each once.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CRITEO_SAMPLE = REPO.parent / "shared" / "data" / "criteo" / "kaggle_train_sample.tsv"
RESULTS_ROOT = REPO / "runs" / "experiments"
CACHE = RESULTS_ROOT / "cache"
SCRATCH = Path("/dev/shm")  # where runs put their checkpoints, when it exists

# The small DLRM with tables capped at 2,000 rows: the model is small so that seed sweeps fit on 2 cores.
MODEL_FLAGS = ("--model", "small", "--rows", "2000", "--lr", "0.01", "--embedding-lr", "0.05", "--no-progress")
# Built-in Zipf set: 54,000 training rows in 106 steps of 512. Criteo sample: 9,000 training rows in 141 steps of 64.
DATASET_FLAGS = {
    "synthetic": ("--synthetic-rows", "60000", "--batch-size", "512"),
    "criteo_sample": ("--data", str(CRITEO_SAMPLE), "--batch-size", "64"),
}
# Torch threads per run. The runs are small (a few ms per step); on a shared 2-core machine a second
# intra-op thread mostly spins against other processes: one run took 81 s with 2 threads, 6 s with 1.
RUN_THREADS = 1
# Tiny settings for smoke tests (--tiny): a few steps on a small synthetic set.
TINY_DATASET_FLAGS = {"synthetic": ("--synthetic-rows", "3000", "--batch-size", "256", "--rows", "300")}


def experiment_parser(doc: str | None, quick_help: str | None = None) -> argparse.ArgumentParser:
    """The options every experiment takes: --quick (a fast look), --tiny (a smoke test), --seeds."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--tiny", action="store_true", help="smoke-test settings (seconds, meaningless numbers)")
    parser.add_argument("--seeds", type=int, nargs="+")
    return parser


def available_datasets(names: Iterable[str], tiny: bool = False) -> dict[str, tuple[str, ...]]:
    """The flags of each named data set that is present; says on stderr which are skipped and why."""
    table = TINY_DATASET_FLAGS if tiny else DATASET_FLAGS
    out = {}
    for name in names:
        if name not in table:
            print(f"skipping data set {name!r}: not available with these settings", file=sys.stderr)
        elif name == "criteo_sample" and not CRITEO_SAMPLE.exists():
            print(f"skipping data set {name!r}: {CRITEO_SAMPLE} not found", file=sys.stderr)
        else:
            out[name] = table[name]
    return out


@dataclass(frozen=True)
class Job:
    """One `cpr.train` run: a label for the progress line and its flags (without --out)."""

    label: str
    flags: tuple[str, ...]


class Runner:
    """Runs jobs in order, one progress line each, reading repeated runs back from the cache."""

    def __init__(self, total: int, cache: Path | None = None) -> None:
        self.total, self.done, self.cache = total, 0, cache or CACHE
        self.started = time.perf_counter()

    def run(self, job: Job) -> dict[str, Any]:
        from cpr.options import parse_args
        from cpr.train import quiet_dependencies, run

        self.done += 1
        key = hashlib.sha256(json.dumps(job.flags).encode()).hexdigest()[:16]
        out = self.cache / key
        summary_path, flags_path = out / "summary.json", out / "flags.json"
        start = time.perf_counter()
        if summary_path.exists() and flags_path.exists() and json.loads(flags_path.read_text()) == list(job.flags):
            summary, how = json.loads(summary_path.read_text()), "cached"
        else:
            import torch

            torch.set_num_threads(RUN_THREADS)
            quiet_dependencies()
            # Saves are fsynced; on tmpfs that costs nothing, and the checkpoints are not kept.
            with tempfile.TemporaryDirectory(prefix="cpr-experiment-", dir=SCRATCH if SCRATCH.is_dir() else None) as ckpt:
                summary = run(parse_args([*job.flags, "--out", str(out), "--checkpoint-dir", ckpt]))
            flags_path.write_text(json.dumps(list(job.flags)))
            how = f"{time.perf_counter() - start:.0f}s"
        pls = f"PLS {summary['pls_measured']:.4f} (expected {summary['pls_expected']:.4f})" if summary["failures"] else "no failures"
        print(f"[{self.done}/{self.total}] {job.label}: AUC {summary['auc']:.4f}, {len(summary['failures'])} failures, {pls}, "
              f"overhead {100 * summary['overhead']['total_fraction']:.2f}% ({how}, {time.perf_counter() - self.started:.0f}s in all)",
              flush=True)
        return summary


def run_all(jobs: Sequence[Job]) -> list[dict[str, Any]]:
    runner = Runner(len(jobs))
    return [runner.run(job) for job in jobs]


def expected_failures(flags: Sequence[str]) -> int:
    """The profile's expected failure count for a run with these flags, rounded (at least 1)."""
    from cpr.options import parse_args, profile_of

    return max(1, round(profile_of(parse_args(list(flags))).expected_failures))


# -- statistics ------------------------------------------------------------------------------------------
def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def linear_fit(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Least-squares y = slope * x + intercept and its R^2 (nan when x or y does not vary)."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(xs) < 2 or np.ptp(xs) == 0:
        return {"slope": math.nan, "intercept": math.nan, "r2": math.nan, "n": len(xs)}
    slope, intercept = np.polyfit(xs, ys, 1)
    residual = float(np.sum((ys - (slope * xs + intercept)) ** 2))
    total = float(np.sum((ys - ys.mean()) ** 2))
    return {"slope": float(slope), "intercept": float(intercept), "r2": 1 - residual / total if total else math.nan,
            "n": len(xs)}


# -- outputs ---------------------------------------------------------------------------------------------
def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    """How this experiment was started, repo-relative, for the report."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO)
    except ValueError:
        pass
    return shlex.join([".venv/bin/python", str(script), *sys.argv[1:]])


def write_outputs(out: Path, name: str, results: dict[str, Any], table: str, figure: plt.Figure) -> None:
    """OUT/results.json (with `experiment`), OUT/results.md (the table and findings) and OUT/NAME.png."""
    out.mkdir(parents=True, exist_ok=True)
    results = {"experiment": name, "figure": f"{name}.png", **results}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=_jsonable))
    findings = "\n".join(f"- {line}" for line in results.get("findings", []))
    (out / "results.md").write_text(f"{table}\n\n{findings}\n")
    figure.savefig(out / f"{name}.png", dpi=110)
    plt.close(figure)
    print(table)
    print(findings)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / f'{name}.png'}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)
