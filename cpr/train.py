"""`python -m cpr.train`: train a TorchRec DLRM on Criteo-format data with CPR checkpointing (the options
and their checks are in `cpr.options`), print the summary and write it to `--out`."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from cpr.checkpointer import CPRCheckpointer
from cpr.comm import release_process_group
from cpr.elastic.job import ElasticJob, JobHooks
from cpr.elastic.keys import STORE_ENV
from cpr.elastic.launch import supervise
from cpr.elastic.membership import Membership
from cpr.errors import CPRError, UnsupportedShardingError, UsageError
from cpr.faults import FailureSchedule
from cpr.loop import MetricsLog, train
from cpr.options import clock_of, parse_args, profile_of, parse_kills, policy_options, validate
from cpr.storage import CheckpointStore
from dlrm.data import open_dataset
from dlrm.data.errors import CriteoDataError
from dlrm.data.loader import BatchLoader
from dlrm.data.schema import table_rows
from dlrm.model import (
    COLLECTIVE_TIMEOUT,
    MODEL_CONFIGS,
    build_model,
    build_optimizer,
    default_device,
    ensure_process_group,
    wrap_dmp,
)

# Makes the store a checkpointer saves through, from (directory, keep_last, lock): `CheckpointStore` by default.
StoreFactory = Callable[..., CheckpointStore]


def run(args: argparse.Namespace, job_hooks: JobHooks | None = None, make_store: StoreFactory | None = None) -> dict[str, Any]:
    """Train as `args` say and return the summary (also written to OUT/summary.json by rank 0).

    Under torchrun (WORLD_SIZE set) every rank runs this; the failure domains are then the ranks. `job_hooks`
    are told of the job's heals, `make_store` makes the store each checkpointer saves through (seams for
    fault injection and monitoring).
    """
    validate(args)
    out = Path(args.out)
    torch.manual_seed(args.seed)
    device = default_device()
    membership = Membership.from_env("nccl" if device.type == "cuda" else "gloo", COLLECTIVE_TIMEOUT)
    if membership is None:
        ensure_process_group(device)
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank, world_size = membership.rank, membership.world_size
    rows = table_rows(args.rows)
    dataset = open_dataset(
        args.data,
        data_format=args.data_format,
        table_rows=rows,
        eval_fraction=args.eval_fraction,
        skip_bad_rows=args.skip_bad_rows,
        synthetic_rows=args.synthetic_rows,
        zipf_alpha=args.zipf_alpha,
        seed=args.seed,
    )
    try:
        train_loader = BatchLoader(dataset.train, args.batch_size, rank=rank, world_size=world_size)
        eval_loader = BatchLoader(dataset.eval, args.batch_size, rank=rank, world_size=world_size)
    except ValueError as err:
        raise UsageError(f"--batch-size {args.batch_size}: {err}") from None
    total_steps = args.steps or max(1, math.ceil(args.epochs * len(train_loader)))
    profile, clock = profile_of(args), clock_of(args)

    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = wrap_dmp(build_model(MODEL_CONFIGS[args.model], rows), device, args.embedding_optimizer,
                         args.embedding_lr, sharding=args.sharding)
        return model, build_optimizer(model, args.lr)

    def checkpointer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, joining: bool) -> CPRCheckpointer:
        directory = args.checkpoint_dir or out / "checkpoints"
        return CPRCheckpointer(
            model,
            optimizer,
            directory if make_store is None else make_store(directory, args.keep_last, rank == 0),
            policy=args.policy,
            num_domains=args.num_shards if world_size == 1 else None,
            target_pls=args.target_pls,
            profile=profile,
            total_steps=total_steps,
            reader=train_loader,
            interval_steps=args.interval_steps,
            keep_last=args.keep_last,
            policy_options=policy_options(args),
            resume=args.resume,
            async_save=not args.sync_save,
            overwrite=args.overwrite,
            quantize=args.quantize,
            differential=args.differential,
            joining=joining,
            clock=clock,
        )

    try:
        job = ElasticJob(build, checkpointer, membership, hooks=job_hooks)
    except UnsupportedShardingError as err:
        raise UsageError(str(err)) from None
    schedule = FailureSchedule.empty()
    # With --kill-at the kills are the experiment: emulated failures join in only when --failures asks for them.
    # On the real clock, failures are real: emulated ones join in only when --failures asks for them.
    draw = args.failures != 0 and (args.failures is not None or args.real_failures or not (args.kill_at or clock.kind == "real"))
    if args.policy != "none" and draw:
        schedule = FailureSchedule.from_profile(job.ckpt.profile, total_steps, seed=args.seed, count=args.failures)
    kills = parse_kills(args.kill_at)
    if args.real_failures:
        kills += [(failure.step, failure.domain) for failure in schedule]
        schedule = FailureSchedule.empty()
    job.kills = frozenset(kills)  # none falls before step 1: the job is built and its first save committed
    model, optimizer, ckpt = job.model, job.optimizer, job.ckpt
    coordinator = ckpt.coordinator

    if coordinator.is_coordinator:
        config = {**vars(args), "total_steps": total_steps, "table_rows": rows, "data_source": dataset.source,
                  "train_rows": len(dataset.train), "eval_rows": len(dataset.eval), "world_size": coordinator.world_size,
                  "failure_domains": ckpt.layout.describe(), "failure_schedule": schedule.to_json(),
                  "kills": [{"step": step, "rank": rank} for step, rank in kills]}
        (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
        print(f"failure domains: {ckpt.layout.describe()}", file=sys.stderr)
    metrics = MetricsLog(out / "metrics.jsonl", append=args.resume or job.replacement, coordinator=coordinator)
    try:
        result = train(model, optimizer, ckpt, train_loader, total_steps, schedule=schedule, eval_loader=eval_loader,
                       lr_decay=args.lr_decay, log_every=args.log_every, eval_every=args.eval_every, metrics=metrics,
                       progress=not args.no_progress, elastic=job)
    finally:
        metrics.close()
    summary = {
        **result.summary(),
        "data_source": dataset.source,
        "rows_skipped": dataset.stats.rows_skipped,
        **job.report(),
    }
    if coordinator.is_coordinator:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    job.close()
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run table a person reads."""
    auc = "n/a (the evaluation rows hold one class)" if summary["auc"] is None else f"{summary['auc']:.4f}"
    lines = [
        f"AUC {auc}   log loss {summary['logloss']:.4f}   {summary['samples_per_s']:,.0f} samples/s wall clock "
        f"(saves and recoveries included; {summary['step_samples_per_s']:,.0f} in training steps)   "
        f"{summary['steps']} steps ({summary['steps_executed']} executed)",
        f"world size {summary['world_size']}; failure domains: {summary['domains_description']}",
        f"policy {summary['policy']}  shards {summary['num_shards']}  settings "
        + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary["policy_settings"].items()
                    if not k.startswith("planned_") and v not in (None, {})),
        # Without checkpoints there is no recovery to plan.
        *([] if summary["policy"] == "none" else
          [f"plan: {summary['plan']['recommended']} recovery is cheaper for this profile: {summary['plan']['reason']}",
           f"planned on the {summary['clock']} clock: {summary['clock_reason']}"]),
        f"checkpoints {len(summary['checkpoints'])}  bytes written {summary['bytes_written']:,}",
        f"failures {len(summary['failures'])}: " + ", ".join(f"step {f['step']} shard {f['shard']}" for f in summary["failures"]),
        f"PLS expected {summary['pls_expected']:.5f}  measured {summary['pls_measured']:.5f}",
    ]
    verdict = pls_verdict(summary)
    if verdict:
        lines.append(verdict)
    o = summary["overhead"]
    lines.append(
        f"overhead ({'emulated hours' if summary['clock'] == 'emulated' else 'hours modelled from the measured costs'}) save {o['save']:.3f}  load {o['load']:.3f}  lost compute {o['lost_compute']:.3f}  "
        f"reschedule {o['reschedule']:.3f}  total {o['total_hours']:.3f} = {100 * o['total_fraction']:.2f}% of the job"
    )
    wall = summary.get("wall_clock")
    if wall:
        lines.append("wall clock (s) " + "  ".join(f"{cause.replace('_', ' ')} {seconds:.2f}" for cause, seconds in wall["seconds"].items())
                     + f"  = {wall['wall_seconds']:.2f}; overhead {wall['overhead_fraction']:.2%} of the job, goodput "
                     f"{wall['goodput']:.3f} of the no-failure rate ({wall['clean_step_seconds'] * 1e3:.2f} ms a step)")
    return "\n".join(lines)


PLS_TOLERANCE = 0.2  # how far measured PLS may stray from the promise before the summary says so


def pls_verdict(summary: dict[str, Any]) -> str:
    """One plain sentence on measured PLS against the target and against this run's expected PLS (the
    target scaled to the failures the run actually had); empty when nothing partial was recovered."""
    if not summary["failures"] or summary["failures"][0]["recovery"] != "partial":
        return ""
    measured, expected, target = summary["pls_measured"], summary["pls_expected"], summary["plan"]["target_pls"]
    failures, planned = len(summary["failures"]), summary["plan"]["partial"]["expected_failures"]

    def off(value: float, reference: float) -> str:
        if not reference:
            return "no reference"
        ratio = value / reference
        return f"{ratio:.2f}x, {'within' if abs(ratio - 1) <= PLS_TOLERANCE else 'OFF by'} {abs(ratio - 1):.0%}"

    return (f"PLS check: measured {measured:.4f} vs target {target:g} ({off(measured, target)}); vs expected "
            f"{expected:.4f} for this run's {failures} failures, the plan assumed {planned:.3g} ({off(measured, expected)}). "
            f"One run's PLS varies with which shard fails and when: compare means over seeds (experiments/pls_target.py).")


def quiet_dependencies() -> None:
    """Silence what TorchRec 1.8 and torch say about their own internals on every run (ShardedTensor's
    deprecation, planner defaults for a one-process CPU topology): nothing a user of the CLI can act on."""
    for message in ("Please use DTensor instead", "HeuristicalStorageReservation is known", "`broadcast_buffers` is deprecated"):
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    for logger in ("torchrec.distributed.planner", "torch.fx._symbolic_trace"):
        logging.getLogger(logger).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None, job_hooks: JobHooks | None = None,
         make_store: StoreFactory | None = None) -> int:
    """The command line; `job_hooks` and `make_store` as for `run`."""
    quiet_dependencies()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.nproc is not None and STORE_ENV not in os.environ:
        # This process supervises: bad settings are reported once, here, before any worker starts.
        try:
            validate(args)
        except UsageError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return supervise(args, [sys.executable, "-m", "cpr.train", *argv])
    owns_group = not dist.is_initialized()  # a caller's process group (main called in-process) stays theirs
    try:
        summary = run(args, job_hooks, make_store)
    except (CPRError, CriteoDataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if owns_group:
            release_process_group()
    if summary["world_size"] == 1 or int(os.environ.get("RANK", "0")) == 0:
        print(format_summary(summary))
        print(f"wrote {Path(args.out) / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
