"""Smoke runs of examples/scale.py at toy size: the width study on both datasets, the dose study's
two arms, and the Pawelczyk preset on a CIFAR-10 folder written here."""

from __future__ import annotations

import pytest
from test_data import write_tiny_cifar10

ROWS = ["trained", "gradient_ascent", "fine_tune", "retrain"]
TOY = ["--seeds", "2", "--tuning-seeds", "1", "--train-size", "120", "--test-size", "40",
       "--epochs", "2", "--batch-size", "16", "--unlearn-batch-size", "8",
       "--methods", "gradient_ascent", "fine_tune"]  # fmt: skip


def check_point(summary: dict, seeds: int) -> None:
    """One point's summary: every row's GUS z over the seeds, its tests and its cost."""
    for name in ROWS:
        z = summary["rows"][name]["gus_z"]
        assert z["n"] == seeds and len(z["values"]) == seeds and z["low"] <= z["mean"] <= z["high"]
        assert {"one_sided_fpr_0.01", "two_sided_0.01"} <= summary["tests"][name].keys()
    assert "p_value" in summary["vs_trained"]["fine_tune"]["gus_z"]
    assert "gus_z" in summary["vs_retrain"]["gradient_ascent"]
    assert summary["rows"]["trained"]["train_acc"]["n"] == seeds
    assert summary["cost"]["report_seeds_wall"] > 0 and summary["cost"]["tuning"]["cpu"] >= 0


@pytest.mark.slow
def test_width_study_on_both_datasets(run_example):
    result, folder = run_example("scale.py", "--study", "width", "--widths", "2", "4", *TOY,
                                 json_name="scale_width_mnist.json")  # fmt: skip
    assert result["seeds"] == [0, 1]
    assert list(result["summary"]) == ["w2", "w4"]
    sizes = [result["summary"][k]["n_params"] for k in ("w2", "w4")]
    assert sizes[0] < sizes[1]
    for key in ("w2", "w4"):
        check_point(result["summary"][key], 2)
        # tuned at every width, on a 3-point grid, on seeds disjoint from the report seeds
        assert len(result["tuning"][key]["search"]["fine_tune"]) == 3
        assert result["tuning"][key]["search_trained"]["z_per_seed"]
        assert result["points"][key]["model"] == "resnet8"
    assert result["total_seconds"]["wall"] > 0
    rows = result["per_seed"]["0"]["w2"]["rows"]
    assert {"steps", "spent"} <= rows["fine_tune"].keys() and rows["fine_tune"]["spent"] > 0
    for name in ("scale_width_mnist", "scale_width_synthetic"):
        assert (folder / f"{name}.png").exists() and (folder / f"{name}.json").exists()


@pytest.mark.slow
def test_dose_study_arms_share_the_default_dose(run_example):
    result, folder = run_example("scale.py", "--study", "dose", "--dose-width", "2",
                                 "--fractions", "0.02", "0.05", "--noise-stds", "0.5", "1.0",
                                 *TOY)  # fmt: skip
    # the default dose (5%, std 1.0) appears once, in the fraction arm
    assert list(result["summary"]) == ["fraction=0.02", "fraction=0.05", "noise_std=0.5"]
    assert result["points"]["noise_std=0.5"]["fraction"] == 0.05
    assert result["summary"]["fraction=0.02"]["rows"]["trained"]["gus_z"]["n"] == 2
    for summary in result["summary"].values():
        check_point(summary, 2)
    # one tuning, at the default dose, for every point
    chosen = [t["chosen"] for t in result["tuning"].values()]
    assert all(c == chosen[0] for c in chosen)
    assert (folder / "scale_dose_mnist.png").exists()


@pytest.mark.slow
def test_pawelczyk_preset_on_a_cifar10_folder(run_example, tmp_path):
    write_tiny_cifar10(tmp_path / "data", images_per_batch=40)  # 200 train, 40 test
    result, folder = run_example("scale.py", "--preset", "pawelczyk", "--data-dir",
                                 str(tmp_path / "data"), "--width", "2", *TOY)  # fmt: skip
    config = result["config"]
    assert config["dataset"] == "cifar10" and config["model"] == "resnet18"
    assert config["budget_fraction"] == 0.1 and config["lr"] == 1e-3
    assert config["batch_size"] == 16 and config["epochs"] == 2  # given flags win
    assert list(result["summary"]) == ["fraction=0.015", "fraction=0.02", "fraction=0.025"]
    forget = [r["fraction=0.025"]["n_forget"] for r in result["per_seed"].values()]
    assert forget == [3, 3]  # 2.5% of 120
    for summary in result["summary"].values():
        check_point(summary, 2)
    assert (folder / "scale_pawelczyk_cifar10.png").exists()
