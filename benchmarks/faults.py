"""The fault and bad-input campaign of issue 13, as tries with outcomes. Prints (and writes) one JSON object.

Each try damages a save, a data file or an option the way a fault or a new user would, then runs the store,
a CPRCheckpointer's recovery or `python -m cpr.train` (in this process) and classifies what happened:
* "clear error": one line naming the problem, exit 2 (or the documented exception of the API);
* "fallback": the damaged save is skipped with a warning naming it and the previous save is what loads;
* "handled": the right outcome is to go on (a killed lock holder, a 2-row file whose AUC is undefined);
* "silent acceptance": the damage went unnoticed;
* "traceback": any other exception escaped.
The campaign passes when there are 0 silent acceptances and 0 tracebacks (exit 1 otherwise).

A save is `save-<step>-<kind>/` with `commit.json` and one folder per part (`domain-00000/` holds rows [0, 5)
of the 10-row table `t` of tests/test_storage.py), each with `manifest.json` and `tensors.bin`. Metadata
defects are tried on both levels: the part manifest (as damaged, and "resealed" with a recomputed sha256,
which the commit record's crc32 must still catch) and the commit record.

    .venv/bin/python benchmarks/faults.py [--out runs/faults.json]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the defect catalogues are shared with the tests

from cpr import CPRCheckpointer  # noqa: E402
from cpr.storage import CheckpointStore, DirectoryLockedError, SkippedSaveWarning, load_newest  # noqa: E402
from cpr.storage.manifest import MAX_MANIFEST_BYTES  # noqa: E402
from cpr.storage.store import COMMIT_FILE, TENSOR_FILE  # noqa: E402
from cpr.train import main as train_main, quiet_dependencies  # noqa: E402
from tests.conftest import ROWS  # noqa: E402
from tests.test_bad_input import row  # noqa: E402
from tests.test_checkpointer import make_batch, plain_ebc  # noqa: E402
from tests.test_metadata_props import (  # noqa: E402
    COMMIT_DEFECTS,
    DEFECTS,
    MOMENTUM,
    PART,
    commit_data,
    commit_defect_text,
    defect_text,
    manifest_data,
    write_manifest_text,
)
from tests.test_save_faults import CHILD as SUBSET_SAVE_CHILD  # noqa: E402
from tests.test_save_faults import FILES, TARGETS, point_entry_at  # noqa: E402
from tests.test_storage import CHILD as FULL_SAVE_CHILD  # noqa: E402
from tests.test_storage import kill_mid_save, restore, save_full, save_subset  # noqa: E402

CLI = ["--model", "small", "--rows", "100", "--batch-size", "4", "--no-progress"]
Outcome = str


def _stores(tmp: Path, kind: str = "full"):
    """A store whose newest save is of `kind` (subsets on top of a full save); (store, newest record)."""
    store = CheckpointStore(tmp / "ckpt")
    save_full(store, 1)
    if kind == "full":
        return store, save_full(store, 2)
    save_subset(store, 2, [1, 2])
    return store, save_subset(store, 3, [2, 3])


def _recording(load: Callable[[], int]) -> tuple[int, bool, list[str]]:
    """Run `load` (which returns the step of what it loaded) recording warnings: (step, skipped, messages)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = load()
    messages = [str(w.message) for w in caught if issubclass(w.category, SkippedSaveWarning)]
    return step, bool(messages), messages


def _after_damage(store: CheckpointStore, newest) -> Outcome:
    """Fallback when the newest save is skipped with a warning naming it and only older saves are used: the
    previous full save for domain 0 (a full save damaged), or no row from the subset (a subset damaged)."""
    if newest.kind == "full":
        def load() -> int:
            return load_newest(store, store.saves(), PART)[0].step
    else:
        def load() -> int:
            return int(restore(store)["saved_step"].max())
    step, _, messages = _recording(load)
    named = any(newest.path.name in m for m in messages)
    return "fallback" if step < newest.step and named else "silent acceptance"


def manifest_try(defect: str, kind: str, seal: str) -> Callable[[Path], Outcome]:
    def attempt(tmp: Path) -> Outcome:
        store, newest = _stores(tmp, kind)
        part = newest.path / PART
        write_manifest_text(part, defect_text(manifest_data(part), defect, seal), seal)
        return _after_damage(store, newest)
    return attempt


def commit_try(defect: str, kind: str) -> Callable[[Path], Outcome]:
    def attempt(tmp: Path) -> Outcome:
        store, newest = _stores(tmp, kind)
        (newest.path / COMMIT_FILE).write_text(commit_defect_text(commit_data(newest.path), defect, reseal=False))
        return _after_damage(store, newest)
    return attempt


def name_try(file: str) -> Callable[[Path], Outcome]:
    """Domain 0's momentum re-declared (resealed, recommitted) as `file`, which holds the right bytes."""
    def attempt(tmp: Path) -> Outcome:
        store, newest = _stores(tmp)
        content = b"outside\n"
        if file.startswith(".."):
            (tmp / "x").write_bytes(content)
        point_entry_at(newest, MOMENTUM, file, content)
        return _after_damage(store, newest)
    return attempt


def special_try(target: str, how: str) -> Callable[[Path], Outcome]:
    """`target` (see TARGETS) replaced by a symbolic link to an identical copy, a FIFO, a link to a device, or
    made larger than allowed."""
    def attempt(tmp: Path) -> Outcome:
        store, newest = _stores(tmp)
        path = newest.path / TARGETS[target]
        if how == "symlink to an identical copy":
            copy = tmp / "copy"
            (shutil.copytree if path.is_dir() else shutil.copy2)(path, copy)
            (shutil.rmtree if path.is_dir() else os.unlink)(path)
            path.symlink_to(copy, target_is_directory=copy.is_dir())
        elif how == "FIFO":
            path.unlink()
            os.mkfifo(path)
        elif how == "device":
            path.unlink()
            path.symlink_to("/dev/zero")
        elif target == TENSOR_FILE:  # oversize
            with open(path, "ab") as f:
                f.write(b"\0" * 4)
        else:
            os.truncate(path, MAX_MANIFEST_BYTES + 1)  # sparse
        return _after_damage(store, newest)
    return attempt


def kill_try(kind: str) -> Callable[[Path], Outcome]:
    """SIGKILL a writer in the middle of a save of `kind`; the newest committed saves must be what loads."""
    def attempt(tmp: Path) -> Outcome:
        kill_mid_save(FULL_SAVE_CHILD if kind == "full" else SUBSET_SAVE_CHILD, str(tmp / "ckpt"))
        store = CheckpointStore(tmp / "ckpt")  # the killed writer's lock must not block
        committed = [(s.step, s.kind) for s in store.saves()]
        if kind == "full":
            dense = store.load_part(store.saves()[-1], "dense").tensors["dense/w"]
            intact = torch.equal(dense, torch.arange(1 << 18, dtype=torch.float32).reshape(-1, 64))
            return "fallback" if committed == [(1, "full")] and intact else "silent acceptance"
        rows = restore(store)["saved_step"].tolist()
        return "fallback" if committed == [(1, "full"), (2, "subset")] and rows == [1, 2, 2, 1, 1] else "silent acceptance"
    return attempt


def checkpointer_try(policy: str, damage: str) -> Callable[[Path], Outcome]:
    """A CPRCheckpointer (plain EBC, 2 domains, `policy`) with two full saves recovers domain 0 after the newest
    full save was damaged (`damage`: a flipped byte in domain 0's tensors.bin, or a torn commit.json): its
    rows must come back as the previous full save holds them, with a warning naming the damaged save."""
    def attempt(tmp: Path) -> Outcome:
        ebc, optimizer = plain_ebc(ROWS, dim=4)
        ckpt = CPRCheckpointer(ebc, optimizer, tmp / "ckpt", policy=policy, num_domains=2, total_steps=100,
                               interval_steps=3)
        gen = torch.Generator().manual_seed(7)
        for _ in range(3):  # the initial save at step 0, and the policy's save at step 3
            ckpt.observe(make_batch(gen))
            with torch.no_grad():
                for table in ckpt.tables.tables:
                    ckpt.tables.weight(table).add_(1.0)  # stands in for an optimizer step: every row moves
            ckpt.step()
        ckpt.flush()  # the step-3 save is written in the background: wait for its commit
        older, newest = ckpt.store.saves("full")[-2:]
        expected = ckpt.store.load_part(older, PART).tensors
        if all(torch.equal(t, ckpt.store.load_part(newest, PART).tensors[name]) for name, t in expected.items()):
            raise AssertionError("training changed nothing between the two saves: the try cannot tell them apart")
        if damage == "flipped byte":
            path = newest.folder / PART / TENSOR_FILE
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            path.write_bytes(bytes(data))
        else:
            text = (newest.folder / COMMIT_FILE).read_text()
            (newest.folder / COMMIT_FILE).write_text(text[: len(text) // 2])
        _, _, messages = _recording(lambda: ckpt.recover([0]).step)
        domain_rows = {table: ckpt.tables.weight(table)[slice(*ckpt.layout.rows(table, 0))] for table in ckpt.tables.tables}
        restored = all(torch.equal(rows, expected[f"emb/{table}/weight"]) for table, rows in domain_rows.items())
        named = any(newest.folder.name in m for m in messages)
        ckpt.close()
        return "fallback" if restored and named else "silent acceptance"
    return attempt


def second_writer(tmp: Path) -> Outcome:
    first = CheckpointStore(tmp / "ckpt")
    try:
        CheckpointStore(tmp / "ckpt")
    except DirectoryLockedError as e:
        return "clear error" if f"pid {os.getpid()}" in str(e) else "silent acceptance"
    finally:
        first.close()
    return "silent acceptance"


def cli_try(*args: str, data: list[str] | None = None, expect: str = "clear error") -> Callable[[Path], Outcome]:
    def attempt(tmp: Path) -> Outcome:
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


def tries() -> dict[str, Callable[[Path], Outcome]]:
    out: dict[str, Callable[[Path], Outcome]] = {}
    for kind in ("full", "subset"):
        for defect in DEFECTS:
            for seal in ("stale", "resealed"):
                label = "" if seal == "stale" else ", resealed"
                out[f"{kind} save, part manifest{label}: {defect}"] = manifest_try(defect, kind, seal)
        for defect in COMMIT_DEFECTS:
            out[f"{kind} save, commit record: {defect}"] = commit_try(defect, kind)
        out[f"SIGKILL during a {kind} save"] = kill_try(kind)
    for file in ("../../../x", "/etc/hostname"):
        out[f"tensor named {file}"] = name_try(file)
    for target in TARGETS:
        out[f"{target}: symlink to an identical copy"] = special_try(target, "symlink to an identical copy")
    for target in FILES:
        for how in ("FIFO", "device", "oversize"):
            out[f"{target}: {how}"] = special_try(target, how)
    out["CPRCheckpointer partial recovery, newest full save's domain part flipped"] = checkpointer_try("partial", "flipped byte")
    out["CPRCheckpointer full recovery, newest full save's commit record torn"] = checkpointer_try("full", "torn commit")
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
