"""Criteo data for DLRM training: `open_dataset` picks the source (built-in synthetic set, TSV or npy),
loads it and holds out the last rows for evaluation."""
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dlrm.data.arrays import CriteoArrays
from dlrm.cache import default_cache_dir
from dlrm.data.errors import CriteoDataError
from dlrm.data.synthetic import synthetic_tsv
from dlrm.data.tsv import LAYOUTS, ReadStats, TsvReader

__all__ = ["CriteoArrays", "CriteoDataError", "Dataset", "ReadStats", "default_cache_dir", "open_dataset"]

DATA_FORMATS = (*LAYOUTS, "npy")
DEFAULT_SYNTHETIC_ROWS = 500_000


@dataclass(frozen=True)
class Dataset:
    """Training and held-out rows, what reading them skipped, and a description of where they came from."""

    train: CriteoArrays
    eval: CriteoArrays
    stats: ReadStats
    source: str


def open_dataset(
    paths: Sequence[str] | None,
    data_format: str = "auto",
    *,
    table_rows: Sequence[int],
    eval_fraction: float,
    skip_bad_rows: bool = False,
    synthetic_rows: int = DEFAULT_SYNTHETIC_ROWS,
    zipf_alpha: float = 1.05,
    cache_dir: str | Path | None = None,
    seed: int = 0,
) -> Dataset:
    """Loads `paths` (files or folders; None = the built-in synthetic set of `synthetic_rows` rows, made with
    `seed` and Zipf skew `zipf_alpha`, cached under `cache_dir`) and holds out the last `eval_fraction` of the rows.

    `data_format`: "auto" (npy files or folders of them -> npy, else TSV), "kaggle" or "terabyte" (TSV),
    or "npy". Raises `CriteoDataError` for unusable input.
    """
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {DATA_FORMATS}, got {data_format!r}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    table_rows = list(table_rows)
    if paths is None:
        path = synthetic_tsv(cache_dir or default_cache_dir(), synthetic_rows, table_rows, zipf_alpha=zipf_alpha, seed=seed)
        paths, data_format = [str(path)], "kaggle"
        source = f"built-in synthetic set ({synthetic_rows} rows, seed {seed}): {path}"
    else:
        if not paths:
            raise ValueError("paths is empty (pass None for the built-in synthetic set)")
        if data_format == "auto" and all(_is_npy(Path(p)) for p in paths):
            data_format = "npy"
        source = f"{'npy' if data_format == 'npy' else 'TSV'}: {', '.join(map(str, paths))}"

    if data_format == "npy":
        from dlrm.data.npy import load_npy  # here: it loads TorchRec, which reading TSV or --help need not

        rows = load_npy(paths, table_rows)
        stats = ReadStats(rows_read=len(rows))
    else:
        reader = TsvReader(paths, table_rows, layout=data_format, skip_bad_rows=skip_bad_rows)
        rows = CriteoArrays.concat(list(reader))
        stats = reader.stats
    # At least one held-out row when any are asked for: an empty evaluation set has no loss to report.
    num_eval = max(1, round(len(rows) * eval_fraction)) if eval_fraction > 0 else 0
    if len(rows) - num_eval < 1:
        raise CriteoDataError(paths[0], f"{len(rows)} usable rows: holding out {num_eval} for evaluation "
                                        "leaves none for training (at least 2 rows are needed)")
    split = len(rows) - num_eval
    return Dataset(train=rows[:split], eval=rows[split:], stats=stats, source=source)


def _is_npy(path: Path) -> bool:
    return path.suffix == ".npy" or (path.is_dir() and any(path.glob("*_dense.npy")))
