"""The fault and bad-input campaign of issue 13, as tries with outcomes. Prints (and writes) one JSON object.

Each try damages a save, a data file or an option the way a fault or a new user would, then runs the store or
`python -m cpr.train` (in this process) and classifies what happened:
* "clear error": one line naming the problem, exit 2 (or the documented exception of the API);
* "fallback": the damaged save is skipped with a warning naming it and the previous save is loaded;
* "handled": the right outcome is to go on (a killed lock holder, a 2-row file whose AUC is undefined);
* "silent acceptance": the damage went unnoticed;
* "traceback": any other exception escaped.
The campaign passes when there are 0 silent acceptances and 0 tracebacks (exit 1 otherwise).

    .venv/bin/python benchmarks/faults.py [--out runs/faults.json]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import traceback
import warnings
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the defect catalogue is shared with the tests

from cpr.storage import CheckpointStore, DirectoryLockedError, SkippedSaveWarning  # noqa: E402
from cpr.storage.manifest import MANIFEST_FILE  # noqa: E402
from cpr.train import main as train_main, quiet_dependencies  # noqa: E402
from tests.test_bad_input import row  # noqa: E402
from tests.test_metadata_props import DEFECTS, entry_of, manifest_data, write_manifest  # noqa: E402
from tests.test_save_faults import CHILD as SUBSET_SAVE_CHILD  # noqa: E402
from tests.test_storage import CHILD as FULL_SAVE_CHILD  # noqa: E402
from tests.test_storage import TABLES, kill_mid_save, save_full, save_subset, subset_tensors, tensor_file  # noqa: E402

CLI = ["--model", "small", "--rows", "100", "--batch-size", "4", "--no-progress"]


def _stores(tmp: Path, kind: str = "full"):
    """A store with two saves of `kind` (a full save below subsets); returns (store, newest record). Every save
    holds `dense/w` and `emb/t/weight`, which the defect catalogue damages."""
    store = CheckpointStore(tmp / "ckpt")
    save_full(store, 1)
    if kind == "full":
        return store, save_full(store, 2)
    save_subset(store, 2, [1, 2])
    subset = {**subset_tensors(3, [2, 3]), "dense/w": torch.ones(3, 2)}
    return store, store.save(3, "subset", "mfu", subset, tables=TABLES)


def _after_damage(store: CheckpointStore, newest) -> str:
    """Fallback when the newest save is skipped with a warning naming it and an older one loads."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = store.latest_loadable()
    named = any(issubclass(w.category, SkippedSaveWarning) and newest.path.name in str(w.message) for w in caught)
    if loaded.manifest.step != newest.step and named:
        return "fallback"
    return "silent acceptance"


def metadata_try(defect: str, kind: str) -> Callable[[Path], str]:
    def attempt(tmp: Path) -> str:
        store, newest = _stores(tmp, kind)
        data = manifest_data(newest.path)
        DEFECTS[defect][0](data)
        if defect == "deep nesting":
            (newest.path / MANIFEST_FILE).write_text(json.dumps(data).replace('"__DEEP__"', "[" * 5000 + "]" * 5000))
        else:
            (newest.path / MANIFEST_FILE).write_text(json.dumps(data, allow_nan=True))
        return _after_damage(store, newest)
    return attempt


def path_try(how: str) -> Callable[[Path], str]:
    def attempt(tmp: Path) -> str:
        store, newest = _stores(tmp)
        path = tensor_file(newest, "dense/w")
        if how in ("../../../x", "/etc/hostname"):
            content = b"outside\n"
            target = tmp / "x" if how.startswith("..") else None
            if target is not None:
                target.write_bytes(content)
            data = manifest_data(newest.path)
            entry_of(data, "dense/w").update(file=how, nbytes=len(content), checksum=zlib.crc32(content), dtype="uint8",
                                             shape=[len(content)])
            data["nbytes"] = sum(t["nbytes"] for t in data["tensors"])
            write_manifest(newest.path, data, reseal=True)
        elif how == "symlink to an identical file":
            copy = tmp / "copy.bin"
            copy.write_bytes(path.read_bytes())
            path.unlink()
            path.symlink_to(copy)
        elif how == "FIFO":
            path.unlink()
            os.mkfifo(path)
        elif how == "device":
            path.unlink()
            path.symlink_to("/dev/zero")
        return _after_damage(store, newest)
    return attempt


def kill_try(kind: str) -> Callable[[Path], str]:
    """SIGKILL a writer in the middle of a save of `kind`; the newest committed saves must be what loads."""
    def attempt(tmp: Path) -> str:
        kill_mid_save(FULL_SAVE_CHILD if kind == "full" else SUBSET_SAVE_CHILD, str(tmp / "ckpt"))
        store = CheckpointStore(tmp / "ckpt")  # the killed writer's lock must not block
        loaded = store.latest_loadable("full")
        committed = [m.step for m in store.saves("subset")] == ([] if kind == "full" else [2])
        return "fallback" if loaded.manifest.step == 1 and committed else "silent acceptance"
    return attempt


def second_writer(tmp: Path) -> str:
    first = CheckpointStore(tmp / "ckpt")
    try:
        CheckpointStore(tmp / "ckpt")
    except DirectoryLockedError as e:
        return "clear error" if f"pid {os.getpid()}" in str(e) else "silent acceptance"
    finally:
        first.close()
    return "silent acceptance"


def cli_try(*args: str, data: list[str] | None = None, expect: str = "clear error") -> Callable[[Path], str]:
    def attempt(tmp: Path) -> str:
        extra = list(args)
        if data is not None:
            path = tmp / "data.tsv"
            path.write_text("".join(line + "\n" for line in data))
            extra += ["--data", str(path), "--steps", "1"]
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = train_main([*CLI, "--out", str(tmp / "out"), *extra])
        one_line = err.getvalue().startswith("error: ") and len(err.getvalue().strip().splitlines()) == 1
        if code == 2 and one_line:
            return "clear error"
        if expect == "handled" and code == 0 and "AUC n/a" in out.getvalue() and "plan:" not in out.getvalue():
            return "handled"
        return "silent acceptance"
    return attempt


def tries() -> dict[str, Callable[[Path], str]]:
    out: dict[str, Callable[[Path], str]] = {}
    for kind in ("full", "subset"):
        for defect in DEFECTS:
            out[f"{kind} save metadata: {defect}"] = metadata_try(defect, kind)
        out[f"SIGKILL during a {kind} save"] = kill_try(kind)
    for how in ("../../../x", "/etc/hostname", "symlink to an identical file", "FIFO", "device"):
        out[f"tensor file: {how}"] = path_try(how)
    out["second writer on one checkpoint folder"] = second_writer
    out["dense field of 400 digits"] = cli_try(data=[row(), row(), row(I3="9" * 400)])
    out["1-row file"] = cli_try(data=[row()])
    out["2-row file (one class held out)"] = cli_try(data=[row(label="1"), row()], expect="handled")
    for option, value in (("--log-every", "0"), ("--epochs", "inf"), ("--synthetic-rows", "0"),
                          ("--num-shards", "100000000"), ("--lr", "inf"), ("--zipf-alpha", "nan"), ("--eval-every", "-1")):
        out[f"{option} {value}"] = cli_try(option, value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    quiet_dependencies()
    results = {}
    for name, attempt in tries().items():
        with tempfile.TemporaryDirectory(prefix="cpr-faults-") as tmp:
            try:
                outcome, detail = attempt(Path(tmp)), None
            except Exception as e:  # noqa: BLE001 - classifying escapes is the point
                outcome, detail = "traceback", "".join(traceback.format_exception_only(e)).strip()
        results[name] = {"outcome": outcome, **({"detail": detail} if detail else {})}
    counts = Counter(r["outcome"] for r in results.values())
    report = {"tries": len(results), "outcomes": dict(sorted(counts.items())), "results": results}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0 if counts["silent acceptance"] == 0 and counts["traceback"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
