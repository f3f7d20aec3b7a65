"""Smoke run of examples/ga_vs_gd.py at toy size over two seeds."""

from __future__ import annotations

import pytest

TOY = ("--seeds", "2", "--examples", "48", "--points", "12", "--pretrain-epochs", "1",
       "--power-iters", "3", "--batch-size", "16", "--width", "8")  # fmt: skip


@pytest.mark.slow
def test_ga_vs_gd_summarizes_every_setting_over_seeds(run_example):
    result, folder = run_example("ga_vs_gd.py", *TOY)
    summary = result["summary"]
    assert (folder / "ga_vs_gd_digits_mlp.png").exists()
    # The closed form holds to rounding in every seed.
    assert max(summary["linear_regression"]["max_relative_error"]["values"]) < 1e-10
    assert set(summary["modes"]) == {"one point", "one batch", "full batch", "dataset (SGD)"}
    assert set(summary["modes"]["dataset (SGD)"]) == {"same", "reversed"}
    for node in (summary["modes"]["one batch"]["same"]["relative"],
                 *summary["points"]["spearman"].values()):  # fmt: skip
        assert node["n"] == 2 and node["low"] <= node["mean"] <= node["high"]
    assert all(-1 <= v <= 1 for v in summary["points"]["spearman"]["loss"]["values"])
    assert "p_value" in summary["same_minus_reversed"]["relative"]
