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
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc
from tqdm import tqdm

from cpr.checkpointer import CPRCheckpointer, RecoveryError
from cpr.faults import FailureSchedule
from cpr.planning import ClusterProfile
from cpr.policies import POLICY_NAMES
from cpr.storage import CorruptCheckpointError, UnwritableDirectoryError
from dlrm.data import open_dataset
from dlrm.data.errors import CriteoDataError
from dlrm.data.loader import BatchLoader
from dlrm.data.schema import table_rows
from dlrm.model import MODEL_CONFIGS, EMBEDDING_OPTIMIZERS, build_model, build_optimizer, default_device, ensure_process_group, wrap_dmp


class UsageError(ValueError):
    """An invalid option, reported before any training starts."""


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
    train.add_argument("--lr-decay", choices=("linear", "none"), default="linear",
                       help="linear: both learning rates fall linearly to 0 over the run (keeps small data sets from overfitting)")
    train.add_argument("--embedding-optimizer", choices=sorted(EMBEDDING_OPTIMIZERS), default="rowwise_adagrad")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps as well as at the end")
    train.add_argument("--log-every", type=int, default=50, help="write the train loss to metrics.jsonl every N steps")
    train.add_argument("--out", default="runs/latest", help="output folder (config.json, metrics.jsonl, summary.json)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    cpr = p.add_argument_group("checkpointing and failures")
    cpr.add_argument("--policy", choices=POLICY_NAMES, default="none")
    cpr.add_argument("--num-shards", type=int, help="embedding shards, the failure domains (default: the profile's)")
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
    cpr.add_argument("--checkpoint-dir", help="where saves go (default: OUT/checkpoints)")
    cpr.add_argument("--resume", action="store_true",
                     help="after a crash: continue from the newest loadable full save in the checkpoint folder")
    return p.parse_args(argv)


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
    checks = [
        (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.rows >= 1, f"--rows must be >= 1, got {args.rows}"),
        (0.0 < args.eval_fraction < 1.0, f"--eval-fraction must be in (0, 1), got {args.eval_fraction}"),
        (args.steps is None or args.steps >= 1, f"--steps must be >= 1, got {args.steps}"),
        (args.epochs > 0, f"--epochs must be > 0, got {args.epochs}"),
        (args.lr > 0, f"--lr must be > 0, got {args.lr}"),
        (args.embedding_lr > 0, f"--embedding-lr must be > 0, got {args.embedding_lr}"),
        (args.num_shards is None or args.num_shards >= 1, f"--num-shards must be >= 1, got {args.num_shards}"),
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
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    try:
        _profile(args)  # the profile validates MTBF, shards and costs
    except ValueError as err:
        raise UsageError(str(err)) from None
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"--out {out}: not writable ({err.strerror or err})") from None


def policy_options(args: argparse.Namespace) -> dict[str, Any]:
    """The prioritized policies' overrides that were given (the planner chooses the others)."""
    given = {"subset_interval_steps": args.subset_interval_steps, "fraction": args.save_fraction, "sample_rate": args.sample_rate}
    return {key: value for key, value in given.items() if value is not None}


def _endless(loader: BatchLoader) -> Iterator:
    """Batches from the loader's current position on, epoch after epoch."""
    while True:
        yield from loader


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: BatchLoader) -> dict[str, float]:
    model.eval()
    logits, labels = [], []
    for batch in loader:
        _, (_, batch_logits, batch_labels) = model(batch)
        logits.append(batch_logits.float().cpu())
        labels.append(batch_labels.float().cpu())
    model.train()
    all_logits, all_labels = torch.cat(logits), torch.cat(labels)
    return {
        "auc": float(binary_auroc(torch.sigmoid(all_logits), all_labels.long())),
        "logloss": float(F.binary_cross_entropy_with_logits(all_logits, all_labels)),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train as `args` say and return the summary (also written to OUT/summary.json)."""
    validate(args)
    out = Path(args.out)
    torch.manual_seed(args.seed)
    device = default_device()
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
    train_loader = BatchLoader(dataset.train, args.batch_size)
    eval_loader = BatchLoader(dataset.eval, args.batch_size)
    total_steps = args.steps or max(1, math.ceil(args.epochs * len(train_loader)))

    ensure_process_group(device)
    model = wrap_dmp(build_model(MODEL_CONFIGS[args.model], rows), device, args.embedding_optimizer, args.embedding_lr)
    optimizer = build_optimizer(model, args.lr)
    profile = _profile(args)
    ckpt = CPRCheckpointer(
        model,
        optimizer,
        args.checkpoint_dir or out / "checkpoints",
        policy=args.policy,
        target_pls=args.target_pls,
        profile=profile,
        total_steps=total_steps,
        reader=train_loader,
        interval_steps=args.interval_steps,
        keep_last=args.keep_last,
        policy_options=policy_options(args),
        resume=args.resume,
    )
    if args.policy == "none" or args.failures == 0:
        schedule = FailureSchedule.empty()
    else:
        schedule = FailureSchedule.from_profile(ckpt.profile, total_steps, seed=args.seed, count=args.failures)

    config = {**vars(args), "total_steps": total_steps, "table_rows": rows, "data_source": dataset.source,
              "train_rows": len(dataset.train), "eval_rows": len(dataset.eval), "failure_schedule": schedule.to_json()}
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))

    base_lrs = [group["lr"] for group in optimizer.param_groups]
    pending = [failure for failure in schedule if failure.step > ckpt.global_step]
    metrics = (out / "metrics.jsonl").open("a" if args.resume else "w")
    batches = _endless(train_loader)
    bar = tqdm(total=total_steps, initial=ckpt.global_step, disable=args.no_progress, unit="step", dynamic_ncols=True)
    loss_sum, loss_count, samples, executed = 0.0, 0, 0, 0
    train_seconds = 0.0
    window_start = time.perf_counter()
    while ckpt.global_step < total_steps:
        batch = next(batches)
        step_start = time.perf_counter()
        if args.lr_decay == "linear":
            # A function of the model's step, so full recovery retrains lost steps with the same rates.
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * (1.0 - ckpt.global_step / total_steps)
        ckpt.observe(batch)
        optimizer.zero_grad()
        loss, _ = model(batch)
        loss.backward()
        optimizer.step()
        ckpt.step()
        train_seconds += time.perf_counter() - step_start
        samples += batch.labels.numel()
        executed += 1
        loss_sum += float(loss.detach())
        loss_count += 1
        step = ckpt.global_step
        bar.update(1)
        while pending and pending[0].step <= step:
            failure = pending.pop(0)
            result = ckpt.recover([failure.shard])
            metrics.write(json.dumps({"step": step, "event": "failure", "shard": failure.shard, "recovery": result.kind,
                                      "resumed_at": result.step}) + "\n")
            if result.kind == "full":
                batches = _endless(train_loader)  # the reader was rewound with the model
                bar.n = result.step
        if step % args.log_every == 0 or step == total_steps:
            rate = samples / train_seconds if train_seconds else 0.0
            metrics.write(json.dumps({"step": step, "train_loss": loss_sum / loss_count, "samples_per_s": rate}) + "\n")
            bar.set_postfix(loss=f"{loss_sum / loss_count:.4f}", samples_s=f"{rate:,.0f}")
            loss_sum, loss_count = 0.0, 0
        if args.eval_every and step % args.eval_every == 0 and step < total_steps:
            metrics.write(json.dumps({"step": step, **{f"eval_{k}": v for k, v in evaluate(model, eval_loader).items()}}) + "\n")
    bar.close()
    wall_seconds = time.perf_counter() - window_start
    final = evaluate(model, eval_loader)
    metrics.write(json.dumps({"step": total_steps, **{f"eval_{k}": v for k, v in final.items()}}) + "\n")
    metrics.close()
    summary = {
        **final,
        "samples_per_s": samples / train_seconds if train_seconds else 0.0,
        "steps": total_steps,
        "steps_executed": executed,
        "wall_seconds": wall_seconds,
        "data_source": dataset.source,
        "rows_skipped": dataset.stats.rows_skipped,
        **ckpt.report(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run table a person reads."""
    lines = [
        f"AUC {summary['auc']:.4f}   log loss {summary['logloss']:.4f}   {summary['samples_per_s']:,.0f} samples/s   "
        f"{summary['steps']} steps ({summary['steps_executed']} executed)",
        f"policy {summary['policy']}  shards {summary['num_shards']}  settings "
        + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary["policy_settings"].items()
                    if not k.startswith("planned_") and v not in (None, {})),
        f"plan: {summary['plan']['recommended']} recovery is cheaper for this profile: {summary['plan']['reason']}",
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
    args = parse_args(argv)
    try:
        summary = run(args)
    except (UsageError, CriteoDataError, RecoveryError, CorruptCheckpointError, UnwritableDirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(f"wrote {Path(args.out) / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
