"""CPR in multi-rank TorchRec jobs (2 and 3 processes over gloo, table-wise and row-wise plans)."""
from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests import multirank_worker

DEADLINE_S = 240  # a hung rank fails the test instead of stalling the suite

# Ranks fork from one server that imported torch, TorchRec and CPR once, instead of each importing them
# (about 5 s of CPU a rank): the server is single-threaded when it forks, and every rank still creates its
# own process group.
multiprocessing.set_forkserver_preload(["tests.multirank_worker"])


def spawn(tmp_path: Path, scenario: str, world_size: int, sharding: str = "table_wise", failed: int = 0) -> list[dict]:
    context = mp.start_processes(multirank_worker.main, args=(world_size, str(tmp_path), scenario, sharding, failed),
                                 nprocs=world_size, join=False, start_method="forkserver")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"{scenario}: ranks still running after {DEADLINE_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(tmp_path / f"{scenario}-rank{r}.pt", weights_only=False) for r in range(world_size)]


@pytest.mark.parametrize("world_size, sharding, failed", [(2, "table_wise", 1), (3, "row_wise", 1)])
def test_partial_recovery_restores_only_the_failed_ranks_rows(tmp_path, world_size, sharding, failed):
    ranks = spawn(tmp_path, "partial", world_size, sharding, failed)
    if sharding == "row_wise":
        assert all(len(r["holds"]) == 26 for r in ranks)  # every rank holds a row slice of every table
    else:
        assert sorted(t for r in ranks for t in r["holds"]) == sorted({t for r in ranks for t in r["holds"]})
    for rank, r in enumerate(ranks):
        assert r["step"] == multirank_worker.STEPS - 2  # partial recovery never rewinds
        assert r["position"][0] == r["position"][1]  # the reader goes on
        for key, value in r["after"].items():
            if key.startswith("dense/"):
                assert torch.equal(value, r["before"][key]), f"rank {rank}: dense {key} changed"
            elif rank == failed:
                assert torch.equal(value, r["saved"][key]), f"rank {rank}: {key} is not its newest saved version"
            else:
                assert torch.equal(value, r["before"][key]), f"rank {rank}: {key} changed though it did not fail"
        if rank == failed:
            assert any(not torch.equal(r["before"][k], r["saved"][k]) for k in r["saved"] if not k.startswith("dense/"))
            # a domain restore reads its own rows and state (plus manifests), not the other ranks'
            assert r["own_bytes"] <= r["loaded_bytes"] <= 1.2 * r["own_bytes"]
        else:  # the failure is the job's event: every rank records the bytes the failed rank read
            assert r["loaded_bytes"] == ranks[failed]["loaded_bytes"]
    report = ranks[0]["report_failures"]
    assert [f["shard"] for f in report] == [failed] and report[0]["loaded_bytes"] == ranks[failed]["loaded_bytes"]
    assert all(r["report_failures"] == report for r in ranks)


def test_a_two_rank_full_save_loads_into_one_process_with_dcp(tmp_path, process_group):
    """DCP reshards the row-wise chunks two ranks wrote into the whole tables of a one-process model."""
    import torch.distributed.checkpoint as dcp

    from dlrm.data.schema import SPARSE_NAMES
    from dlrm.model import MODEL_CONFIGS, build_model, wrap_dmp

    ranks = spawn(tmp_path, "dcp_layout", 2, "row_wise")
    assert ranks[0]["save"] == ranks[1]["save"] and ranks[0]["step"] == 2 * multirank_worker.INTERVAL
    torch.manual_seed(123)
    model = wrap_dmp(build_model(MODEL_CONFIGS["small"], [multirank_worker.ROWS_PER_TABLE] * len(SPARSE_NAMES),
                                 SPARSE_NAMES), torch.device("cpu"), "rowwise_adagrad", 0.05)
    state = model.state_dict()
    dcp.load(state, checkpoint_id=ranks[0]["save"])
    assert state.keys() == ranks[0]["state"].keys()
    for key, value in model.state_dict().items():
        whole = value.local_shards()[0].tensor if hasattr(value, "local_shards") else value
        pieces = [piece for r in ranks for piece in r["state"][key]]
        for first, rows in pieces:
            assert torch.equal(whole[first:first + len(rows)] if whole.dim() else whole, rows), key


@pytest.mark.parametrize("world_size, sharding", [(2, "table_wise"), (3, "row_wise")])
def test_full_recovery_equals_the_run_without_failures(tmp_path, world_size, sharding):
    for rank, r in enumerate(spawn(tmp_path, "full", world_size, sharding, failed=1)):
        assert r["lost_steps"] == 2  # the failure at step 10 rolled back to the save at step 8
        for key, value in r["clean"].items():
            torch.testing.assert_close(r["recovered"][key], value, rtol=0, atol=1e-6, msg=f"rank {rank} {key}")


def test_resumed_run_equals_the_uninterrupted_one(tmp_path):
    for rank, r in enumerate(spawn(tmp_path, "resume", 2)):
        assert r["resumed_at"] == 8
        for key, value in r["clean"].items():
            torch.testing.assert_close(r["resumed"][key], value, rtol=0, atol=1e-6, msg=f"rank {rank} {key}")


def _whole(ranks: list[dict], which: str | None = None) -> dict[str, torch.Tensor]:
    """Every table's rows and row-wise state put together from the ranks' pieces, and the dense state (each
    rank's copy must be the same)."""
    whole: dict[str, torch.Tensor] = {}
    for r in ranks:
        got = r[which] if which else r
        for table, (first, tensors) in got["rows"].items():
            for name, value in tensors.items():
                if name not in whole:
                    whole[name] = torch.full((multirank_worker.ROWS_PER_TABLE, *value.shape[1:]), float("nan"), dtype=value.dtype)
                whole[name][first:first + len(value)] = value
        for name, value in got["dense"].items():
            assert name not in whole or torch.equal(whole[name], value), f"ranks differ in dense {name}"
            whole[name] = value
    return whole


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys(), what
    for name, value in want.items():
        assert torch.equal(got[name], value), f"{what}: {name} differs from the saved state"


def test_resume_reshards_to_another_world_size_and_plan_tensor_for_tensor(tmp_path):
    """2 ranks row-wise -> 3 ranks row-wise (2 -> 3), then 3 ranks row-wise -> 2 ranks table-wise (3 -> 2,
    row-wise -> table-wise): each resume holds exactly what the save it resumed holds, optimizer state
    included; a model with other table sizes is still refused."""
    written = spawn(tmp_path, "reshard_write", 2, "row_wise")
    grown = spawn(tmp_path, "reshard_resume", 3, "row_wise")
    assert all(r["resumed"]["step"] == 2 * multirank_worker.INTERVAL for r in grown)
    _assert_same(_whole(grown, "resumed"), _whole(written), "2 -> 3 ranks")
    shrunk = spawn(tmp_path, "reshard_resume", 2, "table_wise")
    assert all(r["resumed"]["step"] == multirank_worker.STEPS for r in shrunk)
    assert sorted(t for r in shrunk for t in r["resumed"]["rows"]) == sorted({t for r in grown for t in r["trained"]["rows"]})
    _assert_same(_whole(shrunk, "resumed"), _whole(grown, "trained"), "3 ranks row-wise -> 2 ranks table-wise")
    for r in grown + shrunk:  # DCP reshards the same saves alike (row-wise chunks into row- and table-wise shards)
        assert r["resumed"]["dcp"].keys() == r["resumed"]["rows"].keys()
        for table, (_, tensors) in r["resumed"]["rows"].items():
            assert torch.equal(r["resumed"]["dcp"][table], tensors[f"emb/{table}/weight"]), table
    for r in spawn(tmp_path, "mismatch", 2):
        assert r["error"] and "another model" in r["error"] and "(304, 8)" in r["error"]


def test_a_shrink_restores_exactly_the_lost_ranks_newest_rows_on_their_new_owners(tmp_path):
    """3 ranks row-wise -> 2: survivors' rows come from their memory, the lost rank's from its newest save."""
    ranks = spawn(tmp_path, "shrink", 3, "row_wise", failed=2)
    lost_saved, lost_live = _whole([ranks[2]], "saved"), _whole([ranks[2]], "old")
    survivors_live = _whole(ranks[:2], "old")
    shrunk = _whole(ranks[:2], "new")
    lost_first, _ = ranks[2]["old"]["rows"]["t_cat_0"]
    for name, value in shrunk.items():
        if name.startswith("dense/"):
            continue
        assert not value.isnan().any(), name  # every row has a new owner
        assert torch.equal(value[:lost_first], survivors_live[name][:lost_first]), f"{name}: a survivor's row changed"
        assert torch.equal(value[lost_first:], lost_saved[name][lost_first:]), f"{name}: not the lost rank's newest save"
        if name.endswith("/weight"):  # training went on past the save: the live rows were newer, and are lost
            assert not torch.equal(lost_saved[name][lost_first:], lost_live[name][lost_first:]), name
    results = [r["result"] for r in ranks[:2]]
    assert sum(r.stored_rows for r in results) == 26 * (multirank_worker.ROWS_PER_TABLE - lost_first)
    assert all(r.oldest_step == 2 * multirank_worker.INTERVAL for r in results if r.stored_rows)


def test_a_rank_without_tables_is_a_domain_too(tmp_path):
    """Two tables on three ranks (table-wise): one rank holds nothing, saves and recoveries still work."""
    ranks = spawn(tmp_path, "two_tables", 3, failed=1)
    assert sorted(len(r["holds"]) for r in ranks) == [0, 1, 1]
    for rank, r in enumerate(ranks):
        for key, value in r["after"].items():
            expected = r["saved"] if rank == 1 and not key.startswith("dense/") else r["before"]
            assert torch.equal(value, expected[key]), f"rank {rank} {key}"


def test_a_part_that_cannot_be_written_abandons_the_save_on_every_rank(tmp_path):
    for r in spawn(tmp_path, "failed_save", 2, failed=1):
        assert r["step"] == multirank_worker.STEPS  # training went on
        assert [(f["step"], f["kind"]) for f in r["failed_saves"]] == [(4, "full")]
        error = r["failed_saves"][0]["error"]
        assert "enforce fail" in error and "No space left" in error and "rank 1" in error, error
        assert (4, "full") not in r["saves"] and (8, "full") in r["saves"]  # nothing half-committed; retried
        assert r["left"] == []  # the abandoned staging folder is gone


def test_column_wise_sharding_is_refused_with_a_clear_message(process_group):
    from torchrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan
    from torchrec.distributed.types import ShardingPlan

    from cpr.tables import EmbeddingTables, UnsupportedShardingError
    from dlrm.model import MODEL_CONFIGS, build_model
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    model = build_model(MODEL_CONFIGS["kaggle"], [20, 20], ["cat_0", "cat_1"])
    ebc = model.model.sparse_arch.embedding_bag_collection
    sharder = EmbeddingBagCollectionSharder()
    plan = construct_module_sharding_plan(ebc, {"t_cat_0": column_wise(ranks=[0, 0], compute_kernel="fused"),
                                                "t_cat_1": column_wise(ranks=[0, 0], compute_kernel="fused")},
                                          local_size=1, world_size=1, device_type="cpu", sharder=sharder)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), sharders=[sharder],
                                   plan=ShardingPlan({"model.sparse_arch.embedding_bag_collection": plan}))
    with pytest.raises(UnsupportedShardingError, match="column-wise"):
        EmbeddingTables(dmp)
