"""Criteo feature layout: column counts, TorchRec feature names and the Kaggle table cardinalities."""
from collections.abc import Sequence

NUM_DENSE = 13
NUM_SPARSE = 26
NUM_COLUMNS = 1 + NUM_DENSE + NUM_SPARSE  # label, I1..I13, C1..C26

# Names as TorchRec's Criteo datasets and DLRM examples use them (cat_0..cat_25 are the KJT keys), spelled here
# so that reading data needs no TorchRec import (dlrm.model checks that they are TorchRec's).
DENSE_NAMES: list[str] = [f"int_{i}" for i in range(NUM_DENSE)]
SPARSE_NAMES: list[str] = [f"cat_{i}" for i in range(NUM_SPARSE)]
# Names of the TSV columns as Criteo documents them, used in error messages.
COLUMN_NAMES: list[str] = ["label"] + [f"I{i}" for i in range(1, NUM_DENSE + 1)] + [
    f"C{i}" for i in range(1, NUM_SPARSE + 1)
]

# Distinct ids per categorical feature in the Kaggle Display Advertising Challenge training set.
KAGGLE_CARDINALITIES: tuple[int, ...] = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)


def table_rows(cap: int | None, per_feature: Sequence[int] | None = None) -> list[int]:
    """Embedding-table rows per feature: `per_feature` if given, else each Kaggle cardinality capped at `cap`."""
    if per_feature is not None:
        rows = [int(r) for r in per_feature]
        if len(rows) != NUM_SPARSE:
            raise ValueError(f"per_feature needs {NUM_SPARSE} table sizes, got {len(rows)}")
    else:
        rows = [c if cap is None else min(c, cap) for c in KAGGLE_CARDINALITIES]
    if any(r < 1 for r in rows):
        raise ValueError(f"table sizes must be >= 1, got {rows}")
    return rows
