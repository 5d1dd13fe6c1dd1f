"""Tensor files: each tensor's stored bytes (as its codec encodes it), nothing else, with a crc32 kept in
the manifest.

Any dtype (bfloat16 and bool included) round-trips raw because tensors are written as their uint8 view and
read back by viewing the bytes as the recorded dtype; a quantized tensor is written as its codec's uint8 rows
and decoded back to the recorded dtype and shape when read (see codecs.py).
"""
import os
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from . import codecs, files
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


def write_tensors(path: Path, tensors: Mapping[str, torch.Tensor],
                  codec_of: Mapping[str, str] | None = None) -> list[TensorEntry]:
    """Write every tensor of a part, back to back, into one file at `path`, fsync it once, and return their
    manifest entries (file = path's name, offset = where each tensor's bytes start).

    `codec_of[name]` is the codec tensor `name` is stored with (default "raw": its own bytes, unchanged).

    One file per part keeps a save's file count (and fsyncs) independent of the number of tables, and a
    reader can still fetch a single tensor by its byte range.
    """
    entries = []
    offset = 0
    with open(path, "wb") as f:
        for name, tensor in tensors.items():
            dtype = dtype_name(tensor.dtype)
            codec = (codec_of or {}).get(name, "raw")
            problem = codecs.problem(codec, dtype, tuple(tensor.shape))
            if problem:
                raise ValueError(f"tensor {name!r}: {problem}")
            data = _as_bytes(codecs.encode(codec, tensor))
            f.write(memoryview(data))
            entries.append(TensorEntry(name=name, file=path.name, dtype=dtype, shape=tuple(tensor.shape),
                                       nbytes=data.nbytes, checksum=zlib.crc32(memoryview(data)), offset=offset,
                                       codec=codec))
            offset += data.nbytes
        f.flush()
        os.fsync(f.fileno())
    return entries


def read_tensor(folder: Path, entry: TensorEntry, file_size: int) -> torch.Tensor:
    """Read one tensor: its byte range of a regular file directly inside `folder` that has exactly
    `file_size` bytes, whose crc32 matches, decoded by its codec; CorruptCheckpointError otherwise."""
    if entry.dtype not in DTYPES:
        raise CorruptCheckpointError(folder, str(entry.file), f"unknown dtype {entry.dtype!r}")
    buffer = files.read_file(Path(folder), entry.file, size=file_size, offset=entry.offset, length=entry.nbytes)
    checksum = zlib.crc32(buffer)
    if checksum != entry.checksum:
        raise CorruptCheckpointError(folder, entry.file, f"{entry.name}: crc32 {checksum:#010x} != manifest "
                                     f"{entry.checksum:#010x}")
    raw = torch.from_numpy(np.frombuffer(buffer, dtype=np.uint8))
    try:
        return codecs.decode(entry.codec, raw, DTYPES[entry.dtype], entry.shape)
    except (RuntimeError, TypeError, ValueError) as e:
        reason = f"{entry.nbytes} bytes do not form {entry.dtype}{list(entry.shape)} as {entry.codec}"
        raise CorruptCheckpointError(folder, entry.file, reason) from e
