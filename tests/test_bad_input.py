"""Every kind of bad Criteo input raises a `CriteoDataError` naming the file, line and field."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dlrm.data import CriteoDataError
from dlrm.data.schema import table_rows
from dlrm.data.tsv import TsvReader, load_tsv

TABLES = table_rows(1000)
REPO = Path(__file__).resolve().parents[1]


def row(**fields: str) -> str:
    """A valid 40-column line, with fields replaced by name (label, I1..I13, C1..C26)."""
    names = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    values = {"label": "0", **{f"I{i}": str(i) for i in range(1, 14)}, **{f"C{i}": f"{i:08x}" for i in range(1, 27)}}
    values.update(fields)
    return "\t".join(values[n] for n in names)


def write(tmp_path: Path, lines: list[str], name: str = "data.tsv", newline: str = "\n") -> Path:
    path = tmp_path / name
    path.write_bytes("".join(line + newline for line in lines).encode())
    return path


def error_of(path: Path, **kwargs) -> CriteoDataError:
    with pytest.raises(CriteoDataError) as info:
        load_tsv([path], TABLES, **kwargs)
    return info.value


@pytest.mark.parametrize(
    "bad_line, field, reason",
    [
        (row(C7="zz!"), "C7", "'zz!' is not a hexadecimal id"),
        (row(C26="12345678901234567"), "C26", "longer than 16 hex digits"),
        (row(I3="abc"), "I3", "'abc' is not an integer"),
        (row(I1="1.5"), "I1", "'1.5' is not an integer"),
        (row(I13="-"), "I13", "'-' is not an integer"),
        (row(label="2"), "label", "'2' is not a 0/1 label"),
        (row(label=""), "label", "'' is not a 0/1 label"),
        (row() + "\textra", None, "expected 40 tab-separated columns (label, I1..I13, C1..C26), got 41"),
        (row().rsplit("\t", 1)[0], None, "expected 40 tab-separated columns (label, I1..I13, C1..C26), got 39"),
        ("0\t1\t2", None, "got 3"),
    ],
)
def test_bad_field_names_file_line_and_field(tmp_path, bad_line, field, reason):
    path = write(tmp_path, [row()] * 11 + [bad_line] + [row()] * 3)
    error = error_of(path)
    assert (error.path, error.line, error.field) == (str(path), 12, field)
    assert reason in str(error)
    prefix = f"{path}:12: field {field}: " if field else f"{path}:12: "
    assert str(error).startswith(prefix)


def test_message_format(tmp_path):
    path = write(tmp_path, [row(), row(C7="zz!")], name="x.tsv")
    assert str(error_of(path)) == f"{path}:2: field C7: 'zz!' is not a hexadecimal id"


def test_error_line_counts_across_chunks(tmp_path):
    path = write(tmp_path, [row()] * 25 + [row(I2="x")])
    error = error_of(path, chunk_rows=10)
    assert (error.line, error.field) == (26, "I2")


def test_missing_file(tmp_path):
    error = error_of(tmp_path / "nope.tsv")
    assert error.line is None and "no such file" in str(error) and "nope.tsv" in str(error)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.tsv"
    path.write_bytes(b"")
    assert str(error_of(path)) == f"{path}: file is empty"


def test_only_blank_lines(tmp_path):
    path = write(tmp_path, ["", ""])
    assert "only blank lines" in str(error_of(path))


def test_folder_without_data_files(tmp_path):
    (tmp_path / "notes.md").write_text("x")
    assert "no *.tsv" in str(error_of(tmp_path))


def test_label_less_test_set_is_refused_for_training(tmp_path):
    label_less = row().split("\t", 1)[1]
    path = write(tmp_path, [label_less] * 3, name="test.txt")
    for skip in (False, True):  # a wrong file, not bad rows: skipping does not hide it
        error = error_of(path, skip_bad_rows=skip)
        assert error.line == 1 and "label-less" in str(error) and "39 columns" in str(error)


def test_crlf_line_endings_read_like_lf(tmp_path):
    lines = [row(label=str(i % 2), I2="-2", C3="") for i in range(5)] + [row(I4="")]
    lf = load_tsv([write(tmp_path, lines, "lf.tsv")], TABLES)
    crlf = load_tsv([write(tmp_path, lines, "crlf.tsv", newline="\r\n")], TABLES)
    assert len(crlf) == 6
    for a, b in ((lf.dense, crlf.dense), (lf.sparse, crlf.sparse), (lf.labels, crlf.labels)):
        np.testing.assert_array_equal(a, b)


def test_crlf_errors_still_locate_the_field(tmp_path):
    path = write(tmp_path, [row(), row(C1="xyz")], newline="\r\n")
    error = error_of(path)
    assert (error.line, error.field) == (2, "C1")


def test_blank_lines_are_ignored(tmp_path):
    path = write(tmp_path, [row(), "", row(label="1"), ""])
    arrays = load_tsv([path], TABLES)
    np.testing.assert_array_equal(arrays.labels, [0.0, 1.0])


def test_skip_bad_rows_drops_and_counts(tmp_path):
    bad = [row(C7="zz!"), row(I3="abc"), row(label="7"), "0\t1", row(C1="q"), row(C2="q"), row(C3="q")]
    good = [row(label="1")] * 10
    path = write(tmp_path, good[:5] + bad + good[5:])
    reader = TsvReader([path], TABLES, skip_bad_rows=True)
    arrays = load_tsv([path], TABLES, skip_bad_rows=True)
    list(reader)
    assert len(arrays) == 10 and (arrays.labels == 1).all()
    assert (reader.stats.rows_read, reader.stats.rows_skipped) == (10, 7)
    assert len(reader.stats.skip_reasons) == 5  # only the first few are kept
    assert reader.stats.skip_reasons[0] == f"{path}:6: field C7: 'zz!' is not a hexadecimal id"
    assert reader.stats.skip_reasons[3].startswith(f"{path}:9: expected 40")


def run_convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dlrm.data.convert", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_convert_cli_bad_file_exits_cleanly(tmp_path):
    path = write(tmp_path, [row(), row(), row(I5="5x")])
    result = run_convert(str(path), str(tmp_path / "out"))
    assert result.returncode == 2
    assert f"error: {path}:3: field I5: '5x' is not an integer" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "out").glob("*.npy"))


def test_convert_cli_label_less_file(tmp_path):
    path = write(tmp_path, [row().split("\t", 1)[1]], name="test.txt")
    result = run_convert(str(path), str(tmp_path / "out"))
    assert result.returncode == 2 and "label-less" in result.stderr and "Traceback" not in result.stderr


# -- the command line: every data and option defect is one line and exit 2 -----------------------------------

CLI_SMALL = ["--model", "small", "--rows", "100", "--batch-size", "4", "--no-progress"]


def cli(tmp_path: Path, *args: str) -> tuple[int, str, str]:
    """`python -m cpr.train` in this process: (exit code, stdout, stderr)."""
    import contextlib
    import io

    from cpr.train import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*CLI_SMALL, "--out", str(tmp_path / "out"), *args])
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    "option, value, reason",
    [
        ("--log-every", "0", "--log-every must be >= 1"),
        ("--epochs", "inf", "--epochs must be a finite number"),
        ("--synthetic-rows", "0", "--synthetic-rows must be >= 2"),
        ("--num-shards", "100000000", "--num-shards must be <= 1024"),
        ("--lr", "inf", "--lr must be a finite number"),
        ("--lr", "nan", "--lr must be a finite number"),
        ("--zipf-alpha", "nan", "--zipf-alpha must be a finite number"),
        ("--zipf-alpha", "-1", "--zipf-alpha must be >= 0"),
        ("--eval-every", "-1", "--eval-every must be >= 0"),
        ("--target-pls", "nan", "--target-pls must be a finite number"),
    ],
)
def test_bad_options_exit_2_with_one_line(tmp_path, option, value, reason):
    code, _, err = cli(tmp_path, option, value)
    assert code == 2 and err.startswith("error: ") and reason in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    "lines, reason",
    [
        ([row()], "1 usable rows: holding out 1 for evaluation leaves none for training"),
        ([row(), row(I4="9" * 400)], ":2: field I4: "),
    ],
)
def test_bad_data_exits_2_with_one_line(tmp_path, lines, reason):
    path = write(tmp_path, lines)
    code, _, err = cli(tmp_path, "--data", str(path), "--steps", "1")
    assert code == 2 and reason in err and len(err.strip().splitlines()) == 1 and len(err) < 300, err


def test_two_rows_train_and_report_undefined_auc(tmp_path):
    import json

    path = write(tmp_path, [row(label="1"), row(label="0")])
    code, out, err = cli(tmp_path, "--data", str(path), "--steps", "1")
    assert code == 0, err
    assert "AUC n/a" in out  # one held-out row: one class, AUC undefined rather than 0
    assert "plan:" not in out  # --policy none recovers nothing, so there is no plan to explain
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["auc"] is None


def test_evaluate_reports_auc_only_with_both_classes():
    import torch

    from cpr.loop import evaluate

    class Fixed(torch.nn.Module):
        def forward(self, batch):
            return None, (None, batch["logits"], batch["labels"])

    one = [{"logits": torch.tensor([0.3, -1.0]), "labels": torch.tensor([1.0, 1.0])}]
    both = [{"logits": torch.tensor([0.3, -1.0]), "labels": torch.tensor([1.0, 0.0])}]
    assert evaluate(Fixed(), one)["auc"] is None
    assert evaluate(Fixed(), both)["auc"] == pytest.approx(1.0)
