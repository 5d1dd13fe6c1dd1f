"""Background threads that keep off training's cores: torch ops on them run on one intra-op thread.

A torch op large enough to run in parallel on a second Python thread starts a second OpenMP thread team
there, which from then on competes with training's intra-op threads for the cores: on 2 cores, one int8
save encoded on CPR's writer thread left every later training step 1.9x slower. OpenMP's thread count is
a per-thread setting, so the writer thread lowers its own to 1 (after torch's lazy per-thread set-up, which
would otherwise override it) and training keeps its threads. `torch.set_num_threads` cannot do this: it
also changes MKL's threads for the whole process.
"""
from __future__ import annotations

import ctypes
import functools

import torch


@functools.cache
def _openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch loaded (found among the process's mapped libraries; None where there is
    no /proc or no OpenMP)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def one_intraop_thread() -> None:
    """Make the calling thread run torch's parallel ops serially (a thread pool's `initializer`)."""
    torch.get_num_threads()  # torch's per-thread OpenMP set-up, done once per thread, happens now
    runtime = _openmp()
    if runtime is not None:
        runtime.omp_set_num_threads(1)
