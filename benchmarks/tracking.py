"""Cost of CPR's access tracking (cpr.tracking) on CPU. Prints one JSON object.

* step_overhead_fraction: extra time of `AccessTracker.observe` per training step of the `kaggle` DLRM
  (26 tables capped at --rows rows, dim 16, DMP with fbgemm's fused kernel and row-wise Adagrad), from
  steps with and without it run in interleaved pairs: median pair difference over the median plain step.
  observe_over_step times observe alone, right after a step (cold caches), over the median step.
* ids_per_s_*: one Zipf id stream counted by the CPR op, by the best pure-torch way (bincount + add per
  table) and recorded by TorchRec's ModelDeltaTracker (id-only mode, then get_unique_ids()).
* bytes_per_row_mfu (all MFU state: the int32 counters, which also tell which rows are unsaved),
  ssu_bytes (all SSU state) for two table sizes.
* gather_gb_per_s vs copy_gb_per_s: index_select of hot rows against a contiguous copy of as many bytes,
  which is why there is no custom gather op.

    .venv/bin/python benchmarks/tracking.py [--quick] [--rows 100000] [--batch-size 2048]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cpr.tracking import AccessTracker
from dlrm.data.schema import NUM_DENSE, SPARSE_NAMES, table_rows
from dlrm.model import MODEL_CONFIGS, build_model, build_optimizer, ensure_process_group, table_name, wrap_dmp

ZIPF_ALPHA = 1.05


def zipf_batches(rows: list[int], batch_size: int, count: int, seed: int = 0) -> list[Batch]:
    """Criteo-shaped batches (one id per feature and sample) with Zipf-distributed ids per table."""
    rng = np.random.default_rng(seed)
    samplers = []
    for r in rows:
        cdf = np.cumsum(1.0 / np.arange(1, r + 1) ** ZIPF_ALPHA)
        samplers.append((cdf / cdf[-1], rng.permutation(r)))
    batches = []
    for _ in range(count):
        ids = [perm[np.minimum(np.searchsorted(cdf, rng.random(batch_size)), len(perm) - 1)] for cdf, perm in samplers]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=SPARSE_NAMES,
            values=torch.from_numpy(np.concatenate(ids)).long(),
            lengths=torch.ones(len(rows) * batch_size, dtype=torch.int32),
        )
        batches.append(Batch(
            dense_features=torch.randn(batch_size, NUM_DENSE),
            sparse_features=kjt,
            labels=torch.randint(0, 2, (batch_size,)).float(),
        ))
    return batches


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_overhead(dmp, batches: list[Batch], steps: int, warmup: int) -> dict[str, float]:
    optimizer = build_optimizer(dmp, 0.05)
    tracker = AccessTracker.from_module(dmp)

    def train(batch: Batch) -> None:
        optimizer.zero_grad()
        loss, _ = dmp(batch)
        loss.backward()
        optimizer.step()

    def train_tracked(batch: Batch) -> None:
        tracker.observe(batch.sparse_features)
        train(batch)

    for i in range(warmup):
        train_tracked(batches[i % len(batches)])
    plain, tracked, observe = [], [], []
    for i in range(steps):
        batch = batches[i % len(batches)]
        # Alternate which variant goes first so that drifts (caches, clocks) hit both alike.
        if i % 2:
            tracked.append(seconds(lambda: train_tracked(batch)))
            plain.append(seconds(lambda: train(batch)))
        else:
            plain.append(seconds(lambda: train(batch)))
            tracked.append(seconds(lambda: train_tracked(batch)))
        observe.append(seconds(lambda: tracker.observe(batch.sparse_features)))
    step = statistics.median(plain)
    return {
        "step_ms": 1e3 * step,
        "step_tracked_ms": 1e3 * statistics.median(tracked),
        "observe_ms": 1e3 * statistics.median(observe),
        # Median of paired differences: each pair ran back to back, so load from other processes mostly
        # cancels, which a difference of two medians would not do.
        "step_overhead_fraction": statistics.median(t - p for t, p in zip(tracked, plain)) / step,
        "observe_over_step": statistics.median(observe) / step,
    }


def ids_per_s(rows: list[int], dmp, kjts: list[KeyedJaggedTensor], repeats: int) -> dict[str, float | None]:
    ids = sum(k.values().numel() for k in kjts)
    tracker = AccessTracker(
        {table_name(f): r for f, r in zip(SPARSE_NAMES, rows)}, {f: table_name(f) for f in SPARSE_NAMES}
    )
    counters = [torch.zeros(r, dtype=torch.int64) for r in rows]

    def cpr() -> None:
        for kjt in kjts:
            tracker.observe(kjt)

    def torch_bincount() -> None:
        for kjt in kjts:
            for counter, values in zip(counters, kjt.values().split(kjt.length_per_key())):
                counter += torch.bincount(values, minlength=counter.numel())

    from torchrec.distributed.model_tracker.types import DeltaTrackerConfig, TrackingMode

    # Made after the step timings, as it hooks the sharded modules' lookups; fed the same KJTs directly.
    delta = dmp.init_torchrec_delta_tracker(DeltaTrackerConfig(tracking_mode=TrackingMode.ID_ONLY))

    def delta_tracker() -> None:
        for kjt in kjts:
            delta.record_ids(kjt)
            delta.step()
        delta.get_unique_ids()

    result: dict[str, float | None] = {}
    for name, fn in [("cpr", cpr), ("torch", torch_bincount), ("delta_tracker", delta_tracker)]:
        fn()  # warm-up
        result[f"ids_per_s_{name}"] = ids / min(seconds(fn) for _ in range(repeats))
    return result


def gather_bandwidth(rows: int, dim: int, fraction: float, repeats: int) -> dict[str, float]:
    weight = torch.randn(rows, dim)
    hot = torch.randperm(rows)[: int(rows * fraction)].sort().values
    contiguous = weight[: hot.numel()]
    out = torch.empty_like(contiguous)
    nbytes = hot.numel() * dim * weight.element_size()
    gather = min(seconds(lambda: torch.index_select(weight, 0, hot, out=out)) for _ in range(repeats))
    copy = min(seconds(lambda: out.copy_(contiguous)) for _ in range(repeats))
    return {"gather_gb_per_s": nbytes / gather / 1e9, "copy_gb_per_s": nbytes / copy / 1e9}


def memory(rows: int) -> dict[str, object]:
    mfu = AccessTracker({"t": rows}, {"f": "t"}).memory_bytes()
    ssu = {str(r): AccessTracker({"t": r}, {"f": "t"}, mode="ssu").memory_bytes() for r in (rows, 100 * rows)}
    return {"bytes_per_row_mfu": mfu / rows, "ssu_bytes": ssu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="cap on rows per table")
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--quick", action="store_true", help="few steps, for a smoke test")
    args = parser.parse_args()
    steps, warmup, repeats, stream = (6, 2, 2, 4) if args.quick else (100, 5, 5, 20)

    rows = table_rows(args.rows)
    batches = zipf_batches(rows, args.batch_size, max(stream, 4))
    ensure_process_group(torch.device("cpu"))
    torch.manual_seed(0)
    dmp = wrap_dmp(build_model(MODEL_CONFIGS["kaggle"], rows), torch.device("cpu"), "rowwise_adagrad", 0.05)

    result: dict[str, object] = {"model": "kaggle", "batch_size": args.batch_size, "table_rows_cap": args.rows}
    result.update(step_overhead(dmp, batches, steps, warmup))
    result.update(ids_per_s(rows, dmp, [b.sparse_features for b in batches[:stream]], repeats))
    result.update(memory(args.rows))
    result.update(gather_bandwidth(10 * args.rows, MODEL_CONFIGS["kaggle"].embedding_dim, 0.1, repeats))
    result.update(threads=torch.get_num_threads(), machine=platform.machine(), quick=args.quick)
    print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
