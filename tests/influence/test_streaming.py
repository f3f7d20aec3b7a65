"""Every estimator fits and scores from a stream: a Dataset is read batch by batch, each pass
reads each example once (the checks ride on the first pass), and the numbers are those of the
same examples given as tensors.

Passes over the training set of ``fit`` + ``scores(query)`` + ``self_influence()`` while the
train features fit the cache (they are kept after their first pass):

    exact 2 (dense curvature, features)     kfac 2 (factors, features)
    ekfac 3 (factors, eigenvalues, features) trak 1 (projected features and Fisher)
    tracin, grad_dot, grad_cos 1 (features, computed by fit)
    cg, lissa, arnoldi: one per curvature-vector product (spectrum, solves), plus the
    preconditioner's fit (EK-FAC: 2) and the features (1)

and when they do not (every pass streams): exact 3, kfac 3, ekfac 4, trak 3, tracin / grad_dot /
grad_cos 2 (fit reads nothing). A query set is read once per ``scores`` call.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from utils import LazyDataset, assert_close

from influx import influence
from influx.errors import InfluxValueError
from influx.influence import stream

# The short spectrum runs that keep cg / lissa / arnoldi cheap here warn that they are short.
pytestmark = pytest.mark.filterwarnings("ignore:Lanczos did not resolve")


def cross_entropy(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


OPTIONS = {
    "exact": {"damping": 0.5},
    "cg": {"damping": 0.5, "max_iterations": 4, "spectrum_iterations": 12, "trace_samples": 4},
    "lissa": {"damping": 0.5, "max_iterations": 4, "spectrum_iterations": 12, "trace_samples": 4},
    "arnoldi": {"damping": 0.5, "rank": 4, "spectrum_iterations": 12, "trace_samples": 4},
    "kfac": {},
    "ekfac": {},
    "trak": {"dim": 8},
    "tracin": {"learning_rates": [0.5, 0.25]},
    "grad_dot": {},
    "grad_cos": {},
}
# Every curvature-vector product reads the train set again: cg / lissa / arnoldi take seconds.
SOLVED = ("cg", "lissa", "arnoldi")
METHODS = [pytest.param(m, marks=pytest.mark.slow) if m in SOLVED else m for m in influence.METHODS]
CACHED = {"exact": 2, "kfac": 2, "ekfac": 3, "trak": 1, "tracin": 1, "grad_dot": 1, "grad_cos": 1}
STREAMED = {"exact": 3, "kfac": 3, "ekfac": 4, "trak": 3, "tracin": 2, "grad_dot": 2, "grad_cos": 2}


def options_for(method, model):
    options = dict(OPTIONS[method])
    if method == "tracin":
        options["checkpoints"] = [model.state_dict()] * 2
    return options


def expected_passes(method, fitted, cached: bool) -> int:
    if method in SOLVED:
        preconditioner = fitted.diagnostics["preconditioner"]
        fit = {"ekfac": 2, "kfac": 1, None: 0}[preconditioner]
        return fitted.estimator.operator.passes + fit + (1 if cached else 2)
    return (CACHED if cached else STREAMED)[method]


def run(method, train, query, model, batch_size=8):
    fitted = influence.fit(
        model, cross_entropy, train, method=method, batch_size=batch_size,
        **options_for(method, model),
    )  # fmt: skip
    return fitted, fitted.scores(query).values, fitted.self_influence()


@pytest.mark.parametrize("cached", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_a_dataset_is_read_once_per_pass_and_scores_like_tensors(method, cached, monkeypatch):
    if not cached:
        monkeypatch.setattr(stream, "CACHE_BYTES", 0)
    model = mlp()
    train, query = LazyDataset(37, shape=(5,)), LazyDataset(6, shape=(5,), seed=1)
    fitted, scores, own = run(method, train, query, model)
    passes = expected_passes(method, fitted, cached)
    assert torch.equal(train.reads, torch.full((37,), passes)), (method, train.reads.unique())
    assert torch.equal(query.reads, torch.ones(6, dtype=torch.long))
    assert torch.equal(fitted.train_indices, torch.arange(37))
    # the same numbers, bit for bit, as the tuple of the same examples in the same batches
    _, tuple_scores, tuple_own = run(method, train.tensors(), query.tensors(), mlp())
    assert torch.equal(scores, tuple_scores) and torch.equal(own, tuple_own)


@pytest.mark.parametrize(
    "method", ["exact", "ekfac", "trak", "grad_dot", pytest.param("cg", marks=pytest.mark.slow)]
)
def test_a_dataloader_is_a_data_argument(method):
    model = mlp()
    train, query = LazyDataset(30, shape=(5,)), LazyDataset(4, shape=(5,), seed=1)
    # the loaders' batches are the tuple's: bit for bit
    loader = DataLoader(train, batch_size=8)
    fitted, scores, own = run(method, loader, DataLoader(query, batch_size=8), model)
    _, tuple_scores, tuple_own = run(method, train.tensors(), query.tensors(), mlp())
    assert torch.equal(scores, tuple_scores) and torch.equal(own, tuple_own)
    # other batches: the same numbers up to rounding
    other = fitted.scores(DataLoader(query, batch_size=3), DataLoader(train, batch_size=5))
    assert_close(other.values, tuple_scores, rtol=1e-10, elementwise=True, name=method)


def test_ekfac_self_influence_never_holds_all_inputs(monkeypatch):
    """fit(method='ekfac') + self_influence() on a Dataset: no tensor of all inputs is formed
    (every concatenation and stack of input rows is watched) and the features are not kept."""
    monkeypatch.setattr(stream, "CACHE_BYTES", 0)
    n, batch = 90, 16
    real_cat, real_stack = torch.cat, torch.stack

    def watched(real):
        def call(tensors, *args, **kwargs):
            out = real(tensors, *args, **kwargs)
            if out.is_floating_point() and out.dim() == 2 and out.shape[1] == 5:
                assert out.shape[0] <= batch, f"{out.shape[0]} input rows held at once"
            return out

        return call

    train = LazyDataset(n, shape=(5,))
    monkeypatch.setattr(torch, "cat", watched(real_cat))
    monkeypatch.setattr(torch, "stack", watched(real_stack))
    fitted = influence.fit(mlp(), cross_entropy, train, method="ekfac", batch_size=batch)
    values = fitted.self_influence()
    assert values.shape == (n,) and fitted._train_features is None
    assert torch.equal(train.reads, torch.full((n,), 3))  # factors, eigenvalues, self-influence


def test_the_checks_ride_on_the_first_pass_and_name_dataset_indices():
    class WithNaN(LazyDataset):
        def __getitem__(self, index):
            x, y, i = super().__getitem__(index)
            return (x * float("nan") if i == 23 else x), y, i

    train = WithNaN(30, shape=(5,))
    with pytest.raises(InfluxValueError, match=r"train inputs of 1 example.*indices \[23\]"):
        influence.fit(mlp(), cross_entropy, train, method="kfac", batch_size=8)
    assert int(train.reads.max()) == 1  # no pass of its own before the fit's
    with pytest.raises(InfluxValueError, match="the train set is empty"):
        influence.fit(mlp(), cross_entropy, LazyDataset(0), method="ekfac")


def test_repeated_dataset_indices_across_batches_are_refused():
    class Repeats(LazyDataset):
        def __getitem__(self, index):
            x, y, _ = super().__getitem__(index)
            return x, y, index % 10

    with pytest.raises(InfluxValueError, match="indices repeat"):
        influence.fit(mlp(), cross_entropy, Repeats(20, shape=(5,)), method="exact", damping=0.5)


def test_another_train_set_is_read_once_per_call():
    fitted = influence.fit(
        mlp(), cross_entropy, LazyDataset(20, shape=(5,)), method="ekfac", batch_size=8
    )
    other, query = LazyDataset(15, shape=(5,), seed=2), LazyDataset(3, shape=(5,), seed=1)
    scores = fitted.scores(query, train=other)
    assert scores.shape == (3, 15) and torch.equal(other.reads, torch.ones(15, dtype=torch.long))
    fitted.self_influence(other)
    assert torch.equal(other.reads, torch.full((15,), 2))
    with pytest.warns(DeprecationWarning, match="train_inputs is deprecated"):
        assert fitted.train_inputs.shape == (20, 5)
