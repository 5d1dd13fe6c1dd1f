"""Everything a full recovery needs besides the embedding rows: dense parameters, optimizer state, RNG.

The snapshot is a flat `name -> tensor` dict (what the storage writes as raw tensors; no pickling) and
is restored by copying into the live tensors, so optimizers and DMP keep the objects they hold.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from cpr.storage.dcp_format import Chunk, optimizer_key
from cpr.tables import EmbeddingTables

MODEL_PREFIX = "dense/model/"
OPTIM_PREFIX = "dense/optim/"
RNG_KEY = "rng/torch"


def _flatten(prefix: str, value: Any, out: dict[str, torch.Tensor], skip: set[int]) -> None:
    if isinstance(value, ShardedTensor) or (isinstance(value, torch.Tensor) and id(value) in skip):
        return  # embedding rows and their row-wise state are saved per row, not here
    if isinstance(value, torch.Tensor):
        out[prefix] = value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{prefix}/{key}" if prefix else str(key), item, out, skip)


def _optimizer_tensors(optimizer: torch.optim.Optimizer, tables: EmbeddingTables) -> dict[str, torch.Tensor]:
    """The optimizer's state tensors except per-row embedding state, keyed by their path in state_dict.

    Both torch optimizers and torchrec's KeyedOptimizers return references to the live state tensors
    from `state_dict()`, which is what lets `restore` copy into them.
    """
    out: dict[str, torch.Tensor] = {}
    _flatten("", optimizer.state_dict()["state"], out, tables.row_state_ids())
    return out


def _model_tensors(model: nn.Module, tables: EmbeddingTables) -> dict[str, torch.Tensor]:
    return {
        key: value
        for key, value in model.state_dict().items()
        if isinstance(value, torch.Tensor) and not isinstance(value, ShardedTensor) and not tables.is_embedding_key(key)
    }


def capture(model: nn.Module, optimizer: torch.optim.Optimizer, tables: EmbeddingTables) -> dict[str, torch.Tensor]:
    """Copies of the dense parameters, the non-row optimizer state and the torch RNG state."""
    snapshot = {MODEL_PREFIX + k: v.detach().clone() for k, v in _model_tensors(model, tables).items()}
    snapshot.update({OPTIM_PREFIX + k: v.detach().clone() for k, v in _optimizer_tensors(optimizer, tables).items()})
    snapshot[RNG_KEY] = torch.get_rng_state()
    return snapshot


def chunks(snapshot: Mapping[str, torch.Tensor]) -> dict[str, Chunk]:
    """The state-dict entries of a `capture` for DCP: the dense parameters under their model keys, the optimizer
    state under DCP's optimizer keys; the RNG state is CPR's own and has none."""
    out = {}
    for name, tensor in snapshot.items():
        if name.startswith(MODEL_PREFIX):
            out[name] = Chunk.whole(name.removeprefix(MODEL_PREFIX), tensor)
        elif name.startswith(OPTIM_PREFIX):
            parameter, _, state = name.removeprefix(OPTIM_PREFIX).partition("/")
            out[name] = Chunk.whole(optimizer_key(parameter, state.replace("/", ".")), tensor)
    return out


def restore(
    snapshot: Mapping[str, torch.Tensor], model: nn.Module, optimizer: torch.optim.Optimizer, tables: EmbeddingTables
) -> None:
    """Copy a `capture` back into the live model, optimizer and RNG; a missing or misshaped entry is an error."""
    targets = {MODEL_PREFIX + k: v for k, v in _model_tensors(model, tables).items()}
    targets.update({OPTIM_PREFIX + k: v for k, v in _optimizer_tensors(optimizer, tables).items()})
    saved = {k: v for k, v in snapshot.items() if k.startswith((MODEL_PREFIX, OPTIM_PREFIX))}
    missing = sorted(set(targets) - set(saved))
    if missing:
        raise KeyError(f"the checkpoint lacks dense state {missing[:5]}")
    with torch.no_grad():
        for key, target in targets.items():
            value = saved[key]
            if value.shape != target.shape:
                raise ValueError(f"dense state {key!r}: checkpoint shape {tuple(value.shape)} != model shape {tuple(target.shape)}")
            target.copy_(value)
    if RNG_KEY in snapshot:
        torch.set_rng_state(snapshot[RNG_KEY])
