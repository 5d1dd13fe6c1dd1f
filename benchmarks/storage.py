"""Checkpoint storage: bytes per save (raw, differential, int8, int4), full-save speed against the disk, and
the AUC lost by restoring quantized rows.

Prints one JSON object (and writes it to `--out` if given):

* `bytes_per_save`: a full save of the `kaggle` DLRM with tables capped at `--rows` rows, raw and with int8 /
  int4 rows, and a differential save after `--diff-steps` training steps of `--batch-size` (the rows those
  steps looked up, raw).
* `mb_s`: the raw full save (`cpr_sync`: write, fsync, commit, with the profile's 16 emulated domains;
  `cpr_sync_one_domain`: the same with one domain, as each rank of a multi-rank job holds; `cpr_async`: the
  16-domain save written by the background thread, snapshot to commit) against `dd`, a write of the same
  number of bytes in 64 MiB blocks
  to one file in the same folder followed by one fsync (the disk's limit), and against `dcp`/`dcp_async`:
  `torch.distributed.checkpoint.save`/`async_save` of the same DMP model and optimizer state dict (their own
  bytes over the time until the checkpoint is complete). Each is the median of `--repeats` warm saves (the
  first save of a process also pays for page-cache and allocator warm-up), as is `save_seconds`.
* `restore_one_domain_read_ratio`: the bytes read to restore one of the emulated domains (its part of the full
  save and of the differential save after `--diff-steps`) over that domain's own rows and row-wise state.
* `async_stall_fraction`: what an asynchronous full save made training wait (its copy-on-write snapshot, the
  rows kept before the steps run meanwhile change them, and gathering and
  settling the commit, measured in a training loop with a full save every `--stall-interval` steps, long
  enough for one save to be written before the next is due: a save due earlier first waits for the one in
  flight, which measures the disk, not the stall) over the time of a synchronous save;
  `async_contention_fraction` adds the slowdown of the training steps run while the save was written (the
  writer thread shares the cores), as the sum over those steps of their time beyond the median step.
* `throughput`: wall-clock samples/s (saves included, no failures) of `--throughput-steps` training steps of
  the same config with `--policy none`, `mfu` and `ssu`, the fastest of `--throughput-rounds` interleaved
  runs each, training with `--threads` intra-op threads (the writer thread has the other cores);
  `throughput_ratio` over `none`; `throughput_threads` also has a `none` run with torch's default threads;
  `throughput_breakdown` says where each fastest run's time went (steps, the training thread's time on
  saves, the writer thread's).
* `targets`: each of issue 11's storage targets, measured, and for a missed one what limits it.
* `bytes_per_hour`: emulated-hour write volume of `partial` (full saves at the PLS target's interval) and of
  `mfu --differential --quantize int8` at the same PLS target, from the same runs' length.
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
from cpr.options import parse_args
from cpr.train import quiet_dependencies, run
from dlrm.data import open_dataset
from dlrm.data.loader import BatchLoader
from dlrm.data.schema import table_rows
from dlrm.model import MODEL_CONFIGS, build_model, build_optimizer, ensure_process_group, wrap_dmp

CRITEO_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "criteo" / "kaggle_train_sample.tsv"
CODECS = ("int8", "int4")
_BLOCK = 64 << 20
STALL_SAVES = 4  # asynchronous full saves timed for the stall (their mean)


def dd_mb_s(folder: Path, nbytes: int, repeats: int) -> float:
    """MB/s of writing `nbytes` to one new file in `folder` in 64 MiB blocks, then one fsync (median)."""
    block = np.random.default_rng(0).integers(0, 256, size=_BLOCK, dtype=np.uint8)
    path = folder / "dd.bin"
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        with open(path, "wb") as f:
            left = nbytes
            while left:
                n = min(left, _BLOCK)
                f.write(memoryview(block)[:n])
                left -= n
            f.flush()
            os.fsync(f.fileno())
        rates.append(nbytes / (time.perf_counter() - start) / 1e6)
        path.unlink()
    return float(np.median(rates))


def first_save(ckpt: CPRCheckpointer) -> tuple[int, float]:
    event = ckpt.ledger.checkpoints[0]  # the initial full save, made when the checkpointer is created
    return event.bytes, event.seconds


def train_step(model, optimizer, ckpt: CPRCheckpointer | None, batch) -> None:
    optimizer.zero_grad()
    loss, _ = model(batch)
    loss.backward()
    optimizer.step()
    if ckpt is not None:
        ckpt.step()


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


class ShardedCopyStager:
    """An `AsyncStager` for dcp.async_save that copies a TorchRec state dict: DCP's default stager cannot copy
    a ShardedTensor (its `data_ptr` is unsupported), so each local shard is cloned into a new ShardedTensor."""

    _synchronize_after_execute = False
    should_synchronize_after_execute = False

    def stage(self, state: dict) -> dict:
        from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor

        def copy(value):
            if isinstance(value, ShardedTensor):
                shards = [Shard(s.tensor.detach().clone(), s.metadata) for s in value.local_shards()]
                return ShardedTensor._init_from_local_shards_and_global_metadata(shards, value.metadata())
            if isinstance(value, torch.Tensor):
                return value.detach().clone()
            if isinstance(value, dict):
                return {k: copy(v) for k, v in value.items()}
            if isinstance(value, list):
                return [copy(v) for v in value]
            return value

        return copy(state)

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def dcp_numbers(model, optimizer, folder: Path, repeats: int) -> dict:
    """MB/s of dcp.save and dcp.async_save of the model and optimizer state dict (medians of `repeats`
    saves, each into a new folder), and async_save's stall."""
    import torch.distributed.checkpoint as dcp

    state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    rates: dict[str, list[float]] = {"dcp": [], "dcp_async": [], "dcp_async_stall_s": []}
    for _ in range(repeats):
        started = time.perf_counter()
        dcp.save(state, checkpoint_id=str(folder / "dcp"))
        rates["dcp"].append(folder_bytes(folder / "dcp") / (time.perf_counter() - started) / 1e6)
        started = time.perf_counter()
        future = dcp.async_save(state, checkpoint_id=str(folder / "dcp-async"), async_stager=ShardedCopyStager())
        rates["dcp_async_stall_s"].append(time.perf_counter() - started)
        future.result()
        rates["dcp_async"].append(folder_bytes(folder / "dcp-async") / (time.perf_counter() - started) / 1e6)
        shutil.rmtree(folder / "dcp")
        shutil.rmtree(folder / "dcp-async")
    return {key: float(np.median(values)) for key, values in rates.items()}


def cpr_full_saves(model, optimizer, folder: Path, repeats: int, async_save: bool,
                   quantize: str = "none", num_domains: int | None = None) -> tuple[int, float]:
    """(bytes, median seconds) of `repeats` full saves after the initial one, snapshot to commit: policy
    `full` saving at every step, each step waiting for its save to commit; `num_domains` emulated domains (the
    profile's 16 by default)."""
    ckpt = CPRCheckpointer(model, optimizer, folder / "speed", policy="full", total_steps=10**6, interval_steps=1,
                           keep_last=1, async_save=async_save, quantize=quantize, num_domains=num_domains)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        ckpt.step()
        ckpt.flush()
        seconds.append(time.perf_counter() - started)
    nbytes = ckpt.ledger.checkpoints[-1].bytes
    ckpt.close()
    shutil.rmtree(folder / "speed")
    return nbytes, float(np.median(seconds))


def async_stall(model, optimizer, batches, folder: Path, interval: int, sync_seconds: float) -> dict:
    """Train with a full save every `interval` steps, written in the background; what the saves cost training."""
    ckpt = CPRCheckpointer(model, optimizer, folder / "async", policy="full", total_steps=10**6, interval_steps=interval)
    step_seconds, in_flight = [], []
    saving = False
    for _ in range((STALL_SAVES + 1) * interval):  # the save at the last step is not committed in a step
        committed = len(ckpt.ledger.checkpoints)
        started = time.perf_counter()
        train_step(model, optimizer, ckpt, next(batches))
        step_seconds.append(time.perf_counter() - started)
        in_flight.append(saving)
        saving = (saving or ckpt.global_step % interval == 0) and len(ckpt.ledger.checkpoints) == committed
    saves = [e for e in ckpt.ledger.checkpoints[1:] if e.kind == "full"]  # periodic saves, committed in a step
    ckpt.close()
    shutil.rmtree(folder / "async")
    normal = float(np.median([t for t, flight in zip(step_seconds, in_flight) if not flight]))
    contention = sum(t - normal for t, flight in zip(step_seconds, in_flight) if flight)
    stall = float(np.mean([e.seconds for e in saves]))
    return {"async_stall_fraction": stall / sync_seconds,
            "async_contention_fraction": (stall + contention / max(len(saves), 1)) / sync_seconds,
            "async_stall": {"stall_s": stall, "contention_s_per_save": contention / max(len(saves), 1),
                            "persist_s": float(np.mean([e.persist_seconds for e in saves])),
                            "median_step_s": normal, "saves": len(saves), "interval_steps": interval}}


def training_runs(args: argparse.Namespace, folder: Path) -> dict:
    """Samples/s with no, mfu and ssu checkpointing, and bytes per emulated hour of full saves against
    mfu + differential + int8, at the kaggle config (no failures)."""
    common = ["--model", "kaggle", "--rows", str(args.rows), "--steps", str(args.throughput_steps), "--failures", "0",
              "--batch-size", str(args.batch_size), "--no-progress", "--overwrite"]
    runs = {"none": [], "mfu": [], "ssu": [], "partial": [], "mfu_diff_int8": ["--differential", "--quantize", "int8"]}
    summaries: dict[str, list[dict]] = {name: [] for name in runs}
    # Training gets `--threads` intra-op threads, the rest of the cores are the writer thread's. With every
    # core given to training (torch's default), a persist in the background preempts an intra-op thread and
    # every parallel op waits for it; on this shared machine that is slower even without checkpoints (the
    # `none` run with the default threads is kept for comparison).
    default_threads = torch.get_num_threads()
    reference = {}
    if args.threads != default_threads:
        out = folder / "run-none-default-threads"
        reference = run(parse_args([*common, "--policy", "none", "--out", str(out)]))
        shutil.rmtree(out, ignore_errors=True)
    torch.set_num_threads(args.threads)
    # The machine is shared: the throughput runs are interleaved over rounds and each policy keeps its
    # fastest run (the one least slowed by other jobs); the byte counts do not depend on the round.
    for round_ in range(args.throughput_rounds):
        for name, extra in runs.items():
            if round_ and name not in ("none", "mfu", "ssu"):
                continue
            policy = "mfu" if name == "mfu_diff_int8" else name
            out = folder / f"run-{name}"
            summaries[name].append(run(parse_args([*common, "--policy", policy, *extra, "--out", str(out)])))
            shutil.rmtree(out, ignore_errors=True)
    torch.set_num_threads(default_threads)
    every_round = {name: [s["samples_per_s"] for s in summaries[name]] for name in ("none", "mfu", "ssu")}
    throughput = {name: max(rates) for name, rates in every_round.items()}
    fastest = {name: max(summaries[name], key=lambda s: s["samples_per_s"]) for name in ("none", "mfu", "ssu")}
    summaries = {name: found[0] for name, found in summaries.items()}
    hourly = {name: summaries[name]["bytes_per_hour"] for name in ("partial", "mfu_diff_int8")}
    return {"throughput": throughput,
            "throughput_ratio": {name: value / throughput["none"] for name, value in throughput.items()},
            "throughput_steps": args.throughput_steps,
            "throughput_threads": {"training": args.threads, "default": default_threads,
                                   "none_with_default_threads": reference.get("samples_per_s")},
            "throughput_every_round": every_round,
            "throughput_breakdown": {name: time_breakdown(summary) for name, summary in fastest.items()},
            "bytes_per_hour": hourly,
            "full_over_mfu_diff_int8": hourly["partial"] / hourly["mfu_diff_int8"] if hourly["mfu_diff_int8"] else None,
            "pls_expected": {name: summaries[name]["pls_expected"] for name in ("partial", "mfu_diff_int8")}}


def time_breakdown(summary: dict) -> dict:
    """Where a throughput run's wall-clock time went: its training steps, the training thread's time on saves
    (snapshots, gathering and settling commits, waiting for a save in flight) and on planning, and the writer
    thread's (persisting, on the same cores as training)."""
    saves = [c for c in summary["checkpoints"] if c["step"] > 0]  # the initial save is made before the loop
    return {"wall_s": summary["wall_seconds"],
            "steps_s": summary["samples"] / summary["step_samples_per_s"] if summary["step_samples_per_s"] else 0.0,
            "saves": len(saves), "full_saves": sum(c["kind"] == "full" for c in saves),
            "save_stall_s": sum(c["seconds"] for c in saves),
            # a full save's stall includes a save waiting for it to be written (when more fell due than may queue)
            "full_save_stall_s": sum(c["seconds"] for c in saves if c["kind"] == "full"),
            "persist_s": sum(c["persist_seconds"] for c in saves),
            "planning_s": summary["policy_settings"].get("planning_seconds", 0.0)}


def verdicts(result: dict) -> dict:
    """Each of issue 11's storage targets: measured, target, met, and for a missed one what limits it, in this
    run's numbers."""
    out: dict = {}

    def judge(name: str, measured: float | None, target: str, met: bool, why: str) -> None:
        out[name] = {"measured": measured, "target": target, "met": met, **({} if met else {"why": why})}

    mb, seconds, nbytes = result["mb_s"], result["save_seconds"]["raw"], result["bytes"]
    layout = (f"with the profile's 16 emulated domains in one process a full save is a torch.save record per table, "
              f"row-wise state and domain (about 0.1 ms of pickling each: dcp.save writes one per table and "
              f"state) in {result['parts_per_full_save']} part files with their manifests and about 50 fsyncs, "
              f"plus a crc32 of every byte (on another core while large records are written): {seconds:.2f} s for "
              f"{nbytes / 1e6:.0f} MB on 2 shared cores. At one domain per process, as each rank of a multi-rank "
              f"job holds, the same bytes go at {mb['cpr_sync_one_domain_over_dd']:.2f}x dd and "
              f"{mb['cpr_sync_one_domain_over_dcp']:.2f}x dcp.save")
    for name, key, target in (("full_save_over_dd", "cpr_sync_over_dd", 0.8), ("full_save_over_dcp", "cpr_sync_over_dcp", 1.0),
                              ("full_save_one_domain_over_dd", "cpr_sync_one_domain_over_dd", 0.8),
                              ("full_save_one_domain_over_dcp", "cpr_sync_one_domain_over_dcp", 1.0)):
        judge(name, mb[key], f">= {target}", mb[key] >= target,
              layout if "one_domain" not in name else
              f"dd writes one buffer into the page cache at {mb['dd']:.0f} MB/s; a save adds the torch.save records, "
              "the crc32 and a part file per domain with its manifest and fsyncs")
    stall = result["async_stall"]
    judge("async_stall_fraction", result["async_stall_fraction"], "<= 0.05", result["async_stall_fraction"] <= 0.05,
          f"the training thread's {stall['stall_s'] * 1e3:.0f} ms per asynchronous full save against a {seconds:.2f} s "
          "synchronous one: the copy-on-write snapshot's bookkeeping (fresh access counters and a slot per row, "
          "about 45 MB of memory written), the rows it keeps before a step changes them while the save is written, "
          "and gathering and settling the commit")
    restore = result["restore_one_domain_read_ratio"]
    judge("restore_one_domain_read_ratio", restore, "<= 1.2", restore <= 1.2,
          "the domain's part of the full save plus its rows in the differential save after it, each with its manifest")
    ratio = result["bytes_ratio"]["int8"]
    judge("int8_bytes_ratio", ratio, "<= 0.3", ratio <= 0.3,
          "an int8 row is dim codes plus an fp16 scale and bias, and the row-wise optimizer state stays raw: at the "
          "kaggle config's 16 floats and one Adagrad float per row that is 24 of 68 bytes (0.353x); the codes "
          "with their scale and bias alone are 20 of 68 (0.294x), so 0.3x leaves under half a byte per row for "
          "the optimizer state")
    if "throughput_ratio" in result:
        none = result["throughput_breakdown"]["none"]
        for name in ("mfu", "ssu"):
            run_ = result["throughput_breakdown"][name]
            value = result["throughput_ratio"][name]
            # beyond the time outside the steps that a run without checkpoints has too (reading batches, logging)
            bookkeeping = (run_["wall_s"] - run_["steps_s"] - run_["save_stall_s"]) - (none["wall_s"] - none["steps_s"])
            step_ms = none["steps_s"] / result["throughput_steps"] * 1e3
            per_save_ms = (run_["wall_s"] - none["wall_s"]) / max(run_["saves"], 1) * 1e3
            judge(f"throughput_{name}", value, ">= 0.98", value >= 0.98,
                  f"{run_['saves']} saves ({run_['full_saves']} full) in {result['throughput_steps']} steps of "
                  f"{step_ms:.1f} ms: the training thread spent {run_['save_stall_s']:.2f} s on them"
                  + (f" ({run_['full_save_stall_s']:.2f} s on the full saves: their snapshots, and waiting for "
                     "one's write when more subsets fell due meanwhile than may queue behind it)" if run_["full_saves"] else "")
                  + f" and {bookkeeping:.2f} s more outside its steps ({run_['planning_s']:.2f} s of it the policy's "
                  "planning, mostly its one-time calibration; the rest its bookkeeping), and "
                  f"its steps took {run_['steps_s'] - none['steps_s']:.2f} s longer than without checkpoints while the "
                  f"writer thread's {run_['persist_s']:.2f} s of persisting shared the 2 cores (other jobs use them "
                  f"too); against {none['wall_s']:.2f} s for the whole run without checkpoints. That is "
                  f"{per_save_ms:.0f} ms of wall clock per save, a save every "
                  f"{result['throughput_steps'] / max(run_['saves'], 1):.0f} steps: at that cost 0.98x needs saves "
                  f"at least {per_save_ms / (0.02 * step_ms):.0f} steps apart. The emulation compresses the profile's "
                  "job (hours between subset saves) into these steps; a save's fixed cost (a part per emulated domain: "
                  "16 manifests, about 50 fsyncs, the writer's Python under the GIL) is what such intervals would make "
                  "negligible")
    return out


def storage_numbers(args: argparse.Namespace, folder: Path) -> dict:
    rows = table_rows(args.rows)
    device = torch.device("cpu")
    ensure_process_group(device)
    torch.manual_seed(0)
    model = wrap_dmp(build_model(MODEL_CONFIGS["kaggle"], rows), device, "rowwise_adagrad", 0.01)
    optimizer = build_optimizer(model, 0.001)
    steps = args.diff_steps + (STALL_SAVES + 1) * args.stall_interval
    data = open_dataset(None, table_rows=rows, eval_fraction=0.01, synthetic_rows=2 * args.batch_size * steps)
    batches = iter(BatchLoader(data.train, args.batch_size, drop_last=True))

    # Raw full save (at creation, synchronous) and the differential save of the next periodic "full" save.
    ckpt = CPRCheckpointer(model, optimizer, folder / "raw", policy="partial", total_steps=10**6,
                           interval_steps=args.diff_steps, differential=True, async_save=False)
    raw_bytes, _ = first_save(ckpt)
    for _ in range(args.diff_steps):
        train_step(model, optimizer, ckpt, next(batches))
    diff = ckpt.ledger.checkpoints[-1]
    assert diff.kind == "subset" and diff.step == args.diff_steps, diff
    # Restoring one domain reads its part of the full save and of the differential after it.
    own = ckpt.tables.nbytes(ckpt.layout.held(0))
    ckpt.recover([0])
    restore_ratio = ckpt.ledger.failures[-1].loaded_bytes / own
    ckpt.close()
    shutil.rmtree(folder / "raw")
    # Speeds: medians of warm repeats (a first save also pays for page-cache and allocator warm-up).
    dd = dd_mb_s(folder, raw_bytes, args.repeats)
    sync_bytes, raw_seconds = cpr_full_saves(model, optimizer, folder, args.repeats, async_save=False)
    async_bytes, async_seconds = cpr_full_saves(model, optimizer, folder, args.repeats, async_save=True)
    # One domain per process, as each rank of a multi-rank job holds: a DCP chunk per table and state, as
    # dcp.save writes, instead of one per table, state and emulated domain.
    one_bytes, one_seconds = cpr_full_saves(model, optimizer, folder, args.repeats, async_save=False, num_domains=1)

    out = {"rows_cap": args.rows, "table_rows": sum(rows), "bytes": raw_bytes,
           "bytes_per_save": {"raw": raw_bytes, "diff": diff.bytes},
           "diff_after": {"steps": args.diff_steps, "batch_size": args.batch_size},
           "mb_s": {"dd": dd, "cpr_sync": sync_bytes / raw_seconds / 1e6,
                    "cpr_async": async_bytes / async_seconds / 1e6, "cpr_sync_one_domain": one_bytes / one_seconds / 1e6,
                    **dcp_numbers(model, optimizer, folder, args.repeats)},
           "save_seconds": {"raw": raw_seconds},
           "restore_one_domain_read_ratio": restore_ratio}
    out.update(async_stall(model, optimizer, batches, folder, args.stall_interval, raw_seconds))
    for codec in CODECS:
        nbytes, seconds = cpr_full_saves(model, optimizer, folder, args.repeats, async_save=False, quantize=codec)
        out["bytes_per_save"][codec] = nbytes
        out["save_seconds"][codec] = seconds
    out["bytes_ratio"] = {k: v / raw_bytes for k, v in out["bytes_per_save"].items()}
    out["mb_s"]["cpr_sync_over_dd"] = out["mb_s"]["cpr_sync"] / dd
    out["mb_s"]["cpr_sync_over_dcp"] = out["mb_s"]["cpr_sync"] / out["mb_s"]["dcp"]
    out["mb_s"]["cpr_sync_one_domain_over_dd"] = out["mb_s"]["cpr_sync_one_domain"] / dd
    out["mb_s"]["cpr_sync_one_domain_over_dcp"] = out["mb_s"]["cpr_sync_one_domain"] / out["mb_s"]["dcp"]
    out["parts_per_full_save"] = len(ckpt.layout.local) + 1  # every domain's part and the dense part
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
    parser.add_argument("--stall-interval", type=int, default=250, help="steps between the full saves of the stall loop (each must be written before the next is due)")
    parser.add_argument("--throughput-steps", type=int, default=1000, help="steps of each throughput run")
    parser.add_argument("--throughput-rounds", type=int, default=2, help="interleaved rounds of throughput runs")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of the throughput runs' training")
    parser.add_argument("--repeats", type=int, default=3, help="saves timed for each MB/s (median)")
    parser.add_argument("--skip-auc", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    quiet_dependencies()

    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="cpr-storage-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        result = storage_numbers(args, folder)
        if not args.skip_throughput:
            result.update(training_runs(args, folder))
        if not args.skip_auc:
            result.update(auc_losses(folder, args.failures))
        result["targets"] = verdicts(result)
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
