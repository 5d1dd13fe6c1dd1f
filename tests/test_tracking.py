"""cpr.tracking (the `cpr._C` ops behind AccessTracker) against pure-torch references."""
import math

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cpr.tracking import AccessTracker

# Three tables; f_a and f_b share t_big, t_one has a single row.
TABLES = {"t_big": 1000, "t_small": 70, "t_one": 1}
FEATURES = {"f_a": "t_big", "f_b": "t_big", "f_c": "t_small", "f_d": "t_one"}


def zipf_ids(rows: int, n: int, generator: torch.Generator, exponent: float = 1.1) -> torch.Tensor:
    """n ids of a Zipf(exponent) law over the rows, with popularity ranks shuffled over the ids."""
    probs = 1.0 / torch.arange(1, rows + 1, dtype=torch.float64) ** exponent
    ranks = torch.multinomial(probs, n, replacement=True, generator=generator)
    return torch.randperm(rows, generator=generator)[ranks]


def uniform_ids(rows: int, n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, rows, (n,), generator=generator)


def make_kjt(ids_by_feature: dict[str, torch.Tensor], batch: int, dtype: torch.dtype) -> KeyedJaggedTensor:
    """A KJT whose feature f holds ids_by_feature[f], spread over `batch` bags."""
    values, lengths = [], []
    for ids in ids_by_feature.values():
        per_bag = torch.full((batch,), ids.numel() // batch, dtype=torch.int32)
        per_bag[: ids.numel() % batch] += 1
        values.append(ids)
        lengths.append(per_bag)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(ids_by_feature), values=torch.cat(values).to(dtype), lengths=torch.cat(lengths)
    )


def random_batch(draw, n_per_feature: int, generator: torch.Generator, dtype=torch.int64):
    ids = {f: draw(TABLES[t], n_per_feature, generator) for f, t in FEATURES.items()}
    return ids, make_kjt(ids, batch=8, dtype=dtype)


def reference_counts(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    counts = {t: torch.zeros(rows, dtype=torch.int64) for t, rows in TABLES.items()}
    for ids in batches:
        for feature, values in ids.items():
            table = FEATURES[feature]
            counts[table] += torch.bincount(values, minlength=TABLES[table])
    return counts


def reference_hottest(counts: torch.Tensor, k: int, start: int = 0) -> torch.Tensor:
    """Top-k by count, ties to the lower id (stable sort of -count), count 0 excluded, ascending ids."""
    order = torch.sort(-counts, stable=True).indices[:k]
    return (order[counts[order] > 0] + start).sort().values


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("draw", [uniform_ids, zipf_ids])
def test_counts_dirty_and_hottest_match_torch(dtype, draw):
    generator = torch.Generator().manual_seed(1)
    tracker = AccessTracker(TABLES, FEATURES)
    batches = []
    for _ in range(3):
        ids, kjt = random_batch(draw, 400, generator, dtype)
        tracker.observe(kjt)
        batches.append(ids)
    expected = reference_counts(batches)
    for table, counts in expected.items():
        assert torch.equal(tracker.counts(table).long(), counts)
        assert torch.equal(tracker.dirty_rows(table), counts.nonzero().squeeze(1))
        for k in (0, 1, 5, 64, TABLES[table] + 3):
            assert torch.equal(tracker.hottest(table, k=k), reference_hottest(counts, k))
    counts = expected["t_big"]
    for start, end in [(0, 1000), (130, 611), (5, 5), (999, 1000)]:
        assert torch.equal(
            tracker.hottest("t_big", fraction=0.1, row_range=(start, end)),
            reference_hottest(counts[start:end], math.ceil(0.1 * (end - start)), start),
        )
        dirty = tracker.dirty_rows("t_big", row_range=(start, end))
        assert torch.equal(dirty, counts[start:end].nonzero().squeeze(1) + start)


def test_large_batch_uses_threads_and_matches_torch():
    # 4 features x 300k ids is above the single-thread cut-off (2^20 ids), so tables go to several threads.
    generator = torch.Generator().manual_seed(2)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, 2))
    try:
        tracker = AccessTracker(TABLES, FEATURES)
        ids, kjt = random_batch(zipf_ids, 300_000, generator)
        tracker.observe(kjt)
    finally:
        torch.set_num_threads(threads)
    for table, counts in reference_counts([ids]).items():
        assert torch.equal(tracker.counts(table).long(), counts)


def test_ties_go_to_lower_ids_and_zero_counts_are_never_selected():
    tracker = AccessTracker({"t": 10}, {"f": "t"})
    tracker.observe(make_kjt({"f": torch.tensor([7, 7, 3, 3, 9, 1])}, batch=2, dtype=torch.int64))
    assert tracker.hottest("t", k=1).tolist() == [3]
    assert tracker.hottest("t", k=3).tolist() == [1, 3, 7]
    assert tracker.hottest("t", k=10).tolist() == [1, 3, 7, 9]


def test_empty_batch_changes_nothing():
    tracker = AccessTracker(TABLES, FEATURES)
    empty = {f: torch.empty(0, dtype=torch.int64) for f in FEATURES}
    tracker.observe(make_kjt(empty, batch=4, dtype=torch.int64))
    for table in TABLES:
        assert tracker.counts(table).sum() == 0
        assert tracker.dirty_rows(table).numel() == 0
        assert tracker.hottest(table, fraction=1.0).numel() == 0


@pytest.mark.parametrize("bad_id", [1000, -1])
@pytest.mark.parametrize("mode", ["mfu", "ssu"])
def test_out_of_range_id_raises_and_leaves_state_unchanged(bad_id, mode):
    tracker = AccessTracker(TABLES, FEATURES, mode=mode, ssu_rate=1.0)
    generator = torch.Generator().manual_seed(3)
    _, kjt = random_batch(uniform_ids, 50, generator)
    tracker.observe(kjt)
    before = tracker.state_dict()
    ids, _ = random_batch(uniform_ids, 50, generator)
    ids["f_b"][17] = bad_id  # f_b is feature 1 and reads table 0 (t_big, 1000 rows)
    with pytest.raises(RuntimeError, match=rf"feature 1 \(table 0\): id {bad_id} at value position 67 .*\[0, 1000\)"):
        tracker.observe(make_kjt(ids, batch=8, dtype=torch.int64))
    after = tracker.state_dict()
    for table in TABLES:
        for field, tensor in before["tables"][table].items():
            assert torch.equal(after["tables"][table][field], tensor), (table, field)


def test_unknown_feature_raises():
    tracker = AccessTracker({"t": 10}, {"f": "t"})
    with pytest.raises(KeyError, match="not mapped to a tracked table"):
        tracker.observe(make_kjt({"g": torch.tensor([1])}, batch=1, dtype=torch.int64))


def test_take_counts_resets_every_counter_and_add_counts_gives_them_back():
    tracker = AccessTracker({"t": 50, "u": 20}, {"f": "t", "g": "u"})
    gen = torch.Generator().manual_seed(0)
    tracker.observe(make_kjt({"f": uniform_ids(50, 40, gen), "g": uniform_ids(20, 30, gen)}, batch=4, dtype=torch.int64))
    before = {t: tracker.counts(t) for t in ("t", "u")}
    taken = tracker.take_counts()
    assert all(torch.equal(taken[t], before[t]) for t in before) and tracker.pending_total() == 0
    assert all(tracker.counts(t).sum() == 0 for t in before)
    tracker.observe(make_kjt({"f": torch.tensor([3, 3]), "g": torch.tensor([1])}, batch=1, dtype=torch.int64))
    for table, counts in taken.items():  # the save failed: its accesses are pending again, with the new ones
        tracker.add_counts(table, counts)
    assert tracker.pending_total() == 73 and int(tracker.counts("t")[3]) == int(before["t"][3]) + 2


def test_mark_saved_resets_counts_and_cleans_rows():
    tracker = AccessTracker({"t": 200}, {"f": "t"})
    ids = torch.arange(200).repeat_interleave(4)  # every row accessed 4 times
    tracker.observe(make_kjt({"f": ids}, batch=4, dtype=torch.int64))
    tracker.mark_saved("t", rows=torch.tensor([0, 63, 64, 199, 63]))
    tracker.mark_saved("t", row_range=(100, 130))
    tracker.mark_saved("t", row_range=(150, 150))
    expected = torch.full((200,), 4, dtype=torch.int32)
    expected[[0, 63, 64, 199]] = 0
    expected[100:130] = 0
    assert torch.equal(tracker.counts("t"), expected)
    assert torch.equal(tracker.dirty_rows("t"), expected.nonzero().squeeze(1))
    tracker.mark_saved("t")
    assert tracker.dirty_rows("t").numel() == 0 and tracker.counts("t").sum() == 0
    before = tracker.counts("t")
    for bad, position in [([200], 0), ([5, -1, 7], 1)]:
        with pytest.raises(RuntimeError, match=rf"rows\[{position}\] = {bad[position]} is outside \[0, 200\)"):
            tracker.mark_saved("t", rows=torch.tensor(bad))
    assert torch.equal(tracker.counts("t"), before)  # a bad row resets nothing
    with pytest.raises(ValueError, match="row_range \\(5, 201\\)"):
        tracker.mark_saved("t", row_range=(5, 201))


def test_dirty_rows_are_the_rows_accessed_since_their_last_save():
    # Random interleavings of batches and saves of rows, of ranges and of whole tables, against a Python
    # reference: per table, the set of rows accessed since their last save and their access counts.
    generator = torch.Generator().manual_seed(9)
    tracker = AccessTracker(TABLES, FEATURES)
    counts = {t: [0] * rows for t, rows in TABLES.items()}
    for _ in range(40):
        action = int(torch.randint(0, 4, (1,), generator=generator))
        table = list(TABLES)[int(torch.randint(0, len(TABLES), (1,), generator=generator))]
        rows = TABLES[table]
        if action == 0:
            ids, kjt = random_batch(zipf_ids, 60, generator)
            tracker.observe(kjt)
            for feature, values in ids.items():
                for id in values.tolist():
                    counts[FEATURES[feature]][id] += 1
        elif action == 1:  # about half of the dirty rows and a few others, some listed twice
            dirty = torch.tensor([r for r, c in enumerate(counts[table]) if c > 0], dtype=torch.int64)
            saved = torch.cat([dirty[torch.rand(dirty.numel(), generator=generator) < 0.5],
                               torch.randint(0, rows, (3,), generator=generator)])
            saved = saved[torch.randint(0, saved.numel(), (saved.numel(),), generator=generator)]
            tracker.mark_saved(table, rows=saved)
            for id in saved.tolist():
                counts[table][id] = 0
        elif action == 2:
            start, end = sorted(torch.randint(0, rows + 1, (2,), generator=generator).tolist())
            tracker.mark_saved(table, row_range=(start, end))
            counts[table][start:end] = [0] * (end - start)
        else:
            tracker.mark_saved(table)
            counts[table] = [0] * rows
        for name, reference in counts.items():
            assert tracker.counts(name).tolist() == reference
            assert tracker.dirty_rows(name).tolist() == [r for r, c in enumerate(reference) if c > 0]
            start, end = TABLES[name] // 3, TABLES[name] - TABLES[name] // 5
            in_range = [r for r in range(start, end) if reference[r] > 0]
            assert tracker.dirty_rows(name, row_range=(start, end)).tolist() == in_range
        assert tracker.pending_total() == sum(sum(reference) for reference in counts.values())  # kept, not summed


def test_counters_saturate_at_int32_max():
    tracker = AccessTracker({"t": 3}, {"f": "t"})
    state = tracker.state_dict()
    state["tables"]["t"]["counts"] = torch.tensor([2**31 - 2, 5, 0], dtype=torch.int32)
    tracker.load_state_dict(state)
    tracker.observe(make_kjt({"f": torch.tensor([0, 0, 0, 1])}, batch=1, dtype=torch.int64))
    assert tracker.counts("t").tolist() == [2**31 - 1, 6, 0]


def test_state_dict_round_trip():
    generator = torch.Generator().manual_seed(4)
    for mode in ("mfu", "ssu"):
        tracker = AccessTracker(TABLES, FEATURES, mode=mode, ssu_rate=0.5, ssu_capacity=64)
        tracker.observe(random_batch(zipf_ids, 300, generator)[1])
        copy = AccessTracker(TABLES, FEATURES, mode=mode, ssu_rate=0.5, ssu_capacity=64)
        copy.load_state_dict(tracker.state_dict())
        kjt = random_batch(zipf_ids, 300, generator)[1]
        tracker.observe(kjt)
        copy.observe(kjt)  # same step, so SSU samples the same accesses
        for table in TABLES:
            if mode == "mfu":
                assert torch.equal(copy.counts(table), tracker.counts(table))
                assert torch.equal(copy.dirty_rows(table), tracker.dirty_rows(table))
            else:
                assert torch.equal(copy.sampled(table), tracker.sampled(table))
    with pytest.raises(ValueError, match="mode 'ssu'"):
        AccessTracker(TABLES, FEATURES).load_state_dict(tracker.state_dict())


def test_ssu_holds_the_hottest_rows():
    # A row with a accesses in the window is missed with probability (1 - p)^a; with the 20 hottest
    # rows all having a >= 150 at p = 0.05, P(any missed) <= 20 * 0.95^150 < 1e-2 for a fresh seed.
    rate, rows = 0.05, 1000
    generator = torch.Generator().manual_seed(5)
    tracker = AccessTracker({"t": rows}, {"f": "t"}, mode="ssu", ssu_rate=rate, ssu_capacity=rows, seed=11)
    counts = torch.zeros(rows, dtype=torch.int64)
    for _ in range(10):
        ids = zipf_ids(rows, 5000, generator)
        counts += torch.bincount(ids, minlength=rows)
        tracker.observe(make_kjt({"f": ids}, batch=50, dtype=torch.int64))
    top = torch.topk(counts, 20)
    assert 20 * (1 - rate) ** int(top.values.min()) < 1e-2
    sampled = tracker.sampled("t")
    assert set(top.indices.tolist()) <= set(sampled.tolist())
    assert set(sampled.tolist()) <= set(counts.nonzero().squeeze(1).tolist())  # only accessed rows
    # Each row is held independently with probability 1 - (1 - p)^a: the size is within 5 sigma of the mean.
    held = 1 - (1 - rate) ** counts.double()
    assert abs(sampled.numel() - held.sum()) < 5 * held.mul(1 - held).sum().sqrt()
    assert tracker.sampled("t").numel() == 0  # cleared by the previous call


def test_ssu_buffer_never_exceeds_capacity_and_counts_overflow():
    tracker = AccessTracker({"t": 500}, {"f": "t"}, mode="ssu", ssu_rate=1.0, ssu_capacity=16)
    ids = torch.arange(500).flip(0)
    tracker.observe(make_kjt({"f": ids}, batch=5, dtype=torch.int32))
    assert tracker.ssu_overflow("t") == 500 - 16
    sampled = tracker.sampled("t", clear=False)
    assert torch.equal(sampled, ids[:16].sort().values)  # full: the earliest sampled ids are kept
    tracker.observe(make_kjt({"f": ids[:16]}, batch=1, dtype=torch.int32))  # already held: no overflow
    assert tracker.ssu_overflow("t") == 500 - 16


def test_ssu_with_rate_one_holds_every_distinct_id_once_and_is_reproducible():
    threads = torch.get_num_threads()
    results = []
    for num_threads in (1, 2):
        torch.set_num_threads(num_threads)
        try:
            tracker = AccessTracker(TABLES, FEATURES, mode="ssu", ssu_rate=1.0, ssu_capacity=2000)
            sample = AccessTracker(TABLES, FEATURES, mode="ssu", ssu_rate=0.1, ssu_capacity=2000, seed=3)
            ids, kjt = random_batch(zipf_ids, 300_000, torch.Generator().manual_seed(7))
            tracker.observe(kjt)
            sample.observe(kjt)
        finally:
            torch.set_num_threads(threads)
        for table, counts in reference_counts([ids]).items():
            assert torch.equal(tracker.sampled(table), counts.nonzero().squeeze(1))
        results.append({table: sample.sampled(table) for table in TABLES})
    for table in TABLES:
        assert torch.equal(results[0][table], results[1][table])


def test_mode_specific_queries_raise_clearly():
    ssu = AccessTracker({"t": 10}, {"f": "t"}, mode="ssu")
    with pytest.raises(RuntimeError, match="counts\\(\\) needs mode='mfu'"):
        ssu.counts("t")
    with pytest.raises(RuntimeError, match="hottest\\(\\) needs mode='mfu'"):
        ssu.hottest("t", k=1)
    with pytest.raises(RuntimeError, match="dirty_rows\\(\\) needs mode='mfu'; an SSU tracker keeps no per-row state"):
        ssu.dirty_rows("t")
    with pytest.raises(RuntimeError, match="mark_saved\\(\\) needs mode='mfu'; an SSU tracker keeps no per-row state"):
        ssu.mark_saved("t")
    mfu = AccessTracker({"t": 10}, {"f": "t"})
    with pytest.raises(RuntimeError, match="sampled\\(\\) needs mode='ssu'"):
        mfu.sampled("t")
    with pytest.raises(KeyError, match="unknown table 'u'"):
        mfu.dirty_rows("u")
    with pytest.raises(ValueError, match="row_range \\(3, 11\\)"):
        mfu.dirty_rows("t", row_range=(3, 11))


@pytest.mark.parametrize("tables", [{"t": 100_000}, {"t": 1}, {"t": 0}, TABLES, {"a": 65, "b": 63, "c": 129}])
def test_mfu_tracking_takes_exactly_4_bytes_per_row(tables):
    mfu = AccessTracker(tables, {f"f_{t}": t for t in tables})
    rows = sum(tables.values())
    assert mfu.memory_bytes() == 4 * rows
    assert mfu.memory_breakdown() == {"counters": 4 * rows, "ssu_sets": 0}


def test_ssu_memory_is_independent_of_table_size():
    small = AccessTracker({"t": 1_000}, {"f": "t"}, mode="ssu", ssu_capacity=1024)
    large = AccessTracker({"t": 1_000_000}, {"f": "t"}, mode="ssu", ssu_capacity=1024)
    assert small.memory_breakdown()["ssu_sets"] == large.memory_breakdown()["ssu_sets"] == 2048 * 8 + 16
    assert small.memory_breakdown()["counters"] == large.memory_breakdown()["counters"] == 0


def test_from_plain_ebc():
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name="t_0", embedding_dim=4, num_embeddings=50, feature_names=["f_0", "f_1"]),
            EmbeddingBagConfig(name="t_1", embedding_dim=4, num_embeddings=7, feature_names=["f_2"]),
        ]
    )
    tracker = AccessTracker.from_module(torch.nn.Sequential(ebc))
    assert tracker.table_rows == {"t_0": 50, "t_1": 7}
    assert tracker.feature_to_table == {"f_0": "t_0", "f_1": "t_0", "f_2": "t_1"}
    kjt = make_kjt({"f_0": torch.tensor([1, 2]), "f_1": torch.tensor([2]), "f_2": torch.tensor([6])}, 1, torch.int64)
    ebc(kjt)
    tracker.observe(kjt)
    assert tracker.counts("t_0")[:3].tolist() == [0, 1, 2] and tracker.counts("t_1")[6] == 1
    with pytest.raises(ValueError, match="no EmbeddingBagCollection"):
        AccessTracker.from_module(torch.nn.Linear(2, 2))


def test_from_dmp_model():
    from dlrm.model import MODEL_CONFIGS, build_model, ensure_process_group, wrap_dmp

    features = ["c_0", "c_1", "c_2"]
    rows = [100, 30, 5]
    ensure_process_group(torch.device("cpu"))
    dmp = wrap_dmp(build_model(MODEL_CONFIGS["small"], rows, features), torch.device("cpu"))
    tracker = AccessTracker.from_module(dmp)
    assert tracker.table_rows == {f"t_{f}": r for f, r in zip(features, rows)}
    assert tracker.feature_to_table == {f: f"t_{f}" for f in features}
    generator = torch.Generator().manual_seed(8)
    ids = {f: zipf_ids(r, 64, generator) for f, r in zip(features, rows)}
    kjt = make_kjt(ids, batch=16, dtype=torch.int64)
    from torchrec.datasets.utils import Batch

    batch = Batch(dense_features=torch.randn(16, 13), sparse_features=kjt, labels=torch.randint(0, 2, (16,)).float())
    loss, _ = dmp(batch)
    loss.backward()
    tracker.observe(kjt)
    for f, r in zip(features, rows):
        assert torch.equal(tracker.counts(f"t_{f}").long(), torch.bincount(ids[f], minlength=r))
