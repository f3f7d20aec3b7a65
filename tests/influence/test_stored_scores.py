"""``scores(..., store=path.npy)``: an interrupted run never leaves a matrix that looks complete."""

from __future__ import annotations

import json

import pytest
import torch

from influx import influence
from influx.errors import InfluxValueError
from influx.influence.scores import read_stored


class Interrupted(KeyboardInterrupt):
    pass


def test_an_interrupted_store_is_marked_incomplete_and_refused(tiny_mlp, tmp_path, monkeypatch):
    model, loss_fn, train, query = tiny_mlp
    path = tmp_path / "scores.npy"
    first = influence.fit(model, loss_fn, train, method="grad_dot", batch_size=10)
    done = first.scores(query, store=path)
    assert torch.equal(read_stored(path).values, done.values)

    second = influence.fit(model, loss_fn, train, method="exact", damping=0.5, batch_size=10)
    features, calls = second.estimator.features, []

    def fails_midway(inputs, targets):
        calls.append(inputs.shape[0])
        if len(calls) == 4:  # the query batch, then train blocks 1, 2 and the third fails
            raise Interrupted("stopped midway")
        return features(inputs, targets)

    monkeypatch.setattr(second.estimator, "features", fails_midway)
    with pytest.raises(Interrupted):
        second.scores(query, store=path)
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["complete"] is False and manifest["method"] == "exact"
    assert not path.exists(), "neither the previous run's matrix nor a half-written one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.json"], "no partial file left"
    with pytest.raises(InfluxValueError, match="incomplete.*interrupted"):
        read_stored(path)

    monkeypatch.setattr(second.estimator, "features", features)
    again = second.scores(query, store=path)
    stored = read_stored(path)
    assert stored.method == "exact" and stored.sign == -1.0
    assert torch.equal(stored.values, again.values)
    assert torch.equal(stored.train_indices, torch.arange(train[0].shape[0]))


def test_top_k_must_be_a_positive_integer(tiny_mlp):
    model, loss_fn, train, query = tiny_mlp
    fitted = influence.fit(model, loss_fn, train, method="grad_dot")
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(InfluxValueError, match="top_k must be a positive integer"):
            fitted.scores(query, top_k=bad)
