"""Smoke run of examples/craft_unlearnable.py at toy size: the crafting objective is the relative
remaining distance after the unrolled ascent, and the paired differences are crafted - Gaussian."""

from __future__ import annotations

import pytest

TOY = ("--seeds", "2", "--retain", "40", "--poisons", "6", "--train-steps", "6",
       "--ascent-steps", "2", "--craft-iterations", "3")  # fmt: skip
UNROLLED = "gradient_ascent (unrolled)"


@pytest.mark.slow
def test_craft_unlearnable_toy_run(run_example):
    result, folder = run_example("craft_unlearnable.py", *TOY)
    assert (folder / "craft_unlearnable_digits_mlp.png").exists()
    assert result["seeds"] == [0, 1]
    for record in result["per_seed"].values():
        poisons = record["poisons"]
        for rows in poisons.values():
            for row in rows.values():
                assert row["relative_remaining"] == pytest.approx(
                    row["remaining"] / row["shift_norm"])  # fmt: skip
        # J at the start is the Gaussian poison's relative remaining after the unrolled ascent,
        # J at the end the crafted one's: the objective is what the evaluation reports.
        curve = record["objective"]["curve"]
        assert len(curve) == 3 + 1
        assert curve[0] == pytest.approx(poisons["gaussian"][UNROLLED]["relative_remaining"])
        assert curve[-1] == pytest.approx(poisons["crafted"][UNROLLED]["relative_remaining"])
    difference = result["summary"]["crafted_minus_gaussian"][UNROLLED]["relative_remaining"]
    expected = [r["poisons"]["crafted"][UNROLLED]["relative_remaining"]
                - r["poisons"]["gaussian"][UNROLLED]["relative_remaining"]
                for r in result["per_seed"].values()]  # fmt: skip
    assert difference["values"] == pytest.approx(expected)
    assert "p_value" in difference
    assert set(result["summary"]["verdict"]) == set(result["summary"]["crafted_minus_gaussian"])
