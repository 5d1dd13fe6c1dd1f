"""The data layer on real Criteo rows and on the built-in synthetic set: readers, npy round trip, loader."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dlrm.data import CriteoDataError, default_cache_dir, open_dataset
from dlrm.data.arrays import CriteoArrays
from dlrm.data.loader import BatchLoader
from dlrm.data.npy import convert_tsv_to_npy, load_npy
from dlrm.data.schema import KAGGLE_CARDINALITIES, NUM_SPARSE, SPARSE_NAMES, table_rows
from dlrm.data.synthetic import synthetic_tsv
from dlrm.data.tsv import TsvReader, _parse_fast, load_tsv

CRITEO = Path(__file__).resolve().parents[2] / "shared/data/criteo"
TABLES = table_rows(10_000)
SMALL_ROWS = 20_000


def real(name: str) -> Path:
    path = CRITEO / name
    if not path.is_file():
        pytest.skip(f"real Criteo sample {path} absent (the repo's sibling ../shared is not checked out)")
    return path


@pytest.fixture(scope="module")
def synthetic_small(tmp_path_factory) -> Path:
    return synthetic_tsv(tmp_path_factory.mktemp("synthetic"), SMALL_ROWS, TABLES, seed=3)


def assert_same(a: CriteoArrays, b: CriteoArrays) -> None:
    np.testing.assert_array_equal(a.dense, b.dense)
    np.testing.assert_array_equal(a.sparse, b.sparse)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_table_rows():
    assert table_rows(None) == list(KAGGLE_CARDINALITIES)
    capped = table_rows(1000)
    assert capped[0] == 1000 and capped[8] == 3 and max(capped) == 1000
    assert table_rows(5, per_feature=[7] * NUM_SPARSE) == [7] * NUM_SPARSE
    with pytest.raises(ValueError):
        table_rows(None, per_feature=[7])


def test_kaggle_sample():
    arrays = load_tsv([real("kaggle_train_sample.tsv")], TABLES)
    assert len(arrays) == 9_999
    assert arrays.labels.mean() == pytest.approx(0.218, abs=0.001)
    assert arrays.dense.dtype == np.float32 and arrays.sparse.dtype == np.int64
    assert (arrays.sparse >= 0).all() and (arrays.sparse < np.array(TABLES)).all()
    assert (arrays.dense >= 0).all()  # log(1 + max(x, 0)), although I2 has negative values
    # First row: I1 = 1, I5 = 1382, C1 = 68fd1e64.
    assert arrays.dense[0, 0] == np.float32(np.log(2.0))
    assert arrays.dense[0, 4] == np.float32(np.log1p(1382.0))
    assert arrays.sparse[0, 0] == 0x68FD1E64 % TABLES[0]


def test_terabyte_sample():
    arrays = load_tsv([real("terabyte_format_sample.tsv")], TABLES, layout="terabyte")
    assert len(arrays) == 1_000
    assert arrays.labels.mean() == pytest.approx(0.021)


def test_kaggle_test_set_is_refused():
    with pytest.raises(CriteoDataError, match="label-less"):
        load_tsv([real("kaggle_test_sample_nolabel.tsv")], TABLES)


def test_fast_and_line_parsers_agree_on_real_rows(tmp_path):
    lines = real("kaggle_train_sample.tsv").read_bytes().splitlines(keepends=True)
    assert _parse_fast(b"".join(lines), TABLES) is not None  # real rows take the vectorised path
    fast = load_tsv([real("kaggle_train_sample.tsv")], TABLES)
    # A bad line in the only chunk sends all of it through the line-by-line parser.
    path = tmp_path / "with_bad_line.tsv"
    path.write_bytes(b"".join(lines) + b"oops\n")
    reader = TsvReader([path], TABLES, skip_bad_rows=True, chunk_rows=len(lines) + 1)
    slow = CriteoArrays.concat(list(reader))
    assert reader.stats.rows_skipped == 1
    assert_same(fast, slow)


def test_chunking_and_folders_do_not_change_rows(tmp_path, synthetic_small):
    whole = load_tsv([synthetic_small], TABLES)
    chunked = load_tsv([synthetic_small], TABLES, chunk_rows=777)
    assert_same(whole, chunked)
    lines = synthetic_small.read_bytes().splitlines(keepends=True)
    (tmp_path / "day_1").write_bytes(b"".join(lines[5000:]))
    (tmp_path / "day_0").write_bytes(b"".join(lines[:5000]))
    assert_same(whole, load_tsv([tmp_path], TABLES))


def test_synthetic_is_deterministic_and_cached(tmp_path, synthetic_small):
    again = synthetic_tsv(tmp_path, SMALL_ROWS, TABLES, seed=3)
    assert again != synthetic_small and again.read_bytes() == synthetic_small.read_bytes()
    mtime = again.stat().st_mtime_ns
    assert synthetic_tsv(tmp_path, SMALL_ROWS, TABLES, seed=3).stat().st_mtime_ns == mtime  # reused
    other = synthetic_tsv(tmp_path, SMALL_ROWS, TABLES, seed=4)
    assert other != again and other.read_bytes() != again.read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))


def test_synthetic_click_rate_and_missing_fields(synthetic_small):
    arrays = load_tsv([synthetic_small], TABLES)
    assert arrays.labels.mean() == pytest.approx(0.25, abs=0.02)
    fields = [line.split(b"\t") for line in synthetic_small.read_bytes().splitlines()[:2000]]
    assert all(len(f) == 40 for f in fields)
    missing = np.mean([[v == b"" for v in f[1:]] for f in fields])
    assert 0.01 < missing < 0.03
    assert all(len(v) == 8 for f in fields for v in f[14:] if v)


def test_synthetic_ids_are_skewed_and_hot_rows_scattered(synthetic_small):
    arrays = load_tsv([synthetic_small], TABLES)
    rows = TABLES[2]  # a 10,000-row table
    counts = np.bincount(arrays.sparse[:, 2], minlength=rows)
    top = np.argsort(counts)[::-1][: rows // 100]
    assert counts[top].sum() / counts.sum() > 0.4  # top 1% of rows take a large share of accesses
    # Shards are contiguous row ranges: the hot rows must not crowd into the first range.
    in_first_quarter = np.mean(top < rows // 4)
    assert 0.1 < in_first_quarter < 0.45


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores)] = np.arange(1, len(scores) + 1)
    pos = labels == 1
    return float((ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum()))


def test_synthetic_labels_are_learnable(synthetic_small):
    """Per-row click rates learnt on 80% of the rows rank the other 20%: the planted model is there."""
    arrays = load_tsv([synthetic_small], TABLES)
    split = int(0.8 * len(arrays))
    y = arrays.labels.astype(np.float64)
    prior = y[:split].mean()
    score = np.zeros(len(arrays) - split)
    for f in range(NUM_SPARSE):
        ids = arrays.sparse[:, f]
        clicks = np.bincount(ids[:split], weights=y[:split], minlength=TABLES[f])
        seen = np.bincount(ids[:split], minlength=TABLES[f])
        rate = (clicks + 20 * prior) / (seen + 20)
        score += np.log(rate / (1 - rate))[ids[split:]]
    assert auc(score, y[split:]) > 0.65  # ~0.68 at this size; 0.5 if labels ignored the features


@pytest.mark.parametrize("name", ["kaggle_train_sample.tsv", "terabyte_format_sample.tsv"])
def test_npy_round_trip_real_rows(tmp_path, name):
    tsv = real(name)
    expected = load_tsv([tsv], TABLES)
    prefix = convert_tsv_to_npy(tsv, tmp_path / "npy", name="day_0")
    assert sorted(p.name for p in prefix.parent.iterdir()) == [
        "day_0_dense.npy", "day_0_labels.npy", "day_0_meta.json", "day_0_sparse.npy"
    ]
    assert_same(load_npy([tmp_path / "npy"], TABLES), expected)
    # A triple made by TorchRec's own scripts has no meta file: the dense offset is inferred.
    (tmp_path / "npy/day_0_meta.json").unlink()
    assert_same(load_npy([tmp_path / "npy"], TABLES), expected)


def test_npy_round_trip_synthetic_in_a_test_named_folder(tmp_path, synthetic_small):
    # tmp_path contains "test": TorchRec's Kaggle mode would take the file for the label-less test set.
    tsv = tmp_path / "test_day.tsv"
    tsv.write_bytes(b"".join(synthetic_small.read_bytes().splitlines(keepends=True)[:3000]))
    prefix = convert_tsv_to_npy(tsv, tmp_path)
    expected = load_tsv([tsv], TABLES)
    got = load_npy([prefix.with_name(prefix.name + "_sparse.npy")], TABLES)
    np.testing.assert_allclose(got.dense, expected.dense, rtol=1e-6)
    np.testing.assert_array_equal(got.sparse, expected.sparse)
    np.testing.assert_array_equal(got.labels, expected.labels)
    assert set(np.unique(got.labels)) == {0.0, 1.0}
    dataset = open_dataset([str(tmp_path)], table_rows=TABLES, eval_fraction=0.0)
    assert dataset.source.startswith("npy") and len(dataset.train) == 3000


def test_npy_missing_partner_file(tmp_path):
    np.save(tmp_path / "day_0_dense.npy", np.zeros((2, 13), np.float32))
    with pytest.raises(CriteoDataError, match="day_0_sparse.npy"):
        load_npy([tmp_path], TABLES)


def test_loader_batches(synthetic_small):
    arrays = load_tsv([synthetic_small], TABLES)[:1000]
    loader = BatchLoader(arrays, batch_size=256)
    batches = list(loader)
    assert len(loader) == len(batches) == 4
    assert [len(b.labels) for b in batches] == [256, 256, 256, 232]
    first = batches[0]
    assert first.dense_features.shape == (256, 13) and first.dense_features.dtype == torch.float32
    assert first.labels.dtype == torch.float32
    kjt = first.sparse_features
    assert kjt.keys() == SPARSE_NAMES
    assert kjt.lengths().dtype == torch.int32 and (kjt.lengths() == 1).all()
    assert kjt.values().dtype == torch.int64
    for f in (0, 25):
        np.testing.assert_array_equal(kjt[SPARSE_NAMES[f]].values().numpy(), arrays.sparse[:256, f])
    np.testing.assert_array_equal(batches[3].sparse_features["cat_7"].values().numpy(), arrays.sparse[768:, 7])
    assert len(BatchLoader(arrays, batch_size=256, drop_last=True)) == 3


def test_loader_resumes_at_the_saved_batch(synthetic_small):
    arrays = load_tsv([synthetic_small], TABLES)[:1000]
    loader = BatchLoader(arrays, batch_size=100)
    stream = loader.epochs(2)
    for _ in range(13):
        next(stream)
    state = loader.state_dict()
    assert state == {"epoch": 1, "batch": 3}
    expected = next(stream)
    resumed = BatchLoader(arrays, batch_size=100)
    resumed.load_state_dict(state)
    got = next(resumed.epochs(2))
    assert torch.equal(got.dense_features, expected.dense_features)
    assert torch.equal(got.sparse_features.values(), expected.sparse_features.values())
    assert torch.equal(got.labels, expected.labels)
    assert sum(1 for _ in resumed.epochs(2)) == 6  # the rest of epoch 1
    with pytest.raises(ValueError):
        resumed.load_state_dict({"epoch": 0, "batch": 10})


def test_open_dataset_synthetic_default(tmp_path, monkeypatch):
    monkeypatch.setenv("CPR_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "synthetic"
    dataset = open_dataset(None, table_rows=TABLES, eval_fraction=0.1, synthetic_rows=5000)
    assert (len(dataset.train), len(dataset.eval)) == (4500, 500)
    assert list((tmp_path / "synthetic").glob("*.tsv")) and "synthetic" in dataset.source
    assert dataset.stats.rows_read == 5000
    whole = load_tsv(list((tmp_path / "synthetic").glob("*.tsv")), TABLES)
    np.testing.assert_array_equal(dataset.eval.labels, whole.labels[4500:])  # the last rows are held out


def test_open_dataset_tsv_skip_bad_rows(tmp_path, synthetic_small):
    lines = synthetic_small.read_bytes().splitlines(keepends=True)[:1000]
    path = tmp_path / "train.txt"
    path.write_bytes(b"".join(lines[:500]) + b"1\tbad\n" + b"".join(lines[500:]))
    with pytest.raises(CriteoDataError, match=r"train.txt:501: expected 40"):
        open_dataset([str(path)], table_rows=TABLES, eval_fraction=0.2)
    dataset = open_dataset([str(path)], "kaggle", table_rows=TABLES, eval_fraction=0.2, skip_bad_rows=True)
    assert (len(dataset.train), len(dataset.eval), dataset.stats.rows_skipped) == (800, 200, 1)


def test_cache_evicts_least_recently_used_beyond_its_bound_and_clears(tmp_path, monkeypatch):
    from dlrm import cache

    folder = tmp_path / "synthetic"
    paths = [synthetic_tsv(folder, 500, TABLES, seed=s) for s in range(3)]
    size = paths[0].stat().st_size
    os.utime(paths[0], (1, paths[0].stat().st_mtime))  # least recently used
    synthetic_tsv(folder, 500, TABLES, seed=1)  # a hit marks it used
    monkeypatch.setenv("CPR_CACHE_MAX_MB", str(2.5 * size / 2**20))
    newest = synthetic_tsv(folder, 500, TABLES, seed=3)  # a new entry prunes down to 2.5 entries' worth
    assert sorted(p.name for p in cache.entries(folder)) == sorted(p.name for p in (paths[1], newest))
    monkeypatch.setenv("CPR_CACHE_MAX_MB", "0")
    assert synthetic_tsv(folder, 500, TABLES, seed=4).exists()  # the entry just made is always kept
    monkeypatch.setenv("CPR_CACHE", str(tmp_path))
    assert cache.clear(cache.cache_root())[0] == 1 and not cache.entries(folder)
