"""``scores(..., store=path.npy)``: an interrupted run never leaves a matrix that looks complete,
files influx did not write are never overwritten, and finished scores of another question are
replaced only when asked."""

from __future__ import annotations

import json

import numpy as np
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

    def fails_midway(inputs, targets, loss_fn=None):
        calls.append(inputs.shape[0])
        if len(calls) == 4:  # the query batch, then train blocks 1, 2 and the third fails
            raise Interrupted("stopped midway")
        return features(inputs, targets, loss_fn)

    monkeypatch.setattr(second.estimator, "features", fails_midway)
    with pytest.raises(Interrupted):
        second.scores(query, store=path, overwrite=True)  # another method: replaced when asked
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["complete"] is False and manifest["method"] == "exact"
    assert not path.exists(), "neither the previous run's matrix nor a half-written one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.json"], "no partial file left"
    with pytest.raises(InfluxValueError, match="incomplete.*interrupted"):
        read_stored(path)

    monkeypatch.setattr(second.estimator, "features", features)
    again = second.scores(query, store=path)  # an incomplete manifest is the store's to replace
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


def test_files_influx_did_not_write_are_never_overwritten(tiny_mlp, tmp_path):
    model, loss_fn, train, query = tiny_mlp
    fitted = influence.fit(model, loss_fn, train, method="grad_dot")
    own = tmp_path / "results.json"
    own.write_text('{"my": "results"}')
    with pytest.raises(InfluxValueError, match=r"results.json' exists and influx did not write"):
        fitted.scores(query, store=tmp_path / "results.npy")
    assert own.read_text() == '{"my": "results"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]

    matrix = tmp_path / "matrix.npy"
    np.save(matrix, np.arange(3.0))
    before = matrix.read_bytes()
    for overwrite in (False, True):  # overwrite= replaces influx's scores, never foreign files
        with pytest.raises(InfluxValueError, match=r"matrix.npy' exists.*another path, or delete"):
            fitted.scores(query, store=matrix, overwrite=overwrite)
    assert matrix.read_bytes() == before and not matrix.with_suffix(".json").exists()


@pytest.mark.parametrize("bad", ["", None, 3])
def test_an_empty_or_odd_store_path_is_refused_clearly(tiny_mlp, bad):
    model, loss_fn, train, query = tiny_mlp
    fitted = influence.fit(model, loss_fn, train, method="grad_dot")
    if bad is None:
        assert fitted.scores(query, store=bad).path is None  # None: nothing stored
        return
    with pytest.raises(InfluxValueError, match="store= must name a .npy file"):
        fitted.scores(query, store=bad)


def test_finished_scores_of_another_question_are_refused(tiny_mlp, tmp_path):
    model, loss_fn, train, query = tiny_mlp
    path = tmp_path / "scores.npy"
    fitted = influence.fit(model, loss_fn, train, method="grad_dot")
    first = fitted.scores(query, store=path).values.clone()
    again = fitted.scores(query, store=path)  # the same question: recomputed in place
    assert torch.equal(again.values, first)
    others = {
        "query set": lambda: fitted.scores((query[0][:5], query[1][:5]), store=path),
        "query set .*same size": lambda: fitted.scores((*query, torch.arange(8) + 50), store=path),
        "train set": lambda: fitted.scores(query, train=(train[0][:9], train[1][:9]), store=path),
        "method 'grad_dot' -> 'grad_cos'": lambda: influence.fit(
            model, loss_fn, train, method="grad_cos"
        ).scores(query, store=path),
    }
    for what, score in others.items():
        with pytest.raises(InfluxValueError, match=f"another question.*{what.split()[0]}"):
            score()
        assert torch.equal(read_stored(path).values, first), what
    replaced = fitted.scores((query[0][:5], query[1][:5]), store=path, overwrite=True)
    assert read_stored(path).shape == (5, 60) and replaced.path == str(path)
