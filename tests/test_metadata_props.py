"""Save metadata is verified like data, at both levels: a part's `manifest.json` and the save's `commit.json`.

Every defect makes that save corrupt, and the store falls back to the previous save with a warning; no other
exception escapes. A part manifest is checked three ways: its bytes against the crc32 the commit record names,
its own sha256 and its typed schema. The tests damage it at three seal levels:
* "stale": the defect alone, as a disk or a hand edit leaves it;
* "resealed": the manifest's sha256 recomputed, so only the commit record's crc32 can catch it;
* "recommitted": the commit record's crc32 (and the commit record's own checksum) recomputed too, so only the
  schema can catch it; a self-consistent, sealed manifest is then the writer's word.
"""
from __future__ import annotations

import json
import shutil
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cpr.storage import CheckpointStore, CorruptCheckpointError, Manifest, SkippedSaveWarning, load_newest
from cpr.storage.manifest import CHECKSUM_FIELD, MANIFEST_FILE, content_checksum
from cpr.storage.store import COMMIT_FILE, SaveInfo
from tests.test_storage import DIM, restore, save_full, save_subset

PART = "domain-00000"  # the part the defects damage: rows [0, 5) of table t
MOMENTUM = "emb/t/opt/momentum"
SEALS = ("stale", "resealed", "recommitted")


def manifest_data(part_folder: Path) -> dict:
    return json.loads((part_folder / MANIFEST_FILE).read_text())


def commit_data(save_folder: Path) -> dict:
    return json.loads((save_folder / COMMIT_FILE).read_text())


def canonical(data: dict) -> str:
    """The writer's serialisation of a manifest (compact, sorted keys): unchanged data gives unchanged bytes."""
    return json.dumps(data, separators=(",", ":"), sort_keys=True)


def write_commit(save_folder: Path, data: dict, reseal: bool) -> None:
    """Write `data` as the commit record; `reseal` recomputes its checksum, so only its schema can catch a defect."""
    if reseal:
        data = {**data, CHECKSUM_FIELD: content_checksum(data)}
    (save_folder / COMMIT_FILE).write_text(json.dumps(data, indent=1))


def recommit(part_folder: Path) -> None:
    """Make the commit record name the crc32 of the part's manifest as it is now, and reseal the record."""
    commit = commit_data(part_folder.parent)
    commit["parts"][part_folder.name]["checksum"] = zlib.crc32((part_folder / MANIFEST_FILE).read_bytes())
    write_commit(part_folder.parent, commit, reseal=True)


def write_manifest_text(part_folder: Path, text: str, seal: str) -> None:
    (part_folder / MANIFEST_FILE).write_text(text)
    if seal == "recommitted":
        recommit(part_folder)


def write_manifest(part_folder: Path, data: dict, seal: str) -> None:
    """Write `data` as the part's manifest at seal level `seal` (see the module's docstring)."""
    if seal != "stale":
        data = {**data, CHECKSUM_FIELD: content_checksum(data)}
    write_manifest_text(part_folder, canonical(data), seal)


def falls_back(store: CheckpointStore, expected_step: int, part: str = PART) -> str:
    """The newest full save is skipped with a SkippedSaveWarning (by the listing or by the loader) and
    `expected_step` is loaded; the warnings' text."""
    with pytest.warns(SkippedSaveWarning) as caught:
        save, loaded = load_newest(store, store.saves(), part)
    assert save.step == loaded.manifest.step == expected_step
    return " ".join(str(w.message) for w in caught)


def entry_of(data: dict, name: str) -> dict:
    (entry,) = [t for t in data["tensors"] if t["name"] == name]
    return entry


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


# Each defect of a part manifest: (what it does to the manifest's data, text the reason must hold).
DEFECTS = {
    "float32 re-declared as int32": (lambda d: entry_of(d, "emb/t/weight").update(dtype="int32"), ""),
    "renamed entry": (lambda d: entry_of(d, "emb/t/weight").update(name="emb/t/weights"), ""),
    "empty tensor list": (lambda d: d.update(tensors=[], nbytes=0), ""),
    "crc32 written as a string": (lambda d: entry_of(d, MOMENTUM).update(checksum=str(entry_of(d, MOMENTUM)["checksum"])),
                                  "checksum must be an integer"),
    "file given as a number": (lambda d: entry_of(d, MOMENTUM).update(file=7), "file name must be a string"),
    "negative shape": (lambda d: entry_of(d, MOMENTUM).update(shape=[-3, -2]), "shape[0] -3 is outside"),
    "shape not matching nbytes": (lambda d: entry_of(d, MOMENTUM).update(shape=[4, 2]), "do not hold float32[4, 2]"),
    "shape as a string": (lambda d: entry_of(d, MOMENTUM).update(shape="5x1"), "shape must be a JSON list"),
    "unknown dtype": (lambda d: entry_of(d, MOMENTUM).update(dtype="float33"), "not a known dtype"),
    "dtype as a number": (lambda d: entry_of(d, MOMENTUM).update(dtype=4), "not a known dtype"),
    "step as a string": (lambda d: d.update(step="1"), "step must be an integer"),
    "step as a bool": (lambda d: d.update(step=True), "step must be an integer"),
    "tables as a list": (lambda d: d.update(tables=[]), "tables must be a JSON object"),
    "table rows as a float": (lambda d: d["tables"]["t"].update(rows=5.0), "rows must be an integer"),
    "shard beyond the table": (lambda d: d["shards"]["t"].append([5, 11]), "is not a row range"),
    "parent-directory file": (lambda d: entry_of(d, MOMENTUM).update(file="../../../x"), "not a plain name"),
    "absolute file": (lambda d: entry_of(d, MOMENTUM).update(file="/etc/hostname"), "not a plain name"),
    # One file per part: two tensors reading the same bytes is the old "two entries, one file" defect.
    "overlapping byte ranges": (lambda d: entry_of(d, MOMENTUM).update(offset=0), "starts at byte 0"),
    "negative offset": (lambda d: entry_of(d, MOMENTUM).update(offset=-1), "offset -1 is outside"),
    "deep nesting": (lambda d: d["extra"].update(deep="__DEEP__"), "nested too deeply"),
    "nesting past the bound": (lambda d: d["extra"].update(deep=_nested(40)), "nested more than 32 levels"),
    "missing field": (lambda d: d.pop("created"), "missing fields ['created']"),
    "unknown field": (lambda d: d.update(owner="me"), "unknown fields ['owner']"),
    "format version 1": (lambda d: d.update(format_version=1), "format_version 1 is not supported"),
    "infinite created": (lambda d: d.update(created=float("inf")), "Infinity is not a JSON number"),
    "overflowing created": (lambda d: d.update(created="__1E999__"), "out of the range of a float"),
}

# Self-consistent when recommitted: only the checksums tell them from what the writer wrote.
CHECKSUM_ONLY = {"float32 re-declared as int32", "renamed entry", "empty tensor list"}
# Written as text past what JSON or the canonical JSON can express: no sha256 can be recomputed, only a crc32.
_TEXT_FORMS = {'"__DEEP__"': "[" * 5000 + "]" * 5000, '"__1E999__"': "1e999"}


def defect_text(data: dict, defect: str, seal: str) -> str:
    """The manifest text with `defect` applied to a copy of `data`, sealed as far as `seal` allows."""
    data = json.loads(json.dumps(data))
    DEFECTS[defect][0](data)
    text_only = defect in ("deep nesting", "infinite created", "overflowing created")
    if seal != "stale" and not text_only:
        data[CHECKSUM_FIELD] = content_checksum(data)
    text = json.dumps(data, separators=(",", ":"), sort_keys=True, allow_nan=True)
    for placeholder, written in _TEXT_FORMS.items():
        text = text.replace(placeholder, written)
    return text


@pytest.mark.parametrize("seal", SEALS)
@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_each_part_manifest_defect_falls_back_to_the_previous_save(tmp_path, defect, seal):
    _, reason = DEFECTS[defect]
    store = CheckpointStore(tmp_path)
    save_full(store, 1)
    part = save_full(store, 2).path / PART
    write_manifest_text(part, defect_text(manifest_data(part), defect, seal), seal)
    if seal == "recommitted" and defect in CHECKSUM_ONLY:
        save, _ = load_newest(store, store.saves(), PART)
        assert save.step == 2  # a consistent manifest that the commit record names is the writer's word
        return
    message = falls_back(store, 1)
    assert "save-0000000002-full" in message
    if seal == "recommitted":
        assert reason in message, message
    else:  # a resealed manifest is no longer the one the commit record names
        assert "crc32 differs from the commit record" in message, message


# Each defect of a commit record: (what it does to the record's data, text the reason must hold).
COMMIT_DEFECTS = {
    "step as a string": (lambda d: d.update(step="2"), "step must be a non-negative int"),
    "step of another save": (lambda d: d.update(step=d["step"] + 1), "folder name says step"),
    "unknown kind": (lambda d: d.update(kind="delta"), "kind 'delta' is not one of"),
    "kind of another save": (lambda d: d.update(kind={"full": "subset", "subset": "full"}[d["kind"]]),
                             "folder name says step"),
    "negative world size": (lambda d: d.update(world_size=-1), "world_size must be a non-negative int"),
    "domain count as a bool": (lambda d: d.update(num_domains=True), "num_domains must be a non-negative int"),
    "part name with a path": (lambda d: d["parts"].update({"../x": d["parts"].pop(PART)}), "part name '../x'"),
    "part record with an extra field": (lambda d: d["parts"][PART].update(owner=1), f"part '{PART}' record"),
    "part crc32 as a string": (lambda d: d["parts"][PART].update(checksum="5"), f"part '{PART}' record"),
    "part crc32 changed": (lambda d: d["parts"][PART].update(checksum=d["parts"][PART]["checksum"] ^ 1),
                           "crc32 differs from the commit record"),
    "extra as a list": (lambda d: d.update(extra=[]), "wrong type"),
    "unknown domain mode": (lambda d: d.update(domain_mode="planets"), "wrong type"),
    "created as a string": (lambda d: d.update(created="1.5"), "created must be a number"),
    "missing field": (lambda d: d.pop("policy"), "KeyError('policy')"),
    "unknown field": (lambda d: d.update(owner="me"), "fields ["),
    "format version 1": (lambda d: d.update(format_version=1), "format_version 1 is not supported"),
    "deep nesting": (lambda d: d["extra"].update(deep="__DEEP__"), "nested too deeply"),
    "nesting past the bound": (lambda d: d["extra"].update(deep=_nested(40)), "nested more than 32 levels"),
    "infinite created": (lambda d: d.update(created=float("inf")), "Infinity is not a JSON number"),
    "overflowing created": (lambda d: d.update(created="__1E999__"), "out of the range of a float"),
    "reader state changed": (lambda d: d["extra"].update(reader=3), ""),
    "policy renamed": (lambda d: d.update(policy="full"), ""),
}
# Fields no other file repeats: resealed, the change is the writer's word.
COMMIT_WRITERS_WORD = {"reader state changed", "policy renamed"}
# Refused before the checksum is compared: unparseable, too deep, or of another format.
CHECKED_BEFORE_THE_CHECKSUM = {"format version 1", "deep nesting", "nesting past the bound", "infinite created",
                               "overflowing created"}


def commit_defect_text(data: dict, defect: str, reseal: bool) -> str:
    data = json.loads(json.dumps(data))
    COMMIT_DEFECTS[defect][0](data)
    if reseal and defect not in ("deep nesting", "infinite created", "overflowing created"):
        data[CHECKSUM_FIELD] = content_checksum(data)
    text = json.dumps(data, indent=1, allow_nan=True)
    for placeholder, written in _TEXT_FORMS.items():
        text = text.replace(placeholder, written)
    return text


@pytest.mark.parametrize("reseal", [False, True], ids=["stale", "resealed"])
@pytest.mark.parametrize("defect", sorted(COMMIT_DEFECTS))
def test_each_commit_record_defect_falls_back_to_the_previous_save(tmp_path, defect, reseal):
    _, reason = COMMIT_DEFECTS[defect]
    store = CheckpointStore(tmp_path)
    save_full(store, 1)
    newest = save_full(store, 2)
    (newest.path / COMMIT_FILE).write_text(commit_defect_text(commit_data(newest.path), defect, reseal))
    if reseal and defect in COMMIT_WRITERS_WORD:
        save, loaded = load_newest(store, store.saves(), PART)
        assert save.step == 2 and torch.equal(loaded.tensors["emb/t/weight"], torch.full((5, DIM), 2.0))
        return
    message = falls_back(store, 1)
    assert "save-0000000002-full" in message
    if reseal or defect in CHECKED_BEFORE_THE_CHECKSUM:
        assert reason in message, message
    else:
        assert "checksum does not match" in message, message


GARBAGE = [b"", b"\xff\xfe", b"[]", b"null", b'{"step": 2, "step": 2}', b"[" * 100_000,
           b'{"format_version": 3, "checksum": 5}', b"NaN", b"1e999"]


@pytest.mark.parametrize("file", [MANIFEST_FILE, COMMIT_FILE])
@pytest.mark.parametrize("garbage", GARBAGE)
def test_malformed_json_is_corrupt(tmp_path, garbage, file):
    store = CheckpointStore(tmp_path)
    save_full(store, 1)
    newest = save_full(store, 2)
    if file == MANIFEST_FILE:  # recommitted: the manifest's own parser has to refuse it
        (newest.path / PART / MANIFEST_FILE).write_bytes(garbage)
        recommit(newest.path / PART)
    else:
        (newest.path / COMMIT_FILE).write_bytes(garbage)
    message = falls_back(store, 1)
    assert file in message and "crc32 differs" not in message, message


@pytest.mark.parametrize("seal", ["resealed", "recommitted"])
def test_a_resealed_defect_in_a_subset_save_is_skipped_by_composition(tmp_path, seal):
    store = CheckpointStore(tmp_path)
    save_full(store, 10)
    save_subset(store, 20, [1, 2])
    newest = save_subset(store, 30, [2, 3])
    data = manifest_data(newest.path / PART)
    entry_of(data, "emb/t/ids").update(shape=[3])
    write_manifest(newest.path / PART, data, seal)
    with pytest.warns(SkippedSaveWarning, match="save-0000000030-subset") as caught:
        rows = restore(store)
    assert rows["saved_step"].tolist() == [10, 20, 20, 10, 10]
    message = " ".join(str(w.message) for w in caught)
    assert ("do not hold int64[3]" if seal == "recommitted" else "crc32 differs from the commit record") in message


@pytest.mark.parametrize("level", ["manifest", "commit record"])
def test_the_checksum_covers_every_field(tmp_path, level):
    store = CheckpointStore(tmp_path)
    record = save_full(store, 3)
    data = manifest_data(record.path / PART) if level == "manifest" else commit_data(record.path)
    assert data[CHECKSUM_FIELD] == content_checksum(data)
    for key in sorted(set(data) - {CHECKSUM_FIELD}):
        changed = {**data, key: "x"}
        assert content_checksum(changed) != data[CHECKSUM_FIELD], key


# -- property: random mutations of a valid manifest or commit record ----------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _paths(value, prefix=()):
    """Every (path to a container, key) pair in a JSON document."""
    if isinstance(value, dict):
        for key, child in value.items():
            yield prefix, key
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield prefix, index
            yield from _paths(child, (*prefix, index))


@st.composite
def mutations(draw, original: dict) -> dict:
    data = json.loads(json.dumps(original))
    for _ in range(draw(st.integers(1, 3))):
        spots = list(_paths(data))
        prefix, key = draw(st.sampled_from(spots))
        parent = data
        for part in prefix:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[key] = draw(JSON_VALUES)
        elif action == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(JSON_VALUES)
        else:
            parent.insert(key, draw(JSON_VALUES))
    return data


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A checkpoint folder with two full saves, written once and copied per example (saving fsyncs)."""
    folder = tmp_path_factory.mktemp("template")
    store = CheckpointStore(folder)
    save_full(store, 1)
    save_full(store, 2)
    store.close()
    return folder


def _copy(template: Path, tmp: Path) -> tuple[CheckpointStore, Path]:
    """A store on a copy of `template` in `tmp`, and the newest save's folder."""
    shutil.copytree(template, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".lock"))
    return CheckpointStore(tmp), tmp / "save-0000000002-full"


def _content(data: dict) -> str:
    """What a manifest or commit record says, apart from its checksum, in canonical form (so 1, 1.0 and true differ)."""
    return canonical({k: v for k, v in data.items() if k != CHECKSUM_FIELD})


def _load_recording_warnings(store: CheckpointStore):
    """(save, loaded part) of load_newest over a fresh listing, and every warning either raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        saves = store.saves()
        save, loaded = load_newest(store, saves, PART)
    skipped = [str(w.message) for w in caught if issubclass(w.category, SkippedSaveWarning)]
    return saves, save, loaded, skipped, caught


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_part_manifest_mutations_never_escape_as_another_exception(template, tmp_path_factory, data):
    store, newest = _copy(template, tmp_path_factory.mktemp("mut"))
    part = newest / PART
    original_text = (part / MANIFEST_FILE).read_text()
    original = json.loads(original_text)
    mutated = data.draw(mutations(original))
    seal = data.draw(st.sampled_from(SEALS))
    write_manifest(part, mutated, seal)
    written = (part / MANIFEST_FILE).read_text()
    unchanged = _content(mutated) == _content(original)

    _, save, loaded, skipped, caught = _load_recording_warnings(store)
    event(f"{seal}: {'accepted' if save.step == 2 else 'fell back'}")
    if save.step == 2:
        # Accepted: the very bytes the commit record names, or a recommitted, self-consistent manifest.
        assert written == original_text or seal == "recommitted"
        assert not unchanged or not caught
    else:
        assert save.step == loaded.manifest.step == 1
        assert any(newest.name in message for message in skipped)
        assert written != original_text  # the bytes the commit record names are never refused
        if seal != "recommitted":
            assert any("crc32 differs from the commit record" in message for message in skipped)
    try:
        Manifest.read(part)
    except CorruptCheckpointError as e:
        assert newest.name in str(e)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_commit_record_mutations_skip_the_save_or_are_legitimate(template, tmp_path_factory, data):
    store, newest = _copy(template, tmp_path_factory.mktemp("mut"))
    original = commit_data(newest)
    mutated = data.draw(mutations(original))
    reseal = data.draw(st.booleans())
    write_commit(newest, mutated, reseal)
    unchanged = _content(mutated) == _content(original)

    saves, save, loaded, skipped, caught = _load_recording_warnings(store)
    listed = [s for s in saves if s.folder == newest]
    event(f"resealed={reseal}: {'listed, loaded step ' + str(save.step) if listed else 'skipped by the listing'}")
    if not listed:
        # Skipped by the listing, with a warning naming it; the previous save loads.
        assert any(newest.name in message for message in skipped)
        assert save.step == 1
        assert not unchanged or not (reseal or mutated.get(CHECKSUM_FIELD) == original[CHECKSUM_FIELD])
        return
    # Listed: the record parses, is sealed and names this folder's step and kind.
    assert unchanged or reseal
    assert not unchanged or not caught
    (info,) = listed
    assert (info.step, info.kind) == (2, "full") and info == SaveInfo.read(newest)
    if save.step == 2:
        assert torch.equal(loaded.tensors["emb/t/weight"], torch.full((5, DIM), 2.0))
    else:  # the record names another crc32 for the part, or no such part at all
        assert save.step == 1
        assert any(newest.name in message for message in skipped) or PART not in info.parts
