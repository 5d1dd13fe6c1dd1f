"""Training throughput of the `kaggle` DLRM: DMP with fbgemm's fused kernel vs a plain unfused EBC.

Prints one JSON object. Both variants train the same model shape on the same Zipf-skewed batches from the
built-in synthetic set; the fused variant steps its tables inside backward (row-wise Adagrad), the plain
one computes dense table gradients and steps them with torch's Adagrad, as a model without TorchRec's
sharding would.

    .venv/bin/python benchmarks/train_throughput.py [--rows 100000] [--batch-size 2048] [--steps 30]
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from dlrm.data import open_dataset
from dlrm.data.loader import BatchLoader
from dlrm.data.schema import table_rows
from dlrm.model import MODEL_CONFIGS, build_model, build_optimizer, ensure_process_group, wrap_dmp


def _samples_per_s(step, batches, warmup: int, steps: int) -> float:
    for batch in batches[:warmup]:
        step(batch)
    start = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    elapsed = time.perf_counter() - start
    return steps * batches[0].labels.numel() / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="cap on rows per table")
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()

    rows = table_rows(args.rows)
    data = open_dataset(None, table_rows=rows, eval_fraction=0.01, synthetic_rows=args.batch_size * 20)
    batches = list(BatchLoader(data.train, args.batch_size, drop_last=True))
    config = MODEL_CONFIGS["kaggle"]
    device = torch.device("cpu")
    ensure_process_group(device)

    torch.manual_seed(0)
    dmp = wrap_dmp(build_model(config, rows), device, "rowwise_adagrad", 0.05)
    fused_opt = build_optimizer(dmp, 0.05)

    def fused_step(batch) -> None:
        fused_opt.zero_grad()
        loss, _ = dmp(batch)
        loss.backward()
        fused_opt.step()

    torch.manual_seed(0)
    plain = build_model(config, rows, device="cpu")
    plain_opt = torch.optim.Adagrad(plain.parameters(), lr=0.05)

    def plain_step(batch) -> None:
        plain_opt.zero_grad()
        loss, _ = plain(batch)
        loss.backward()
        plain_opt.step()

    fused = _samples_per_s(fused_step, batches, args.warmup, args.steps)
    unfused = _samples_per_s(plain_step, batches, args.warmup, max(3, args.steps // 5))
    print(json.dumps({
        "model": "kaggle",
        "batch_size": args.batch_size,
        "table_rows_cap": args.rows,
        "total_rows": sum(rows),
        "samples_per_s_dmp_fused": round(fused, 1),
        "samples_per_s_plain_ebc": round(unfused, 1),
        "speedup": round(fused / unfused, 2),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }))


if __name__ == "__main__":
    main()
