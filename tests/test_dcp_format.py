"""A CPR full save is a torch.distributed.checkpoint checkpoint with TorchRec's state-dict names: DCP's own
tools read it without CPR, and CPR's recovery reads the same files without unpickling anything."""
from __future__ import annotations

import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from cpr import CPRCheckpointer
from cpr.storage.dcp_format import METADATA_FILE
from tests.conftest import FEATURES, ROWS
from tests.test_checkpointer import make_batch, snapshot, train_step


def fresh_dmp(seed: int):
    from dlrm.model import MODEL_CONFIGS, build_model, build_optimizer, wrap_dmp

    torch.manual_seed(seed)
    model = wrap_dmp(build_model(MODEL_CONFIGS["small"], ROWS, FEATURES), torch.device("cpu"), "rowwise_adagrad", 0.1)
    return model, build_optimizer(model, 0.1)


def plain(value: torch.Tensor) -> torch.Tensor:
    """A state-dict value as one dense tensor (a one-process ShardedTensor holds the whole table)."""
    if hasattr(value, "local_shards"):
        (shard,) = value.local_shards()
        return shard.tensor
    return value


def trained_full_save(dmp_model, tmp_path, steps: int = 4, **options) -> tuple[CPRCheckpointer, dict[str, torch.Tensor]]:
    """A job trained `steps` steps whose last step is a full save; the model's state dict at that save."""
    model, optimizer = dmp_model
    ckpt = CPRCheckpointer(model, optimizer, tmp_path / "ckpt", policy="full", num_domains=3, total_steps=100,
                           interval_steps=steps, **options)
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        train_step(model, optimizer, ckpt, make_batch(gen))
    ckpt.flush()
    return ckpt, {key: plain(value).clone() for key, value in model.state_dict().items()}


def newest_full(ckpt: CPRCheckpointer):
    return [s for s in ckpt.store.saves() if s.kind == "full"][-1]


@pytest.mark.parametrize("async_save", [True, False])
def test_a_full_save_loads_into_a_fresh_model_with_dcp(dmp_model, tmp_path, async_save):
    ckpt, expected = trained_full_save(dmp_model, tmp_path, async_save=async_save)
    save = newest_full(ckpt)
    assert save.step == 4 and (save.folder / METADATA_FILE).is_file()
    model, _ = fresh_dmp(seed=1)
    state = model.state_dict()
    assert any(not torch.equal(plain(state[k]), v) for k, v in expected.items())  # another initialisation
    dcp.load(state, checkpoint_id=str(save.folder))
    loaded = {key: plain(value) for key, value in model.state_dict().items()}
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def test_the_fused_optimizer_state_loads_under_dcp_optimizer_keys(dmp_model, tmp_path):
    ckpt, _ = trained_full_save(dmp_model, tmp_path)
    model, optimizer = fresh_dmp(seed=2)
    state = optimizer.state_dict()["state"]
    fused = {f"optim.state.{key}.{name}": value for key, states in state.items() for name, value in states.items()
             if hasattr(value, "local_shards")}
    assert fused
    dcp.load(fused, checkpoint_id=str(newest_full(ckpt).folder))
    for table in ckpt.tables.tables:
        key = f"optim.state.{ckpt.tables.tables[table].state_key}.{table}.momentum1"
        assert torch.equal(plain(fused[key]), ckpt.tables.row_states(table)["momentum1"]), key


def test_a_full_save_converts_with_dcp_to_torch_save(dmp_model, tmp_path):
    ckpt, expected = trained_full_save(dmp_model, tmp_path)
    dcp_to_torch_save(newest_full(ckpt).folder, tmp_path / "model.pt")
    converted = torch.load(tmp_path / "model.pt", weights_only=True)
    for key, value in expected.items():
        assert torch.equal(converted[key], value), key
    assert any(key.startswith("optim.state.") for key in converted)


def test_cpr_recovery_reads_the_same_files_without_unpickling(dmp_model, tmp_path, monkeypatch):
    """Full recovery from the DCP-format save restores everything, with pickle and torch.load unavailable."""
    ckpt, _ = trained_full_save(dmp_model, tmp_path)
    rows = snapshot(ckpt)
    model, optimizer = dmp_model
    gen = torch.Generator().manual_seed(4)
    train_step(model, optimizer, ckpt, make_batch(gen))

    def refuse(*args, **kwargs):
        raise AssertionError("CPR's read path unpickled something")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    ckpt.recover([0])
    assert ckpt.global_step == 4
    for key, value in snapshot(ckpt).items():
        assert torch.equal(value, rows[key]), key


def test_a_quantized_full_save_shows_dcp_the_fused_rows(dmp_model, tmp_path):
    ckpt, _ = trained_full_save(dmp_model, tmp_path, quantize="int8")
    folder = newest_full(ckpt).folder
    metadata = dcp.FileSystemReader(folder).read_metadata()
    weight_key = ckpt.tables.tables["t_cat_0"].state_key
    assert weight_key not in metadata.state_dict_metadata
    stored = metadata.state_dict_metadata[f"{weight_key}.int8_rowwise"]
    width = ckpt.tables.tables["t_cat_0"].dim + 4  # int8 codes, then an fp16 scale and bias per row
    assert stored.properties.dtype == torch.uint8 and tuple(stored.size) == (ROWS[0], width)


def test_cpr_recovery_does_not_depend_on_dcp_metadata(dmp_model, tmp_path):
    """`.metadata` is DCP's alone: a damaged one leaves CPR's rollback to the same save intact."""
    ckpt, _ = trained_full_save(dmp_model, tmp_path)
    rows = snapshot(ckpt)
    (newest_full(ckpt).folder / METADATA_FILE).write_bytes(b"not a pickle")
    model, optimizer = dmp_model
    train_step(model, optimizer, ckpt, make_batch(torch.Generator().manual_seed(5)))
    assert ckpt.recover([2]).step == 4
    for key, value in snapshot(ckpt).items():
        assert torch.equal(value, rows[key]), key
