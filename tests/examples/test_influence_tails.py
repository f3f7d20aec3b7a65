"""Smoke run of examples/influence_tails.py at toy size (two seeds, a few epochs)."""

from __future__ import annotations

import warnings

import pytest


@pytest.mark.slow
def test_influence_tails_toy_run(run_example):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny models: damping and conditioning warnings
        result, folder = run_example(
            "influence_tails.py", "--seeds", "2", "--train", "120", "--poisons", "20",
            "--epochs", "1", "--width", "8",
            "--power-law-bootstrap", "2",
        )  # fmt: skip
    assert result["seeds"] == [0, 1]
    record = result["per_seed"]["0"]
    clean = record["clean"]["self_influence"]
    # Self-influence is non-negative: positive families and a power law, never the symmetric ones.
    assert clean["best_family"] in ("lognormal", "gamma", "exponential")
    assert clean["power_law_alpha"] > 1 and clean["x_min"] > 0
    assert clean["survival_exponent"] == clean["power_law_alpha"] - 1
    assert record["gaussian"]["i_z"]["best_family"] in ("normal", "laplace", "t", "cauchy")
    assert "poisons" in record["label_flip"]["self_influence"]
    assert -1 <= record["exact_check"]["spearman"] <= 1
    summary = result["summary"]
    assert summary["clean"]["self_influence"]["hill_alpha"]["n"] == 2
    assert summary["clean"]["self_influence"]["best_is_gamma"]["n"] == 2  # a proportion
    paired = result["comparisons"]["exact_minus_ekfac"]["hill_alpha"]
    assert len(paired["values"]) == 2 and "p_value" in paired
    assert result["comparisons"]["clean_power_law_rejected"]["n"] == 2
    assert (folder / "influence_tails_digits_mlp.png").stat().st_size > 0
