"""The CUDA kernels of the `cpr._C` tracking ops against the CPU kernels."""
import pytest
import torch

from cpr.tracking import AccessTracker
from cpr.tracking import has_cuda_kernels
from tests.test_tracking import FEATURES, TABLES, make_kjt, random_batch, zipf_ids

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and has_cuda_kernels()),
    reason="needs a CUDA device and cpr._C built with its CUDA kernels (a CUDA build of torch)",
)


def to_cuda(kjt):
    return kjt.to(torch.device("cuda"))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_mfu_cuda_matches_cpu(dtype):
    cpu = AccessTracker(TABLES, FEATURES)
    gpu = AccessTracker(TABLES, FEATURES, device="cuda")
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        _, kjt = random_batch(zipf_ids, 5000, generator, dtype)
        cpu.observe(kjt)
        gpu.observe(to_cuda(kjt))
    for table, rows in TABLES.items():
        assert torch.equal(gpu.counts(table).cpu(), cpu.counts(table))
        assert torch.equal(gpu.dirty_rows(table).cpu(), cpu.dirty_rows(table))
        for row_range in [(0, rows), (rows // 3, rows - rows // 4)]:
            assert torch.equal(gpu.dirty_rows(table, row_range=row_range).cpu(), cpu.dirty_rows(table, row_range=row_range))
            for k in (1, 17, rows):
                assert torch.equal(gpu.hottest(table, k=k, row_range=row_range).cpu(), cpu.hottest(table, k=k, row_range=row_range))
    for tracker in (cpu, gpu):
        tracker.mark_saved("t_big", rows=torch.tensor([0, 5, 63, 64, 999, 5]))
        tracker.mark_saved("t_big", row_range=(100, 300))
        tracker.mark_saved("t_small")
        with pytest.raises(RuntimeError, match=r"rows\[1\] = 1000 is outside \[0, 1000\)"):
            tracker.mark_saved("t_big", rows=torch.tensor([3, 1000]))
    for table in TABLES:
        assert torch.equal(gpu.counts(table).cpu(), cpu.counts(table))
        assert torch.equal(gpu.dirty_rows(table).cpu(), cpu.dirty_rows(table))


def test_cuda_counters_saturate():
    gpu = AccessTracker({"t": 2}, {"f": "t"}, device="cuda")
    state = gpu.state_dict()
    state["tables"]["t"]["counts"] = torch.tensor([2**31 - 3, 0], dtype=torch.int32)
    gpu.load_state_dict(state)
    gpu.observe(to_cuda(make_kjt({"f": torch.zeros(1000, dtype=torch.int64)}, batch=10, dtype=torch.int64)))
    assert gpu.counts("t").tolist() == [2**31 - 1, 0]


def test_ssu_cuda_samples_the_same_ids_as_cpu():
    cpu = AccessTracker(TABLES, FEATURES, mode="ssu", ssu_rate=0.1, ssu_capacity=4096, seed=5)
    gpu = AccessTracker(TABLES, FEATURES, mode="ssu", ssu_rate=0.1, ssu_capacity=4096, seed=5, device="cuda")
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        _, kjt = random_batch(zipf_ids, 5000, generator)
        cpu.observe(kjt)
        gpu.observe(to_cuda(kjt))
    for table in TABLES:
        assert torch.equal(gpu.sampled(table).cpu(), cpu.sampled(table))


def test_ssu_cuda_never_exceeds_capacity():
    gpu = AccessTracker({"t": 100_000}, {"f": "t"}, mode="ssu", ssu_rate=1.0, ssu_capacity=100, device="cuda")
    ids = torch.randperm(100_000)[:50_000]
    gpu.observe(to_cuda(make_kjt({"f": ids}, batch=100, dtype=torch.int64)))
    sampled = gpu.sampled("t", clear=False)
    assert sampled.numel() <= 100
    assert gpu.ssu_overflow("t") + sampled.numel() == 50_000
    assert set(sampled.tolist()) <= set(ids.tolist())


def test_cuda_out_of_range_raises_and_leaves_state_unchanged():
    gpu = AccessTracker(TABLES, FEATURES, device="cuda")
    ids, _ = random_batch(zipf_ids, 50, torch.Generator().manual_seed(3))
    ids["f_c"][3] = 70
    with pytest.raises(RuntimeError, match=r"feature 2 \(table 1\): id 70 at value position 103 .*\[0, 70\)"):
        gpu.observe(to_cuda(make_kjt(ids, batch=8, dtype=torch.int64)))
    assert all(gpu.counts(t).sum() == 0 for t in TABLES)
