"""`python -m cpr.train`: train a TorchRec DLRM on Criteo-format data with CPR checkpointing.

The default data is the built-in synthetic Criteo-shaped set; `--data` takes real Criteo TSV files
(Kaggle or 1TB layout) or TorchRec's preprocessed .npy files. With a checkpointing policy, failures are
injected from the cluster profile (or `--failures N`) and recovered as the policy prescribes; the run
ends with AUC, log loss, throughput and the failure accounting, printed and written to `--out`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from cpr.checkpointer import QUANTIZE_CHOICES, CPRCheckpointer, EarlierRunError, RecoveryError
from cpr.comm import CoordinationError, release_process_group
from cpr.elastic import ElasticJob
from cpr.faults import FailureSchedule
from cpr.loop import LR_DECAYS, MetricsLog, train
from cpr.membership import STORE_ENV, Membership, MembershipError
from cpr.planning import ClusterProfile
from cpr.policies import POLICY_NAMES
from cpr.run import supervise, supervisor_options
from cpr.storage import CheckpointMismatchError, CorruptCheckpointError, DirectoryLockedError, UnwritableDirectoryError
from cpr.shards import MAX_VIRTUAL_SHARDS
from cpr.tables import UnsupportedShardingError
from dlrm.data import open_dataset
from dlrm.data.errors import CriteoDataError
from dlrm.data.loader import BatchLoader
from dlrm.data.schema import table_rows
from dlrm.model import (
    COLLECTIVE_TIMEOUT,
    EMBEDDING_OPTIMIZERS,
    MODEL_CONFIGS,
    SHARDING_TYPES,
    build_model,
    build_optimizer,
    default_device,
    ensure_process_group,
    wrap_dmp,
)


class UsageError(ValueError):
    """An invalid option, reported before any training starts."""


_FLOAT_OPTIONS = ("epochs", "lr", "embedding_lr", "eval_fraction", "zipf_alpha", "target_pls", "mtbf_hours", "job_hours",
                  "save_fraction", "sample_rate")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cpr.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data", nargs="+", metavar="PATH", help="Criteo files or folders (default: the built-in synthetic set)")
    data.add_argument("--data-format", choices=("auto", "kaggle", "terabyte", "npy"), default="auto")
    data.add_argument("--rows", type=int, default=100_000, help="cap on rows per embedding table (ids are hashed modulo it)")
    data.add_argument("--eval-fraction", type=float, default=0.1, help="last fraction of the rows held out for evaluation")
    data.add_argument("--skip-bad-rows", action="store_true", help="count and skip malformed rows instead of stopping")
    data.add_argument("--synthetic-rows", type=int, default=400_000, help="size of the built-in synthetic set")
    data.add_argument("--zipf-alpha", type=float, default=1.05, help="skew of the synthetic ids")
    train = p.add_argument_group("training")
    train.add_argument("--model", choices=sorted(MODEL_CONFIGS), default="kaggle")
    train.add_argument("--batch-size", type=int, default=128, help="mini-batch size (128 as the DLRM reference for Kaggle)")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="training steps (default: --epochs worth)")
    length.add_argument("--epochs", type=float, default=1.0)
    train.add_argument("--lr", type=float, default=0.001, help="learning rate of the dense layers (Adagrad)")
    train.add_argument("--embedding-lr", type=float, default=0.01, help="learning rate of the fused embedding optimizer")
    train.add_argument("--lr-decay", choices=LR_DECAYS, default="linear",
                       help="linear: both learning rates fall linearly to 0 over the run (keeps small data sets from overfitting)")
    train.add_argument("--embedding-optimizer", choices=sorted(EMBEDDING_OPTIMIZERS), default="rowwise_adagrad")
    train.add_argument("--sharding", choices=SHARDING_TYPES, default="table_wise",
                       help="how tables are placed on the ranks of a multi-rank job (torchrun)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps as well as at the end")
    train.add_argument("--log-every", type=int, default=50, help="write the train loss to metrics.jsonl every N steps")
    train.add_argument("--out", default="runs/latest", help="output folder (config.json, metrics.jsonl, summary.json)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    cpr = p.add_argument_group("checkpointing and failures")
    cpr.add_argument("--policy", choices=POLICY_NAMES, default="none")
    cpr.add_argument("--num-shards", type=int,
                     help="one-process runs: emulated embedding shards, the failure domains (default: the profile's); "
                          "under torchrun the ranks are the domains")
    cpr.add_argument("--target-pls", type=float, default=0.02, help="portion of lost samples partial recovery may cost")
    cpr.add_argument("--profile", default="production", help="cluster profile preset")
    cpr.add_argument("--mtbf-hours", type=float, help="override the profile's per-node MTBF (hours)")
    cpr.add_argument("--job-hours", type=float, help="override the emulated job length (hours)")
    cpr.add_argument("--failures", type=int, help="inject exactly N failures (default: drawn from the profile)")
    cpr.add_argument("--interval-steps", type=int, help="override the planned (full) save interval (steps)")
    cpr.add_argument("--subset-interval-steps", type=int, help="mfu/ssu/scar: override the planned subset-save interval (steps)")
    cpr.add_argument("--save-fraction", type=float, help="mfu/scar: override the planned fraction r of each shard's rows per subset save")
    cpr.add_argument("--sample-rate", type=float, help="ssu: override the planned probability of sampling an access")
    cpr.add_argument("--keep-last", type=int, default=3, help="full checkpoints kept on disk")
    cpr.add_argument("--overwrite", action="store_true",
                     help="start over in a checkpoint folder that holds an earlier run's saves, deleting them")
    cpr.add_argument("--sync-save", action="store_true",
                     help="write each save inside the training step (default: in the background while training goes on)")
    cpr.add_argument("--checkpoint-dir", help="where saves go (default: OUT/checkpoints)")
    cpr.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="none",
                     help="how saves store embedding rows: raw (none), row-wise int8 or int4 with a scale and bias per "
                          "row, or auto (4 bits when the job expects few restores, else 8)")
    cpr.add_argument("--differential", action="store_true",
                     help="partial-recovery policies: write each periodic full save as the rows changed since their last "
                          "save (a real full save when a restore would read more than about 2x a full save)")
    cpr.add_argument("--resume", action="store_true",
                     help="after a crash: continue from the newest loadable full save in the checkpoint folder")
    supervisor_options(p)
    kills = p.add_argument_group("real failures (with --nproc)")
    kills.add_argument("--kill-at", action="append", default=[], metavar="STEP:RANK",
                       help="SIGKILL rank RANK's process as it starts step STEP (repeatable); the supervisor starts "
                            "a replacement and the policy recovers it")
    kills.add_argument("--real-failures", action="store_true",
                       help="kill ranks at the steps of the cluster profile's failure schedule (--failures N: that many) "
                            "instead of emulating those failures")
    return p.parse_args(argv)


def parse_kills(specs: Sequence[str]) -> list[tuple[int, int]]:
    """`--kill-at STEP:RANK` values as (step, rank)."""
    kills = []
    for spec in specs:
        step, sep, rank = spec.partition(":")
        if not sep or not step.strip().isdigit() or not rank.strip().isdigit():
            raise UsageError(f"--kill-at {spec!r}: expected STEP:RANK, two whole numbers (e.g. 150:1)")
        kills.append((int(step), int(rank)))
    return kills


def _profile(args: argparse.Namespace) -> ClusterProfile:
    profile = ClusterProfile.preset(args.profile)
    overrides: dict[str, Any] = {}
    if args.num_shards is not None:
        overrides["num_shards"] = args.num_shards
    if args.mtbf_hours is not None:
        overrides["mtbf_hours"] = args.mtbf_hours
    if args.job_hours is not None:
        overrides["job_hours"] = args.job_hours
    return dataclasses.replace(profile, **overrides)


def validate(args: argparse.Namespace) -> None:
    """Reject bad settings before any data is read or model built."""
    for name in _FLOAT_OPTIONS:
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    checks = [
        (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.rows >= 1, f"--rows must be >= 1, got {args.rows}"),
        (0.0 < args.eval_fraction < 1.0, f"--eval-fraction must be in (0, 1), got {args.eval_fraction}"),
        (args.steps is None or args.steps >= 1, f"--steps must be >= 1, got {args.steps}"),
        (args.epochs > 0, f"--epochs must be > 0, got {args.epochs}"),
        (args.lr > 0, f"--lr must be > 0, got {args.lr}"),
        (args.embedding_lr > 0, f"--embedding-lr must be > 0, got {args.embedding_lr}"),
        (args.num_shards is None or args.num_shards >= 1, f"--num-shards must be >= 1, got {args.num_shards}"),
        (args.num_shards is None or args.num_shards <= MAX_VIRTUAL_SHARDS,
         f"--num-shards must be <= {MAX_VIRTUAL_SHARDS}, got {args.num_shards}: each shard is an emulated parameter-server node "
         "holding a slice of every table, and the shard layout and every save's metadata grow with the number of shards"),
        (args.log_every >= 1, f"--log-every must be >= 1, got {args.log_every}"),
        (args.eval_every >= 0, f"--eval-every must be >= 0 (0: only at the end), got {args.eval_every}"),
        (args.synthetic_rows >= 2, f"--synthetic-rows must be >= 2 (rows to train on and rows to evaluate), got {args.synthetic_rows}"),
        (args.zipf_alpha >= 0, f"--zipf-alpha must be >= 0 (0: uniform ids), got {args.zipf_alpha}"),
        (0.0 < args.target_pls < 1.0, f"--target-pls must be in (0, 1), got {args.target_pls}"),
        (args.mtbf_hours is None or args.mtbf_hours > 0, f"--mtbf-hours must be > 0, got {args.mtbf_hours}"),
        (args.job_hours is None or args.job_hours > 0, f"--job-hours must be > 0, got {args.job_hours}"),
        (args.failures is None or args.failures >= 0, f"--failures must be >= 0, got {args.failures}"),
        (args.interval_steps is None or args.interval_steps >= 1, f"--interval-steps must be >= 1, got {args.interval_steps}"),
        (args.keep_last >= 1, f"--keep-last must be >= 1, got {args.keep_last}"),
        (args.subset_interval_steps is None or args.subset_interval_steps >= 1,
         f"--subset-interval-steps must be >= 1, got {args.subset_interval_steps}"),
        (args.save_fraction is None or 0 < args.save_fraction <= 1, f"--save-fraction must be in (0, 1], got {args.save_fraction}"),
        (args.sample_rate is None or 0 < args.sample_rate <= 1, f"--sample-rate must be in (0, 1], got {args.sample_rate}"),
        (args.policy != "none" or not args.failures, "--failures needs a checkpointing policy (--policy full|partial|...): policy 'none' cannot recover"),
        (not args.differential or args.policy not in ("none", "full"),
         f"--differential needs a partial-recovery policy (partial, mfu, ssu, scar), not {args.policy!r}: "
         "a full rollback restores from full saves only"),
        (args.nproc is None or args.nproc >= 1, f"--nproc must be >= 1, got {args.nproc}"),
        (args.nnodes >= 1 and 0 <= args.node_rank < args.nnodes,
         f"--node-rank must be in 0..{args.nnodes - 1} and --nnodes >= 1, got {args.node_rank} and {args.nnodes}"),
        (args.max_restarts >= 0, f"--max-restarts must be >= 0, got {args.max_restarts}"),
        (supervised(args) or not (args.kill_at or args.real_failures),
         "--kill-at and --real-failures kill worker processes: run the job under a supervisor (--nproc N)"),
        (not (args.kill_at or args.real_failures) or args.policy != "none",
         "--kill-at/--real-failures need a checkpointing policy (--policy full|partial|...): policy 'none' cannot recover"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    world_size = int(os.environ["WORLD_SIZE"]) if STORE_ENV in os.environ else (args.nproc or 1) * args.nnodes
    steps = args.steps
    for step, rank in parse_kills(args.kill_at):
        if rank >= world_size or step < 1 or (steps is not None and step > steps):
            raise UsageError(f"--kill-at {step}:{rank}: the rank must be below the world size {world_size} and the step "
                             f"in 1..{steps if steps is not None else 'the run length'}")
    try:
        _profile(args)  # the profile validates MTBF, shards and costs
    except ValueError as err:
        raise UsageError(str(err)) from None
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):  # its own name: every rank probes at once
            pass
    except OSError as err:
        raise UsageError(f"--out {out}: not writable ({err.strerror or err})") from None


def supervised(args: argparse.Namespace) -> bool:
    """Whether this run is (or will start) a supervised job, whose dead ranks are replaced."""
    return args.nproc is not None or STORE_ENV in os.environ


def policy_options(args: argparse.Namespace) -> dict[str, Any]:
    """The prioritized policies' overrides that were given (the planner chooses the others)."""
    given = {"subset_interval_steps": args.subset_interval_steps, "fraction": args.save_fraction, "sample_rate": args.sample_rate}
    return {key: value for key, value in given.items() if value is not None}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train as `args` say and return the summary (also written to OUT/summary.json by rank 0).

    Under torchrun (WORLD_SIZE set) every rank runs this; the failure domains are then the ranks.
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
    profile = _profile(args)

    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = wrap_dmp(build_model(MODEL_CONFIGS[args.model], rows), device, args.embedding_optimizer,
                         args.embedding_lr, sharding=args.sharding)
        return model, build_optimizer(model, args.lr)

    def checkpointer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, joining: bool) -> CPRCheckpointer:
        return CPRCheckpointer(
            model,
            optimizer,
            args.checkpoint_dir or out / "checkpoints",
            policy=args.policy,
            num_shards=args.num_shards if world_size == 1 else None,
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
        )

    try:
        job = ElasticJob(build, checkpointer, membership)
    except UnsupportedShardingError as err:
        raise UsageError(str(err)) from None
    schedule = FailureSchedule.empty()
    # With --kill-at the kills are the experiment: emulated failures join in only when --failures asks for them.
    draw = args.failures != 0 and (args.failures is not None or args.real_failures or not args.kill_at)
    if args.policy != "none" and draw:
        schedule = FailureSchedule.from_profile(job.ckpt.profile, total_steps, seed=args.seed, count=args.failures)
    kills = parse_kills(args.kill_at)
    if args.real_failures:
        kills += [(failure.step, failure.shard) for failure in schedule]
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
          [f"plan: {summary['plan']['recommended']} recovery is cheaper for this profile: {summary['plan']['reason']}"]),
        f"checkpoints {len(summary['checkpoints'])}  bytes written {summary['bytes_written']:,}",
        f"failures {len(summary['failures'])}: " + ", ".join(f"step {f['step']} shard {f['shard']}" for f in summary["failures"]),
        f"PLS expected {summary['pls_expected']:.5f}  measured {summary['pls_measured']:.5f}",
    ]
    verdict = pls_verdict(summary)
    if verdict:
        lines.append(verdict)
    o = summary["overhead"]
    lines.append(
        f"overhead (emulated hours) save {o['save']:.3f}  load {o['load']:.3f}  lost compute {o['lost_compute']:.3f}  "
        f"reschedule {o['reschedule']:.3f}  total {o['total_hours']:.3f} = {100 * o['total_fraction']:.2f}% of the job"
    )
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


def main(argv: Sequence[str] | None = None) -> int:
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
        summary = run(args)
    except (UsageError, CriteoDataError, RecoveryError, CorruptCheckpointError, UnwritableDirectoryError,
            CheckpointMismatchError, CoordinationError, DirectoryLockedError, EarlierRunError, MembershipError) as err:
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
