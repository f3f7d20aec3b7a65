"""Smoke run of examples/gaussian_poisoning.py at toy size: the JSON's structure (the chosen
settings another script reads, the search grid, the summary's tests and paired differences)."""

from __future__ import annotations

METHODS = ["gradient_ascent", "fine_tune", "ssd"]


def test_gaussian_poisoning_toy_run(run_example):
    result, folder = run_example(
        "gaussian_poisoning.py", "--seeds", "2", "--tuning-seeds", "1", "--grid-size", "2",
        "--train-size", "200", "--epochs", "2", "--points", "2", "--methods", *METHODS,
    )  # fmt: skip
    assert result["seeds"] == [0, 1]
    assert result["tuning_seeds"] == [1000]
    assert {"git_sha", "dirty"} <= result["provenance"].keys()
    # chosen_settings: keyword arguments of influx.unlearn.METHODS[name], from the grid
    chosen = result["chosen_settings"]
    assert sorted(chosen) == sorted(METHODS)
    assert chosen["fine_tune"].keys() == {"batch_size", "lr"}
    assert chosen["ssd"].keys() == {"dampening", "alpha"}
    for name in METHODS:
        grid = result["search"][name]
        assert len(grid) == 2
        assert sum(bool(point.get("chosen")) for point in grid) == 1
        assert [p["setting"] for p in grid if p.get("chosen")] == [chosen[name]]
        assert {"mean_z", "mean_abs_z", "mean_test_acc_drop", "feasible"} <= grid[0].keys()
    summary = result["summary"]
    for name in ["trained", *METHODS, "retrain"]:
        z = summary["rows"][name]["gus_z"]
        assert z["n"] == 2 and len(z["values"]) == 2 and z["low"] <= z["mean"] <= z["high"]
        assert summary["rows"][name]["detected_one_sided"]["n"] == 2
        assert {"one_sided_fpr_0.01", "two_sided_0.01"} <= summary["tests"][name].keys()
    for name in [*METHODS, "retrain"]:
        assert "p_value" in summary["vs_trained"][name]["gus_z"]
        assert {"test_acc", "retain_acc", "forget_acc"} <= summary["vs_trained"][name].keys()
    assert len(summary["null_calibration"]["values"]) == 2
    assert {"search", "report_seeds", "total"} <= result["phase_seconds"].keys()
    assert (folder / "gaussian_poisoning_digits_mlp.png").exists()
