"""`python -m cpr.train`: train a TorchRec DLRM on Criteo-format data with CPR checkpointing (the options
and their checks are in `cpr.options`, the run in `cpr.training`), print the summary and write it to `--out`.

This module imports nothing heavy: `--help` and every argument or environment error come before torch and
TorchRec load (`benchmarks/startup.py` measures it).
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from cpr.elastic.keys import STORE_ENV
from cpr.elastic.launch import supervise
from cpr.environment import check_environment
from cpr.errors import CPRError
from cpr.options import parse_args, validate
from dlrm.data.errors import CriteoDataError

if TYPE_CHECKING:
    import argparse

    from cpr.elastic.job import JobHooks
    from cpr.training import StoreFactory


def run(args: argparse.Namespace, job_hooks: JobHooks | None = None, make_store: StoreFactory | None = None) -> dict[str, Any]:
    """`cpr.training.run`: train as `args` say and return the summary (imports torch on first call)."""
    from cpr.training import run as run_training

    return run_training(args, job_hooks, make_store)


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
    """The command line; `job_hooks` and `make_store` as for `run`. Exit codes: 0 done, 2 bad input (one
    line on stderr), 130 interrupted (Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    worker = STORE_ENV in os.environ  # a supervised worker: its supervisor reports for the job
    try:
        args = parse_args(argv)
        check_environment()
        if not worker:  # the supervisor checked the options before it started this worker
            validate(args)
        quiet_dependencies()
        if args.nproc is not None and not worker:
            return supervise(args, [sys.executable, "-m", "cpr.train", *argv])
        from cpr.training import run_command

        summary = run_command(args, job_hooks, make_store)
    except (CPRError, CriteoDataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if not worker:  # a supervised worker's Ctrl-C is its supervisor's to report, once for the job
            print("error: interrupted; the saves committed so far stay in the checkpoint folder (--resume continues "
                  "from the newest)", file=sys.stderr)
        return 130
    if summary["world_size"] == 1 or int(os.environ.get("RANK", "0")) == 0:
        print(format_summary(summary))
        print(f"wrote {Path(args.out) / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
