"""Checkpoint storage: bytes per save (raw, differential, int8, int4), full-save speed against the disk, and
the AUC lost by restoring quantized rows.

Prints one JSON object (and writes it to `--out` if given):

* `bytes_per_save`: a full save of the `kaggle` DLRM with tables capped at `--rows` rows, raw and with int8 /
  int4 rows, and a differential save after `--diff-steps` training steps of `--batch-size` (the rows those
  steps looked up, raw).
* `mb_s`: the raw full save (`cpr_sync`: snapshot, write, fsync, commit) against `dd`, a write of the same
  number of bytes in 64 MiB blocks to one file in the same folder followed by one fsync (the disk's limit).
* `auc_loss[codec][data][recovery]`: AUC of a run restored from raw rows minus AUC of the same run (same
  seed, data and failures) restored from `codec` rows, with partial and with full recovery; positive is AUC
  lost. Runs go through `cpr.train.run` with the small model, on the built-in synthetic set and on the real
  Criteo sample rows (`../shared/data/criteo/`, null when absent).

    .venv/bin/python benchmarks/storage.py [--rows 1000000] [--dir /tmp/cpr-storage-bench] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cpr import CPRCheckpointer
from cpr.train import parse_args, quiet_dependencies, run
from dlrm.data import open_dataset
from dlrm.data.loader import BatchLoader
from dlrm.data.schema import table_rows
from dlrm.model import MODEL_CONFIGS, build_model, build_optimizer, ensure_process_group, wrap_dmp

CRITEO_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "criteo" / "kaggle_train_sample.tsv"
CODECS = ("int8", "int4")
_BLOCK = 64 << 20


def dd_mb_s(folder: Path, nbytes: int) -> float:
    """MB/s of writing `nbytes` to one new file in `folder` in 64 MiB blocks, then one fsync."""
    block = np.random.default_rng(0).integers(0, 256, size=_BLOCK, dtype=np.uint8)
    path = folder / "dd.bin"
    start = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left:
            n = min(left, _BLOCK)
            f.write(memoryview(block)[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return nbytes / seconds / 1e6


def first_save(ckpt: CPRCheckpointer) -> tuple[int, float]:
    event = ckpt.ledger.checkpoints[0]  # the initial full save, made when the checkpointer is created
    return event.bytes, event.seconds


def storage_numbers(args: argparse.Namespace, folder: Path) -> dict:
    rows = table_rows(args.rows)
    device = torch.device("cpu")
    ensure_process_group(device)
    torch.manual_seed(0)
    model = wrap_dmp(build_model(MODEL_CONFIGS["kaggle"], rows), device, "rowwise_adagrad", 0.01)
    optimizer = build_optimizer(model, 0.001)
    data = open_dataset(None, table_rows=rows, eval_fraction=0.01, synthetic_rows=2 * args.batch_size * args.diff_steps)
    batches = iter(BatchLoader(data.train, args.batch_size, drop_last=True))

    # Raw full save (at creation) and the differential save of the next periodic "full" save.
    ckpt = CPRCheckpointer(model, optimizer, folder / "raw", policy="partial", total_steps=10**6,
                           interval_steps=args.diff_steps, differential=True)
    raw_bytes, raw_seconds = first_save(ckpt)
    for _ in range(args.diff_steps):
        batch = next(batches)
        optimizer.zero_grad()
        loss, _ = model(batch)
        loss.backward()
        optimizer.step()
        ckpt.step()
    diff = ckpt.ledger.checkpoints[-1]
    assert diff.kind == "subset" and diff.step == args.diff_steps, diff
    ckpt.close()
    shutil.rmtree(folder / "raw")
    dd = dd_mb_s(folder, raw_bytes)

    out = {"rows_cap": args.rows, "table_rows": sum(rows), "bytes": raw_bytes,
           "bytes_per_save": {"raw": raw_bytes, "diff": diff.bytes},
           "diff_after": {"steps": args.diff_steps, "batch_size": args.batch_size},
           "mb_s": {"dd": dd, "cpr_sync": raw_bytes / raw_seconds / 1e6},
           "save_seconds": {"raw": raw_seconds}}
    for codec in CODECS:
        quantized = CPRCheckpointer(model, optimizer, folder / codec, policy="partial", total_steps=10**6,
                                    interval_steps=10**6, quantize=codec)
        nbytes, seconds = first_save(quantized)
        out["bytes_per_save"][codec] = nbytes
        out["save_seconds"][codec] = seconds
        quantized.close()
        shutil.rmtree(folder / codec)
    out["bytes_ratio"] = {k: v / raw_bytes for k, v in out["bytes_per_save"].items()}
    out["mb_s"]["cpr_sync_over_dd"] = out["mb_s"]["cpr_sync"] / dd
    return out


def auc(folder: Path, name: str, data: list[str], recovery: str, codec: str, failures: int) -> float:
    args = parse_args([*data, "--model", "small", "--policy", recovery, "--quantize", codec, "--failures", str(failures),
                       "--num-shards", "4", "--no-progress", "--out", str(folder / f"{name}-{recovery}-{codec}")])
    return run(args)["auc"]


def auc_losses(folder: Path, failures: int) -> dict:
    datasets = {
        "synthetic": ["--rows", "2000", "--synthetic-rows", "30000", "--batch-size", "256", "--lr", "0.01",
                      "--embedding-lr", "0.05", "--epochs", "1"],
        "criteo_sample": (["--data", str(CRITEO_SAMPLE), "--rows", "20000", "--batch-size", "128", "--epochs", "2"]
                          if CRITEO_SAMPLE.exists() else None),
    }
    out: dict = {codec: {} for codec in CODECS}
    raw_auc: dict = {}
    for name, data in datasets.items():
        for codec in CODECS:
            out[codec][name] = None if data is None else {}
        if data is None:
            continue
        for recovery in ("partial", "full"):
            raw_auc[f"{name}/{recovery}"] = base = auc(folder, name, data, recovery, "none", failures)
            for codec in CODECS:
                out[codec][name][recovery] = base - auc(folder, name, data, recovery, codec, failures)
    return {"auc_loss": out, "auc_raw": raw_auc, "auc_failures": failures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="cap on rows per table of the kaggle config")
    parser.add_argument("--diff-steps", type=int, default=100, help="training steps before the differential save")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--failures", type=int, default=8, help="failures injected in each AUC run")
    parser.add_argument("--dir", help="where saves are written (default: a temporary folder, removed after)")
    parser.add_argument("--skip-auc", action="store_true")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    quiet_dependencies()

    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="cpr-storage-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        result = storage_numbers(args, folder)
        if not args.skip_auc:
            result.update(auc_losses(folder, args.failures))
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
