"""The ids each rank's embedding shards actually look up, from TorchRec's post-lookup hook.

A rank's input batch names rows of every table, but in a sharded model the rank serves the lookups of
its own shards for every rank's batch. TorchRec's `ShardedEmbeddingBagCollection` calls a registered
function after its lookup, after input distribution, with the features the rank's shards served and the
ids already local to each shard (row-wise sharding subtracts the shard's first row). That is what CPR
counts: each rank's counters and samples cover exactly its own rows.
"""
from __future__ import annotations

from typing import Callable

from torch import nn
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def sharded_collections(model: nn.Module) -> list[ShardedEmbeddingBagCollection]:
    return [m for m in model.modules() if isinstance(m, ShardedEmbeddingBagCollection)]


def hook_served_lookups(model: nn.Module, record: Callable[[KeyedJaggedTensor], None]) -> bool:
    """Call `record(kjt)` with the local ids every training-mode lookup of the model's sharded collections
    serves (evaluation lookups are not counted). Returns False when the model has no sharded collection,
    so the caller must observe input batches itself."""
    collections = sharded_collections(model)

    def on_lookup(features: KeyedJaggedTensor, _embeddings, module, _raw_ids) -> None:
        if module is None or module.training:
            record(features)

    for collection in collections:
        collection.register_post_lookup_tracker_fn(on_lookup)
    return bool(collections)
