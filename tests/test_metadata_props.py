"""Save metadata is verified like data: every defect of a manifest makes that save corrupt, and the store
falls back to the previous save with a warning; no other exception escapes the loader."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpr.storage import CheckpointStore, CorruptCheckpointError, Manifest, SkippedSaveWarning
from cpr.storage.manifest import CHECKSUM_FIELD, MANIFEST_FILE, content_checksum
from tests.test_storage import save_full, save_subset


def manifest_data(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_FILE).read_text())


def write_manifest(folder: Path, data: dict, reseal: bool) -> None:
    """Write `data` as the manifest; `reseal` recomputes its checksum, so only the schema can catch a defect."""
    if reseal:
        data = {**data, CHECKSUM_FIELD: content_checksum(data)}
    (folder / MANIFEST_FILE).write_text(json.dumps(data))


def falls_back(store: CheckpointStore, expected_step: int, kind: str | None = None) -> str:
    """The newest save is skipped with a SkippedSaveWarning and `expected_step` is loaded; the warning text."""
    with pytest.warns(SkippedSaveWarning) as caught:
        loaded = store.latest_loadable(kind)
    assert loaded is not None and loaded.manifest.step == expected_step
    return " ".join(str(w.message) for w in caught)


def entry_of(data: dict, name: str) -> dict:
    (entry,) = [t for t in data["tensors"] if t["name"] == name]
    return entry


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


# Each defect of the issue: (what it does to the manifest's data, text the reason must hold).
DEFECTS = {
    "float32 re-declared as int32": (lambda d: entry_of(d, "emb/t/weight").update(dtype="int32"), ""),
    "renamed entry": (lambda d: entry_of(d, "emb/t/weight").update(name="emb/t/weights"), ""),
    "empty tensor list": (lambda d: d.update(tensors=[], nbytes=0), ""),
    "crc32 written as a string": (lambda d: entry_of(d, "dense/w").update(checksum=str(entry_of(d, "dense/w")["checksum"])),
                                  "checksum must be an integer"),
    "file given as a number": (lambda d: entry_of(d, "dense/w").update(file=7), "file name must be a string"),
    "negative shape": (lambda d: entry_of(d, "dense/w").update(shape=[-3, -2]), "shape[0] -3 is outside"),
    "shape not matching nbytes": (lambda d: entry_of(d, "dense/w").update(shape=[4, 2]), "do not hold float32[4, 2]"),
    "shape as a string": (lambda d: entry_of(d, "dense/w").update(shape="3x2"), "shape must be a JSON list"),
    "unknown dtype": (lambda d: entry_of(d, "dense/w").update(dtype="float33"), "not a known dtype"),
    "dtype as a number": (lambda d: entry_of(d, "dense/w").update(dtype=4), "not a known dtype"),
    "step as a string": (lambda d: d.update(step="1"), "step must be an integer"),
    "step as a bool": (lambda d: d.update(step=True), "step must be an integer"),
    "tables as a list": (lambda d: d.update(tables=[]), "tables must be a JSON object"),
    "table rows as a float": (lambda d: d["tables"]["t"].update(rows=10.0), "rows must be an integer"),
    "shard beyond the table": (lambda d: d["shards"].setdefault("t", []).append([5, 11]), "outside [0, 10]"),
    "parent-directory file": (lambda d: entry_of(d, "dense/w").update(file="../../../x"), "not a plain name"),
    "absolute file": (lambda d: entry_of(d, "dense/w").update(file="/etc/hostname"), "not a plain name"),
    "duplicate file": (lambda d: entry_of(d, "dense/w").update(file=entry_of(d, "emb/t/weight")["file"]), "same file"),
    "deep nesting": (lambda d: d["extra"].update(deep="__DEEP__"), "nested too deeply"),
    "nesting past the bound": (lambda d: d["extra"].update(deep=_nested(40)), "nested more than 32 levels"),
    "missing field": (lambda d: d.pop("created"), "missing fields ['created']"),
    "unknown field": (lambda d: d.update(owner="me"), "unknown fields ['owner']"),
    "format version 1": (lambda d: d.update(format_version=1), "format_version 1 is not supported"),
    "infinite created": (lambda d: d.update(created=1e999), ""),
}


# Self-consistent when resealed: only the checksum tells them from what the writer wrote.
CHECKSUM_ONLY = {"float32 re-declared as int32", "renamed entry", "empty tensor list"}


@pytest.mark.parametrize("reseal", [False, True], ids=["stale-checksum", "resealed"])
@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_each_defect_falls_back_to_the_previous_save(tmp_path, defect, reseal):
    mutate, reason = DEFECTS[defect]
    store = CheckpointStore(tmp_path)
    save_full(store, 1)
    newest = save_full(store, 2)
    data = manifest_data(newest.path)
    mutate(data)
    if defect == "infinite created":
        text = json.dumps(data, allow_nan=True)
        (newest.path / MANIFEST_FILE).write_text(text)  # not resealable: the checksum itself refuses inf
    elif defect == "deep nesting":  # deeper than the JSON parser's recursion: written as text
        (newest.path / MANIFEST_FILE).write_text(json.dumps(data).replace('"__DEEP__"', "[" * 5000 + "]" * 5000))
    else:
        write_manifest(newest.path, data, reseal)
    if reseal and defect in CHECKSUM_ONLY:
        assert store.latest_loadable().manifest.step == 2  # a consistent, sealed manifest is the writer's word
        return
    message = falls_back(store, 1)
    assert "save-0000000002-full" in message
    if reseal or defect in ("format version 1", "deep nesting"):
        assert reason in message, message
    else:
        assert "checksum does not match" in message or reason in message, message


@pytest.mark.parametrize("garbage", [b"", b"\xff\xfe", b"[]", b"null", b'{"step": 2, "step": 2}', b"[" * 100_000,
                                     b'{"format_version": 2, "checksum": 5}', b"NaN"])
def test_malformed_json_is_corrupt(tmp_path, garbage):
    store = CheckpointStore(tmp_path)
    save_full(store, 1)
    newest = save_full(store, 2)
    (newest.path / MANIFEST_FILE).write_bytes(garbage)
    assert "manifest.json" in falls_back(store, 1)


def test_a_resealed_defect_in_a_subset_save_is_skipped_by_composition(tmp_path):
    from cpr.storage import restore_rows

    store = CheckpointStore(tmp_path)
    save_full(store, 10)
    save_subset(store, 20, [1, 2])
    newest = save_subset(store, 30, [2, 3])
    data = manifest_data(newest.path)
    entry_of(data, "emb/t/ids").update(shape=[3])
    write_manifest(newest.path, data, reseal=True)
    with pytest.warns(SkippedSaveWarning, match="save-0000000030-subset"):
        rows = restore_rows(store, "t", (0, 4))
    assert rows["saved_step"].tolist() == [10, 20, 20, 10]


def test_the_checksum_covers_every_field(tmp_path):
    store = CheckpointStore(tmp_path)
    record = save_full(store, 3)
    data = manifest_data(record.path)
    assert data[CHECKSUM_FIELD] == content_checksum(data)
    for key in sorted(set(data) - {CHECKSUM_FIELD}):
        changed = {**data, key: "x"}
        assert content_checksum(changed) != data[CHECKSUM_FIELD], key


# -- property: random mutations of a valid manifest -------------------------------------------------------

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
def mutations(draw, original: dict) -> tuple[dict, bool]:
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
    return data, draw(st.booleans())


def _template(tmp: Path) -> tuple[dict, str]:
    store = CheckpointStore(tmp)
    save_full(store, 1)
    record = save_full(store, 2)
    store.close()
    return manifest_data(record.path), record.path.name


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_mutations_never_escape_as_another_exception(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("mut")
    original, newest = _template(root)
    mutated, reseal = data.draw(mutations(original))
    write_manifest(root / newest, mutated, reseal)
    store = CheckpointStore(root)
    unchanged = {k: v for k, v in mutated.items() if k != CHECKSUM_FIELD} == {
        k: v for k, v in original.items() if k != CHECKSUM_FIELD}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            loaded = store.latest_loadable()
        except KeyError:  # a resealed, self-consistent manifest without a tensor the caller asked for
            raise AssertionError("latest_loadable asks for no names, so no KeyError") from None
    assert loaded is not None
    if loaded.manifest.step == 2:
        # Accepted: either nothing that matters changed, or it was resealed and is self-consistent.
        assert unchanged or reseal
        assert not unchanged or not caught
        if not reseal:
            assert unchanged
    else:
        assert loaded.manifest.step == 1
        assert any(issubclass(w.category, SkippedSaveWarning) and newest in str(w.message) for w in caught)
    try:
        Manifest.read(root / newest)
    except CorruptCheckpointError as e:
        assert newest in str(e)
