"""Which embedding rows to save: per-row access counts (CPR-MFU), sampled accessed ids (CPR-SSU) and
"updated since last save" (a counter above 0), kept by the `cpr._C` ops.

Copying the chosen rows out is plain `index_select`, no custom gather op: gathering 64-byte rows at random
from a 64 MB table ran at ~8 GB/s against ~23 GB/s for a sequential copy of as many bytes
(benchmarks/tracking.py, `gather_gb_per_s` vs `copy_gb_per_s`); the gap is the random reads' memory
latency, which a hand-written loop pays too, and both are far above checkpoint storage bandwidth.
"""
from cpr.tracking._ops import has_cuda_kernels
from cpr.tracking.tracker import AccessTracker, TrackingMode

__all__ = ["AccessTracker", "TrackingMode", "has_cuda_kernels"]
