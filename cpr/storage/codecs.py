"""Codecs: how a tensor's values are stored in a part's tensor file, by the name its manifest entry records.

* `raw`: the tensor's own bytes (any dtype), unchanged.
* `int8`: row-wise 8-bit quantization of a 2-d floating tensor, fbgemm's fused n-bit layout ("SBHalf"): per
  row `dim` uint8 codes, then an fp16 scale and an fp16 bias (`dim + 4` bytes per row: at the kaggle config's
  16 floats per row, the fp32 scale and bias of fbgemm's 8-bit layout would take a third of the row).
* `int4`: the same layout with 4-bit codes: per row `dim / 2` bytes of packed codes, then an fp16 scale and
  an fp16 bias (`dim / 2 + 4` bytes per row; `dim` must be a multiple of 4 so that fbgemm's fp16 scale and
  bias stay aligned).

A value x of a row with minimum m and maximum M is stored as round((x - m) / scale) with
scale = (M - m) / (2**bits - 1), so decoding is off by at most scale / 2, plus the fp16 rounding of the scale
and bias; rows with values beyond float16's range cannot be stored so. Encoding and decoding are fbgemm's
row-wise conversion operators; the decoded tensor has the dtype and shape the entry records.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm, CPU kernels included)

CODECS = ("raw", "int8", "int4")
QUANTIZED = ("int8", "int4")
BITS = {"int8": 8, "int4": 4}
# Quantization takes floating tensors of these dtypes (as recorded in a manifest), decoded back to them.
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
_FP16_MAX = 65504.0  # int4's fp16 scale and bias hold rows whose values lie within float16's range


def problem(codec: str, dtype: str, shape: Sequence[int]) -> str | None:
    """Why `codec` cannot store a tensor of `dtype` (a manifest dtype name) and `shape`, or None if it can."""
    if codec not in CODECS:
        return f"codec {codec!r} is not one of {CODECS}"
    if codec == "raw":
        return None
    if dtype not in FLOAT_DTYPES or len(shape) != 2:
        return f"{codec} quantizes 2-d {'/'.join(FLOAT_DTYPES)} rows, not {dtype}{list(shape)}"
    if codec == "int4" and shape[1] % 4:
        return f"int4 needs a row length that is a multiple of 4 (fbgemm's fp16 scale alignment), got {shape[1]}"
    return None


def stored_nbytes(codec: str, dtype: torch.dtype, shape: Sequence[int]) -> int:
    """Bytes `codec` stores for a tensor of `dtype` and `shape` (one that `problem` accepts)."""
    if codec == "raw":
        return math.prod(shape) * dtype.itemsize
    rows, dim = shape
    return rows * (dim * BITS[codec] // 8 + 4)


def encode(codec: str, tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as `codec` stores it: itself for `raw`, else the uint8 rows of the fused layout."""
    if codec == "raw":
        return tensor
    rows = tensor.detach().to("cpu", torch.float32).contiguous()
    # Checked on the fp32 rows (one pass, no copy): fp16 checks of the stored scale and bias cost far more on a CPU.
    peak = max(abs(float(bound)) for bound in torch.aminmax(rows)) if rows.numel() else 0.0
    if math.isfinite(peak) and peak > _FP16_MAX:
        raise ValueError(f"{codec} cannot store rows with values beyond float16's range (|x| > {_FP16_MAX:g}): its "
                         "per-row scale and bias are fp16; save such tables raw (quantize none)")
    return torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf(rows, BITS[codec])


def decode(codec: str, stored: torch.Tensor, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """The tensor of `dtype` and `shape` from the bytes `codec` stored (`stored`: a 1-d uint8 tensor).

    Raises ValueError or RuntimeError if the bytes do not form such a tensor.
    """
    if codec == "raw":
        return stored.view(dtype).reshape(tuple(shape))
    rows, dim = shape
    fused = stored.reshape(rows, stored_nbytes(codec, dtype, (1, dim)))
    return torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(fused, BITS[codec]).to(dtype)
