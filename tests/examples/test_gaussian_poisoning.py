"""examples/gaussian_poisoning.py: a smoke run at toy size (the JSON's structure: the chosen
settings another script reads, the search grid, the summary's tests and paired differences), and
the choice of a setting from its grid on constructed grids."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

METHODS = ["gradient_ascent", "fine_tune", "ssd"]


@pytest.mark.slow
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


def _point(mean_abs_z: float, drop: float, max_drop: float = 0.01) -> dict:
    return {"setting": {"lr": mean_abs_z}, "mean_abs_z": mean_abs_z, "mean_test_acc_drop": drop,
            "feasible": drop <= max_drop}  # fmt: skip


def test_choice_is_the_least_abs_z_within_the_accuracy_constraint(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    script = importlib.import_module("gaussian_poisoning")
    grid = [_point(4.0, 0.0), _point(2.5, 0.009), _point(0.5, 0.2), _point(3.0, -0.01)]
    assert script.choose(grid) == {"lr": 2.5}
    assert [bool(p.get("chosen")) for p in grid] == [False, True, False, False]
    # No setting within the constraint: the least damaging one, whatever its z.
    assert script.choose([_point(0.5, 0.3), _point(4.0, 0.05), _point(1.0, 0.1)]) == {"lr": 4.0}


def test_grid_settings_spread_over_the_grid(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    script = importlib.import_module("gaussian_poisoning")
    args = argparse.Namespace(grid_size=2, batch_size=32)
    fixed, knob, values = script.GRIDS["fine_tune"]
    assert [s[knob] for s in script.grid_settings("fine_tune", args)] == [values[0], values[-1]]
    assert script.grid_settings("fine_tune", args)[0]["batch_size"] == 32
    args.grid_size = 1
    assert [s[knob] for s in script.grid_settings("fine_tune", args)] == [values[len(values) // 2]]
    assert "batch_size" not in script.grid_settings("ssd", args)[0]  # not a step method
