"""Default feature / score batches come from a memory budget, not a fixed number of examples."""

from __future__ import annotations

import pytest

from influx import influence
from influx.influence import base


@pytest.mark.parametrize(
    ("method", "options", "per_example"),
    [
        ("grad_dot", {}, 8 * 57),  # 57 parameters: float64 gradients
        ("ekfac", {}, 8 * 57),
        # dense projection: the largest parameter's gradient (6 x 5) and one copy of it
        ("trak", {"dim": 8}, 8 * 2 * 30),
    ],
)
def test_default_batches_fit_the_budget(tiny_mlp, monkeypatch, method, options, per_example):
    model, loss_fn, train, query = tiny_mlp
    monkeypatch.setattr(base, "FEATURE_BATCH_BYTES", 3 * per_example)  # three examples
    seen = []
    real_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda x: seen.append(x.shape[0]) or real_forward(x))
    fitted = influence.fit(model, loss_fn, train, method=method, **options)
    seen.clear()
    fitted.scores(query)
    assert fitted.batch_size == 3
    assert max(seen) <= 3, seen


def test_default_batch_size_rule():
    assert base.default_batch_size(1) == base.MAX_DEFAULT_BATCH
    assert base.default_batch_size(10**12) == 1
    assert base.default_batch_size(1000, budget=10_000) == 10
