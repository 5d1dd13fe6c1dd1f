"""Saves and partial recoveries at 1, 2 and 3 ranks: seconds per save, seconds per recovery, and the bytes a
recovery reads against the failed domain's own bytes (its rows and their optimizer state).

Each world size is a real multi-process job over gloo on this machine (spawned here), training the small
DLRM on the built-in synthetic set through `cpr.loop.train` with a full save every step (`partial`,
interval 1) and then recovering domain 0 a few times. At world size 1 the domains are emulated (as many
as the largest world size, so a domain is the same share of the model); above it they are the ranks.

    .venv/bin/python benchmarks/multirank.py [--world-sizes 1 2 3] [--rows 100000] [--out FILE]

Prints JSON: per world size, the median seconds a save stalls training (snapshot and commit; with a save
every step, also the wait for the previous write) and takes to write (the slowest rank's parts, in the
background), the median recovery seconds, bytes written per save, and
`read_ratio` = bytes read by a recovery / the domain's own bytes (target <= 1.2).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def worker(rank: int, world_size: int, folder: str, rows: int, steps: int, recoveries: int, domains: int) -> None:
    from cpr import CPRCheckpointer
    from cpr.comm import release_process_group
    from cpr.loop import train
    from cpr.train import quiet_dependencies
    from dlrm.data import open_dataset
    from dlrm.data.loader import BatchLoader
    from dlrm.data.schema import table_rows
    from dlrm.model import MODEL_CONFIGS, build_model, build_optimizer, wrap_dmp

    quiet_dependencies()
    out = Path(folder)
    dist.init_process_group("gloo", init_method=f"file://{out / 'pg'}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=300))
    sizes = table_rows(rows)
    data = open_dataset(None, table_rows=sizes, eval_fraction=0.1, synthetic_rows=20_000, seed=0)
    reader = BatchLoader(data.train, 256, rank=rank, world_size=world_size)
    torch.manual_seed(rank)
    model = wrap_dmp(build_model(MODEL_CONFIGS["small"], sizes), torch.device("cpu"), sharding="row_wise")
    optimizer = build_optimizer(model, 0.01)
    ckpt = CPRCheckpointer(model, optimizer, out / "ckpt", policy="partial", total_steps=steps + 1, reader=reader,
                           interval_steps=1, num_domains=domains if world_size == 1 else None, keep_last=2)
    train(model, optimizer, ckpt, reader, steps, lr_decay="none", log_every=10_000)
    recovery_seconds = []
    for _ in range(recoveries):
        dist.barrier()
        start = time.perf_counter()
        ckpt.recover([0])
        recovery_seconds.append(time.perf_counter() - start)
    # The bytes domain 0 holds: all of it at world size > 1 (its rank's rows), one row range of each table at 1.
    own = ckpt.tables.nbytes(ckpt.layout.held(0))
    report = ckpt.report()
    if rank == 0:
        saves = [c for c in report["checkpoints"] if c["kind"] == "full"][1:]  # the initial save warms up
        loads = [f["loaded_bytes"] for f in report["failures"]]
        result = {
            "world_size": world_size,
            "domains": report["domains"],
            "save_stall_seconds_median": statistics.median(c["seconds"] for c in saves),
            "save_write_seconds_median": statistics.median(c["persist_seconds"] for c in saves),
            "bytes_per_save": saves[-1]["bytes"],
            "recovery_seconds_median": statistics.median(recovery_seconds),
            "domain_bytes": own,
            "bytes_read_per_recovery": statistics.median(loads),
            "read_ratio": statistics.median(loads) / own,
        }
        (out / "result.json").write_text(json.dumps(result))
    ckpt.close()
    release_process_group()


def measure(world_size: int, rows: int, steps: int, recoveries: int, domains: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        context = mp.start_processes(worker, args=(world_size, folder, rows, steps, recoveries, domains),
                                     nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + 900
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"world size {world_size}: no result in 900 s")
        return json.loads((Path(folder) / "result.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--rows", type=int, default=100_000, help="cap on rows per table (26 tables)")
    parser.add_argument("--steps", type=int, default=6, help="training steps, each followed by a full save")
    parser.add_argument("--recoveries", type=int, default=3)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    os.environ.setdefault("CPR_COLLECTIVE_TIMEOUT_S", "300")
    domains = max(args.world_sizes)
    results = {"rows_cap": args.rows, "by_world_size": [
        measure(w, args.rows, args.steps, args.recoveries, domains) for w in args.world_sizes]}
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
