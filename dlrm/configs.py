"""The DLRM configurations and the names of the embedding optimizers and sharding types, without importing
torch or TorchRec (the command line shows and checks them before those load; `dlrm.model` builds them)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    """Layer sizes of a DLRM; the bottom MLP ends at the embedding dimension, as DLRM requires."""

    name: str
    embedding_dim: int
    bottom_mlp: tuple[int, ...]
    top_mlp: tuple[int, ...]


MODEL_CONFIGS: dict[str, ModelConfig] = {
    # The DLRM reference configuration for Criteo Kaggle.
    "kaggle": ModelConfig("kaggle", 16, (512, 256, 64, 16), (512, 256, 1)),
    # Small enough for tests to train in seconds on two cores.
    "small": ModelConfig("small", 8, (32, 8), (32, 1)),
}
# `--embedding-optimizer`: dlrm.model.EMBEDDING_OPTIMIZERS maps each to fbgemm's fused optimizer.
EMBEDDING_OPTIMIZER_NAMES = ("rowwise_adagrad", "sgd")
SHARDING_TYPES = ("table_wise", "row_wise")
