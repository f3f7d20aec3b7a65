"""Smoke run of examples/interlacing.py at toy size: every (placement, rule) per seed, finite
numbers, the clean null run, paired differences to the mean rule and a verdict per row."""

from __future__ import annotations

import math

import pytest
from utils import numbers

TOY = ("--seeds", "2", "--train-size", "128", "--epochs", "1")
RULES = {"mean", "median", "trimmed_mean", "krum", "multi_krum"}


@pytest.mark.slow
def test_interlacing_toy_run(run_example):
    result, folder = run_example("interlacing.py", *TOY)
    assert (folder / "interlacing_digits_mlp.png").exists()
    assert result["seeds"] == [0, 1]
    records = list(result["per_seed"].values())
    for record in records:
        assert set(record["clean"]) == {"mean"}
        for placement in ("concentrated", "interlaced"):
            assert set(record[placement]) == RULES
            assert 0 <= record[placement]["krum"]["selected_poison_share"] <= 1
        assert all(math.isfinite(v) for v in numbers(record))
    # seeds differ: another poison draw, init and order give another GUS z
    assert records[0]["interlaced"]["mean"]["gus_z"] != records[1]["interlaced"]["mean"]["gus_z"]
    summary = result["summary"]
    entry = summary["concentrated"]["trimmed_mean"]
    assert entry["gus_z"]["n"] == 2 and len(entry["gus_z"]["values"]) == 2
    assert entry["fraction_significant"]["n"] == 2
    assert entry["verdict"] in {"stopped", "inconclusive", "detectable"}
    difference = entry["minus_mean"]["gus_z"]
    expected = [a - b for a, b in zip(entry["gus_z"]["values"],
                                      summary["concentrated"]["mean"]["gus_z"]["values"])]  # fmt: skip
    assert difference["values"] == expected
    assert "minus_mean" not in summary["interlaced"]["mean"]
    assert summary["clean"]["mean"]["verdict"] in {"stopped", "inconclusive", "detectable"}
