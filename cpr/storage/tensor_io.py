"""Raw tensor files: the tensor's bytes, nothing else, with a crc32 kept in the manifest.

Any dtype (bfloat16 and bool included) round-trips because tensors are written as their uint8 view and
read back by viewing the bytes as the recorded dtype.
"""
import os
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .errors import CorruptCheckpointError
from .manifest import TensorEntry

_DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    )
}


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise TypeError(f"dtype {dtype} cannot be checkpointed; supported: {sorted(_DTYPES)}")
    return name


def _as_bytes(tensor: torch.Tensor) -> np.ndarray:
    # reshape(-1) first: a 0-d tensor cannot be viewed as a dtype of another size.
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def write_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> list[TensorEntry]:
    """Write every tensor of a part, back to back, into one file at `path`, fsync it once, and return their
    manifest entries (file = path's name, offset = where each tensor's bytes start).

    One file per part keeps a save's file count (and fsyncs) independent of the number of tables, and a
    reader can still fetch a single tensor by its byte range.
    """
    entries = []
    offset = 0
    with open(path, "wb") as f:
        for name, tensor in tensors.items():
            dtype = dtype_name(tensor.dtype)
            data = _as_bytes(tensor)
            f.write(memoryview(data))
            entries.append(TensorEntry(
                name=name,
                file=path.name,
                dtype=dtype,
                shape=tuple(tensor.shape),
                nbytes=data.nbytes,
                checksum=zlib.crc32(memoryview(data)),
                offset=offset,
            ))
            offset += data.nbytes
        f.flush()
        os.fsync(f.fileno())
    return entries


def read_tensor(folder: Path, entry: TensorEntry) -> torch.Tensor:
    """Read one tensor's byte range, checking its size and crc32; CorruptCheckpointError otherwise."""
    path = Path(folder) / entry.file
    try:
        size = path.stat().st_size
        if size < entry.offset + entry.nbytes:
            raise CorruptCheckpointError(folder, entry.file, f"size {size} bytes, manifest says "
                                         f"{entry.nbytes} at offset {entry.offset}")
        buffer = bytearray(entry.nbytes)
        with open(path, "rb") as f:
            f.seek(entry.offset)
            read = f.readinto(buffer)
    except FileNotFoundError as e:
        raise CorruptCheckpointError(folder, entry.file, "file missing") from e
    except OSError as e:
        raise CorruptCheckpointError(folder, entry.file, f"unreadable: {e}") from e
    if read != entry.nbytes:
        raise CorruptCheckpointError(folder, entry.file, f"read {read} of {entry.nbytes} bytes")
    checksum = zlib.crc32(buffer)
    if checksum != entry.checksum:
        raise CorruptCheckpointError(folder, entry.file, f"{entry.name}: crc32 {checksum:#010x} != manifest {entry.checksum:#010x}")
    if entry.dtype not in _DTYPES:
        raise CorruptCheckpointError(folder, entry.file, f"unknown dtype {entry.dtype!r}")
    raw = torch.from_numpy(np.frombuffer(buffer, dtype=np.uint8))
    try:
        return raw.view(_DTYPES[entry.dtype]).reshape(entry.shape)
    except RuntimeError as e:
        reason = f"{entry.nbytes} bytes do not form {entry.dtype}{list(entry.shape)}"
        raise CorruptCheckpointError(folder, entry.file, reason) from e
