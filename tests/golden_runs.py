"""Golden runs: a fixed set of CLI runs whose saves (tensor for tensor) and summary numbers must not change
when code moves without a change of behaviour (a re-cut, a rename).

    .venv/bin/python tests/golden_runs.py record runs/golden-before.json   # before the change
    .venv/bin/python tests/golden_runs.py record runs/golden-after.json    # after it
    .venv/bin/python tests/golden_runs.py compare runs/golden-before.json runs/golden-after.json

`--only NAME` runs a subset. Each run's record holds a sha256 of every tensor of every committed save
(read back through the store, so every byte is verified) and the deterministic numbers of `summary.json`
(AUC, log loss, PLS expected and measured, bytes, saves, failures, emulated overhead); wall-clock numbers
are left out, and the bytes a recovery read (and the emulated load time charged for them) are compared to
0.1%: each manifest's `created` timestamp is text of varying length. Not a pytest module: a run of all of them takes several minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMALL = ("--model", "small", "--rows", "2000", "--synthetic-rows", "20000", "--batch-size", "128", "--steps", "60",
         "--no-progress", "--log-every", "20")

# name -> (launcher, arguments): "train" is `python -m cpr.train`, "torchrun2" two ranks under torchrun.
RUNS: dict[str, tuple[str, tuple[str, ...]]] = {
    **{f"sync-{policy}": ("train", (*SMALL, "--policy", policy, "--sync-save", *(() if policy == "none" else ("--failures", "2"))))
       for policy in ("none", "full", "partial", "mfu", "ssu", "scar")},
    **{f"async-{policy}": ("train", (*SMALL, "--policy", policy, "--failures", "2"))
       for policy in ("full", "partial", "mfu", "ssu", "scar")},
    "int8-partial": ("train", (*SMALL, "--policy", "partial", "--failures", "2", "--quantize", "int8")),
    "int4-mfu": ("train", (*SMALL, "--policy", "mfu", "--failures", "2", "--quantize", "int4")),
    "differential-mfu": ("train", (*SMALL, "--policy", "mfu", "--failures", "2", "--differential")),
    "differential-partial-sync": ("train", (*SMALL, "--policy", "partial", "--failures", "3", "--differential",
                                            "--sync-save", "--interval-steps", "5")),
    "torchrun2-partial": ("torchrun2", (*SMALL, "--policy", "partial", "--failures", "2", "--sync-save")),
    "torchrun2-mfu-rowwise": ("torchrun2", (*SMALL, "--policy", "mfu", "--failures", "2", "--sharding", "row_wise")),
    "torchrun2-full": ("torchrun2", (*SMALL, "--policy", "full", "--failures", "2")),
    "kill-nproc3-partial": ("train", (*SMALL, "--nproc", "3", "--policy", "partial", "--sync-save",
                                      "--interval-steps", "6", "--kill-at", "30:1")),
    "kill-nproc3-full": ("train", (*SMALL, "--nproc", "3", "--policy", "full", "--sync-save", "--interval-steps", "8",
                                   "--kill-at", "29:2")),
}
SUMMARY_KEYS = ("auc", "logloss", "steps", "steps_executed", "samples", "pls_expected", "pls_measured", "bytes_written",
                "lost_updates", "total_updates", "world_size", "num_shards", "policy", "policy_settings", "plan",
                "tracking_bytes", "policy_memory_bytes", "domains", "rows_skipped")


def _command(launcher: str, args: tuple[str, ...], out: Path) -> list[str]:
    flags = [*args, "--out", str(out)]
    if launcher == "torchrun2":
        return [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2", "-m", "cpr.train", *flags]
    return [sys.executable, "-m", "cpr.train", *flags]


def _tensor_digest(tensor) -> str:
    import torch

    h = hashlib.sha256(f"{tensor.dtype}{list(tensor.shape)}".encode())
    h.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()[:24]


def _saves(checkpoints: Path) -> dict[str, dict[str, str]]:
    """Every committed save's tensors, part by part, as digests (read and verified through the store)."""
    import warnings

    from cpr.storage import CheckpointStore

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store = CheckpointStore(checkpoints, keep_last=1000, lock=False)
        out = {}
        for save in store.saves():
            for part in sorted(save.parts):
                loaded = store.load_part(save, part)
                out[f"{save.folder.name}/{part}"] = {name: _tensor_digest(t) for name, t in sorted(loaded.tensors.items())}
        store.close()
    return out


# Numbers that vary by a few bytes from run to run (manifests hold their creation time as text), compared to 0.1%.
NEAR = {"loaded_bytes", "bytes_read", "survivor_bytes_read", "load", "total_hours", "total_fraction"}


def _summary(summary: dict) -> dict:
    """The deterministic numbers of a summary: no wall-clock seconds."""
    kept = {key: summary.get(key) for key in SUMMARY_KEYS}
    kept["policy_settings"] = {k: v for k, v in (summary.get("policy_settings") or {}).items() if k != "planning_seconds"}
    kept["checkpoints"] = [(c["step"], c["kind"], c["bytes"], c.get("data_bytes")) for c in summary["checkpoints"]]
    kept["failures"] = summary["failures"]
    kept["failed_saves"] = [(f["step"], f["kind"]) for f in summary["failed_saves"]]
    kept["recoveries"] = [{k: v for k, v in r.items() if not k.startswith("seconds") and k != "phases"}
                          for r in summary["recoveries"]]
    kept["overhead"] = summary["overhead"]
    return kept


def run_one(name: str, root: Path) -> dict:
    launcher, args = RUNS[name]
    out = root / name
    env = {**os.environ, "CPR_COLLECTIVE_TIMEOUT_S": "300", "CPR_REJOIN_TIMEOUT_S": "600", "PYTHONHASHSEED": "0"}
    result = subprocess.run(_command(launcher, args, out), cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"{name}: exit {result.returncode}\n{result.stderr[-4000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"summary": _summary(summary), "saves": _saves(out / "checkpoints")}


def record(path: Path, only: list[str] | None) -> None:
    names = only or list(RUNS)
    with tempfile.TemporaryDirectory(prefix="cpr-golden-") as tmp:
        results = {}
        for name in names:
            print(f"golden run {name} ...", file=sys.stderr, flush=True)
            results[name] = run_one(name, Path(tmp))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, sort_keys=True))
    print(f"wrote {path}: {len(results)} runs")


def _diff(a, b, where: str, out: list[str]) -> None:
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{where}[{i}]", out)
    elif isinstance(a, (int, float)) and isinstance(b, (int, float)) and where.rsplit("/", 1)[-1] in NEAR:
        if abs(a - b) > 1e-3 * max(abs(a), abs(b)):
            out.append(f"{where}: {a} != {b}")
    elif isinstance(a, dict) and isinstance(b, dict):
        for key in sorted((set(a) | set(b)) - {"planning_seconds"}):  # (wall clock)
            if key not in a or key not in b:
                out.append(f"{where}/{key}: only in {'after' if key not in a else 'before'}")
            else:
                _diff(a[key], b[key], f"{where}/{key}", out)
    elif a != b:
        out.append(f"{where}: {json.dumps(a)[:200]} != {json.dumps(b)[:200]}")


def compare(before: Path, after: Path) -> int:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    differences: list[str] = []
    for name in sorted(set(a) & set(b)):
        _diff(a[name], b[name], name, differences)
    missing = sorted(set(a) ^ set(b))
    for line in differences[:60]:
        print(line)
    print(f"{len(set(a) & set(b))} runs compared, {len(differences)} differences"
          + (f"; runs in one file only: {missing}" if missing else ""))
    return 1 if differences else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("path", type=Path)
    rec.add_argument("--only", nargs="+", choices=sorted(RUNS))
    cmp_ = sub.add_parser("compare")
    cmp_.add_argument("before", type=Path)
    cmp_.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.verb == "record":
        record(args.path, args.only)
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
