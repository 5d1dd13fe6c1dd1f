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
  torch.save writes straight into the part's file (`_SerializationStream`), without its own per-record
  crc32s, so the crc32 is the only pass over the bytes besides the write.
"""
import io
import os
import struct
import zipfile
import zlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import IO

import numpy as np
import torch
from torch.utils.serialization import config as serialization_config

from . import codecs, files, location
from cpr.errors import CorruptCheckpointError
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


def _states_size(buffer: bytes | bytearray, at: int, payload: int) -> bool:
    """Whether the data descriptor that PyTorchStreamWriter writes after each non-empty zip record starts at
    `at` of `buffer` and states a record of exactly `payload` bytes."""
    for descriptor in _ZIP_DESCRIPTORS:
        if at + descriptor.size <= len(buffer):
            signature, stored, size = descriptor.unpack_from(buffer, at)
            if signature == b"PK\x07\x08" and stored == size == payload:
                return True
    return False


def _is_storage_record(buffer: bytearray, start: int, payload: int) -> bool:
    """Whether a zip record of exactly `payload` bytes starts at `start` of a torch.save serialization: its data
    descriptor follows them and states that size; an empty record is followed by the next record's local
    header."""
    if payload == 0:
        return buffer[start:start + 4] == b"PK\x03\x04"
    return _states_size(buffer, start + payload, payload)


def _exact_storage(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` on the CPU, contiguous, over a storage of exactly its own bytes (torch.save writes the whole
    storage of a view). A view (a domain's rows of a live table, written by a synchronous save) is not copied:
    numpy wraps its bytes, and torch a storage of exactly those."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.storage_offset() or tensor.untyped_storage().nbytes() != tensor.nbytes:
        exact = torch.from_numpy(tensor.reshape(-1).view(torch.uint8).numpy())
        tensor = exact.view(tensor.dtype).reshape(tensor.shape)
    return tensor


# A storage of at least this many bytes has its crc32 computed on another thread while it is written (below
# it, handing it over costs more than it saves). One thread per process (a crc32 task never waits), made
# anew in a forked child, which does not inherit the parent's threads.
_OVERLAPPED_CRC32_BYTES = 1 << 20
_crc32_threads: dict[int, ThreadPoolExecutor] = {}


def _crc32_thread() -> ThreadPoolExecutor:
    pid = os.getpid()
    if pid not in _crc32_threads:
        _crc32_threads[pid] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpr-crc32")
    return _crc32_threads[pid]


class _SerializationStream:
    """The file-like object a tensor's torch.save writes into, passing the serialization on to `file` with a
    running crc32, so that it is neither copied into a buffer nor read a second time.

    torch.save hands over zero-copy views, its storage record's bytes as one view of the tensor's own memory:
    that chunk is recognized by its address and passed on as it is. Every other chunk (zip headers, the
    pickle: a few hundred bytes in dozens of writes) is kept in `metadata` and passed on in one write
    before the storage's bytes and one at `flush`; in `metadata`, the storage record's data descriptor
    starts where its bytes were left out (`payload_at`). An empty storage writes no chunk, so `metadata` is
    then the whole serialization, read as a zip to find the record.
    """

    def __init__(self, file: IO[bytes], storage: torch.Tensor) -> None:
        self._file = file
        self._storage = (storage.data_ptr(), storage.nbytes)
        self._passed = 0  # how much of `metadata` was passed on
        self.metadata = bytearray()
        self.payload_at: int | None = None
        self.nbytes = 0
        self.checksum = 0

    def write(self, chunk: memoryview) -> int:
        size = chunk.nbytes
        if size == self._storage[1] and np.frombuffer(chunk, dtype=np.uint8).ctypes.data == self._storage[0]:
            self.flush()
            self.payload_at = len(self.metadata)
            self._pass_on(chunk)
        else:
            self.metadata += chunk
        return size

    def flush(self) -> None:
        """Pass on the metadata written since the last flush (torch.save flushes when done)."""
        if self._passed < len(self.metadata):
            self._pass_on(memoryview(self.metadata[self._passed:]))
            self._passed = len(self.metadata)

    def _pass_on(self, chunk: memoryview) -> None:
        if chunk.nbytes >= _OVERLAPPED_CRC32_BYTES:
            # Both release the GIL: the crc32 of a large storage runs on another core while it is written.
            checksum = _crc32_thread().submit(zlib.crc32, chunk, self.checksum)
            self._file.write(chunk)
            location.start_writeback(self._file)
            self.checksum = checksum.result()
        else:
            self._file.write(chunk)
            self.checksum = zlib.crc32(chunk, self.checksum)
        self.nbytes += chunk.nbytes

    def payload_offset(self, payload: int) -> int:
        """Where the storage record's `payload` bytes start in the serialization (ValueError if they cannot be
        found and checked)."""
        if self.payload_at is None:
            return _storage_record_offset(io.BytesIO(self.metadata), payload)
        if not _states_size(self.metadata, self.payload_at, payload):
            raise ValueError(f"torch.save wrote no data/0 record of {payload} bytes")
        return self.payload_at


def _write_torch_save(file: IO[bytes], stored: torch.Tensor) -> tuple[int, int, int]:
    """Append a torch.save serialization of `stored` (owning exactly its storage) to `file`; return its size,
    its crc32 and where its storage record's bytes start in it. Call within `_WITHOUT_ZIP_CRC32`."""
    stream = _SerializationStream(file, stored)
    torch.save(stored, stream)
    stream.flush()
    return stream.nbytes, stream.checksum, stream.payload_offset(stored.nbytes)


# torch's own crc32 of each zip record is left out (zeros; patched for the calling thread only): the crc32 in
# the manifest covers every byte, and torch.load, which DCP's reader and dcp_to_torch_save use, does not check
# them; computing them would be a second pass over the bytes.
_WITHOUT_ZIP_CRC32 = {"save.compute_crc32": False}


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
    with location.create(path) as f, serialization_config.patch(_WITHOUT_ZIP_CRC32 if torch_save else {}):
        for name, tensor in tensors.items():
            dtype = dtype_name(tensor.dtype)
            codec = (codec_of or {}).get(name, "raw")
            problem = codecs.problem(codec, dtype, tuple(tensor.shape))
            if problem:
                raise ValueError(f"tensor {name!r}: {problem}")
            stored = codecs.encode(codec, tensor)
            if torch_save:
                nbytes, checksum, payload_offset = _write_torch_save(f, _exact_storage(stored))
            else:
                data = memoryview(_as_bytes(stored))
                f.write(data)
                if data.nbytes >= _OVERLAPPED_CRC32_BYTES:
                    location.start_writeback(f)
                nbytes, checksum, payload_offset = data.nbytes, zlib.crc32(data), 0
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
    payload = entry.payload_nbytes
    if entry.payload_offset and not _is_storage_record(buffer, entry.payload_offset, payload):
        raise CorruptCheckpointError(folder, entry.file, f"{entry.name}: its torch.save record's bytes do not hold "
                                     f"{entry.dtype}{list(entry.shape)} as {entry.codec}")
    raw = torch.from_numpy(np.frombuffer(buffer, dtype=np.uint8, count=payload, offset=entry.payload_offset))
    try:
        return codecs.decode(entry.codec, raw, DTYPES[entry.dtype], entry.shape)
    except (RuntimeError, TypeError, ValueError) as e:
        reason = f"{entry.nbytes} bytes do not form {entry.dtype}{list(entry.shape)} as {entry.codec}"
        raise CorruptCheckpointError(folder, entry.file, reason) from e
