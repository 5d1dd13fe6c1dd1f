"""TorchRec DLRM configurations and their placement through `DistributedModelParallel`.

Placement is Zion-like: embedding tables live in host memory (the fused CPU kernel, or fbgemm's UVM kernel
on a CUDA machine, which keeps the rows in host memory and reads them from the GPU) while the MLPs run on
the accelerator when there is one.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed import DistributedModelParallel, collective_utils
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from torchrec.datasets.criteo import DEFAULT_CAT_NAMES, DEFAULT_INT_NAMES, INT_FEATURE_COUNT as NUM_DENSE

from cpr.environment import setting
from dlrm.configs import EMBEDDING_OPTIMIZER_NAMES, MODEL_CONFIGS, SHARDING_TYPES, ModelConfig
from dlrm.data.schema import DENSE_NAMES, SPARSE_NAMES

# dlrm.data spells TorchRec's feature names without importing TorchRec.
assert (list(DEFAULT_INT_NAMES), list(DEFAULT_CAT_NAMES)) == (DENSE_NAMES, SPARSE_NAMES)


# Names accepted by `--embedding-optimizer`, mapped to fbgemm's fused (in-backward) optimizers.
EMBEDDING_OPTIMIZERS: dict[str, EmbOptimType] = {
    "sgd": EmbOptimType.EXACT_SGD,
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
}
assert sorted(EMBEDDING_OPTIMIZERS) == sorted(EMBEDDING_OPTIMIZER_NAMES)


def table_name(feature: str) -> str:
    """One table per categorical feature, named after it."""
    return f"t_{feature}"


def build_model(
    config: ModelConfig,
    table_rows: Sequence[int],
    feature_names: Sequence[str] = DEFAULT_CAT_NAMES,
    device: torch.device | str = "meta",
) -> DLRMTrain:
    """A `DLRMTrain` (DLRM plus BCE loss) with one embedding table per categorical feature.

    Tables are created on the meta device by default so that `DistributedModelParallel` materialises
    them directly in their sharded, fused form.
    """
    if len(table_rows) != len(feature_names):
        raise ValueError(f"{len(table_rows)} table sizes given for {len(feature_names)} features")
    tables = [
        EmbeddingBagConfig(
            name=table_name(feature),
            embedding_dim=config.embedding_dim,
            num_embeddings=int(rows),
            feature_names=[feature],
        )
        for feature, rows in zip(feature_names, table_rows)
    ]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device(device))
    dlrm = DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=NUM_DENSE,
        dense_arch_layer_sizes=list(config.bottom_mlp),
        over_arch_layer_sizes=list(config.top_mlp),
        dense_device=torch.device("cpu") if str(device) == "meta" else torch.device(device),
    )
    return DLRMTrain(dlrm)


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# Collectives of training wait at most this long for a peer (torch's default is 30 minutes): a dead or hung
# rank ends the job with an error instead of a silent stall.
COLLECTIVE_TIMEOUT = timedelta(seconds=setting("CPR_COLLECTIVE_TIMEOUT_S"))


def ensure_process_group(device: torch.device) -> None:
    """Join the process group of a launcher (torchrun sets WORLD_SIZE, RANK, MASTER_ADDR/PORT) or, without
    one, start a one-process group on an in-memory store (no port to collide with other runs)."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=COLLECTIVE_TIMEOUT)


def wrap_dmp(
    model: DLRMTrain,
    device: torch.device,
    embedding_optimizer: str = "rowwise_adagrad",
    embedding_lr: float = 0.01,
    sharding: str = "table_wise",
) -> DistributedModelParallel:
    """Shard the model's tables over the process group's ranks with fbgemm's fused kernel and in-backward
    optimizer: `table_wise` (TorchRec's planner places whole tables, balancing the ranks) or `row_wise`
    (every rank holds a contiguous row slice of every table).

    On a CUDA machine the tables use the UVM kernel: rows stay in host memory (Zion-like), MLPs go to
    the GPU. The process group must already exist (`ensure_process_group`).
    """
    if embedding_optimizer not in EMBEDDING_OPTIMIZERS:
        raise ValueError(f"unknown embedding optimizer {embedding_optimizer!r}; choose from {sorted(EMBEDDING_OPTIMIZERS)}")
    if sharding not in SHARDING_TYPES:
        raise ValueError(f"unknown sharding {sharding!r}; choose from {SHARDING_TYPES}")
    fused_params = {"optimizer": EMBEDDING_OPTIMIZERS[embedding_optimizer], "learning_rate": embedding_lr, "eps": 1e-8}
    sharder = EmbeddingBagCollectionSharder(fused_params=fused_params)
    kernel = EmbeddingComputeKernel.FUSED_UVM if device.type == "cuda" else EmbeddingComputeKernel.FUSED
    ebc = model.model.sparse_arch.embedding_bag_collection
    world_size = dist.get_world_size()
    if sharding == "row_wise":
        # TorchRec's planner offers row-wise sharding on CUDA only; the plan itself runs on CPU too, so it is
        # built directly: every table split into world_size near-equal row blocks.
        module_plan = construct_module_sharding_plan(
            ebc, {cfg.name: row_wise(compute_kernel=kernel.value) for cfg in ebc.embedding_bag_configs()},
            local_size=world_size, world_size=world_size, device_type=device.type, sharder=sharder,
        )
        plan = ShardingPlan({"model.sparse_arch.embedding_bag_collection": module_plan})
    else:
        constraints = {
            cfg.name: ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value], compute_kernels=[kernel.value])
            for cfg in ebc.embedding_bag_configs()
        }
        planner = EmbeddingShardingPlanner(
            topology=Topology(world_size=world_size, compute_device=device.type),
            constraints=constraints,
        )
        plan = planner.collective_plan(model, [sharder], dist.GroupMember.WORLD)
    # DMP's first construction in a process broadcasts TorchRec's collective-validation flag; later ones skip
    # it. A process that rebuilds DMP around a re-formed group (a survivor of a rank's death) must take part
    # again, or it would be one collective out of step with the replacement building DMP for the first time.
    collective_utils._INITIALIZED = False
    return DistributedModelParallel(model, device=device, plan=plan, sharders=[sharder])


def build_optimizer(dmp: DistributedModelParallel, dense_lr: float) -> CombinedOptimizer:
    """The fused embedding optimizer (it steps inside backward) combined with Adagrad for dense layers."""
    dense_params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    dense = KeyedOptimizerWrapper(dense_params, lambda params: torch.optim.Adagrad(params, lr=dense_lr))
    return CombinedOptimizer([dmp.fused_optimizer, dense])
