"""`CriteoArrays`: model-ready Criteo rows as three aligned numpy arrays."""
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dlrm.data.schema import NUM_DENSE, NUM_SPARSE


@dataclass(frozen=True)
class CriteoArrays:
    """Rows after feature transforms: dense float32 [n,13] (log-scaled), sparse int64 [n,26] (table rows),
    labels float32 [n] (0 or 1)."""

    dense: np.ndarray
    sparse: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.dense.shape != (n, NUM_DENSE) or self.sparse.shape != (n, NUM_SPARSE):
            raise ValueError(
                f"inconsistent shapes: dense {self.dense.shape}, sparse {self.sparse.shape}, labels {self.labels.shape}"
            )
        if self.dense.dtype != np.float32 or self.sparse.dtype != np.int64 or self.labels.dtype != np.float32:
            raise ValueError(
                f"dtypes must be float32/int64/float32, got {self.dense.dtype}/{self.sparse.dtype}/{self.labels.dtype}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, rows: slice) -> "CriteoArrays":
        if not isinstance(rows, slice):
            raise TypeError(f"CriteoArrays supports slicing only, got {type(rows).__name__}")
        return CriteoArrays(self.dense[rows], self.sparse[rows], self.labels[rows])

    @staticmethod
    def empty() -> "CriteoArrays":
        return CriteoArrays(
            np.zeros((0, NUM_DENSE), np.float32), np.zeros((0, NUM_SPARSE), np.int64), np.zeros(0, np.float32)
        )

    @staticmethod
    def concat(parts: Sequence["CriteoArrays"]) -> "CriteoArrays":
        """Rows of `parts` in order (a copy)."""
        if not parts:
            return CriteoArrays.empty()
        if len(parts) == 1:
            return parts[0]
        return CriteoArrays(
            np.concatenate([p.dense for p in parts]),
            np.concatenate([p.sparse for p in parts]),
            np.concatenate([p.labels for p in parts]),
        )
