"""The feature transforms of the DLRM reference, shared by every reader so all formats give equal arrays."""
from collections.abc import Sequence

import numpy as np

_UINT32_MAX = 0xFFFFFFFF


def hash_ids(raw_ids: np.ndarray, table_rows: Sequence[int]) -> np.ndarray:
    """Table rows of raw categorical ids [n,26] (unsigned, missing = 0): `id % table_rows[i]` per column, int64."""
    # 32-bit division is ~3x faster than 64-bit, and Criteo's ids are 32-bit.
    narrow = raw_ids.dtype == np.uint32 and max(table_rows) <= _UINT32_MAX
    dtype = np.uint32 if narrow else np.uint64
    return (raw_ids.astype(dtype, copy=False) % np.asarray(table_rows, dtype=dtype)).astype(np.int64)


def log_dense(raw: np.ndarray) -> np.ndarray:
    """`log(1 + max(x, 0))` of raw integer counts (missing = 0) as float32."""
    return np.log1p(np.maximum(raw.astype(np.float64, copy=False), 0.0)).astype(np.float32)
