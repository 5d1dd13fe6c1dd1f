"""The options of `python -m cpr.train`: parsing, and every check made before any data is read or model built."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

from cpr.choices import LR_DECAYS, MAX_VIRTUAL_DOMAINS, POLICY_NAMES, QUANTIZE_CHOICES
from cpr.elastic.keys import STORE_ENV
from cpr.elastic.launch import supervisor_options
from cpr.errors import UsageError
from cpr.planning import ClusterProfile
from cpr.planning.clock import CLOCK_KINDS, EmulatedClock, RealClock
from dlrm.configs import EMBEDDING_OPTIMIZER_NAMES, MODEL_CONFIGS, SHARDING_TYPES

TRAIN_DOC = """Train a TorchRec DLRM on Criteo-format data with CPR checkpointing.

The default data is the built-in synthetic Criteo-shaped set; `--data` takes real Criteo TSV files
(Kaggle or 1TB layout) or TorchRec's preprocessed .npy files. With a checkpointing policy, failures are
injected from the cluster profile (or `--failures N`) and recovered as the policy prescribes; the run
ends with AUC, log loss, throughput and the failure accounting, printed and written to `--out`.
"""

class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (not the usage block that would precede them)."""

    def error(self, message: str):  # noqa: D102 (argparse's hook)
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written, and each option's default after its help (unless the help says it, or
    there is none to show: a flag, or an option that is off unless given)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "default" in help_text or action.default in (None, False, [], argparse.SUPPRESS):
            return help_text
        return f"{help_text} (default: %(default)s)".lstrip()


# The longest run (steps) and the largest whole numbers the options take: beyond them a step counter or a row
# id outgrows 32 bits, or a node would start more worker processes than it has cores by orders of magnitude.
MAX_STEPS = 2**31 - 1
MAX_NPROC = 256
_INT_LIMITS = {"rows": 2**31 - 1, "synthetic_rows": 10**9, "batch_size": 2**31 - 1, "steps": MAX_STEPS, "seed": 2**32 - 1,
               "eval_every": MAX_STEPS, "log_every": MAX_STEPS, "failures": MAX_STEPS, "interval_steps": MAX_STEPS,
               "subset_interval_steps": MAX_STEPS, "keep_last": 1_000_000,
               "nproc": MAX_NPROC, "nnodes": 100_000, "node_rank": 100_000, "max_restarts": 1_000_000, "nodes": 10_000_000}
# Upper limits of float options that have no natural one: a learning rate this large already diverges at the first
# step, and an emulated job or MTBF beyond a million hours (114 years) is no cluster's.
_FLOAT_LIMITS = {"epochs": 1e6, "lr": 1e3, "embedding_lr": 1e3, "zipf_alpha": 100.0, "mtbf_hours": 1e9, "job_hours": 1e6}

_FLOAT_OPTIONS = ("epochs", "lr", "embedding_lr", "eval_fraction", "zipf_alpha", "target_pls", "mtbf_hours", "job_hours",
                  "save_fraction", "sample_rate")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = _Parser(prog="python -m cpr.train", description=TRAIN_DOC, formatter_class=_HelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data", nargs="+", metavar="PATH", help="Criteo files or folders (default: the built-in synthetic set)")
    data.add_argument("--data-format", choices=("auto", "kaggle", "terabyte", "npy"), default="auto",
                      help="layout of --data (auto: npy files by their names, else TSV with the layout from the first line)")
    data.add_argument("--rows", type=int, default=100_000, help="cap on rows per embedding table (ids are hashed modulo it)")
    data.add_argument("--eval-fraction", type=float, default=0.1, help="last fraction of the rows held out for evaluation")
    data.add_argument("--skip-bad-rows", action="store_true", help="count and skip malformed rows instead of stopping")
    data.add_argument("--synthetic-rows", type=int, default=400_000, help="size of the built-in synthetic set")
    data.add_argument("--zipf-alpha", type=float, default=1.05, help="skew of the synthetic ids")
    train = p.add_argument_group("training")
    train.add_argument("--model", choices=sorted(MODEL_CONFIGS), default="kaggle",
                       help="DLRM size: kaggle (the DLRM reference for Criteo Kaggle) or small (seconds on two cores)")
    train.add_argument("--batch-size", type=int, default=128, help="mini-batch size (128 as the DLRM reference for Kaggle)")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="training steps (default: --epochs worth)")
    length.add_argument("--epochs", type=float, default=1.0, help="passes over the training rows")
    train.add_argument("--lr", type=float, default=0.001, help="learning rate of the dense layers (Adagrad)")
    train.add_argument("--embedding-lr", type=float, default=0.01, help="learning rate of the fused embedding optimizer")
    train.add_argument("--lr-decay", choices=LR_DECAYS, default="linear",
                       help="linear: both learning rates fall linearly to 0 over the run (keeps small data sets from overfitting)")
    train.add_argument("--embedding-optimizer", choices=sorted(EMBEDDING_OPTIMIZER_NAMES), default="rowwise_adagrad",
                       help="fbgemm's fused optimizer of the embedding rows")
    train.add_argument("--sharding", choices=SHARDING_TYPES, default="table_wise",
                       help="how tables are placed on the ranks of a multi-rank job (torchrun)")
    train.add_argument("--seed", type=int, default=0, help="seed of the model, the synthetic data and the failure schedule")
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
    cpr.add_argument("--clock", choices=("auto", *CLOCK_KINDS), default="auto",
                     help="what plans the saves: the emulated job of the profile, or the real wall clock with the "
                          "costs this run measures (auto: real for real failures: --nproc, --kill-at, --real-failures, "
                          "torchrun without --failures)")
    cpr.add_argument("--nodes", type=int,
                     help="real clock: the nodes of your cluster, each failing every --mtbf-hours (default: the profile's)")
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
                     help="after a crash: continue from the newest loadable full save in the checkpoint folder "
                          "(none there: exit 2, saying what the folder holds)")
    cpr.add_argument("--start-fresh", action="store_true",
                     help="start at step 0 when not resuming, or when --resume finds no loadable save: the saves the "
                          "folder holds are set aside (renamed aside-save-...), never deleted")
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


def profile_of(args: argparse.Namespace) -> ClusterProfile:
    profile = ClusterProfile.preset(args.profile)
    overrides: dict[str, Any] = {}
    if args.num_shards is not None:
        overrides["num_domains"] = args.num_shards
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
        if value is not None and value > _FLOAT_LIMITS.get(name, math.inf):
            raise UsageError(f"--{name.replace('_', '-')} must be <= {_FLOAT_LIMITS[name]:g}, got {value:g}")
    for name, limit in _INT_LIMITS.items():
        value = getattr(args, name)
        if value is not None and value > limit:
            raise UsageError(f"--{name.replace('_', '-')} must be <= {limit}, got {value}")
    checks = [
        (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.rows >= 1, f"--rows must be >= 1, got {args.rows}"),
        (args.seed >= 0, f"--seed must be >= 0, got {args.seed}"),
        (0.0 < args.eval_fraction < 1.0, f"--eval-fraction must be in (0, 1), got {args.eval_fraction}"),
        (args.steps is None or args.steps >= 1, f"--steps must be >= 1, got {args.steps}"),
        (args.epochs > 0, f"--epochs must be > 0, got {args.epochs}"),
        (args.lr > 0, f"--lr must be > 0, got {args.lr}"),
        (args.embedding_lr > 0, f"--embedding-lr must be > 0, got {args.embedding_lr}"),
        (args.num_shards is None or args.num_shards >= 1, f"--num-shards must be >= 1, got {args.num_shards}"),
        (args.num_shards is None or args.num_shards <= MAX_VIRTUAL_DOMAINS,
         f"--num-shards must be <= {MAX_VIRTUAL_DOMAINS}, got {args.num_shards}: each shard is an emulated parameter-server node "
         "holding a slice of every table, and the shard layout and every save's metadata grow with the number of shards"),
        (args.log_every >= 1, f"--log-every must be >= 1, got {args.log_every}"),
        (args.eval_every >= 0, f"--eval-every must be >= 0 (0: only at the end), got {args.eval_every}"),
        (args.synthetic_rows >= 2, f"--synthetic-rows must be >= 2 (rows to train on and rows to evaluate), got {args.synthetic_rows}"),
        (args.zipf_alpha >= 0, f"--zipf-alpha must be >= 0 (0: uniform ids), got {args.zipf_alpha}"),
        (0.0 < args.target_pls < 1.0, f"--target-pls must be in (0, 1), got {args.target_pls}"),
        (args.mtbf_hours is None or args.mtbf_hours > 0, f"--mtbf-hours must be > 0, got {args.mtbf_hours}"),
        (args.job_hours is None or args.job_hours > 0, f"--job-hours must be > 0, got {args.job_hours}"),
        (args.failures is None or args.failures >= 0, f"--failures must be >= 0, got {args.failures}"),
        (args.nodes is None or args.nodes >= 1, f"--nodes must be >= 1, got {args.nodes}"),
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
        profile_of(args)  # the profile validates MTBF, shards and costs
    except ValueError as err:
        raise UsageError(str(err)) from None
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):  # its own name: every rank probes at once
            pass
    except OSError as err:
        raise UsageError(f"--out {out}: not writable ({err.strerror or err})") from None


def clock_of(args: argparse.Namespace) -> EmulatedClock | RealClock:
    """The clock the run is planned on (see --clock): real failures are planned on the wall clock."""
    kind = args.clock
    if kind == "auto":
        torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.failures is None
        kind = "real" if supervised(args) or args.kill_at or args.real_failures or torchrun else "emulated"
    if kind == "emulated":
        return EmulatedClock()
    profile = profile_of(args)
    return RealClock(mtbf_hours=profile.mtbf_hours, nodes=args.nodes or profile.nodes)


def supervised(args: argparse.Namespace) -> bool:
    """Whether this run is (or will start) a supervised job, whose dead ranks are replaced."""
    return args.nproc is not None or STORE_ENV in os.environ


def policy_options(args: argparse.Namespace) -> dict[str, Any]:
    """The prioritized policies' overrides that were given (the planner chooses the others)."""
    given = {"subset_interval_steps": args.subset_interval_steps, "fraction": args.save_fraction, "sample_rate": args.sample_rate}
    return {key: value for key, value in given.items() if value is not None}
