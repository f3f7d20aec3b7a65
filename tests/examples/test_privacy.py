"""Smoke run of examples/privacy.py at toy size: no DP, DP and the accuracy-matched baseline per
epsilon and seed, finite numbers, the FPR resolution and the paired DP - matched differences."""

from __future__ import annotations

import math

import pytest
from utils import numbers

TOY = ("--seeds", "2", "--pool", "200", "--epochs", "2", "--shadows", "4", "--epsilons", "4")


@pytest.mark.slow
def test_privacy_toy_run(run_example):
    result, folder = run_example("privacy.py", *TOY)
    assert (folder / "privacy_digits_mlp.png").exists()
    assert result["seeds"] == [0, 1]
    for record in result["per_seed"].values():
        assert set(record["dp"]) == set(record["matched"]) == {"4"}
        assert all(math.isfinite(v) for v in numbers(record))
        assert record["n_nonmembers"] == 100
        dp_row, matched = record["dp"]["4"], record["matched"]["4"]
        assert 0 <= matched["step"] <= record["steps"]
        gap = matched["test_accuracy"] - dp_row["test_accuracy"]
        assert math.isclose(matched["accuracy_gap"], gap)
        assert dp_row["epsilon_spent"] <= 4.0 + 1e-6
        for attack in ("lira", "loss_mia"):
            assert dp_row[attack]["k"] == round(dp_row[attack]["tpr"] * record["n_members"])
    assert result["resolution"]["fpr_step"] == 1 / 100
    summary = result["summary"]
    assert set(summary["conditions"]) == {"no_dp", "dp_4", "matched_4"}
    pooled = summary["conditions"]["dp_4"]["lira_tpr_pooled"]
    assert pooled["n"] == sum(r["n_members"] for r in result["per_seed"].values())
    assert 0 <= pooled["low"] <= pooled["rate"] <= pooled["high"] <= 1
    difference = summary["dp_minus_matched"]["4"]["gus_z"]
    assert difference["n"] == 2
    assert summary["answer"]["4"]["gus_z"] in {
        "DP lower than the matched baseline", "DP higher than the matched baseline",
        "no difference resolved",
    }  # fmt: skip
