"""`python -m cpr.run`: run a training script as a supervised job whose dead ranks are replaced one by one.

    python -m cpr.run --nproc-per-node 3 examples/train_dlrm.py --steps 300
    python -m cpr.run --standalone --nproc-per-node 2 my_torchrun_script.py      # any torchrun script, unchanged
    python -m cpr.run --nproc 2 --spares 1 --kill-at 150:1 -m cpr.train --model small --policy partial
    # two nodes (or two shells on one machine): node 0 hosts the job's store at the endpoint
    python -m cpr.run --nnodes 2 --node-rank 0 --nproc 2 --rdzv-endpoint HOST:29400 my_train.py
    python -m cpr.run --nnodes 2 --node-rank 1 --nproc 2 --rdzv-endpoint HOST:29400 my_train.py

Takes torchrun's common options and gives workers torchrun's environment. A script that uses
`cpr.elastic.ElasticJob` has a dead worker replaced alone (the survivors keep their state, the replacement
joins); any other script gets torchrun's semantics: every worker restarts (see `cpr.elastic.supervisor`).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .kills import parse_pairs


def _nnodes(text: str) -> int:
    """torchrun's --nnodes N or MIN:MAX (an elastic range: this launcher runs a fixed MIN == MAX)."""
    low, _, high = text.partition(":")
    if not low.isdigit() or (high and high != low):
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number of nodes (a range MIN:MAX must have MIN == MAX)")
    return int(low)


def supervisor_options(parser: argparse.ArgumentParser) -> None:
    """The options of a supervised job (shared with `python -m cpr.train`); torchrun's spellings work too."""
    group = parser.add_argument_group("supervised job (real failures)")
    group.add_argument("--nproc", "--nproc-per-node", "--nproc_per_node", dest="nproc", type=int,
                       help="worker processes on this node; a dead one is replaced alone")
    group.add_argument("--nnodes", type=_nnodes, default=1, help="nodes of the job, one supervisor each")
    group.add_argument("--node-rank", "--node_rank", dest="node_rank", type=int, default=0,
                       help="this node's place among --nnodes")
    group.add_argument("--rdzv-endpoint", "--rdzv_endpoint", dest="rdzv_endpoint", metavar="HOST:PORT",
                       help="the job's store: node 0 hosts it there, the other nodes connect (default: a free port "
                            "on this machine, single node only)")
    group.add_argument("--rdzv-backend", "--rdzv_backend", dest="rdzv_backend", default="c10d",
                       choices=("c10d", "static"), help="torchrun's; both mean the supervisor's TCPStore here")
    group.add_argument("--max-restarts", "--max_restarts", dest="max_restarts", type=int, default=3,
                       help="replacements allowed per rank (a torchrun script: restarts of the job) before it stops")
    group.add_argument("--spares", type=int, default=0,
                       help="hot spares per node: processes already started and waiting to take a dead rank "
                            "(the script must use ElasticJob)")
    group.add_argument("--master-addr", "--master_addr", dest="master_addr",
                       help="MASTER_ADDR for the workers (default: the store's host)")
    group.add_argument("--master-port", "--master_port", dest="master_port", type=int,
                       help="MASTER_PORT for the workers (default: a free port, new at each restart)")
    group.add_argument("--standalone", action="store_true", help="one node, a store on a free local port (torchrun's)")
    group.add_argument("--rdzv-id", "--rdzv_id", dest="rdzv_id", help="the job's id (TORCHELASTIC_RUN_ID)")


def _endpoint(args: argparse.Namespace) -> str | None:
    if args.standalone and args.nnodes != 1:
        raise ValueError("--standalone is a one-node job: drop --nnodes or --standalone")
    endpoint = args.rdzv_endpoint
    return None if args.standalone and not endpoint else endpoint


def supervise(args: argparse.Namespace, command: Sequence[str]) -> int:
    """Run `command` under a supervisor as `args` say; one clear line and exit code 2 for bad settings."""
    from .supervisor import Supervisor  # here: `--help` and the options need none of torch.distributed
    import os
    if getattr(args, "rdzv_id", None):
        os.environ["TORCHELASTIC_RUN_ID"] = args.rdzv_id
    try:
        kill_at = parse_pairs(getattr(args, "launcher_kill_at", None) or [], "--kill-at", "STEP")
        kill_after = parse_pairs(getattr(args, "kill_after", None) or [], "--kill-after", "SECONDS", float)
        supervisor = Supervisor(command, args.nproc, args.nnodes, args.node_rank, _endpoint(args), args.max_restarts,
                                spares=args.spares, kill_at=kill_at, kill_after=kill_after,
                                master_addr=args.master_addr, master_port=args.master_port)
    except (ValueError, RuntimeError) as err:  # bad numbers, or a store endpoint that cannot be bound or reached
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return supervisor.run()
    except KeyboardInterrupt:
        print("error: interrupted; the workers were stopped", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpr.run", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    supervisor_options(parser)
    kills = parser.add_argument_group("injected deaths (the launcher's own, for any script)")
    kills.add_argument("--kill-at", dest="launcher_kill_at", action="append", metavar="STEP:RANK",
                       help="SIGKILL that rank as it starts that step (the script must use ElasticJob, which reports steps)")
    kills.add_argument("--kill-after", action="append", metavar="SECONDS:RANK",
                       help="SIGKILL that rank's process SECONDS after the job started (any script)")
    parser.add_argument("-m", "--module", dest="module", action="store_true", help="the target is a module (python -m)")
    parser.add_argument("--no-python", "--no_python", dest="no_python", action="store_true",
                        help="the target is an executable, not a Python script")
    parser.add_argument("target", help="the training script (or module, with -m)")
    parser.add_argument("target_args", nargs=argparse.REMAINDER, help="its arguments")
    args = parser.parse_args(argv)
    if args.nproc is None:
        args.nproc = 1
    python = [] if args.no_python else [sys.executable, *(["-m"] if args.module else [])]
    return supervise(args, [*python, args.target, *args.target_args])


if __name__ == "__main__":
    sys.exit(main())
