"""The run of `python -m cpr.train` (its command line and summary are in `cpr.train`, its options in
`cpr.options`): data, model, checkpointer and elastic job as the options say, then the training loop."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from cpr.checkpointer import CPRCheckpointer
from cpr.comm import release_process_group
from cpr.elastic.job import ElasticJob, JobHooks
from cpr.elastic.membership import Membership
from cpr.errors import OutputError, UnsupportedShardingError, UsageError
from cpr.faults import FailureSchedule
from cpr.loop import MetricsLog, train
from cpr.options import MAX_STEPS, clock_of, parse_kills, policy_options, profile_of, validate
from cpr.storage import CheckpointStore
from dlrm.data import open_dataset
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
    if total_steps > MAX_STEPS:
        raise UsageError(f"--epochs {args.epochs:g}: {total_steps:,} steps of {len(train_loader):,} batches an epoch, more than "
                         f"the {MAX_STEPS:,} a run may take")
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
            start_fresh=args.start_fresh,
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
        try:
            schedule = FailureSchedule.from_profile(job.ckpt.profile, total_steps, seed=args.seed, count=args.failures)
        except ValueError as err:  # more failures than steps that can fail
            raise UsageError(f"--failures {args.failures if args.failures is not None else '(from the profile)'}: {err}") from None
    kills = parse_kills(args.kill_at)
    if args.real_failures:
        kills += [(failure.step, failure.domain) for failure in schedule]
        schedule = FailureSchedule.empty()
    job.kills = job.kills | frozenset(kills)  # none falls before step 1: the job is built and its first save committed
    model, optimizer, ckpt = job.model, job.optimizer, job.ckpt
    coordinator = ckpt.coordinator

    if coordinator.is_coordinator:
        config = {**vars(args), "total_steps": total_steps, "table_rows": rows, "data_source": dataset.source,
                  "train_rows": len(dataset.train), "eval_rows": len(dataset.eval), "world_size": coordinator.world_size,
                  "failure_domains": ckpt.layout.describe(), "failure_schedule": schedule.to_json(),
                  "kills": [{"step": step, "rank": rank} for step, rank in kills]}
        write_output(out, "config.json", json.dumps(config, indent=2, default=str))
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
        write_output(out, "summary.json", json.dumps(summary, indent=2))
    job.close()
    return summary


def write_output(out: Path, name: str, text: str) -> None:
    """OUT/name, or one line naming --out when the folder is gone or unwritable (deleted during the run)."""
    try:
        (out / name).write_text(text)
    except OSError as err:
        raise OutputError(f"--out {out}: cannot write {name} ({err.strerror or err}); was the folder deleted or made "
                          "read-only during the run?") from None


def run_command(args: argparse.Namespace, job_hooks: JobHooks | None = None,
                make_store: StoreFactory | None = None) -> dict[str, Any]:
    """`run` for the command line: a process group it starts is released at the end (a caller's, when
    `cpr.train.main` is called in-process, stays theirs)."""
    owns_group = not dist.is_initialized()
    try:
        return run(args, job_hooks, make_store)
    finally:
        if owns_group:
            release_process_group()
