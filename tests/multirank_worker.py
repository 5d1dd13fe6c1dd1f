"""What each rank of the multi-rank tests runs (a module of its own: spawned processes import it).

Every scenario builds the same small DLRM through DMP on a gloo group, trains it with `cpr.loop.train`
and writes what the parent test compares to `OUT/<scenario>-rank<r>.pt`.
"""
from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from cpr.comm import release_process_group

ROWS_PER_TABLE = 300  # big enough that a part's manifest is small beside its rows
STEPS = 12
INTERVAL = 4


def _arrays(n: int = 2048):
    from dlrm.data.arrays import CriteoArrays
    from dlrm.data.schema import NUM_DENSE, NUM_SPARSE

    rng = np.random.default_rng(0)
    ids = np.minimum(rng.zipf(1.3, size=(n, NUM_SPARSE)) - 1, ROWS_PER_TABLE - 1).astype(np.int64)
    return CriteoArrays(rng.random((n, NUM_DENSE), dtype=np.float32), ids,
                        (rng.random(n) < 0.3).astype(np.float32))


class FirstFeatures:
    """A reader of the first `n` categorical features only (a model with fewer tables than ranks)."""

    def __init__(self, loader, n: int) -> None:
        self.loader, self.n = loader, n

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        from torchrec.datasets.utils import Batch
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        for batch in self.loader:
            kjt, size = batch.sparse_features, batch.labels.numel()
            sparse = KeyedJaggedTensor.from_lengths_sync(  # values are key-major: the first n keys come first
                keys=kjt.keys()[: self.n], values=kjt.values()[: self.n * size], lengths=kjt.lengths()[: self.n * size])
            yield Batch(batch.dense_features, sparse, batch.labels)


def _job(sharding: str, directory: Path, policy: str, seed: int = 0, resume: bool = False, tables: int | None = None,
         before_write=None, rows: int = ROWS_PER_TABLE):
    """A fresh model, optimizer, reader and checkpointer on this rank (`tables`: only the first few features;
    `before_write`: a hook of the store it saves through, see tests/stores.py)."""
    from cpr import CPRCheckpointer
    from tests.stores import HookedStore
    from dlrm.data.loader import BatchLoader
    from dlrm.data.schema import NUM_SPARSE, SPARSE_NAMES
    from dlrm.model import MODEL_CONFIGS, build_model, build_optimizer, wrap_dmp

    torch.manual_seed(seed + dist.get_rank())
    features = SPARSE_NAMES[: tables or NUM_SPARSE]
    model = wrap_dmp(build_model(MODEL_CONFIGS["small"], [rows] * len(features), features),
                     torch.device("cpu"), "rowwise_adagrad", 0.05, sharding=sharding)
    optimizer = build_optimizer(model, 0.05)
    reader = BatchLoader(_arrays(), 32, rank=dist.get_rank(), world_size=dist.get_world_size())
    if tables:
        reader = FirstFeatures(reader, tables)
    store = HookedStore(directory, lock=dist.get_rank() == 0, before_write=before_write)
    ckpt = CPRCheckpointer(model, optimizer, store, policy=policy, total_steps=STEPS, reader=reader,
                           interval_steps=INTERVAL, resume=resume)
    return model, optimizer, reader, ckpt


def _state(ckpt) -> dict[str, torch.Tensor]:
    """Copies of this rank's rows, row-wise optimizer state and dense parameters."""
    out = {}
    for table in ckpt.tables.tables:
        out[f"{table}/weight"] = ckpt.tables.weight(table).detach().clone()
        for name, value in ckpt.tables.row_states(table).items():
            out[f"{table}/{name}"] = value.detach().clone()
    for name, value in ckpt.model.named_parameters():
        if "embedding_bags" not in name:
            out[f"dense/{name}"] = value.detach().clone()
    return out


def _train(model, optimizer, ckpt, reader, steps: int, schedule=None) -> None:
    from cpr.loop import train

    train(model, optimizer, ckpt, reader, steps, schedule=schedule, lr_decay="none", log_every=1000)


def partial(out: Path, sharding: str, failed: int, tables: int | None = None) -> dict[str, Any]:
    """Train to step 10 (full saves at 0, 4, 8), then domain `failed` fails: partial recovery."""
    from cpr.storage import domain_part

    model, optimizer, reader, ckpt = _job(sharding, out / "ckpt", "partial", tables=tables)
    _train(model, optimizer, ckpt, reader, 2 * INTERVAL)
    saved = _state(ckpt)  # the newest save (step 8) holds exactly this
    _train(model, optimizer, ckpt, reader, STEPS - 2)
    before, position = _state(ckpt), reader.state_dict()
    result = ckpt.recover([failed])
    report = ckpt.report()
    # What this rank's rows and state take in the newest full save (torch.save records: a small frame each).
    own_bytes = [s for s in ckpt.store.saves() if s.kind == "full"][-1].parts[domain_part(dist.get_rank())].nbytes
    return {"saved": saved, "before": before, "after": _state(ckpt), "position": (position, reader.state_dict()),
            "step": result.step, "own_bytes": own_bytes, "loaded_bytes": ckpt.ledger.failures[0].loaded_bytes,
            "report_failures": report["failures"], "holds": sorted(ckpt.tables.tables)}


def dcp_layout(out: Path, sharding: str, failed: int) -> dict[str, Any]:
    """Train to step 8 (a full save there); every state-dict entry as this rank holds it: (first row, rows)."""
    model, optimizer, reader, ckpt = _job(sharding, out / "ckpt", "full")
    _train(model, optimizer, ckpt, reader, 2 * INTERVAL)
    ckpt.flush()
    state = {}
    for key, value in model.state_dict().items():
        shards = value.local_shards() if hasattr(value, "local_shards") else None
        state[key] = ([(s.metadata.shard_offsets[0], s.tensor.clone()) for s in shards] if shards is not None
                      else [(0, value.clone())])
    newest = [s for s in ckpt.store.saves() if s.kind == "full"][-1]
    return {"state": state, "save": str(newest.folder), "step": newest.step}


def full(out: Path, sharding: str, failed: int) -> dict[str, Any]:
    """The same run twice: without failures, and with domain `failed` failing at step 10 (full recovery)."""
    from cpr.faults import Failure, FailureSchedule

    model, optimizer, reader, ckpt = _job(sharding, out / "clean", "full")
    _train(model, optimizer, ckpt, reader, STEPS)
    clean = _state(ckpt)
    model, optimizer, reader, ckpt = _job(sharding, out / "failed", "full")
    schedule = FailureSchedule((Failure(10, failed, 0.0),), STEPS, 1.0, None)
    _train(model, optimizer, ckpt, reader, STEPS, schedule)
    return {"clean": clean, "recovered": _state(ckpt), "lost_steps": ckpt.ledger.failures[0].lost_steps}


def resume(out: Path, sharding: str, failed: int) -> dict[str, Any]:
    """Uninterrupted, against: train to step 10, lose the whole job, resume from the last full save."""
    model, optimizer, reader, ckpt = _job(sharding, out / "clean", "full")
    _train(model, optimizer, ckpt, reader, STEPS)
    clean = _state(ckpt)
    model, optimizer, reader, ckpt = _job(sharding, out / "crashed", "full")
    _train(model, optimizer, ckpt, reader, STEPS - 2)
    del model, optimizer, reader, ckpt  # the crash: nothing in memory survives
    model, optimizer, reader, ckpt = _job(sharding, out / "crashed", "full", seed=99, resume=True)
    resumed_at = ckpt.global_step
    _train(model, optimizer, ckpt, reader, STEPS)
    return {"clean": clean, "resumed": _state(ckpt), "resumed_at": resumed_at}


def two_tables(out: Path, sharding: str, failed: int) -> dict[str, Any]:
    """A model of two tables on more ranks than tables: some rank holds none and still takes part."""
    return partial(out, sharding, failed, tables=2)


def failed_save(out: Path, sharding: str, failed: int) -> dict[str, Any]:
    """Rank `failed` cannot write its part of the step-4 save (disk full, as torch.save's zip writer reports it):
    the save is abandoned on every rank and training goes on; the step-8 save commits."""
    from tests.test_disk_full import torch_zip_writer_error

    def disk_full_at_step_4(staging, part, step, kind):
        if step == INTERVAL:
            raise torch_zip_writer_error()

    model, optimizer, reader, ckpt = _job(sharding, out / "ckpt", "partial",
                                          before_write=disk_full_at_step_4 if dist.get_rank() == failed else None)
    _train(model, optimizer, ckpt, reader, STEPS)
    report = ckpt.report()
    return {"saves": [(s.step, s.kind) for s in ckpt.store.saves()], "failed_saves": report["failed_saves"],
            "left": sorted(p.name for p in (out / "ckpt").iterdir() if p.name.startswith(".tmp-")),
            "step": ckpt.global_step}


def mismatch(out: Path, sharding: str, failed: int) -> dict[str, Any]:
    """Resume from a checkpoint of another model (other table sizes): one clear error, on every rank."""
    from cpr.storage import CheckpointMismatchError

    try:
        _job(sharding, out / "reshard", "full", resume=True, rows=ROWS_PER_TABLE + 4)
    except CheckpointMismatchError as err:
        return {"error": str(err)}
    return {"error": None}


def _pieces(ckpt) -> dict[str, Any]:
    """This rank's rows with their row-wise state, by table: (global first row, tensors by save name), and the
    dense state (RNG left out): what the reshard tests put together into whole tables."""
    state = ckpt.state
    rows = {table: (state.tables.tables[table].row_offset, {k: v.clone() for k, v in tensors.items()})
            for table, tensors in state.row_tensors().items()}
    dense = {k: v.clone() for k, v in state.capture_dense().items() if not k.startswith("rng/")}
    return {"rows": rows, "dense": dense, "step": ckpt.global_step}


def _dcp_rows(sharding: str, folder: Path) -> dict[str, torch.Tensor]:
    """`dcp.load` of a full save into a fresh model of this world size and plan: each table's local rows."""
    import torch.distributed.checkpoint as dcp

    from dlrm.data.schema import SPARSE_NAMES
    from dlrm.model import MODEL_CONFIGS, build_model, wrap_dmp

    model = wrap_dmp(build_model(MODEL_CONFIGS["small"], [ROWS_PER_TABLE] * len(SPARSE_NAMES), SPARSE_NAMES),
                     torch.device("cpu"), "rowwise_adagrad", 0.05, sharding=sharding)
    state = model.state_dict()
    dcp.load(state, checkpoint_id=str(folder))
    return {key.split(".")[-2]: value.local_shards()[0].tensor.clone() for key, value in state.items()
            if key.endswith(".weight") and "embedding_bags" in key and value.local_shards()}


def reshard_write(out: Path, sharding: str, failed: int) -> dict[str, Any]:
    """Train to step 8 (a full save there) on this world size and plan: what the save holds."""
    model, optimizer, reader, ckpt = _job(sharding, out / "reshard", "full")
    _train(model, optimizer, ckpt, reader, 2 * INTERVAL)
    ckpt.flush()
    return _pieces(ckpt)


def reshard_resume(out: Path, sharding: str, failed: int) -> dict[str, Any]:
    """Resume the newest full save on this world size and plan (another than wrote it): what it loaded; then
    train on to step 12 (a full save there) and say what that save holds."""
    model, optimizer, reader, ckpt = _job(sharding, out / "reshard", "full", seed=99, resume=True)
    from cpr.policies.base import SaveDecision

    resumed = _pieces(ckpt)
    resumed["dcp"] = _dcp_rows(sharding, out / "reshard" / f"save-{ckpt.global_step:010d}-full")
    _train(model, optimizer, ckpt, reader, STEPS)
    ckpt.flush()
    if not any(s.step == STEPS and s.kind == "full" for s in ckpt.store.saves()):
        ckpt.save_now(SaveDecision("full", reason="the state trained here"))  # the policy leaves the last step
        ckpt.flush()
    return {"resumed": resumed, "trained": _pieces(ckpt)}


def shrink(out: Path, sharding: str, failed: int) -> dict[str, Any]:
    """Three ranks train to step 10 (full saves at 0, 4, 8); rank `failed` is lost for good; the other two go
    on as a 2-rank job over a new plan: the rows each survivor kept come from memory, the lost rank's from the
    newest saves. Each survivor reports its old and new pieces; the lost rank what the step-8 save holds."""
    from cpr.comm import Coordinator
    from cpr.domains import DomainLayout
    from cpr.recovery.shrink import kept_rows, shrink_restore
    from cpr.state import TrainingState
    from dlrm.data.schema import SPARSE_NAMES
    from dlrm.model import MODEL_CONFIGS, build_model, build_optimizer, wrap_dmp

    model, optimizer, reader, ckpt = _job(sharding, out / "shrink", "partial")
    _train(model, optimizer, ckpt, reader, 2 * INTERVAL)
    saved = _pieces(ckpt)
    _train(model, optimizer, ckpt, reader, STEPS - 2)
    ckpt.flush()
    rank = dist.get_rank()
    old = _pieces(ckpt)
    kept = kept_rows(ckpt.state)
    ckpt.close()
    del model, optimizer, ckpt
    release_process_group()
    if rank == failed:
        return {"saved": saved, "old": old}
    survivors = [r for r in range(3) if r != failed]
    dist.init_process_group("gloo", init_method=f"file://{out / 'pg-shrunk'}", rank=survivors.index(rank),
                            world_size=len(survivors), timeout=timedelta(seconds=60))
    model = wrap_dmp(build_model(MODEL_CONFIGS["small"], [ROWS_PER_TABLE] * len(SPARSE_NAMES), SPARSE_NAMES),
                     torch.device("cpu"), "rowwise_adagrad", 0.05, sharding=sharding)
    state = TrainingState(model, build_optimizer(model, 0.05))
    layout = DomainLayout.ranks(state.tables.tables, dist.get_rank(), dist.get_world_size())
    from cpr.storage import CheckpointStore

    store = CheckpointStore(out / "shrink", lock=False)
    result = shrink_restore(state, layout, store, store.saves(), kept, Coordinator())
    new = {"rows": {t: (state.tables.tables[t].row_offset, {k: v.clone() for k, v in tensors.items()})
                    for t, tensors in state.row_tensors().items()}, "dense": {}}
    return {"old": old, "new": new, "result": result}


def main(rank: int, world_size: int, out: str, scenario: str, sharding: str, failed: int) -> None:
    os.environ["CPR_COLLECTIVE_TIMEOUT_S"] = "60"
    out_dir = Path(out)
    # One rendezvous file per spawn: a second spawn of a scenario (another world size) must not read the
    # first one's stale addresses, which gloo then fails to connect to.
    rendezvous = out_dir / f"pg-{scenario}-{world_size}-{sharding}"
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        result = globals()[scenario](out_dir, sharding, failed)
        torch.save(result, out_dir / f"{scenario}-rank{rank}.pt")
    finally:
        release_process_group()
