"""Smoke run of examples/commutation.py at toy size over two seeds."""

from __future__ import annotations

import pytest

TOY = ("--seeds", "2", "--models", "mlp", "--examples", "48", "--pair-batch", "12",
       "--pretrain-epochs", "1", "--order-lrs", "0.01", "0.03", "--order-examples", "32",
       "--batch-size", "8", "--perms", "1", "--gd-steps", "10", "--checkpoints", "1",
       "--o3-examples", "24", "--width", "8")  # fmt: skip


@pytest.mark.slow
def test_commutation_reports_effect_sizes_and_errors_over_seeds(run_example):
    result, folder = run_example("commutation.py", *TOY)
    summary = result["summary"]
    assert (folder / "commutation_digits.png").exists()
    for kind in ("raw", "normalized"):
        prob = summary["H2"]["mlp"][kind]["prob_same_smaller"]
        assert prob["n"] == 2 and all(0 <= v <= 1 for v in prob["values"])
        assert "p_value" in summary["H2_seed_level"]["mlp"][kind]["prob_minus_half"]
    assert set(summary["H3"]) == {"0.01", "0.03"}
    assert summary["H3"]["0.01"]["measured"]["mean"] > 0
    assert set(summary["O3"]) == {"linear regression, realizable", "linear regression, noisy",
                                  "softmax regression (digits)", "mlp (digits)"}  # fmt: skip
    steps = result["per_seed"]["0"]["O3"]["mlp (digits)"]["step"]
    assert steps == [0, 10]
