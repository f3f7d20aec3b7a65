"""K-FAC / EK-FAC at scale: saved factors reload bit for bit, and a fit split over two torchrun
ranks (gloo) equals the one-process fit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from utils import assert_close

from influx import influence
from influx.errors import InfluxValueError
from influx.influence import factors_io

ROOT = Path(__file__).resolve().parents[2]


def loss_fn(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def _setup(dtype=torch.float32):
    """A conv + GroupNorm + Linear net with trainable affine parameters, and 30 train points."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2),
        nn.GroupNorm(4, 16),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 3 * 3, 5),
    ).to(dtype)
    x = torch.randn(30, 3, 8, 8, dtype=dtype)
    y = torch.randint(0, 5, (30,))
    return model, (x, y), (x[:4] + 0.1, y[:4])


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_saved_factors_reload_to_the_same_scores_bit_for_bit(tmp_path, method):
    model, train, query = _setup()
    fitted = influence.fit(model, loss_fn, train, method=method, batch_size=8, fisher="sampled")
    path = factors_io.save(fitted, tmp_path / "factors.safetensors")
    loaded = influence.load(path, model, loss_fn, train)
    assert loaded.method == method and loaded.batch_size == 8
    assert loaded.diagnostics["coverage"] == fitted.diagnostics["coverage"]
    assert loaded.diagnostics["damping"] == fitted.diagnostics["damping"]
    assert loaded.diagnostics["feature_basis"] == fitted.diagnostics["feature_basis"]
    # Bit for bit: the same tensors, the same dampings, the same arithmetic.
    assert torch.equal(loaded.scores(query).values, fitted.scores(query).values)
    assert torch.equal(loaded.self_influence(), fitted.self_influence())


def test_loading_onto_another_model_or_file_is_refused(tmp_path):
    model, train, query = _setup()
    fitted = influence.fit(model, loss_fn, train, method="ekfac", batch_size=10)
    path = factors_io.save(fitted, tmp_path / "f.safetensors")
    other, _, _ = _setup()
    with torch.no_grad():
        other[0].weight.add_(1e-3)
    with pytest.raises(InfluxValueError, match="values differ"):
        influence.load(path, other, loss_fn, train)
    wider = nn.Sequential(*list(other)[:-1], nn.Linear(16 * 3 * 3, 6))
    with pytest.raises(InfluxValueError, match=r"do not match.*7.weight"):
        influence.load(path, wider, loss_fn, train)
    with pytest.raises(InfluxValueError, match="fitted on 30 examples but train has 12"):
        influence.load(path, model, loss_fn, (train[0][:12], train[1][:12]))
    with pytest.raises(InfluxValueError, match="no factors file"):
        influence.load(tmp_path / "missing.safetensors", model, loss_fn, train)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InfluxValueError, match="not a safetensors file"):
        influence.load(tmp_path / "junk.safetensors", model, loss_fn, train)
    with pytest.raises(InfluxValueError, match="only kfac / ekfac"):
        factors_io.save(influence.fit(model, loss_fn, train, method="grad_dot"), path)


WORKER = """
import sys, torch
sys.path[:0] = [{tests!r}, {root!r}]
from test_kfac_scale import _setup, loss_fn
from influx import distributed, influence
from influx.influence import factors_io
context = distributed.init("cpu")
model, train, _ = _setup(torch.float64)
fitted = influence.fit(model, loss_fn, train, method="ekfac", batch_size=7, fisher="sampled",
                       split_ranks=True)
if context.is_main:
    factors_io.save(fitted, {out!r})
distributed.finalize()
"""


@pytest.mark.slow
def test_two_gloo_ranks_fit_the_same_factors_as_one_process(tmp_path):
    out = tmp_path / "split.safetensors"
    script = tmp_path / "worker.py"
    tests = Path(__file__).parent
    script.write_text(WORKER.format(tests=str(tests), root=str(tests.parent), out=str(out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--standalone", str(script)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    model, train, query = _setup(torch.float64)
    # 30 examples in batches of 7: rank 0 fits batches 0, 2, 4 and rank 1 batches 1, 3.
    single = influence.fit(model, loss_fn, train, method="ekfac", batch_size=7, fisher="sampled")
    split = influence.load(out, model, loss_fn, train)
    # Sums over the same examples added in another order (float64): agreement to ~1e-15
    # relative; 1e-12 leaves room for the eigendecomposition of nearly equal factors.
    for name, f in single.estimator.factors.items():
        g = split.estimator.factors[name]
        assert f.count == g.count == 30
        assert_close(g.activation, f.activation, rtol=1e-12, name=f"A of {name}")
        assert_close(g.gradient, f.gradient, rtol=1e-12, name=f"S of {name}")
        assert_close(g.eigenvalues, f.eigenvalues, rtol=1e-10, name=f"EK-FAC of {name}")
    for name, f in single.estimator.diagonal.items():
        assert_close(split.estimator.diagonal[name].diagonal, f.diagonal, rtol=1e-12, name=name)
    assert_close(split.scores(query).values, single.scores(query).values, rtol=1e-9, name="scores")


def test_split_ranks_without_a_process_group_is_one_process():
    model, train, query = _setup(torch.float64)
    plain = influence.fit(model, loss_fn, train, method="ekfac", batch_size=7)
    split = influence.fit(model, loss_fn, train, method="ekfac", batch_size=7, split_ranks=True)
    assert torch.equal(split.scores(query).values, plain.scores(query).values)


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
@pytest.mark.parametrize("basis", ["eigen", "parameter"])
def test_layer_by_layer_scores_equal_the_feature_path(monkeypatch, method, basis):
    """A pass that contracts each block as the backward produces it (no [B, K] features: what
    a train set too large to cache gets) gives the feature path's scores, per-layer shares, top-k
    and self-influence, to float64 rounding."""
    model, train, query = _setup(torch.float64)
    fitted = influence.fit(
        model, loss_fn, train, method=method, batch_size=8, fisher="sampled", feature_basis=basis
    )
    estimator = fitted.estimator
    assert_close(
        estimator.preconditioned_features(*query),
        estimator.precondition(estimator.features(*query)),
        rtol=1e-12,
    )
    cached = fitted.scores(query, per_layer=True, top_k=3)  # a small set: features, cached
    cached_self = fitted.self_influence()
    assert fitted._train_features is not None

    featurized = []
    features = fitted.estimator.features
    monkeypatch.setattr(
        fitted.estimator, "features", lambda x, y: featurized.append(len(x)) or features(x, y)
    )
    streamed = fitted.scores(query, train, per_layer=True, top_k=3)  # train= is never cached
    assert featurized == []  # queries are preconditioned as they arrive, train contracted
    assert_close(streamed.values, cached.values, rtol=1e-12)
    assert set(streamed.per_layer) == set(cached.per_layer)
    for layer, share in cached.per_layer.items():
        assert_close(streamed.per_layer[layer], share, rtol=1e-12, atol=1e-14, name=layer)
    assert torch.equal(streamed.top_k.largest_indices, cached.top_k.largest_indices)
    assert torch.equal(streamed.top_k.smallest_indices, cached.top_k.smallest_indices)
    assert_close(fitted.self_influence(train), cached_self, rtol=1e-12, elementwise=True)
    assert featurized == []


def test_layer_by_layer_pass_names_a_train_example_with_nan_gradients(monkeypatch):
    model, train, query = _setup(torch.float64)
    fitted = influence.fit(model, loss_fn, train, method="ekfac", batch_size=8, fisher="sampled")
    score_batch = fitted.estimator.score_batch

    def poisoned(queries, inputs, targets, **kwargs):  # the gradient of train example 13 is NaN
        slab, shares = score_batch(queries, inputs, targets, **kwargs)
        if len(inputs) == 8 and torch.equal(inputs[5], train[0][13]):
            slab[:, 5] = float("nan")
        return slab, shares

    monkeypatch.setattr(fitted.estimator, "score_batch", poisoned)
    with pytest.raises(InfluxValueError, match=r"train gradients .* example indices \[13\]"):
        fitted.scores(query, train)
