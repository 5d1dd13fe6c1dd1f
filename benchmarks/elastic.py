"""Elastic jobs: what a change of the job's ranks costs.

    .venv/bin/python benchmarks/elastic.py [--parts reshard] [--rows 100000] [--out FILE]

Prints JSON, one key per part:

* `reshard_resume`: a full save written by 3 ranks (row-wise) is restored by a 3-rank job (the same plan)
  and by a 2-rank job (another world size and plan, read by global row range: `cpr/recovery/reshard.py`).
  Only the restore is timed (`Restorer.rollback` with every rank between two barriers, median of a few),
  not the start of processes, TorchRec or the model; `ratio` = reshard seconds / same-size seconds, and the
  bytes each read.

Each job is a real multi-process job over gloo on this machine (spawned here), the small DLRM on the
built-in synthetic set. Take numbers with `/work/bin/heavy --alone` (or on an otherwise idle machine).
"""
from __future__ import annotations

import argparse
import json
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


def _job(rank: int, world_size: int, folder: Path, rows: int, steps: int, sharding: str, resume: bool):
    from cpr import CPRCheckpointer
    from cpr.train import quiet_dependencies
    from dlrm.data import open_dataset
    from dlrm.data.loader import BatchLoader
    from dlrm.data.schema import table_rows
    from dlrm.model import MODEL_CONFIGS, build_model, build_optimizer, wrap_dmp

    quiet_dependencies()
    sizes = table_rows(rows)
    data = open_dataset(None, table_rows=sizes, eval_fraction=0.1, synthetic_rows=20_000, seed=0)
    reader = BatchLoader(data.train, 256, rank=rank, world_size=world_size)
    torch.manual_seed(rank)
    model = wrap_dmp(build_model(MODEL_CONFIGS["small"], sizes), torch.device("cpu"), sharding=sharding)
    optimizer = build_optimizer(model, 0.01)
    ckpt = CPRCheckpointer(model, optimizer, folder / "ckpt", policy="full", total_steps=steps + 1, reader=reader,
                           interval_steps=steps, keep_last=2, resume=resume)
    return model, optimizer, reader, ckpt


def reshard_worker(rank: int, world_size: int, folder: str, rows: int, steps: int, sharding: str, mode: str,
                   repeats: int) -> None:
    """`mode` "write": train `steps` steps and save; "restore": resume that save, then time `repeats` more
    restores of it (every rank between barriers) into OUT/restore-<world size>-<rank>.json."""
    from cpr.comm import release_process_group
    from cpr.loop import train

    out = Path(folder)
    dist.init_process_group("gloo", init_method=f"file://{out / f'pg-{mode}-{world_size}'}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=600))
    try:
        model, optimizer, reader, ckpt = _job(rank, world_size, out, rows, steps, sharding, mode == "restore")
        if mode == "write":
            train(model, optimizer, ckpt, reader, steps, lr_decay="none", log_every=10_000)
            ckpt.flush()
            ckpt.close()
            return
        restorer, seconds, nbytes = ckpt.recovery.restorer, [], 0
        for _ in range(repeats):
            saves = ckpt.store.saves()
            dist.barrier()
            started = time.perf_counter()
            rolled_back = restorer.rollback(saves, resume=True)
            dist.barrier()
            seconds.append(time.perf_counter() - started)
            nbytes = rolled_back.bytes_read
        (out / f"restore-{world_size}-{rank}.json").write_text(json.dumps(
            {"seconds": seconds, "bytes_read": nbytes, "step": rolled_back.step}))
        ckpt.close()
    finally:
        release_process_group()


def _spawn(world_size: int, *args) -> None:
    mp.start_processes(reshard_worker, args=(world_size, *args), nprocs=world_size, join=True, start_method="spawn")


def bench_reshard(rows: int, steps: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _spawn(3, tmp, rows, steps, "row_wise", "write", repeats)
        found = {}
        for world_size, sharding in ((3, "row_wise"), (2, "table_wise")):
            _spawn(world_size, tmp, rows, steps, sharding, "restore", repeats)
            ranks = [json.loads((folder / f"restore-{world_size}-{r}.json").read_text()) for r in range(world_size)]
            found[world_size] = {
                "sharding": sharding,
                "restore_s_median": statistics.median(max(r["seconds"][i] for r in ranks) for i in range(repeats)),
                "bytes_read": sum(r["bytes_read"] for r in ranks),
                "step": ranks[0]["step"],
            }
    same, resharded = found[3], found[2]
    return {"written_by": "3 ranks, row_wise", "same_size_3_ranks": same, "reshard_to_2_ranks": resharded,
            "ratio": resharded["restore_s_median"] / same["restore_s_median"], "rows": rows, "repeats": repeats}


PARTS = {"reshard": lambda args: {"reshard_resume": bench_reshard(args.rows, args.steps, args.repeats)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=sorted(PARTS))
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the largest table (as --rows of cpr.train)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = {}
    for part in args.parts:
        result.update(PARTS[part](args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
