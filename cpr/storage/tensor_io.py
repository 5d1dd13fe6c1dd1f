"""Raw tensor files: the tensor's bytes, nothing else, with a crc32 kept in the manifest.

Any dtype (bfloat16 and bool included) round-trips because tensors are written as their uint8 view and
read back by viewing the bytes as the recorded dtype.
"""
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from . import files
from .errors import CorruptCheckpointError
from .manifest import DTYPES, TensorEntry


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise TypeError(f"dtype {dtype} cannot be checkpointed; supported: {sorted(DTYPES)}")
    return name


def _as_bytes(tensor: torch.Tensor) -> np.ndarray:
    # reshape(-1) first: a 0-d tensor cannot be viewed as a dtype of another size.
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def write_tensor(path: Path, name: str, tensor: torch.Tensor) -> TensorEntry:
    """Write `tensor` to `path`, fsync it, and return its manifest entry (file = path's name)."""
    dtype = dtype_name(tensor.dtype)
    data = _as_bytes(tensor)
    with open(path, "wb") as f:
        f.write(memoryview(data))
        f.flush()
        os.fsync(f.fileno())
    return TensorEntry(
        name=name,
        file=path.name,
        dtype=dtype,
        shape=tuple(tensor.shape),
        nbytes=data.nbytes,
        checksum=zlib.crc32(memoryview(data)),
    )


def read_tensor(folder: Path, entry: TensorEntry) -> torch.Tensor:
    """Read one tensor: a regular file directly inside `folder` of exactly the declared size, whose crc32
    matches; CorruptCheckpointError otherwise."""
    if entry.dtype not in DTYPES:
        raise CorruptCheckpointError(folder, str(entry.file), f"unknown dtype {entry.dtype!r}")
    buffer = files.read_file(Path(folder), entry.file, size=entry.nbytes)
    checksum = zlib.crc32(buffer)
    if checksum != entry.checksum:
        raise CorruptCheckpointError(folder, entry.file, f"crc32 {checksum:#010x} != manifest {entry.checksum:#010x}")
    raw = torch.from_numpy(np.frombuffer(buffer, dtype=np.uint8))
    try:
        return raw.view(DTYPES[entry.dtype]).reshape(entry.shape)
    except (RuntimeError, TypeError, ValueError) as e:
        reason = f"{entry.nbytes} bytes do not form {entry.dtype}{list(entry.shape)}"
        raise CorruptCheckpointError(folder, entry.file, reason) from e
