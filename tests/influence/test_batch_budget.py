"""Default feature / score batches come from a memory budget, not a fixed number of examples."""

from __future__ import annotations

import pytest

from influx import influence
from influx.influence import base


@pytest.mark.parametrize(
    ("method", "options"), [("grad_dot", {}), ("ekfac", {}), ("trak", {"dim": 8})]
)
def test_default_batches_fit_the_budget(tiny_mlp, monkeypatch, method, options):
    model, loss_fn, train, query = tiny_mlp
    # 57 parameters: 456 bytes per example of float64 gradients; a budget of three examples
    monkeypatch.setattr(base, "FEATURE_BATCH_BYTES", 3 * 8 * 57)
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
