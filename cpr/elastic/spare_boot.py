"""`python -m cpr.elastic.spare_boot SCRIPT ARGS...` (or `-m MODULE ARGS...`): a hot spare's process.

It imports what a worker spends its start-up on (torch, TorchRec, CPR), waits in the job's store until its
supervisor gives it a rank (`spares.await_assignment`, which also sets torchrun's variables for that rank),
then runs the worker's own script in this process, as `python SCRIPT` would. The script needs no change:
even one that reads `RANK` at import time sees its rank.
"""
from __future__ import annotations

import importlib
import os
import runpy
import sys

from .spares import await_assignment
from .stores import connect
from .keys import STORE_ENV

# What a TorchRec worker imports first; each is optional (a script may not need TorchRec at all).
PRELOAD = ("torch", "torch.distributed", "torchrec", "torchrec.distributed", "cpr.checkpointer", "cpr.elastic.job")


def main(argv: list[str]) -> None:
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    await_assignment(connect(os.environ[STORE_ENV]))
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
