"""TorchRec's preprocessed Criteo layout: per day, `<name>_dense.npy`, `<name>_sparse.npy`, `<name>_labels.npy`.

Conversion and loading use TorchRec's own code (`BinaryCriteoUtils.tsv_to_npys`,
`InMemoryBinaryCriteoIterDataPipe`). TorchRec stores sparse as raw int64 ids (hashed here by the same
`id % table_rows[i]` as the TSV reader) and dense as float32 `log(x - m + 2)`, where m is the minimum raw
dense value of the file (missing = 0). The reader undoes that to apply the DLRM reference transform
`log(1 + max(x, 0))`, so the same rows give equal arrays from TSV and npy. TorchRec does not store m:
`convert_tsv_to_npy` writes it to `<name>_meta.json`; for triples made elsewhere the reader takes raw 0 to
be the most frequent dense value, as it is in Criteo (missing values are 0 and most counts are small).
"""
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torchrec.datasets.criteo import BinaryCriteoUtils, InMemoryBinaryCriteoIterDataPipe

from dlrm.data.arrays import CriteoArrays
from dlrm.data.errors import CriteoDataError
from dlrm.data.schema import KAGGLE_CARDINALITIES
from dlrm.data.transforms import log_dense
from dlrm.data.tsv import TsvReader

PARTS = ("dense", "sparse", "labels")


def npy_files(prefix: Path) -> dict[str, Path]:
    """The three files of the triple `prefix` (e.g. out/day_0 -> out/day_0_dense.npy, ...)."""
    return {part: prefix.with_name(f"{prefix.name}_{part}.npy") for part in PARTS}


def npy_prefixes(paths: Sequence[str | Path]) -> list[Path]:
    """Triples named by `paths`: a folder stands for all its *_dense.npy triples (sorted), a file for its own."""
    prefixes: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f.with_name(f.name.removesuffix("_dense.npy")) for f in p.glob("*_dense.npy"))
            if not found:
                raise CriteoDataError(p, "folder holds no *_dense.npy files")
            prefixes.extend(found)
        else:
            part = next((part for part in PARTS if p.name.endswith(f"_{part}.npy")), None)
            if part is None:
                raise CriteoDataError(
                    p, "not a TorchRec npy file (expected a name ending in _dense.npy, _sparse.npy or _labels.npy)"
                )
            prefix = p.with_name(p.name.removesuffix(f"_{part}.npy"))
            if prefix not in prefixes:
                prefixes.append(prefix)
    for prefix in prefixes:
        for path in npy_files(prefix).values():
            if not path.is_file():
                raise CriteoDataError(path, "no such file (each npy triple needs _dense, _sparse and _labels)")
    return prefixes


def load_npy(paths: Sequence[str | Path], table_rows: Sequence[int]) -> CriteoArrays:
    """All rows of the npy triples named by `paths` (folders or files), transformed as the TSV reader does."""
    prefixes = npy_prefixes(paths)
    files = [npy_files(p) for p in prefixes]
    numpy_rng = np.random.get_state()  # the datapipe reseeds numpy's global generator; keep the caller's
    data = InMemoryBinaryCriteoIterDataPipe(
        stage="train",
        dense_paths=[str(f["dense"]) for f in files],
        sparse_paths=[str(f["sparse"]) for f in files],
        labels_paths=[str(f["labels"]) for f in files],
        batch_size=1,
        rank=0,
        world_size=1,
        hashes=list(table_rows),  # applies id % table_rows[i] to the loaded ids
    )
    np.random.set_state(numpy_rng)
    parts = []
    for prefix, dense, sparse, labels in zip(prefixes, data.dense_arrs, data.sparse_arrs, data.labels_arrs):
        if len(dense) == 0:
            raise CriteoDataError(npy_files(prefix)["dense"], "holds no rows")
        parts.append(
            CriteoArrays(
                dense=log_dense(_raw_dense(dense, prefix)),
                sparse=sparse.astype(np.int64, copy=False),
                labels=labels.reshape(-1).astype(np.float32),
            )
        )
    return CriteoArrays.concat(parts)


def _meta_file(prefix: Path) -> Path:
    return prefix.with_name(f"{prefix.name}_meta.json")


def _raw_dense(stored: np.ndarray, prefix: Path) -> np.ndarray:
    """Raw dense values from TorchRec's float32 log(x - m + 2) (see the module docstring for m)."""
    shifted = np.rint(np.exp(stored.astype(np.float64)))  # x - m + 2
    meta = _meta_file(prefix)
    if meta.is_file():
        minimum = float(json.loads(meta.read_text())["dense_min"])
    else:
        values, counts = np.unique(shifted, return_counts=True)
        minimum = 2.0 - values[np.argmax(counts)]  # the most frequent value is x = 0
    return shifted + minimum - 2.0


def _dense_min(stored: np.ndarray, transformed: np.ndarray) -> int:
    """m of TorchRec's log(x - m + 2), from its output `stored` and log(1 + max(x, 0)) of the same values."""
    shifted = np.rint(np.exp(stored.astype(np.float64)))
    positive = transformed > 0
    if not positive.any():
        return int(2 - shifted.max())  # all x <= 0: any m that keeps them <= 0 reads back the same
    # The smallest positive x is a small count, so both x and its shifted value are exact here.
    at = np.unravel_index(np.argmin(np.where(positive, transformed, np.inf)), transformed.shape)
    x = np.rint(np.expm1(transformed[at].astype(np.float64)))
    return int(x + 2 - shifted[at])


def convert_tsv_to_npy(tsv_path: str | Path, out_dir: str | Path, name: str | None = None) -> Path:
    """Writes `out_dir/<name>_{dense,sparse,labels}.npy` from one Criteo TSV file with TorchRec's converter.

    `name` defaults to the file's stem. The file is validated first (a `CriteoDataError` names the bad line
    and field), and m (see the module docstring) is written to `<name>_meta.json`. Returns the triple's prefix.
    """
    tsv_path = Path(tsv_path)
    # Validates the file and gives its transformed dense values (the table sizes do not matter here).
    transformed = CriteoArrays.concat(list(TsvReader([tsv_path], KAGGLE_CARDINALITIES)))
    with open(tsv_path, "rb") as f:
        num_lines = sum(1 for _ in f)
    if num_lines != len(transformed):
        raise CriteoDataError(tsv_path, "has blank lines, which TorchRec's converter cannot read")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / (name or tsv_path.stem)
    files = npy_files(prefix)
    # Both Criteo layouts have the label first; "criteo_1tb" avoids TorchRec's Kaggle mode, which takes
    # any path containing "test" for the label-less test set.
    BinaryCriteoUtils.tsv_to_npys(
        str(tsv_path), str(files["dense"]), str(files["sparse"]), str(files["labels"]), dataset_name="criteo_1tb"
    )
    dense_min = _dense_min(np.load(files["dense"]), transformed.dense)
    _meta_file(prefix).write_text(json.dumps({"dense_min": dense_min, "rows": len(transformed)}) + "\n")
    return prefix
