"""The built-in synthetic Criteo-shaped data set: a Kaggle-layout TSV with a planted click model.

Categorical ids follow a Zipf law over each table's rows (rank r has weight (r+1)^-alpha) and the ranks are
scattered over the row range by a fixed random permutation, since embedding shards are contiguous row ranges
and real hot rows are not all at low ids. Labels come from a logistic model with a random effect per row of
a few tables plus two dense effects, so a model's AUC on held-out rows measures how much it learned.
"""
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dlrm import cache
from dlrm.data.schema import NUM_COLUMNS, NUM_DENSE, NUM_SPARSE

FORMAT_VERSION = 1  # bump when the generator changes, so cached files are not reused
CLICK_RATE = 0.25
MISSING_RATE = 0.02
# Tables whose rows carry a planted click effect (Kaggle cardinalities 305..93145: learnable, not trivial).
EFFECT_FEATURES = (0, 1, 4, 6, 7, 9, 10, 12)
EFFECT_SIGMA = 0.5
# (dense column, coefficient on its standardised log value)
DENSE_EFFECTS = ((0, 0.5), (5, -0.4))
# Dense columns as floor(lognormal(mu, sigma)); I2 (column 1) is shifted by -2 as in Criteo, where it can be negative.
_DENSE_MU = np.array([0.5, 1.0, 2.0, 1.5, 8.0, 4.0, 1.5, 2.5, 4.0, 0.2, 0.8, 0.3, 2.0])
_DENSE_SIGMA = np.array([1.2, 1.5, 1.0, 1.0, 2.0, 1.5, 1.2, 1.0, 1.2, 0.6, 0.8, 1.0, 1.0])
_ID_SPACE = 1 << 32  # ids are 8 hex digits
_HEX_CHARS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_CELL = 12  # bytes per rendered field: a sign and up to 11 digits
_MAX_DENSE = 10**11 - 1
_POWERS_OF_TEN = 10 ** np.arange(_CELL - 1, -1, -1, dtype=np.int64)
_FORMAT_ROWS = 32768  # rows rendered at a time (bounds the scratch memory)


def synthetic_tsv(
    cache_dir: str | Path,
    num_rows: int,
    table_rows: Sequence[int],
    zipf_alpha: float = 1.05,
    seed: int = 0,
) -> Path:
    """Path of the synthetic TSV for these parameters under `cache_dir`, generated on first use.

    The file's bytes depend only on (num_rows, table_rows, zipf_alpha, seed); it is written under a temporary
    name and renamed, so a concurrent or interrupted run never leaves a partial file under the final name.
    A new file makes the least recently used ones go when the folder grows past its bound (see dlrm/cache.py).
    """
    if num_rows < 1:
        raise ValueError(f"num_rows must be >= 1, got {num_rows}")
    rows = [int(r) for r in table_rows]
    if len(rows) != NUM_SPARSE or not all(1 <= r <= _ID_SPACE for r in rows):
        raise ValueError(f"table_rows needs {NUM_SPARSE} sizes in [1, 2^32], got {rows}")
    params = {"version": FORMAT_VERSION, "rows": num_rows, "tables": rows, "alpha": zipf_alpha, "seed": seed}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"synthetic_criteo_{num_rows}_{digest}.tsv"
    if path.exists():
        cache.mark_used(path)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _generate(num_rows, rows, zipf_alpha, seed)
    tmp = cache.temp_path(path)
    tmp.write_bytes(text)
    os.replace(tmp, path)
    cache.mark_used(path)
    cache.prune(path.parent, keep=path)
    return path


def _zipf_rows(rng: np.random.Generator, n: int, rows: int, alpha: float) -> np.ndarray:
    """n table rows: Zipf ranks (inverse-CDF sampling) mapped through a random permutation of the rows."""
    cdf = np.cumsum(np.arange(1, rows + 1, dtype=np.float64) ** -alpha)
    ranks = np.minimum(np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right"), rows - 1)
    return rng.permutation(rows)[ranks]


def _generate(n: int, table_rows: list[int], alpha: float, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    dense = np.minimum(np.floor(np.exp(rng.normal(_DENSE_MU, _DENSE_SIGMA, size=(n, NUM_DENSE)))), _MAX_DENSE)
    dense = dense.astype(np.int64)
    dense[:, 1] -= 2
    dense_missing = rng.random((n, NUM_DENSE)) < MISSING_RATE

    rows = np.empty((n, NUM_SPARSE), dtype=np.int64)
    ids = np.empty((n, NUM_SPARSE), dtype=np.int64)
    for i, r in enumerate(table_rows):
        rows[:, i] = _zipf_rows(rng, n, r, alpha)
        # Any id congruent to the row modulo the table size hashes back to it; a random multiple makes the
        # ids look like Criteo's 32-bit hashes.
        ids[:, i] = rows[:, i] + r * rng.integers(0, _ID_SPACE // r, size=n)
    sparse_missing = rng.random((n, NUM_SPARSE)) < MISSING_RATE
    rows[sparse_missing] = 0  # what a reader sees for a missing id

    logit = np.zeros(n)
    for f in EFFECT_FEATURES:
        logit += rng.normal(0.0, EFFECT_SIGMA, size=table_rows[f])[rows[:, f]]
    seen_dense = np.log1p(np.maximum(np.where(dense_missing, 0, dense), 0))
    for col, coef in DENSE_EFFECTS:
        x = seen_dense[:, col]
        logit += coef * (x - x.mean()) / (x.std() + 1e-12)
    clicks = rng.random(n) < _sigmoid(logit + _bias_for_rate(logit, CLICK_RATE))

    return _format_tsv(clicks, dense, dense_missing, ids, sparse_missing)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _bias_for_rate(logit: np.ndarray, rate: float) -> float:
    """The bias b with mean(sigmoid(logit + b)) == rate (bisection; the mean is increasing in b)."""
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _sigmoid(logit + mid).mean() < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _format_tsv(
    clicks: np.ndarray, dense: np.ndarray, dense_missing: np.ndarray, ids: np.ndarray, sparse_missing: np.ndarray
) -> bytes:
    """TSV bytes, built in numpy: each field is rendered right-aligned into a fixed-width cell followed by its
    separator, and a mask keeps each cell's used bytes (in order) and drops the padding."""
    out = bytearray()
    for lo in range(0, len(clicks), _FORMAT_ROWS):
        rows = slice(lo, lo + _FORMAT_ROWS)
        n = len(clicks[rows])
        cells = np.zeros((n, NUM_COLUMNS, _CELL + 1), dtype=np.uint8)
        lengths = np.empty((n, NUM_COLUMNS), dtype=np.int64)
        cells[:, 0, _CELL - 1] = np.where(clicks[rows], ord("1"), ord("0"))
        lengths[:, 0] = 1
        cells[:, 1 : 1 + NUM_DENSE, :_CELL], lengths[:, 1 : 1 + NUM_DENSE] = _decimal_cells(dense[rows])
        lengths[:, 1 : 1 + NUM_DENSE][dense_missing[rows]] = 0
        nibbles = (ids[rows][:, :, None] >> np.arange(28, -1, -4)) & 0xF
        cells[:, 1 + NUM_DENSE :, _CELL - 8 : _CELL] = _HEX_CHARS[nibbles]
        lengths[:, 1 + NUM_DENSE :] = np.where(sparse_missing[rows], 0, 8)
        cells[:, :, _CELL] = ord("\t")
        cells[:, -1, _CELL] = ord("\n")
        keep = np.arange(_CELL + 1) >= _CELL - lengths[..., None]
        out += cells[keep].tobytes()
    return bytes(out)


def _decimal_cells(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Right-aligned ASCII decimals of int64 `values` [..] in _CELL-byte cells, and their lengths."""
    magnitude = np.abs(values)
    digits = (magnitude[..., None] // _POWERS_OF_TEN) % 10  # most significant first
    num_digits = np.maximum(1, (magnitude[..., None] >= _POWERS_OF_TEN).sum(axis=-1))
    cells = (digits + ord("0")).astype(np.uint8)
    negative = values < 0
    sign_at = _CELL - 1 - num_digits
    cells[negative, sign_at[negative]] = ord("-")
    return cells, num_digits + negative
