"""Hot spares: processes that have imported torch, TorchRec and the script, and wait in the job's store.

Starting a replacement costs seconds of imports on a quiet machine and a minute on a loaded one. With
`--spares K` a supervisor keeps K spares per node. A spare (`spare_boot.py`) imports torch, TorchRec and
CPR with `CPR_SPARE=NODE:ID` and no rank, announces itself ready (`spare/<node>/<id>`) and waits. When a
rank dies, the supervisor writes that rank's placement under `assign/<node>/<id>`: the spare takes the
rank's torchrun variables, runs the worker's script and joins the next generation like any replacement.
The supervisor starts a new spare once the job trains again. Spares need a Python script or module that
uses `ElasticJob` (a torchrun script restarts every worker instead).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict

from cpr.errors import MembershipError

from . import keys
from .workers import SPARE_ENV, Placement, torchrun_env

_POLL_S = 0.005  # a spare polls often: it does nothing else, and its latency is the heal's


def await_assignment(store) -> Placement:
    """Spare side: announce this process ready and wait until a rank is given to it (or the job stops)."""
    node, spare_id = os.environ[SPARE_ENV].split(":")
    ready, assign = keys.SPARE.format(node=node, id=spare_id), keys.ASSIGN.format(node=node, id=spare_id)
    store.set(ready, "1")
    while not store.check([assign]):
        if store.check([keys.STOP]):
            raise MembershipError(f"spare {node}:{spare_id}: the job stopped: {store.get(keys.STOP).decode()}")
        time.sleep(_POLL_S)
    placement = Placement(**json.loads(store.get(assign)))
    os.environ.update(torchrun_env(placement))
    del os.environ[SPARE_ENV]
    return placement


def offer(store, node: int, spare_id: int) -> bool:
    """Supervisor side: whether spare `spare_id` of `node` is imported and waiting."""
    return store.check([keys.SPARE.format(node=node, id=spare_id)])


def assign(store, node: int, spare_id: int, placement: Placement) -> None:
    """Supervisor side: spare `spare_id` takes `placement`'s rank."""
    store.set(keys.ASSIGN.format(node=node, id=spare_id), json.dumps(asdict(placement)))
