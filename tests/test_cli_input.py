"""The command line on odd input: every option and CPR_* variable is checked with one line and exit 2 before
anything heavy loads; Ctrl-C is one line and exit 130; an output folder deleted mid-run is one line, not a
traceback; `--help` imports neither torch nor TorchRec."""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpr.train import main

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--model", "small", "--rows", "100", "--synthetic-rows", "3000", "--batch-size", "64", "--no-progress"]


def cli(out: Path, *args: str, **kwargs) -> tuple[int, str, str]:
    """`python -m cpr.train` in this process: (exit code, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main([*SMALL, "--out", str(out), *args], **kwargs)
        except SystemExit as exit_:  # argparse's own errors (not a number, an unknown choice)
            code = exit_.code
    return code, stdout.getvalue(), stderr.getvalue()


def assert_one_line_exit_2(result: tuple[int, str, str], *names: str) -> None:
    code, _, err = result
    assert code == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    for name in names:
        assert name in err, err


# -- the values the fault campaign found (issue 23, item 7) ---------------------------------------------------

HUGE = "99999999999999999999"


@pytest.mark.parametrize("option, value, named", [
    ("--steps", HUGE, "--steps"),
    ("--epochs", HUGE, "--epochs"),
    ("--batch-size", HUGE, "--batch-size"),
    ("--seed", HUGE, "--seed"),
    ("--failures", HUGE, "--failures"),
    ("--nproc", HUGE, "--nproc"),
    ("--nproc", "257", "--nproc must be <= 256"),
    ("--epochs", "1e308", "--epochs"),
    ("--seed", "-1", "--seed must be >= 0"),
    ("--lr", "1e308", "--lr"),
    ("--embedding-lr", "1e308", "--embedding-lr"),
    ("--rows", HUGE, "--rows"),
    ("--keep-last", HUGE, "--keep-last"),
    ("--interval-steps", HUGE, "--interval-steps"),
    ("--max-restarts", HUGE, "--max-restarts"),
    ("--mtbf-hours", "1e308", "--mtbf-hours"),
    ("--job-hours", "1e308", "--job-hours"),
    ("--zipf-alpha", "1e308", "--zipf-alpha"),
    ("--steps", "abc", "--steps"),
    ("--policy", "fastest", "--policy"),
])
def test_odd_option_values_are_one_line_and_exit_2(tmp_path, option, value, named):
    assert_one_line_exit_2(cli(tmp_path / "out", option, value), named)


# Each whole-number option's valid range, as the options promise it (an option outside is refused).
INT_RANGES = {"--steps": (1, 2**31 - 1), "--batch-size": (1, 2**31 - 1), "--seed": (0, 2**32 - 1),
              "--rows": (1, 2**31 - 1), "--failures": (0, 2**31 - 1), "--keep-last": (1, 10**6),
              "--interval-steps": (1, 2**31 - 1), "--log-every": (1, 2**31 - 1), "--nproc": (1, 256),
              "--num-shards": (1, 1024), "--max-restarts": (0, 10**6), "--nodes": (1, 10**7)}
FLOAT_OPTIONS = ("--epochs", "--lr", "--embedding-lr", "--target-pls", "--mtbf-hours", "--job-hours", "--zipf-alpha",
                 "--eval-fraction", "--save-fraction", "--sample-rate")


def out_of_range(option: str) -> st.SearchStrategy[str]:
    low, high = INT_RANGES[option]
    return st.one_of(st.integers(max_value=low - 1), st.integers(min_value=high + 1)).map(str)


odd_floats = st.one_of(st.sampled_from(["nan", "inf", "-inf", "1e308", "-1e308", "1e309", "0", "-0.0"]),
                       st.floats(min_value=1e10, allow_infinity=True).map(repr),
                       st.floats(max_value=-1e-300).map(repr))
not_numbers = st.text(alphabet="abcxyz-_.,:/ ", min_size=1, max_size=8).filter(lambda t: not t.strip(" -.").isdigit())


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_out_of_range_or_non_numeric_value_is_one_line_and_exit_2(tmp_path_factory, data):
    """Hypothesis draws an option and a value the option cannot take (out of its range, non-finite or not a
    number at all): the run never starts, and the error is one line naming the option."""
    kind = data.draw(st.sampled_from(["int", "float", "text"]))
    if kind == "int":
        option = data.draw(st.sampled_from(sorted(INT_RANGES)))
        value = data.draw(out_of_range(option))
    elif kind == "float":
        option = data.draw(st.sampled_from(FLOAT_OPTIONS))
        value = data.draw(odd_floats)
    else:
        option = data.draw(st.sampled_from([*sorted(INT_RANGES), *FLOAT_OPTIONS]))
        value = data.draw(not_numbers)
    if kind == "float" and value in ("0", "-0.0") and option in ("--zipf-alpha",):
        value = "-1"  # 0 is a valid skew (uniform ids)
    result = cli(tmp_path_factory.mktemp("odd") / "out", f"{option}={value}")
    assert_one_line_exit_2(result, option)


def test_an_unknown_checkpoint_protocol_is_one_line(tmp_path):
    assert_one_line_exit_2(cli(tmp_path / "out", "--steps", "2", "--policy", "full", "--failures", "0",
                               "--checkpoint-dir", "nosuchproto://x"), "nosuchproto://x", "Protocol not known")


# -- environment variables -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, value", [
    *((name, value) for name in ("CPR_COLLECTIVE_TIMEOUT_S", "CPR_REJOIN_TIMEOUT_S", "CPR_DEATH_NOTICE_S")
      for value in ("abc", "0", "nan", "-1", "inf", "1e308", "")),
    ("CPR_CACHE_MAX_MB", "abc"), ("CPR_CACHE_MAX_MB", "-1"), ("CPR_CACHE_MAX_MB", "nan"),
    ("CPR_STORE", "no-port"), ("CPR_STORE", "host:"),
])
def test_odd_environment_values_are_one_line_and_exit_2(tmp_path, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert_one_line_exit_2(cli(tmp_path / "out", "--steps", "2"), name)


def test_environment_folders_that_are_files_are_refused(tmp_path, monkeypatch):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for name in ("CPR_CACHE", "CPR_TRACE_COLLECTIVES"):
        with monkeypatch.context() as env:
            env.setenv(name, str(a_file))
            assert_one_line_exit_2(cli(tmp_path / "out", "--steps", "2"), name, "a folder")


def test_a_bad_environment_value_is_reported_before_torch_loads(tmp_path):
    """The real entry point, in a fresh process: one line, exit 2, and torch never imported (-X importtime
    lists every module the process imported)."""
    env = {**os.environ, "CPR_COLLECTIVE_TIMEOUT_S": "abc"}
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "cpr.train", "--steps", "2", "--out",
                             str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert result.returncode == 2 and lines == ["error: environment variable CPR_COLLECTIVE_TIMEOUT_S='abc': expected "
                                                "seconds, a number in (0, 10000000]"], result.stderr[-2000:]
    assert not imported(result.stderr, "torch")


def imported(importtime: str, package: str) -> bool:
    """Whether `-X importtime` output lists `package` (or one of its modules)."""
    names = {line.rsplit("|", 1)[-1].strip() for line in importtime.splitlines() if line.startswith("import time:")}
    return any(name == package or name.startswith(package + ".") for name in names)


def test_help_shows_defaults_and_imports_no_torch():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "cpr.train", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not imported(result.stderr, "torch") and not imported(result.stderr, "torchrec")
    text = " ".join(result.stdout.split())
    for shown in ("(default: 128)", "(default: kaggle)", "(default: production)", "(default: runs/latest)"):
        assert shown in text, shown


# -- during a run ------------------------------------------------------------------------------------------------

def test_out_deleted_during_the_run_is_one_line(tmp_path):
    from tests.stores import HookedStore

    out = tmp_path / "out"

    def delete_out(staging, step, kind):
        if step >= 4 and out.exists():
            shutil.rmtree(out)

    def make_store(directory, keep_last, lock):
        return HookedStore(directory, keep_last=keep_last, lock=lock, before_commit=delete_out)

    result = cli(out, "--steps", "8", "--policy", "full", "--failures", "0", "--interval-steps", "4", "--sync-save",
                 "--checkpoint-dir", str(tmp_path / "ckpt"), make_store=make_store)
    code, _, err = result
    lines = err.strip().splitlines()  # what the run printed as it went, then the error
    assert code == 2 and "Traceback" not in err and [line for line in lines if line.startswith("error")] == lines[-1:], err
    assert lines[-1].startswith(f"error: --out {out}: cannot write summary.json"), err


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "cpr.train", *SMALL, "--steps", "100000", "--policy", "partial",
                             "--failures", "0", "--interval-steps", "20", "--log-every", "5", "--out", str(out)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # it is training
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate(timeout=10)
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted"), stderr[-3000:]
    assert sum(line.startswith("error") for line in stderr.splitlines()) == 1, stderr[-3000:]
