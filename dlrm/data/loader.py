"""`BatchLoader`: resumable, deterministic iteration of `CriteoArrays` as TorchRec `Batch`es."""
from collections.abc import Iterator

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm.data.arrays import CriteoArrays
from dlrm.data.schema import NUM_SPARSE, SPARSE_NAMES


class BatchLoader:
    """Batches of `arrays` in row order, one categorical id per feature per sample.

    The position is the next batch to produce, `{"epoch": e, "batch": b}`; it advances before a batch is
    handed out, so a `state_dict()` taken after training on a batch resumes right after it. Iterating the
    loader runs the rest of the current epoch; `epochs(n)` runs until epoch `n`.

    With `world_size` > 1 each rank takes every `world_size`-th batch, starting at its `rank`, and only
    whole batches, so every rank runs the same number of equal batches (collectives in the model need
    that) and the position means the same on every rank: one saved position serves the whole job.
    """

    def __init__(self, arrays: CriteoArrays, batch_size: int, drop_last: bool = False, rank: int = 0,
                 world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.arrays = arrays
        self.batch_size = batch_size
        self.drop_last = drop_last or world_size > 1
        self.rank, self.world_size = rank, world_size
        full, rest = divmod(len(arrays), batch_size)
        self._num_batches = (full + int(rest > 0 and not self.drop_last)) // world_size
        if self._num_batches == 0:
            raise ValueError(f"{len(arrays)} rows make no batch of {batch_size} for each of {world_size} rank(s)")
        self._epoch = 0
        self._batch = 0
        # One id per (feature, sample): the lengths are all 1, shared by every batch.
        self._lengths = torch.ones(NUM_SPARSE * batch_size, dtype=torch.int32)

    def __len__(self) -> int:
        return self._num_batches

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batch": self._batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch < self._num_batches:
            raise ValueError(f"position {state} is outside 0..{self._num_batches - 1} batches per epoch")
        self._epoch, self._batch = epoch, batch

    def __iter__(self) -> Iterator[Batch]:
        epoch = self._epoch
        while self._epoch == epoch:
            yield self._next()

    def epochs(self, num_epochs: int) -> Iterator[Batch]:
        """Batches from the current position up to the end of epoch `num_epochs - 1`."""
        while self._epoch < num_epochs:
            yield self._next()

    def _next(self) -> Batch:
        index = self._batch
        self._batch += 1
        if self._batch == self._num_batches:
            self._epoch, self._batch = self._epoch + 1, 0
        return self.batch(index)

    def batch(self, index: int) -> Batch:
        """Batch number `index` of this rank's epoch (no effect on the position)."""
        index = index * self.world_size + self.rank
        rows = slice(index * self.batch_size, min((index + 1) * self.batch_size, len(self.arrays)))
        part = self.arrays[rows]
        size = len(part)
        # KJT values are key-major: all samples' cat_0 ids, then cat_1's, ...
        values = torch.from_numpy(np.ascontiguousarray(part.sparse.T).reshape(-1))
        return Batch(
            dense_features=torch.from_numpy(part.dense),
            sparse_features=KeyedJaggedTensor(
                keys=SPARSE_NAMES,
                values=values,
                lengths=self._lengths[: NUM_SPARSE * size],
                stride=size,
                length_per_key=[size] * NUM_SPARSE,
                offset_per_key=[size * i for i in range(NUM_SPARSE + 1)],
            ),
            labels=torch.from_numpy(part.labels),
        )
