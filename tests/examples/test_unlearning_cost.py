"""Smoke run of examples/unlearning_cost.py at toy size over two seeds."""

from __future__ import annotations

import pytest

TOY = ("--seeds", "2", "--retain", "48", "--forget", "16", "--epochs", "1", "2",
       "--batch-size", "8", "--width", "8")  # fmt: skip


@pytest.mark.slow
def test_unlearning_cost_reports_floors_orders_and_slopes_over_seeds(run_example):
    result, folder = run_example("unlearning_cost.py", *TOY)
    summary = result["summary"]
    assert (folder / "unlearning_cost_digits_mlp.png").exists()
    assert set(summary["runs"]) == {"1", "2"}
    for e in ("1", "2"):
        for order in ("reversed", "same"):
            node = summary["runs"][e][order]
            assert node["closest"]["n"] == 2
            assert 1 <= node["epochs_to_closest"]["mean"] <= 3 * int(e)
            assert 0 <= node["reaches_relative_target"]["rate"] <= 1
        assert "p_value" in summary["same_minus_reversed"][e]["closest_relative"]
    assert set(summary["slope_minus_1"]) == {"closest_reversed", "closest_same", "displacement"}
