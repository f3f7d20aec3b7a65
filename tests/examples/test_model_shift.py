"""Smoke run of examples/model_shift.py at toy size: structure, the noise floor, the ceiling and
null rows, and identities that tie the rows to each other."""

from __future__ import annotations

import math

import pytest

TOY = ("--seeds", "2", "--train", "160", "--poisons", "16", "--epochs", "2", "--replicates", "3",
       "--budget-fraction", "0.5",
       "--test", "100", "--probe", "50", "--random-directions", "64",
       "--methods", "gradient_ascent", "fine_tune")  # fmt: skip
ROWS = {"gradient_ascent", "fine_tune", "newton (no budget)", "retrain, other batch order",
        "poisoned retrain, other batch order"}  # fmt: skip


@pytest.mark.slow
def test_model_shift_toy_run(run_example):
    result, folder = run_example("model_shift.py", *TOY)
    assert (folder / "model_shift_digits_mlp.png").exists()
    assert result["seeds"] == [0, 1]
    # No gaussian_poisoning result in the temporary folder: the fallback settings.
    assert "SETTINGS" in result["settings_source"]
    parameters = result["summary"]["parameters"]
    assert parameters == 64 * 32 + 32 + 32 * 10 + 10
    band = result["summary"]["random_band_analytic"]
    assert band[1] == pytest.approx(1.96 / math.sqrt(parameters)) and band[0] == -band[1]
    for record in result["per_seed"].values():
        for kind in ("gaussian", "label_flip"):
            row = record[kind]
            assert set(row["methods"]) == ROWS
            noise = row["noise"]
            assert noise["retrain_distance_over_shift"] == pytest.approx(
                noise["retrain_distance"] / noise["shift_norm"])  # fmt: skip
            # The ceiling is the other-order retrain: it lands ||retrain' - retrain|| from the
            # reference; the null moves as far as ||poisoned' - poisoned||.
            ceiling = row["methods"]["retrain, other batch order"]
            null = row["methods"]["poisoned retrain, other batch order"]
            assert ceiling["remaining_over_shift"] == pytest.approx(
                noise["retrain_distance_over_shift"])  # fmt: skip
            assert null["update_over_shift"] == pytest.approx(
                noise["poisoned_distance_over_shift"])  # fmt: skip
            # The empirical random band is centred on 0 with sd near 1 / sqrt(P).
            assert row["random_band"]["low"] < 0 < row["random_band"]["high"]
            assert row["random_band"]["sd"] == pytest.approx(parameters**-0.5, rel=0.3)
        gus = record["gaussian"]["methods"]["fine_tune"]["gus"]
        assert gus["z"] == pytest.approx(math.sqrt(16) * gus["gus"])  # z = sqrt(n) mean score
        assert "gus" not in record["label_flip"]["methods"]["fine_tune"]
    tests = result["summary"]["orthogonality"]["gaussian"]["cosine"]
    # The null is not tested against itself.
    assert tests["poisoned retrain, other batch order"] is None
    assert tests["fine_tune"]["cosine"]["n"] == 2
    assert tests["fine_tune"]["minus_batch_order_null"]["n"] == 2
    for kind in ("gaussian", "label_flip"):
        loo = result["cross_seed"][kind]["leave_one_out_cosine"]
        assert len(loo) == 2 and all(-1 <= c <= 1 for c in loo)
        # With two seeds, "the mean of the others" is the other seed: both cosines are equal.
        assert loo[0] == pytest.approx(loo[1])
