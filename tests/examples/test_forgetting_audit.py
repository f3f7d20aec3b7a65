"""Smoke run of examples/forgetting_audit.py at toy size: structure, the ceiling and floor rows,
finite per-seed numbers and the stated FPR resolution."""

from __future__ import annotations

import math

import pytest
from utils import numbers

TOY = ("--seeds", "2", "--models", "4", "--methods", "gradient_ascent", "fine_tune",
       "--train-size", "120", "--epochs", "2", "--noise-copies", "1")  # fmt: skip


@pytest.mark.slow
def test_forgetting_audit_toy_run(run_example):
    result, folder = run_example("forgetting_audit.py", *TOY)
    assert (folder / "forgetting_audit_digits_mlp.png").exists()
    assert result["seeds"] == [0, 1]
    assert result["settings_source"]
    rows = {"retrain", "no_unlearning", "gradient_ascent", "fine_tune"}
    for record in result["per_seed"].values():
        for metric in ("forgetting", "lira", "loss_mia", "accuracy"):
            assert set(record[metric]) == rows
        assert all(math.isfinite(v) for v in numbers(record))
        assert 0 <= record["forgetting"]["retrain"]["F"] <= 1
        # Pooled pairs: models x forget examples members, models x test examples non-members.
        assert record["lira"]["retrain"]["n"] == 4 * record["n_forget"]
        assert record["n_nonmembers"] == 197
    ceiling = result["summary"]["per_row"]["forgetting"]["retrain"]["F"]
    assert ceiling["n"] == 2 and len(ceiling["values"]) == 2
    differences = result["summary"]["differences"]["fine_tune"]
    assert {"forgetting.F - retrain", "forgetting.F - no_unlearning"} <= differences.keys()
    assert result["resolution"]["smallest_fpr_per_model"] == 1 / 197
    proportion = result["summary"]["lira_proportions"]["retrain"]["pooled"]
    assert 0 <= proportion["low"] <= proportion["rate"] <= proportion["high"] <= 1
