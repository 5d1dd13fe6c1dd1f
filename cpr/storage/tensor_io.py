"""Tensor files: each tensor's stored bytes (as its codec encodes it), with a crc32 kept in the manifest.

Any dtype (bfloat16 and bool included) round-trips raw because tensors are written as their uint8 view and
read back by viewing the bytes as the recorded dtype; a quantized tensor is written as its codec's uint8 rows
and decoded back to the recorded dtype and shape when read (see codecs.py).

A tensor's bytes are framed one of two ways:

* bare: the codec's bytes and nothing else (subset saves);
* `torch_save`: a `torch.save` serialization of the stored tensor (full saves), which is what
  `torch.distributed.checkpoint`'s FileSystemReader `torch.load`s from a byte range, so a full save is also a
  DCP checkpoint (see dcp_format.py). The serialization is an uncompressed zip whose `data/0` record is the
  tensor's storage; the manifest records where that record's bytes start (`payload_offset`), so CPR reads
  them by offset and never unpickles the record's `data.pkl`. The crc32 covers the whole serialization.
"""
import io
import struct
import zipfile
import zlib
from collections.abc import Mapping

import numpy as np
import torch

from . import codecs, files, location
from .errors import CorruptCheckpointError
from .location import Folder
from .manifest import DTYPES, TensorEntry


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise TypeError(f"dtype {dtype} cannot be checkpointed; supported: {sorted(DTYPES)}")
    return name


def _as_bytes(tensor: torch.Tensor) -> np.ndarray:
    # reshape(-1) first: a 0-d tensor cannot be viewed as a dtype of another size.
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


_ZIP_LOCAL_HEADER = struct.Struct("<26xHH")  # a zip local header's file name and extra field lengths


def _storage_record_offset(serialized: io.BytesIO, payload: int) -> int:
    """Where the storage bytes lie in a torch.save serialization: its uncompressed `data/0` record of `payload`
    bytes (ValueError otherwise). zipfile reads only the zip's directory, never the pickle."""
    with zipfile.ZipFile(serialized) as archive:
        record = next((info for info in archive.infolist() if info.filename.endswith("/data/0")), None)
        if record is None or record.compress_type != zipfile.ZIP_STORED or record.file_size != payload:
            raise ValueError(f"torch.save wrote no uncompressed data/0 record of {payload} bytes")
    name_length, extra_length = _ZIP_LOCAL_HEADER.unpack_from(serialized.getbuffer(), record.header_offset)
    return record.header_offset + _ZIP_LOCAL_HEADER.size + name_length + extra_length


_ZIP_DESCRIPTORS = (struct.Struct("<4s4xII"), struct.Struct("<4s4xQQ"))  # after a record: its sizes (zip64: 8 bytes)


def _is_storage_record(buffer: bytearray, start: int, payload: int) -> bool:
    """Whether a zip record of exactly `payload` bytes starts at `start` of a torch.save serialization: its data
    descriptor (PyTorchStreamWriter writes one after each non-empty record) follows them and states that size;
    an empty record is followed by the next record's local header."""
    if payload == 0:
        return buffer[start:start + 4] == b"PK\x03\x04"
    for descriptor in _ZIP_DESCRIPTORS:
        end = start + payload + descriptor.size
        if end <= len(buffer):
            signature, stored, size = descriptor.unpack_from(buffer, start + payload)
            if signature == b"PK\x07\x08" and stored == size == payload:
                return True
    return False


def _exact_storage(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` on the CPU, contiguous and owning a storage of exactly its own bytes (torch.save writes the
    whole storage of a view)."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.storage_offset() or tensor.untyped_storage().nbytes() != tensor.nbytes:
        tensor = tensor.clone()
    return tensor


def write_tensors(path: Folder, tensors: Mapping[str, torch.Tensor], codec_of: Mapping[str, str] | None = None,
                  torch_save: bool = False) -> list[TensorEntry]:
    """Write every tensor of a part, back to back, into one file at `path`, fsync it once, and return their
    manifest entries (file = path's name, offset = where each tensor's bytes start).

    `codec_of[name]` is the codec tensor `name` is stored with (default "raw": its own bytes, unchanged).
    With `torch_save`, each tensor's bytes are a torch.save serialization of its stored form (see above).

    One file per part keeps a save's file count (and fsyncs) independent of the number of tables, and a
    reader can still fetch a single tensor by its byte range.
    """
    entries = []
    offset = 0
    with location.create(path) as f:
        for name, tensor in tensors.items():
            dtype = dtype_name(tensor.dtype)
            codec = (codec_of or {}).get(name, "raw")
            problem = codecs.problem(codec, dtype, tuple(tensor.shape))
            if problem:
                raise ValueError(f"tensor {name!r}: {problem}")
            stored = codecs.encode(codec, tensor)
            if torch_save:
                serialized = io.BytesIO()
                torch.save(_exact_storage(stored), serialized)
                data, payload_offset = serialized.getbuffer(), _storage_record_offset(serialized, stored.nbytes)
            else:
                data, payload_offset = memoryview(_as_bytes(stored)), 0
            f.write(data)
            nbytes, checksum = data.nbytes, zlib.crc32(data)
            entries.append(TensorEntry(name=name, file=path.name, dtype=dtype, shape=tuple(tensor.shape),
                                       nbytes=nbytes, checksum=checksum, offset=offset, codec=codec,
                                       payload_offset=payload_offset))
            offset += nbytes
        location.make_durable(f)
    return entries


def read_tensor(folder: Folder, entry: TensorEntry, file_size: int) -> torch.Tensor:
    """Read one tensor: its byte range of a regular file directly inside `folder` that has exactly
    `file_size` bytes, whose crc32 matches, decoded by its codec; CorruptCheckpointError otherwise."""
    if entry.dtype not in DTYPES:
        raise CorruptCheckpointError(folder, str(entry.file), f"unknown dtype {entry.dtype!r}")
    buffer = files.read_file(folder, entry.file, size=file_size, offset=entry.offset, length=entry.nbytes)
    checksum = zlib.crc32(buffer)
    if checksum != entry.checksum:
        raise CorruptCheckpointError(folder, entry.file, f"{entry.name}: crc32 {checksum:#010x} != manifest "
                                     f"{entry.checksum:#010x}")
    payload = codecs.stored_nbytes(entry.codec, DTYPES[entry.dtype], entry.shape)
    if entry.payload_offset and not _is_storage_record(buffer, entry.payload_offset, payload):
        raise CorruptCheckpointError(folder, entry.file, f"{entry.name}: its torch.save record's bytes do not hold "
                                     f"{entry.dtype}{list(entry.shape)} as {entry.codec}")
    raw = torch.from_numpy(np.frombuffer(buffer, dtype=np.uint8, count=payload, offset=entry.payload_offset))
    try:
        return codecs.decode(entry.codec, raw, DTYPES[entry.dtype], entry.shape)
    except (RuntimeError, TypeError, ValueError) as e:
        reason = f"{entry.nbytes} bytes do not form {entry.dtype}{list(entry.shape)} as {entry.codec}"
        raise CorruptCheckpointError(folder, entry.file, reason) from e
