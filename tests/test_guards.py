"""Bad input gets a clear error (or warning) before any expensive work, naming the problem."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from utils import assert_close

from influx import commutator, grads, influence
from influx.errors import InfluxValueError, UnsupportedModelError
from influx.grads.common import TrainModeDropoutWarning
from influx.grads.functional import naive_per_sample_grads

FAST_OPTIONS = {
    "exact": {"damping": 0.5},
    "cg": {"damping": 0.5, "max_iterations": 5},
    "lissa": {"damping": 0.5, "max_iterations": 5},
    "arnoldi": {"damping": 0.5, "rank": 5},
    "kfac": {},
    "ekfac": {},
    "trak": {"dim": 8},
    "tracin": {"learning_rates": 0.1},
    "grad_dot": {},
    "grad_cos": {},
}


def ce(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def data(n=16):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=generator)


def options_for(method, model):
    options = dict(FAST_OPTIONS[method])
    if method == "tracin":
        options["checkpoints"] = [model.state_dict()]
    return options


@pytest.mark.parametrize("method", influence.METHODS)
def test_batchnorm_is_refused_before_any_work(method):
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).double()
    with pytest.raises(UnsupportedModelError, match=r"BatchNorm1d \(1\).*convert_batchnorm"):
        influence.fit(model, ce, data(), method=method, **options_for(method, model))
    # nothing ran: the running statistics were never updated
    assert int(model[1].num_batches_tracked) == 0


@pytest.mark.parametrize("method", ["exact", "cg"])
def test_estimators_built_directly_refuse_batchnorm_too(method):
    from influx.influence.exact import ExactEstimator, ExactOptions
    from influx.influence.iterative import IterativeEstimator, IterativeOptions

    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).double()
    with pytest.raises(UnsupportedModelError, match="convert_batchnorm"):
        if method == "exact":
            ExactEstimator(model, ce, data(), ExactOptions(damping=0.5))
        else:
            IterativeEstimator(model, ce, data(), IterativeOptions(damping=0.5), method="cg")


@pytest.mark.parametrize("method", influence.METHODS)
@pytest.mark.parametrize("where", ["input", "query"])
def test_nan_examples_are_named_by_dataset_index(method, where):
    model = mlp()
    x, y = data()
    indices = torch.arange(100, 116)
    bad = x.clone()
    bad[7, 2] = float("nan")
    options = options_for(method, model)
    if where == "input":
        with pytest.raises(InfluxValueError, match=r"train inputs of 1 example.*indices \[107\]"):
            influence.fit(model, ce, (bad, y, indices), method=method, **options)
    else:
        fitted = influence.fit(model, ce, (x, y, indices), method=method, **options)
        with pytest.raises(InfluxValueError, match=r"query inputs of 1 example.*indices \[107\]"):
            fitted.scores((bad, y, indices))


def test_nan_losses_and_parameters_are_named():
    model, (x, y) = mlp(), data()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(InfluxValueError, match=r"train losses of 16 example"):
        influence.fit(model, ce, (x, y), method="grad_dot")
    targets = y.double()
    targets[3] = float("nan")
    mse = lambda o, t: (o[:, 0] - t) ** 2  # noqa: E731
    with pytest.raises(InfluxValueError, match=r"losses of 1 example.*indices \[3\]"):
        influence.fit(mlp(), mse, (x, targets), method="cg", damping=0.5)


def test_per_sample_norms_and_pairwise_name_nan_examples():
    model, (x, y) = mlp(), data()
    x[5, 0] = float("nan")
    with pytest.raises(InfluxValueError, match=r"losses of 1 example.*indices \[5\]"):
        grads.per_sample_norms(model, ce, x, y)
    with pytest.raises(InfluxValueError, match=r"indices \[15\]"):  # position 5 + 10
        grads.per_sample_norms(model, ce, torch.cat([x[6:], x[:6]]), y, chunk_size=4)
    with pytest.raises(InfluxValueError, match=r"indices \[5\]"):
        commutator.pairwise(model, ce, (x[:8], y[:8]))


def test_no_trainable_parameters_or_an_empty_selection():
    model = mlp().requires_grad_(False)
    with pytest.raises(InfluxValueError, match="no trainable parameter"):
        influence.fit(model, ce, data(), method="grad_dot")
    with pytest.raises(InfluxValueError, match="no trainable parameter"):
        grads.per_sample_norms(model, ce, *data())
    with pytest.raises(InfluxValueError, match="params= selects no parameter"):
        influence.fit(mlp(), ce, data(), method="cg", params=())


@pytest.mark.parametrize("method", influence.METHODS)
def test_empty_train_or_query_sets(method):
    model, (x, y) = mlp(), data()
    options = options_for(method, model)
    with pytest.raises(InfluxValueError, match="the train set is empty"):
        influence.fit(model, ce, (x[:0], y[:0]), method=method, **options)
    fitted = influence.fit(model, ce, (x, y), method=method, **options)
    with pytest.raises(InfluxValueError, match="the query set is empty"):
        fitted.scores((x[:0], y[:0]))


def test_kfac_auto_fisher_checks_the_loss_instead_of_assuming_it():
    model, (x, y) = mlp(), data()
    fitted = influence.fit(model, ce, (x, y), method="kfac")
    assert fitted.diagnostics["fisher"] == "sampled"
    smoothed = lambda o, t: F.cross_entropy(o, t, reduction="none", label_smoothing=0.2)  # noqa: E731
    with pytest.raises(InfluxValueError, match="fisher='auto'.*fisher='empirical'"):
        influence.fit(model, smoothed, (x, y), method="ekfac")
    assert (
        influence.fit(model, smoothed, (x, y), method="ekfac", fisher="empirical").diagnostics[
            "fisher"
        ]
        == "empirical"
    )
    mse = lambda o, t: ((o - t) ** 2).sum(1)  # noqa: E731
    regression = influence.fit(
        model, mse, (x, torch.randn(16, 3, dtype=torch.float64)), method="kfac"
    )
    assert regression.diagnostics["fisher"] == "empirical"


def test_kfac_covers_norm_layers_diagonally_and_honours_params():
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)).double()
    covered = influence.fit(model, ce, data(), method="kfac")
    assert covered.diagnostics["coverage"]["diagonal"] == ["1.weight", "1.bias"]
    chosen = ("2.weight", "2.bias")
    fitted = influence.fit(model, ce, data(), method="ekfac", params=chosen)
    assert fitted.diagnostics["layers"] == ["2"]
    assert fitted.estimator.layout.size == 3 * 6
    # the same as freezing everything else
    frozen = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)).double()
    frozen.load_state_dict(model.state_dict())
    for name, p in frozen.named_parameters():
        p.requires_grad_(name in chosen)
    expected = influence.fit(frozen, ce, data(), method="ekfac").scores(data(4)).values
    assert_close(fitted.scores(data(4)).values, expected, rtol=1e-12, name="params= vs frozen")


def test_kfac_with_a_weight_but_not_its_bias():
    model, (x, y) = mlp(), data()
    fitted = influence.fit(model, ce, (x, y), method="kfac", params=("2.weight",))
    assert fitted.estimator.layout.size == 3 * 5  # no bias column


@pytest.mark.parametrize("projection", ["dense", "kronecker"])
def test_trak_honours_params_and_covers_every_parameter(projection):
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)).double()
    fitted = influence.fit(model, ce, data(), method="trak", dim=12, projection=projection)
    if projection == "kronecker":
        # the LayerNorm's parameters have their own block: nothing is silently dropped
        assert set(fitted.estimator.layout.layers) == {"0", "1", "2"}
    selected = influence.fit(
        model, ce, data(), method="trak", dim=12, projection=projection, params=("0.weight",)
    )
    assert selected.estimator.num_parameters == 20
    if projection == "kronecker":
        assert set(selected.estimator.layout.layers) == {"0"}


def test_store_needs_a_npy_path_and_keeps_float64(tmp_path):
    model, (x, y) = mlp(), data()
    fitted = influence.fit(model, ce, (x, y), method="grad_dot")
    with pytest.raises(InfluxValueError, match=r"store= must name a \.npy file"):
        fitted.scores((x, y), store=tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()
    scores = fitted.scores((x, y), dense=False, store=tmp_path / "x.npy")
    assert scores.values.dtype == torch.float64 and np.load(tmp_path / "x.npy").dtype == np.float64
    assert_close(scores.values, fitted.scores((x, y)).values, rtol=0, name="stored float64")
    assert scores.path == str(tmp_path / "x.npy")


class Tempered(nn.Module):
    """A linear layer with a learned scalar temperature: a 0-dim parameter."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.temperature = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.linear(x) / self.temperature


def test_zero_dim_parameters_in_norms_and_projections():
    torch.manual_seed(0)
    model = Tempered().double()
    x, y = data(6)
    reference = naive_per_sample_grads(model, ce, x, y)
    flat = torch.cat([g.reshape(6, -1) for g in reference.values()], dim=1)
    assert_close(grads.per_sample_norms(model, ce, x, y), flat.norm(dim=1), name="norms")
    by_layer = grads.per_sample_norms(model, ce, x, y, by_layer=True)
    assert_close(by_layer["temperature"], reference["temperature"].abs(), name="0-dim norm")
    projected = grads.per_sample_projected(model, ce, x, y, dim=8)
    assert projected.shape[0] == 6 and torch.isfinite(projected).all()
    dense = grads.per_sample_projected(model, ce, x, y, dim=8, kind="dense")
    assert dense.shape == (6, 8)


def test_tracin_accepts_the_training_record_of_train():
    from influx import train

    model, (x, y) = mlp(), data()
    record = train.train(
        model, (x, y), loss_fn="cross_entropy", optimizer="sgd", lr=0.1, steps=4, batch_size=None,
        checkpoints=[2, 4], progress=False,
    )  # fmt: skip
    from_record = influence.fit(model, ce, (x, y), method="tracin", checkpoints=record)
    explicit = influence.fit(
        model,
        ce,
        (x, y),
        method="tracin",
        checkpoints=[c.state_dict for c in record.checkpoints],
        learning_rates=[c.lr for c in record.checkpoints],
    )
    assert from_record.diagnostics["learning_rates"] == [c.lr for c in record.checkpoints]
    assert_close(from_record.scores((x, y)).values, explicit.scores((x, y)).values, name="tracin")


def test_dropout_in_train_mode_warns():
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Linear(5, 3)).double()
    with pytest.warns(TrainModeDropoutWarning, match=r"Dropout\(p=0.5\).*model.eval\(\)"):
        grads.per_sample_norms(model, ce, *data())
    with pytest.warns(TrainModeDropoutWarning):
        influence.fit(model, ce, data(), method="grad_dot")
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainModeDropoutWarning)
        grads.per_sample_norms(model.eval(), ce, *data())


def test_lds_uses_the_scores_sign_and_refuses_nan():
    from influx.influence.evaluate import SubsetModels, lds

    model, (x, y) = mlp(), data()
    scores = influence.fit(model, ce, (x, y), method="grad_dot").scores((x[:4], y[:4]))
    assert scores.sign == 1.0
    generator = torch.Generator().manual_seed(0)
    masks = (torch.rand(6, 16, generator=generator) > 0.5).double()
    losses = torch.rand(6, 4, generator=generator, dtype=torch.float64)
    subsets = SubsetModels(masks, losses)
    assert lds(scores, subsets).mean == pytest.approx(lds(scores.values, subsets, sign=1.0).mean)
    assert lds(scores, subsets).mean == pytest.approx(-lds(scores.values, subsets, sign=-1.0).mean)
    broken = scores.values.clone()
    broken[2, 3] = float("nan")
    with pytest.raises(InfluxValueError, match=r"scores of 1 example.*indices \[2\]"):
        lds(broken, subsets)
    constant = SubsetModels(masks, torch.ones(6, 4, dtype=torch.float64))
    with pytest.raises(InfluxValueError, match="no query has a rank correlation"):
        lds(scores, constant)


@pytest.mark.parametrize("method", ["exact", "ekfac", "grad_dot"])
def test_queries_the_model_cannot_run_are_named_before_scoring(method):
    model = mlp()
    train = (torch.randn(6, 4, dtype=torch.float64), torch.randint(3, (6,)))
    fitted = influence.fit(model, ce, train, method=method, **FAST_OPTIONS[method])
    float32_queries = (torch.randn(2, 4), torch.randint(3, (2,)))
    with pytest.raises(InfluxValueError, match=r"inputs\.to\(torch\.float64\)"):
        fitted.scores(float32_queries)
    wrong_shape = (torch.randn(2, 7, dtype=torch.float64), torch.randint(3, (2,)))
    with pytest.raises(InfluxValueError, match=r"one example, of shape \(7,\)"):
        fitted.scores(wrong_shape)
    for top_k in (0, 2.5, True):
        with pytest.raises(InfluxValueError, match="top_k must be a positive integer"):
            fitted.scores(train, dense=False, top_k=top_k)
