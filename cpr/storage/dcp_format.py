"""A full save as a `torch.distributed.checkpoint` checkpoint: the `.metadata` that makes its folder a DCP
`checkpoint_id`.

DCP's FileSystemReader finds each state-dict entry's chunks in `.metadata` (a pickle: what DCP reads, never
CPR) and `torch.load`s each chunk from a byte range of a file under the checkpoint folder. A full save's parts
store every tensor as a torch.save serialization (tensor_io.py), and the writer names, for each tensor, the
state-dict entry it is a chunk of (`Chunk`, kept in the part's manifest under `extra[CHUNKS]`): a domain
part's row slice of a table is the chunk at rows [start, end) of the model's `...embedding_bags.<t>.weight`,
dense parameters are whole entries. The coordinator builds `.metadata` from the parts' manifests when it
commits the save, before `commit.json`, so a multi-rank save (each rank its own parts) is one checkpoint, and
DCP can load it at another world size where it reshards (row-wise chunks into any row-wise or whole table).

Names follow TorchRec and DCP: model entries are `model.state_dict()` keys; optimizer state is
`optim.state.<parameter key>.<state>` (DCP's flattening of `{"optim": optimizer.state_dict()}` for
TorchRec's keyed optimizers: fused row-wise state is `<table>.<state>`, e.g. `t_cat_0.momentum1`). A weight
stored quantized is the uint8 tensor of fbgemm's fused rows (see codecs.py) under `<key>.<codec>_rowwise`,
so DCP sees no float weight for it.
"""
from __future__ import annotations

import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from . import codecs, location
from .location import Folder
from .manifest import DTYPES, Manifest
from .names import state_name, weight_name

METADATA_FILE = ".metadata"  # DCP's name (torch.distributed.checkpoint.filesystem._metadata_fn)
CHUNKS = "dcp_chunks"  # the manifest `extra` key naming each tensor's state-dict entry


@dataclass(frozen=True)
class Chunk:
    """Where a part's tensor lies in a state-dict entry: entry `key`, of shape `size`, from `offsets` on."""

    key: str
    size: tuple[int, ...]
    offsets: tuple[int, ...]

    @classmethod
    def whole(cls, key: str, tensor: torch.Tensor) -> Chunk:
        return cls(key, tuple(tensor.shape), (0,) * tensor.dim())

    @classmethod
    def rows(cls, key: str, tensor: torch.Tensor, total_rows: int, first_row: int) -> Chunk:
        """`tensor` as rows [first_row, first_row + len(tensor)) of an entry of `total_rows` rows."""
        return cls(key, (total_rows, *tensor.shape[1:]), (first_row,) + (0,) * (tensor.dim() - 1))

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "size": list(self.size), "offsets": list(self.offsets)}


def optimizer_key(parameter_key: str, state: str) -> str:
    """DCP's key of optimizer state `state` of the parameter named `parameter_key` in the model's state dict."""
    return f"optim.state.{parameter_key}.{state}"


def table_chunks(table: str, weight_key: str, total_rows: int, first_row: int,
                 tensors: Mapping[str, torch.Tensor]) -> dict[str, Chunk]:
    """The chunks of a full domain part's rows of `table` (its weight and row-wise optimizer state, among
    `tensors`): rows from `first_row` on of the model's entry `weight_key` and of its optimizer state, which
    TorchRec's fused optimizers name `<table>.<state>`."""
    weight = tensors[weight_name(table)]
    if weight.shape[0] == 0:
        return {}  # this domain holds no row of the table: no chunk
    chunks = {weight_name(table): Chunk.rows(weight_key, weight, total_rows, first_row)}
    prefix = state_name(table, "")
    for name, tensor in tensors.items():
        if name.startswith(prefix):
            state = f"{table}.{name.removeprefix(prefix)}"
            chunks[name] = Chunk.rows(optimizer_key(weight_key, state), tensor, total_rows, first_row)
    return chunks


def _stored_chunk(chunk: Mapping[str, Any], codec: str, dtype: str, shape: tuple[int, ...]) -> tuple[str, torch.dtype, list[int], tuple[int, ...]]:
    """(key, dtype, entry size, chunk shape) of a tensor as stored: a quantized weight is its uint8 fused rows."""
    if codec == "raw":
        return chunk["key"], DTYPES[dtype], list(chunk["size"]), shape
    width = codecs.stored_nbytes(codec, DTYPES[dtype], (1, shape[1]))
    return f"{chunk['key']}.{codec}_rowwise", torch.uint8, [chunk["size"][0], width], (shape[0], width)


def build_metadata(manifests: Mapping[str, Manifest], checkpoint_id: str) -> Metadata:
    """DCP metadata of the chunks the parts' manifests name (`part name -> manifest`); ValueError when two
    parts claim the same chunk or disagree on an entry's size or dtype."""
    entries: dict[str, TensorStorageMetadata] = {}
    storage: dict[MetadataIndex, _StorageInfo] = {}
    for part, manifest in sorted(manifests.items()):
        chunks = manifest.extra.get(CHUNKS, {})
        for entry in manifest.tensors:
            if entry.name not in chunks:
                continue
            key, dtype, size, shape = _stored_chunk(chunks[entry.name], entry.codec, entry.dtype, entry.shape)
            offsets = tuple(chunks[entry.name]["offsets"])
            found = entries.setdefault(key, TensorStorageMetadata(TensorProperties(dtype=dtype), torch.Size(size), []))
            if found.size != torch.Size(size) or found.properties.dtype != dtype:
                raise ValueError(f"part {part}: {key} is {dtype}{size}, another part says "
                                 f"{found.properties.dtype}{list(found.size)}")
            index = MetadataIndex(key, offsets)
            if index in storage:
                raise ValueError(f"part {part}: chunk {key} at {list(offsets)} is written by two parts")
            found.chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(shape)))
            storage[index] = _StorageInfo(f"{part}/{entry.file}", entry.offset, entry.nbytes)
    return Metadata(state_dict_metadata=entries, planner_data={key: (key,) for key in entries},
                    storage_data=storage, storage_meta=StorageMeta(checkpoint_id=checkpoint_id),
                    version=CURRENT_DCP_VERSION)


def write_metadata(folder: Folder, manifests: Mapping[str, Manifest], checkpoint_id: str) -> None:
    """Write `folder/.metadata` for the parts' chunks and make it durable, as DCP's writers do at `finish`."""
    metadata = build_metadata(manifests, checkpoint_id)
    with location.create(folder / METADATA_FILE) as f:
        pickle.dump(metadata, f)
        location.make_durable(f)
