"""`python -m cpr.run`: run a training script as a supervised job whose dead ranks are replaced one by one.

    python -m cpr.run --nproc 3 examples/train_dlrm.py --steps 300
    python -m cpr.run --nproc 2 -m cpr.train --model small --policy partial     # what `cpr.train --nproc` does
    # two nodes (or two shells on one machine): node 0 hosts the job's store at the endpoint
    python -m cpr.run --nnodes 2 --node-rank 0 --nproc 2 --rdzv-endpoint HOST:29400 my_train.py
    python -m cpr.run --nnodes 2 --node-rank 1 --nproc 2 --rdzv-endpoint HOST:29400 my_train.py

Like torchrun, but when a worker dies only that worker is started again (see `cpr.supervisor`); the
script uses `cpr.elastic.ElasticJob` so that the survivors keep their state and the replacement joins.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence



def supervisor_options(parser: argparse.ArgumentParser) -> None:
    """The options of a supervised job (shared with `python -m cpr.train`)."""
    group = parser.add_argument_group("supervised job (real failures)")
    group.add_argument("--nproc", type=int, help="worker processes on this node; a dead one is replaced alone")
    group.add_argument("--nnodes", type=int, default=1, help="nodes of the job, one supervisor each")
    group.add_argument("--node-rank", type=int, default=0, help="this node's place among --nnodes")
    group.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                       help="the job's store: node 0 hosts it there, the other nodes connect (default: a free port "
                            "on this machine, single node only)")
    group.add_argument("--max-restarts", type=int, default=3, help="replacements allowed per rank before the job stops")


def supervise(args: argparse.Namespace, command: Sequence[str]) -> int:
    """Run `command` under a supervisor as `args` say; one clear line and exit code 2 for bad settings."""
    from .supervisor import Supervisor  # here: `--help` and the options need none of torch.distributed

    try:
        supervisor = Supervisor(command, args.nproc, args.nnodes, args.node_rank, args.rdzv_endpoint, args.max_restarts)
    except (ValueError, RuntimeError) as err:  # bad numbers, or a store endpoint that cannot be bound or reached
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return supervisor.run()
    except KeyboardInterrupt:
        print("error: interrupted; the workers were stopped", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpr.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    supervisor_options(parser)
    parser.add_argument("-m", dest="module", action="store_true", help="the target is a module (python -m)")
    parser.add_argument("target", help="the training script (or module, with -m)")
    parser.add_argument("target_args", nargs=argparse.REMAINDER, help="its arguments")
    args = parser.parse_args(argv)
    if args.nproc is None:
        args.nproc = 1
    command = [sys.executable, *(["-m"] if args.module else []), args.target, *args.target_args]
    return supervise(args, command)


if __name__ == "__main__":
    sys.exit(main())
