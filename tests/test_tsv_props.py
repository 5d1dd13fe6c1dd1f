"""Properties of the TSV reader: random valid rows parse to the values they spell (both parsers agree), and
a random corruption of one field gives a CriteoDataError naming its line and field, never another exception."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlrm.data import CriteoDataError
from dlrm.data.schema import COLUMN_NAMES
from dlrm.data.tsv import load_tsv
from tests.test_bad_input import TABLES

PROPS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

dense_values = st.one_of(st.just(""), st.integers(-(2**63), 2**63 - 1).map(str))
id_values = st.one_of(st.just(""), st.integers(0, 2**32 - 1).map(lambda v: f"{v:08x}"),
                      st.integers(0, 2**64 - 1).map(lambda v: f"{v:x}"))
rows = st.tuples(st.sampled_from(["0", "1"]), st.lists(dense_values, min_size=13, max_size=13),
                 st.lists(id_values, min_size=26, max_size=26))


def line(row) -> str:
    label, dense, ids = row
    return "\t".join([label, *dense, *ids])


def write(tmp_path: Path, lines: list[str], newline: str) -> Path:
    path = tmp_path / "data.tsv"
    path.write_bytes("".join(text + newline for text in lines).encode("utf-8", errors="surrogatepass"))
    return path


@PROPS
@given(batch=st.lists(rows, min_size=1, max_size=20), newline=st.sampled_from(["\n", "\r\n"]),
       chunk_rows=st.integers(1, 7))
def test_random_valid_rows_parse_to_their_values(tmp_path_factory, batch, newline, chunk_rows):
    path = write(tmp_path_factory.mktemp("valid"), [line(r) for r in batch], newline)
    arrays = load_tsv([path], TABLES, chunk_rows=chunk_rows)
    whole = load_tsv([path], TABLES)  # one chunk: the vectorised parser where it applies
    np.testing.assert_array_equal(arrays.dense, whole.dense)
    np.testing.assert_array_equal(arrays.sparse, whole.sparse)
    for i, (label, dense, ids) in enumerate(batch):
        assert arrays.labels[i] == float(label)
        expected_dense = [math.log1p(max(float(int(v)), 0.0)) if v else 0.0 for v in dense]
        np.testing.assert_allclose(arrays.dense[i], expected_dense, rtol=1e-6)
        expected_ids = [int(v, 16) % rows_ if v else 0 for v, rows_ in zip(ids, TABLES)]
        assert arrays.sparse[i].tolist() == expected_ids


bad_text = st.one_of(
    st.text(min_size=1, max_size=30).filter(lambda t: "\t" not in t and "\n" not in t and "\r" not in t),
    st.sampled_from(["-", "+5", "1.5", "0x10", "1e3", " 7", "7 ", "zz", "\x00", "٣"]),
    st.integers(20, 500).map(lambda n: "9" * n),  # beyond 64 bits
    st.integers(17, 40).map(lambda n: "f" * n),
)


@PROPS
@given(batch=st.lists(rows, min_size=1, max_size=12), data=st.data())
def test_a_corrupted_field_names_its_line_and_field(tmp_path_factory, batch, data):
    lines = [line(r) for r in batch]
    index = data.draw(st.integers(0, len(lines) - 1))
    column = data.draw(st.integers(0, len(COLUMN_NAMES) - 1))
    fields = lines[index].split("\t")
    fields[column] = data.draw(bad_text)
    lines[index] = "\t".join(fields)
    path = write(tmp_path_factory.mktemp("bad"), lines, "\n")
    try:
        load_tsv([path], TABLES, chunk_rows=data.draw(st.integers(1, 5)))
    except CriteoDataError as error:
        assert (error.path, error.line, error.field) == (str(path), index + 1, COLUMN_NAMES[column]), str(error)
        assert len(str(error)) < 300 and "\n" not in str(error)
    else:
        value = fields[column]  # accepted: it must have been valid for its column after all
        if column == 0:
            assert value in ("0", "1")
        elif column <= 13:
            assert -(2**63) <= int(value) < 2**63
        else:
            assert len(value) <= 16 and int(value, 16) >= 0


@PROPS
@given(junk=st.binary(min_size=1, max_size=400))
def test_arbitrary_bytes_parse_or_give_a_clear_error(tmp_path_factory, junk):
    path = tmp_path_factory.mktemp("junk") / "junk.tsv"
    path.write_bytes(junk)
    try:
        load_tsv([path], TABLES)
    except CriteoDataError as error:
        assert str(error).startswith(str(path)) and "\n" not in str(error)


def test_a_dense_field_of_400_digits_is_out_of_range(tmp_path):
    from tests.test_bad_input import row

    path = tmp_path / "d.tsv"
    path.write_text(row() + "\n" + row(I4="9" * 400) + "\n")
    with pytest.raises(CriteoDataError) as info:
        load_tsv([path], TABLES)
    assert (info.value.line, info.value.field) == (2, "I4") and "out of range" in str(info.value)
    assert len(str(info.value)) < 200
