"""Quantized rows: codecs round-trip within the quantization bound, manifests validate the codec, and restores
(partial and full) decode transparently."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cpr import CPRCheckpointer
from cpr.save import AUTO_INT4_MAX_RESTORES, weight_codec
from cpr.storage import CorruptCheckpointError, Manifest, codecs, tensor_io
from cpr.storage.manifest import content_checksum
from cpr.storage.names import state_name, weight_name
from cpr.train import main
from tests.conftest import ROWS
from tests.test_checkpointer import make_batch, snapshot, train_step

BITS = {"int8": 8, "int4": 4}


def row_bound(rows: torch.Tensor, codec: str) -> torch.Tensor:
    """Per row, the largest error `codec` may make on an element: half a quantization step of the row's
    range, plus the fp16 rounding of its scale and bias (relative 2**-11 each, or fp16's absolute resolution
    2**-24 for a subnormal scale; the scale's counted over the 2**bits - 1 steps a code can span), plus the fp32 rounding of decoding (`code * scale + bias`, a few ulps
    of the row's largest magnitude: it dominates for a narrow row far from 0)."""
    low, high = rows.min(dim=1).values, rows.max(dim=1).values
    bound = (high - low) / (2 ** BITS[codec] - 1) / 2
    bound = bound + 2.0**-11 * (low.abs() + (high - low)) + (2 ** BITS[codec] - 1) * 2.0**-25 + 2.0**-25
    bound = bound + 2.0**-22 * torch.maximum(low.abs(), high.abs())
    return bound * (1 + 1e-5) + 1e-7


def round_trip(tmp_path, tensors: dict[str, torch.Tensor], codec_of: dict[str, str]) -> dict[str, torch.Tensor]:
    path = tmp_path / "tensors.bin"
    entries = tensor_io.write_tensors(path, tensors, codec_of)
    size = path.stat().st_size
    return {entry.name: tensor_io.read_tensor(tmp_path, entry, size) for entry in entries}


def test_raw_path_stores_the_tensors_own_bytes(tmp_path):
    tensors = {"a": torch.randn(5, 3), "b": torch.arange(4, dtype=torch.int64), "c": torch.ones(2, dtype=torch.bfloat16)}
    entries = tensor_io.write_tensors(tmp_path / "tensors.bin", tensors)
    expected = b"".join(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() for t in tensors.values())
    assert (tmp_path / "tensors.bin").read_bytes() == expected
    assert [e.codec for e in entries] == ["raw"] * 3


@settings(max_examples=30, deadline=None)
@example(codec="int4", rows=15, dim=4, scale=0.001, offset=0.0, seed=0, dtype=torch.float32)  # subnormal fp16 scales
@given(
    codec=st.sampled_from(["int8", "int4"]),
    rows=st.integers(0, 40),
    dim=st.sampled_from([4, 8, 16, 64]),
    scale=st.floats(1e-3, 1e3),
    offset=st.floats(-100, 100),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_quantized_rows_decode_within_the_bound(tmp_path_factory, codec, rows, dim, scale, offset, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    # Rows of different ranges and offsets: the scale and bias are per row.
    weight = (torch.randn(rows, dim, generator=gen) * scale * torch.rand(rows, 1, generator=gen) + offset).to(dtype)
    out = round_trip(tmp_path_factory.mktemp("q"), {"w": weight}, {"w": codec})["w"]
    assert out.dtype == dtype and out.shape == weight.shape
    original = weight.float()
    error = (out.float() - original).abs()
    bound = row_bound(original, codec) if rows else torch.zeros(0)
    if dtype != torch.float32:  # decoding rounds back to the tensor's own dtype
        bound = bound + original.abs().max(dim=1).values * (2.0**-8 if dtype == torch.bfloat16 else 2.0**-11)
    assert bool((error <= bound[:, None]).all()), (error.max(dim=1).values / bound).max()


def test_quantized_tensors_store_fewer_bytes(tmp_path):
    weight = torch.randn(100, 64)
    entries = tensor_io.write_tensors(tmp_path / "tensors.bin", {"w": weight, "s": torch.ones(100)}, {"w": "int8"})
    assert entries[0].nbytes == 100 * (64 + 4) and entries[0].codec == "int8"
    assert entries[0].dtype == "float32" and entries[0].shape == (100, 64)
    assert entries[1].codec == "raw" and entries[1].nbytes == 400
    assert codecs.stored_nbytes("int4", torch.float32, (100, 64)) == 100 * (32 + 4)


@pytest.mark.parametrize("codec, tensor, message", [
    ("int8", torch.arange(6), "quantizes 2-d"),
    ("int8", torch.ones(6), "quantizes 2-d"),
    ("int4", torch.ones(3, 6), "multiple of 4"),
    ("zip", torch.ones(3, 4), "is not one of"),
])
def test_a_codec_that_cannot_store_a_tensor_is_refused(tmp_path, codec, tensor, message):
    with pytest.raises(ValueError, match=message):
        tensor_io.write_tensors(tmp_path / "tensors.bin", {"w": tensor}, {"w": codec})


def _manifest_json(tmp_path) -> dict:
    entries = tensor_io.write_tensors(tmp_path / "tensors.bin", {"w": torch.randn(4, 8)}, {"w": "int4"})
    manifest = Manifest(step=1, policy="p", kind="full", tables={}, shards={}, tensors=entries, extra={}, created=0.0,
                        nbytes=sum(e.nbytes for e in entries))
    return json.loads(manifest.to_json())


@pytest.mark.parametrize("change, reason", [
    (lambda e: e.update(codec="zstd"), "codec 'zstd' is not one of"),
    (lambda e: e.update(codec=8), "codec must be a string"),
    (lambda e: e.update(codec="raw"), "bytes do not hold float32[4, 8] as raw"),
    (lambda e: e.update(codec="int8"), "bytes do not hold float32[4, 8] as int8"),
    (lambda e: e.update(dtype="int32"), "quantizes 2-d"),
    (lambda e: e.update(shape=[8, 4]), "bytes do not hold"),
    (lambda e: e.pop("codec"), "missing fields ['codec']"),
])
def test_the_manifest_schema_checks_the_codec(tmp_path, change, reason):
    data = _manifest_json(tmp_path)
    assert Manifest.from_json(json.dumps(data), tmp_path).tensors[0].codec == "int4"
    change(data["tensors"][0])
    data["checksum"] = content_checksum(data)  # a consistent but wrong manifest: the schema must catch it
    with pytest.raises(CorruptCheckpointError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        Manifest.from_json(json.dumps(data), tmp_path)


def test_auto_picks_the_bit_width_from_the_expected_restores():
    shapes = {"t": ("float32", 8)}
    assert weight_codec("none", 100.0, shapes) == "raw"
    assert weight_codec("auto", AUTO_INT4_MAX_RESTORES, shapes) == "int4"
    assert weight_codec("auto", AUTO_INT4_MAX_RESTORES + 0.5, shapes) == "int8"
    assert weight_codec("auto", 0.0, {"t": ("float32", 6)}) == "int8"  # int4 cannot hold a row of 6
    with pytest.raises(ValueError, match="table 't'.*multiple of 4"):
        weight_codec("int4", 0.0, {"t": ("float32", 6)})
    with pytest.raises(ValueError, match="quantize must be one of"):
        weight_codec("int2", 0.0, shapes)


# -- restores through the checkpointer -------------------------------------------------------------------------

def _trained(dmp_model, tmp_path, policy: str, quantize: str, steps: int = 12) -> tuple[CPRCheckpointer, dict]:
    model, optimizer = dmp_model
    ckpt = CPRCheckpointer(model, optimizer, tmp_path / "ckpt", policy=policy, num_domains=2, total_steps=100,
                           interval_steps=steps, quantize=quantize)
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):  # ends with the periodic full save
        train_step(model, optimizer, ckpt, make_batch(gen, rows=ROWS))
    return ckpt, snapshot(ckpt)


def _check_restored(ckpt: CPRCheckpointer, saved: dict, codec: str, rows: dict[str, tuple[int, int]]) -> None:
    for table, (start, end) in rows.items():
        original = saved[f"{table}/weight"][start:end]
        restored = ckpt.tables.weight(table)[start:end]
        error = (restored - original).abs()
        assert bool((error <= row_bound(original, codec)[:, None]).all())
        assert not torch.equal(restored, original)  # it was quantized, not kept raw
        for state, value in ckpt.tables.row_states(table).items():  # optimizer state is stored raw
            assert torch.equal(value[start:end], saved[f"{table}/{state}"][start:end])


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_partial_recovery_restores_quantized_rows_within_the_bound(dmp_model, tmp_path, codec):
    ckpt, saved = _trained(dmp_model, tmp_path, "partial", codec)
    save = ckpt.store.saves()[-1]
    manifest = ckpt.store.load_part(save, "domain-00001").manifest
    codec_of = {e.name: e.codec for e in manifest.tensors}
    for table in ckpt.tables.tables:
        assert codec_of[weight_name(table)] == codec
        assert all(codec_of[state_name(table, s)] == "raw" for s in ckpt.tables.row_states(table))
    ckpt.flush()  # rows change below other than by a training step: the save in flight is written first
    with torch.no_grad():
        for table in ckpt.tables.tables:
            ckpt.tables.weight(table).zero_()
    ckpt.recover([1])
    _check_restored(ckpt, saved, codec, {t: ckpt.layout.rows(t, 1) for t in ckpt.tables.tables})
    for table in ckpt.tables.tables:  # the other domain keeps its live (here: zeroed) rows
        start, end = ckpt.layout.rows(table, 0)
        assert bool((ckpt.tables.weight(table)[start:end] == 0).all())


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_full_recovery_restores_quantized_rows_within_the_bound(dmp_model, tmp_path, codec):
    ckpt, saved = _trained(dmp_model, tmp_path, "full", codec)
    model, optimizer = dmp_model
    train_step(model, optimizer, ckpt, make_batch(torch.Generator().manual_seed(9), rows=ROWS))
    assert ckpt.recover([0]).step == 12
    _check_restored(ckpt, saved, codec, {t: (0, info.local_rows) for t, info in ckpt.tables.tables.items()})


def test_quantized_saves_store_a_row_in_dim_plus_4_bytes(dmp_model, tmp_path):
    ckpt, _ = _trained(dmp_model, tmp_path, "partial", "int8", steps=2)
    save = ckpt.store.saves()[-1]
    stored = sum(codecs.stored_nbytes(e.codec, torch.float32, e.shape) for part in save.parts if part != "dense"
                 for e in ckpt.store.load_part(save, part).manifest.tensors if e.name.endswith("/weight"))
    assert stored == sum(rows * (8 + 4) for rows in ROWS)  # dim 8: 32 raw bytes per row became 12


def test_cli_refuses_an_unknown_quantize_choice(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--quantize", "int2", "--out", str(tmp_path)])
    assert info.value.code == 2
    assert "invalid choice: 'int2'" in capsys.readouterr().err

