"""Smoke test of the trak_scale benchmark suite at tiny sizes (ResNet-8 of width 8, 64 train
examples, 8 queries, K = 32): every row runs in its own subprocess, finishes, and lands in the
result files with its provenance. Numbers are not checked (they belong to benchmarks/results)."""

from __future__ import annotations

import json
import math
from argparse import Namespace
from dataclasses import replace

import pytest

from benchmarks import common
from benchmarks.suites import trak_scale

TINY = {
    "INFLUX_TRAK_SCALE_DEPTH": "8",
    "INFLUX_TRAK_SCALE_WIDTH": "8",
    "INFLUX_TRAK_SCALE_TRAIN": "64",
    "INFLUX_TRAK_SCALE_QUERIES": "8",
    "INFLUX_TRAK_SCALE_STEPS": "2",
    "INFLUX_TRAK_SCALE_PROJ_DIM": "32",
    "INFLUX_TRAK_SCALE_RECOMMENDED_DIM": "16",  # exercises the second K of the trak rows
    "INFLUX_TRAK_SCALE_BATCH": "32",
    "INFLUX_TRAK_SCALE_RUNS": "1",
}


def test_traker_dim_follows_its_recommendation():
    assert trak_scale.traker_dim(1000) == 512  # the default 2,048 is not below N
    assert trak_scale.traker_dim(64) == 32  # strictly below N: X^T X stays invertible
    assert trak_scale.traker_dim(2049) == 2048
    assert trak_scale.traker_dim(10**6) == 2048


def test_the_plan_runs_only_the_kinds_asked_for():
    sizes = replace(trak_scale.QUICK, dim=32, recommended_dim=16)
    both = trak_scale.plan(sizes)
    assert [row[0] for row in both] == ["trak"] * 6 + ["project"] * 3
    assert trak_scale.plan(sizes, ("trak",)) == both[:6]
    assert trak_scale.plan(sizes, ("project",)) == both[6:]
    with pytest.raises(ValueError, match="unknown trak_scale row kinds"):
        trak_scale.plan(sizes, ("trak", "projcet"))


@pytest.fixture(scope="module")
def rows():
    with pytest.MonkeyPatch.context() as patch:
        for name, value in TINY.items():
            patch.setenv(name, value)
        yield trak_scale.run(Namespace(device="cpu", quick=False, repeats=None))


@pytest.mark.slow
def test_every_row_finishes(rows):
    training, *measured = rows
    assert training["kind"] == "training"
    expected = [
        ("trak", "influx", "dense", 32),
        ("trak", "influx", "kronecker", 32),
        ("trak", "traker", "dense", 32),
        ("trak", "influx", "dense", 16),
        ("trak", "influx", "kronecker", 16),
        ("trak", "traker", "dense", 16),
        ("project", "influx", "dense", 32),
        ("project", "influx", "kronecker", 32),
        ("project", "traker", "dense", 32),
    ]
    assert [(r["kind"], r["impl"], r["projection"], r["dim"]) for r in measured] == expected
    for row in measured:
        assert row["runs"] == 1, row["notes"]
        assert row["total_s"] == pytest.approx(row["fit_s"] + row["score_s"])
        assert row["peak_mem_mb"] >= 0
        assert row["train"] == 64 and row["queries"] == 8


@pytest.mark.slow
def test_influx_rows_are_compared_with_traker(rows):
    by_key = {(r["kind"], r["projection"], r["dim"]): r for r in rows if r["impl"] == "influx"}
    for key, row in by_key.items():
        same_k = key[0] == "trak" or key[2] == 32  # traker's trak rows run at K = 32 and 16
        assert ("vs_traker_time" in row) == same_k
        assert ("vs_traker_mem" in row) == same_k
        assert ("vs_traker_pooled" in row) == (key[0] == "trak")
        if key[0] == "trak":
            assert -1 <= row["vs_traker_pooled"] <= 1
            assert math.isfinite(row["vs_traker_per_query"])


@pytest.mark.slow
def test_results_carry_provenance_and_the_column_notes(rows, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    meta = common.provenance("cpu")
    path = common.write_results(
        "trak_scale", "cpu", rows, meta, columns=trak_scale.COLUMNS, notes=trak_scale.NOTES
    )
    assert path.name == "trak_scale-cpu.json"
    saved = json.loads(path.read_text())
    assert saved["meta"]["git_sha"] == meta["git_sha"]
    assert len(saved["rows"]) == len(rows)
    markdown = path.with_suffix(".md").read_text()
    assert "peak resident" in markdown and "| vs_traker_pooled |" in markdown
