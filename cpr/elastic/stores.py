"""The job's store: where supervisors and workers meet (keys.py is its schema).

`tcp://HOST:PORT` (or plain HOST:PORT; the default): a `torch.distributed.TCPStore` hosted by node 0's
supervisor, outside the workers. Node 0's supervisor is then a single point of failure for the whole job;
a store that outlives any supervisor (etcd) is not built yet.
"""
from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from cpr.environment import setting

from .keys import parse_endpoint

# Store operations wait at most this long for a key (a worker's rendezvous has its own, longer bounds).
STORE_TIMEOUT_S = max(60.0, setting("CPR_REJOIN_TIMEOUT_S"))


def split_url(url: str) -> tuple[str, str]:
    """(scheme, HOST:PORT) of a store URL; ValueError naming the URL for anything else."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "tcp", url
    if scheme != "tcp":
        raise ValueError(f"store {url!r}: only tcp:// stores are supported (an etcd store is not built yet)")
    parse_endpoint(rest)
    return scheme, rest


def connect(url: str, timeout_s: float = STORE_TIMEOUT_S) -> dist.Store:
    """A client of the job's store at `url` (what CPR_STORE says)."""
    _, endpoint = split_url(url)
    host, port = parse_endpoint(endpoint)
    return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))


def host_or_connect(url: str | None, node_rank: int, timeout_s: float = 300.0) -> tuple[dist.Store, str]:
    """The store a supervisor uses, and its URL for the workers: node 0 hosts a TCPStore (port 0: a free
    one), the other nodes connect."""
    _, endpoint = split_url(url or "127.0.0.1:0")
    host, port = parse_endpoint(endpoint)
    if node_rank == 0:
        store = dist.TCPStore(host, port, is_master=True, timeout=timedelta(seconds=60), wait_for_workers=False)
    else:
        store = connect(endpoint, timeout_s)
    return store, f"{host}:{store.port}"
