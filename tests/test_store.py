"""influx.store: checksummed shards, atomic writes, fingerprint refusal, damage detection."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from influx import store
from influx.errors import InfluxRuntimeError, InfluxValueError

DTYPE = np.dtype([("index", "<i8"), ("value", "<f8")])


def table(start: int, stop: int) -> np.ndarray:
    rows = np.empty(stop - start, dtype=DTYPE)
    rows["index"] = np.arange(start, stop)
    rows["value"] = np.random.default_rng(start).standard_normal(stop - start)
    return rows


def test_shards_round_trip_with_their_sha256(tmp_path):
    shards = store.ShardStore.open(tmp_path / "s", "abc", {"epochs": 1})
    digest = shards.write("part-00000.npy", table(0, 5))
    path = tmp_path / "s" / "part-00000.npy"
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (tmp_path / "s" / "part-00000.npy.sha256").read_text().strip() == digest
    assert np.array_equal(shards.read("part-00000.npy"), table(0, 5))
    assert shards.read("part-00001.npy") is None and shards.rejected == []
    assert shards.names() == ["part-00000.npy"]
    assert store.array_bytes(table(0, 5)) == path.read_bytes(), "same array, same bytes"


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p, r: p.write_bytes(p.read_bytes()[:-3]), "checksum mismatch"),
        (lambda p, r: p.write_bytes(p.read_bytes()[:-1] + b"\x00"), "checksum mismatch"),
        (lambda p, r: r.unlink(), "checksum record is missing"),
        (lambda p, r: p.unlink(), "its file is missing"),
    ],
    ids=["truncated", "one-byte", "no-record", "no-file"],
)
def test_damaged_shards_are_reported_and_removed(tmp_path, damage, reason):
    shards = store.ShardStore.open(tmp_path, "abc")
    shards.write("a.npy", table(0, 50))
    damage(tmp_path / "a.npy", tmp_path / "a.npy.sha256")
    assert shards.read("a.npy") is None
    assert len(shards.rejected) == 1 and reason in shards.rejected[0][1]
    assert not (tmp_path / "a.npy").exists() and not (tmp_path / "a.npy.sha256").exists()


def test_a_valid_shard_copied_over_another_passes_the_checksum_so_callers_check_rows(tmp_path):
    # The store vouches for bytes; which rows a shard must hold is the caller's check (reject).
    shards = store.ShardStore.open(tmp_path, "abc")
    shards.write("a.npy", table(0, 5))
    shards.write("b.npy", table(5, 10))
    for suffix in ("", ".sha256"):
        (tmp_path / f"b.npy{suffix}").write_bytes((tmp_path / f"a.npy{suffix}").read_bytes())
    copied = shards.read("b.npy")
    assert np.array_equal(copied["index"], np.arange(5))
    shards.reject("b.npy", "holds the wrong rows")
    assert shards.read("b.npy") is None and shards.rejected[-1] == ("b.npy", "holds the wrong rows")


def test_other_fingerprint_is_refused_with_the_differences(tmp_path):
    shards = store.ShardStore.open(tmp_path, "one", {"epochs": 1, "seed": 0})
    shards.write("a.npy", table(0, 5))
    with pytest.raises(store.StoreMismatchError, match=r"epochs: 1 -> 2") as info:
        store.ShardStore.open(tmp_path, "two", {"epochs": 2, "seed": 0})
    assert info.value.differences == [("epochs", 1, 2)]
    assert isinstance(info.value, InfluxValueError)
    assert (tmp_path / "a.npy").exists(), "a refusal changes nothing"
    again = store.ShardStore.open(tmp_path, "one", {"epochs": 1, "seed": 0})
    assert np.array_equal(again.read("a.npy"), table(0, 5)), "same fingerprint: resumed"
    store.ShardStore.open(tmp_path, "two", {"epochs": 2}, overwrite=True)
    assert not (tmp_path / "a.npy").exists(), "overwrite starts over"


def test_shards_without_a_manifest_are_never_adopted(tmp_path):
    shards = store.ShardStore.open(tmp_path, "abc")
    shards.write("a.npy", table(0, 5))
    (tmp_path / "manifest.json").unlink()
    (tmp_path / ".a.npy.123.tmp").write_bytes(b"half")
    assert store.ShardStore.open(tmp_path, "abc").read("a.npy") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_a_folder_that_holds_no_store_is_refused_and_left_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r.txt").write_text("mine too")
    (tmp_path / "a.npy").write_bytes(b"no record")
    (tmp_path / "b.npy.sha256").write_text("0" * 64)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(InfluxValueError, match=r"is not empty and holds no influx store") as info:
        store.ShardStore.open(tmp_path, "abc")
    assert str(tmp_path) in str(info.value) and "a.npy, notes.txt, runs/" in str(info.value)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    (tmp_path / "manifest.json").write_text("{not json")  # damaged outside influx
    with pytest.raises(InfluxValueError, match=r"manifest.json missing or damaged; found manifest"):
        store.ShardStore.open(tmp_path, "abc")


def test_overwrite_removes_the_store_files_only(tmp_path):
    shards = store.ShardStore.open(tmp_path, "one")
    shards.write("a.npy", table(0, 5))
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "runs").mkdir()
    store.ShardStore.open(tmp_path, "two", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "notes.txt", "runs"]


def test_a_shard_copied_in_with_its_record_from_another_store_is_refused(tmp_path):
    ours = store.ShardStore.open(tmp_path / "ours", "abc")
    ours.write("a.npy", table(0, 5))
    ours.finalize(["a.npy"])
    theirs = store.ShardStore.open(tmp_path / "theirs", "xyz")
    theirs.write("a.npy", table(100, 105))
    for suffix in ("", ".sha256"):
        copied = (tmp_path / "theirs" / f"a.npy{suffix}").read_bytes()
        (tmp_path / "ours" / f"a.npy{suffix}").write_bytes(copied)
    resumed = store.ShardStore.open(tmp_path / "ours", "abc")
    assert resumed.read("a.npy") is None
    assert resumed.rejected == [
        ("a.npy", "its checksum differs from the one the manifest lists (the file and its "
         "record were replaced after the run was finalized)")
    ]  # fmt: skip
    resumed.write("a.npy", table(0, 5))  # recomputed: this run's bytes are read back
    assert np.array_equal(resumed.read("a.npy"), table(0, 5))


def test_attach_checks_the_fingerprint_and_finalize_lists_checksums(tmp_path):
    opened = store.ShardStore.open(tmp_path, "abc", {"k": 1})
    digest = opened.write("a.npy", table(0, 3))
    attached = store.ShardStore.attach(tmp_path, "abc")
    assert np.array_equal(attached.read("a.npy"), table(0, 3))
    with pytest.raises(InfluxRuntimeError, match="does not hold this run"):
        store.ShardStore.attach(tmp_path, "other")
    opened.finalize(["a.npy"])
    import json

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["shards"] == {"a.npy": digest} and manifest["meta"] == {"k": 1}
    with pytest.raises(InfluxRuntimeError, match="vanished"):
        opened.finalize(["missing.npy"])


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    store.atomic_write_bytes(path, b"old")

    def full_disk(src, dst):
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        store.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"], "no temporary file left"


def test_bad_names_are_refused(tmp_path):
    shards = store.ShardStore.open(tmp_path, "abc")
    for name in ("../x.npy", "a/b.npy", "manifest.json", "x.sha256", ""):
        with pytest.raises(InfluxValueError, match="shard name"):
            shards.write(name, table(0, 1))


# -- one matrix of scores -------------------------------------------------------------------------


def write_matrix(path, values: np.ndarray, identity: dict, **kwargs) -> np.ndarray:
    matrix = store.ScoreMatrix(path, values.shape, str(values.dtype), identity, **kwargs)
    for start in range(0, values.shape[1], 2):  # in column blocks, as scores are streamed
        matrix.write(start, start + 2, values[:, start : start + 2])
    return matrix.finish({"query_indices": list(range(values.shape[0]))})


def test_a_score_matrix_is_written_in_blocks_and_read_back(tmp_path):
    values = np.random.default_rng(0).standard_normal((3, 5))
    path = tmp_path / "m.npy"
    identity = {"method": "exact", "sign": -1.0, "query_indices": [0, 1, 2]}
    assert np.array_equal(write_matrix(path, values, identity), values)
    read, manifest = store.read_matrix(path)
    assert np.array_equal(read, values)
    assert manifest["complete"] is True and manifest["method"] == "exact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.npy"]


def test_a_score_matrix_refuses_foreign_files_and_other_questions(tmp_path):
    values = np.zeros((2, 4))
    identity = {"method": "exact", "sign": -1.0, "query_indices": [0, 1]}
    (tmp_path / "a.json").write_text("mine")
    with pytest.raises(InfluxValueError, match="a.json' exists and influx did not write it"):
        write_matrix(tmp_path / "a.npy", values, identity)
    np.save(tmp_path / "b.npy", values)
    with pytest.raises(InfluxValueError, match="b.npy' exists and influx did not write it"):
        write_matrix(tmp_path / "b.npy", values, identity, overwrite=True)
    assert (tmp_path / "a.json").read_text() == "mine" and not (tmp_path / "b.json").exists()
    for bad in ("", "c.txt", None):
        with pytest.raises(InfluxValueError, match="must name a .npy file"):
            store.check_matrix_path(bad if bad is None or not bad else tmp_path / bad)
    write_matrix(tmp_path / "d.npy", values, identity)
    write_matrix(tmp_path / "d.npy", values + 1, identity)  # the same question: replaced
    with pytest.raises(InfluxValueError, match=r"another question \(another query set\)"):
        write_matrix(tmp_path / "d.npy", values, {**identity, "query_indices": [5, 6]})
    with pytest.raises(InfluxValueError, match=r"shape \[2, 4\] -> \[2, 2\]"):
        write_matrix(tmp_path / "d.npy", values[:, :2], identity)
    assert np.array_equal(store.read_matrix(tmp_path / "d.npy")[0], values + 1)
    write_matrix(tmp_path / "d.npy", values[:, :2], identity, overwrite=True)
    assert store.read_matrix(tmp_path / "d.npy")[0].shape == (2, 2)


def test_an_unfinished_score_matrix_is_never_read(tmp_path):
    path = tmp_path / "m.npy"
    matrix = store.ScoreMatrix(path, (2, 2), "float64", {"method": "kfac"})
    matrix.write(0, 1, np.ones((2, 1)))
    matrix.abort()
    with pytest.raises(InfluxValueError, match="incomplete.*interrupted"):
        store.read_matrix(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]
