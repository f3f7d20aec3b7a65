"""Float64 correctness of every estimator against brute force and closed forms."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn
from utils import assert_close, tiny_transformer

from influx import influence
from influx.curvature import IllConditionedWarning, NonPositiveDefiniteWarning
from influx.errors import InfluxValueError
from influx.grads.functional import naive_per_sample_grads

# A damping that makes the tiny MLP's Hessian positive definite, shared by the comparisons.
PD_DAMPING = 0.5


def flat_grads(model, loss_fn, data):
    grads = naive_per_sample_grads(model, loss_fn, *data)
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)


def brute_force_hessian(model, loss_fn, data):
    params = dict(model.named_parameters())
    names = list(params)
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    sizes = [p.numel() for p in params.values()]

    def objective(theta):
        pieces = dict(
            zip(names, (t.reshape(params[n].shape) for n, t in zip(names, theta.split(sizes))))
        )
        out = torch.func.functional_call(model, pieces, (data[0],))
        return loss_fn(out, data[1]).mean()

    return torch.autograd.functional.hessian(objective, flat)


@pytest.mark.parametrize("solver", ["cholesky", "eigh"])
def test_exact_equals_brute_force_solve(tiny_mlp, solver):
    model, loss_fn, train, query = tiny_mlp
    fitted = influence.fit(model, loss_fn, train, method="exact", damping=PD_DAMPING, solver=solver)
    hessian = brute_force_hessian(model, loss_fn, train)
    g_train, g_query = flat_grads(model, loss_fn, train), flat_grads(model, loss_fn, query)
    solved = torch.linalg.solve(
        hessian + PD_DAMPING * torch.eye(hessian.shape[0], dtype=hessian.dtype), g_train.T
    )
    expected = -g_query @ solved
    assert_close(fitted.scores(query).values, expected, rtol=1e-9, name="exact vs solve")


def test_linear_regression_closed_form():
    torch.manual_seed(1)
    x, theta = torch.randn(50, 4, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    y = x @ theta + 0.3 * torch.randn(50, 1, dtype=torch.float64)
    model = nn.Linear(4, 1, bias=False).double()
    loss_fn = lambda out, t: 0.5 * (out - t).squeeze(1) ** 2
    fitted = influence.fit(model, loss_fn, (x, y), method="exact", damping=0.0)
    w = model.weight.detach().T
    residual = x @ w - y  # [N, 1]
    grads = residual * x  # [N, 4]
    hessian = x.T @ x / x.shape[0]
    expected = -grads[:5] @ torch.linalg.solve(hessian, grads.T)
    assert_close(
        fitted.scores((x[:5], y[:5])).values, expected, rtol=1e-10, name="linear regression"
    )


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_logistic_regression_closed_form(curvature):
    torch.manual_seed(2)
    x = torch.randn(80, 3, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * torch.randn(80, dtype=torch.float64) > 0).double()
    model = nn.Linear(3, 1, bias=False).double()
    loss_fn = lambda out, t: F.binary_cross_entropy_with_logits(out.squeeze(1), t, reduction="none")
    fitted = influence.fit(model, loss_fn, (x, y), method="exact", damping=0.0, curvature=curvature)
    p = torch.sigmoid(x @ model.weight.detach().T).squeeze(1)
    grads = (p - y)[:, None] * x
    # For logistic regression the Hessian and the GGN coincide: (1/N) sum p (1 - p) x x^T.
    hessian = (x * (p * (1 - p))[:, None]).T @ x / x.shape[0]
    expected = -grads[:6] @ torch.linalg.solve(hessian, grads.T)
    assert_close(
        fitted.scores((x[:6], y[:6])).values, expected, rtol=1e-9, name=f"logistic {curvature}"
    )


def _spearman(a, b):
    return spearmanr(a.flatten().numpy(), b.flatten().numpy()).statistic


@pytest.mark.parametrize(
    ("method", "floor", "preconditioner"),
    [
        ("cg", 0.99, None),
        ("cg", 0.99, "ekfac"),
        ("lissa", 0.95, None),
        ("lissa", 0.95, "ekfac"),
        ("arnoldi", 0.95, None),
    ],
)
def test_iterative_methods_agree_with_exact(tiny_mlp, method, floor, preconditioner):
    model, loss_fn, train, query = tiny_mlp
    exact = (
        influence.fit(model, loss_fn, train, method="exact", damping=PD_DAMPING)
        .scores(query)
        .values
    )
    options = (
        {"max_iterations": 300, "tolerance": 1e-8, "preconditioner": preconditioner}
        if method != "arnoldi"
        else {"rank": 40}
    )
    approx = (
        influence.fit(model, loss_fn, train, method=method, damping=PD_DAMPING, **options)
        .scores(query)
        .values
    )
    assert _spearman(approx, exact) >= floor


def test_ekfac_fits_the_empirical_fisher_at_least_as_well_as_kfac(tiny_mlp):
    """EK-FAC's eigenvalues are the best diagonal in K-FAC's eigenbasis (Frobenius norm)."""
    model, loss_fn, train, _ = tiny_mlp
    fits = {
        m: influence.fit(model, loss_fn, train, method=m, fisher="empirical")
        for m in ("kfac", "ekfac")
    }
    grads = fits["kfac"].estimator.features(*train)  # [N, K] in the K-FAC layout
    errors = {}
    for method, fitted in fits.items():
        errors[method] = 0.0
        for block in fitted.estimator.layout.blocks:
            f = fitted.estimator.factors[block.layer]
            g = grads[:, block.start : block.stop]
            fisher = g.T @ g / g.shape[0]
            basis = torch.kron(f.gradient_basis, f.activation_basis)
            approx = basis @ torch.diag(f.eigenvalues.flatten()) @ basis.T
            errors[method] += float((approx - fisher).square().sum())
    assert errors["ekfac"] <= errors["kfac"] * (1 + 1e-9)


METHOD_OPTIONS = {
    "exact": {"damping": PD_DAMPING},
    "cg": {"damping": PD_DAMPING, "max_iterations": 15},
    "lissa": {"damping": PD_DAMPING, "max_iterations": 15},
    "arnoldi": {"damping": PD_DAMPING, "rank": 20},
    "kfac": {},
    "ekfac": {},
    "trak": {"dim": 32},
    "tracin": {"learning_rates": [0.1, 0.2]},
    "grad_dot": {},
    "grad_cos": {},
}


def _fit(method, tiny_mlp):
    model, loss_fn, train, _ = tiny_mlp
    options = dict(METHOD_OPTIONS[method])
    if method == "tracin":
        options["checkpoints"] = [model.state_dict(), model.state_dict()]
    return influence.fit(model, loss_fn, train, method=method, **options)


@pytest.mark.slow
@pytest.mark.parametrize("method", influence.METHODS)
def test_self_influence_is_the_diagonal(tiny_mlp, method):
    _, _, train, _ = tiny_mlp
    fitted = _fit(method, tiny_mlp)
    diagonal = torch.diagonal(fitted.scores(train).values)
    # Influence methods: s(z) = -I_up,loss(z, z); tracin / grad_dot / grad_cos: s(z) = score(z, z).
    assert_close(
        fitted.self_influence(), fitted.sign * diagonal, rtol=1e-6, name=method, elementwise=True
    )


@pytest.mark.parametrize("method", ["exact", "cg", "kfac", "ekfac", "tracin", "grad_dot"])
def test_per_layer_scores_sum_to_total(tiny_mlp, method):
    _, _, _, query = tiny_mlp
    scores = _fit(method, tiny_mlp).scores(query, per_layer=True)
    assert set(scores.per_layer) == {"0", "2"}
    assert_close(sum(scores.per_layer.values()), scores.values, rtol=1e-10, name=method)


def test_tracin_is_the_learning_rate_weighted_sum(tiny_mlp):
    model, loss_fn, train, query = tiny_mlp
    other = {k: v + 0.1 for k, v in model.state_dict().items()}
    fitted = influence.fit(
        model,
        loss_fn,
        train,
        method="tracin",
        checkpoints=[model.state_dict(), other],
        learning_rates=[0.1, 0.3],
    )
    shifted = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    shifted.load_state_dict(other)
    expected = 0.1 * flat_grads(model, loss_fn, query) @ flat_grads(model, loss_fn, train).T
    expected += 0.3 * flat_grads(shifted, loss_fn, query) @ flat_grads(shifted, loss_fn, train).T
    assert_close(fitted.scores(query).values, expected, rtol=1e-10, name="tracin")


def test_tracin_takes_a_cosine_record_whose_last_checkpoint_has_rate_zero(tiny_mlp):
    # The last checkpoint of a cosine schedule records eta = 0: no step follows it.
    from influx import train as training

    model, loss_fn, train, query = tiny_mlp
    model = copy.deepcopy(model)
    record = training.train(
        model, train, optimizer="sgd", lr=0.1, epochs=2, batch_size=30,
        lr_schedule="cosine", checkpoints="epochs", progress=False,
    )  # fmt: skip
    rates = [c.lr for c in record.checkpoints]
    assert rates[-1] == 0.0 and all(lr > 0 for lr in rates[:-1])
    fitted = influence.fit(model, loss_fn, train, method="tracin", checkpoints=record)
    expected = torch.zeros(query[0].shape[0], train[0].shape[0], dtype=torch.float64)
    for checkpoint in record.checkpoints:
        at = copy.deepcopy(model)
        at.load_state_dict(checkpoint.state_dict)
        expected += (
            checkpoint.lr * flat_grads(at, loss_fn, query) @ flat_grads(at, loss_fn, train).T
        )
    # float64, the same sums in another order: a few hundred ulps (see utils.RTOL).
    assert_close(fitted.scores(query).values, expected, rtol=1e-10, name="cosine tracin")
    assert fitted.diagnostics["skipped_zero_rate"] == 1
    with pytest.raises(InfluxValueError, match="every learning rate is 0"):
        influence.fit(model, loss_fn, train, method="tracin", checkpoints=record, learning_rates=0)
    for bad in (-0.1, float("nan")):
        with pytest.raises(InfluxValueError, match="finite and >= 0"):
            influence.fit(
                model, loss_fn, train, method="tracin", checkpoints=record, learning_rates=bad
            )


def test_top_k_and_store_match_dense(tiny_mlp, tmp_path):
    _, _, _, query = tiny_mlp
    fitted = _fit("ekfac", tiny_mlp)
    dense = fitted.scores(query).values
    fitted.batch_size = 7  # ragged train blocks exercise the running top-k merge
    top = fitted.scores(query, dense=False, top_k=5, store=tmp_path / "scores.npy")
    assert torch.equal(top.top_k.largest_indices, dense.topk(5, dim=1).indices)
    assert torch.equal(top.top_k.smallest_indices, dense.topk(5, dim=1, largest=False).indices)
    assert_close(top.values.to(torch.float64), dense, rtol=1e-6, name="stored")
    assert (tmp_path / "scores.json").exists()
    # Top-k only: the fused score_topk kernel path, no [Q, N] matrix at all.
    only = fitted.scores(query, dense=False, top_k=5)
    assert only.values is None
    assert torch.equal(only.top_k.largest_indices, dense.topk(5, dim=1).indices)
    assert torch.equal(only.top_k.smallest_indices, dense.topk(5, dim=1, largest=False).indices)


def test_nonpositive_definite_and_ill_conditioned_warnings(tiny_mlp):
    model, loss_fn, train, _ = tiny_mlp
    with pytest.warns(NonPositiveDefiniteWarning, match="not positive definite"):
        influence.fit(model, loss_fn, train, method="exact", damping=0.0, solver="eigh")
    with pytest.warns(NonPositiveDefiniteWarning, match="falling back to solver='eigh'"):
        influence.fit(model, loss_fn, train, method="exact", damping=0.0)
    x = torch.randn(30, 3, dtype=torch.float64)
    x = torch.cat([x, x[:, :1] * (1 + 1e-6)], dim=1)  # nearly collinear column: tiny eigenvalue
    linear = nn.Linear(4, 1, bias=False).double()
    loss_fn = lambda out, t: 0.5 * (out - t).squeeze(1) ** 2
    with pytest.warns(IllConditionedWarning, match="ill-conditioned"):
        influence.fit(
            linear,
            loss_fn,
            (x, torch.randn(30, 1, dtype=torch.float64)),
            method="exact",
            damping=1e-9,
        )


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_auto_damping_shifts_the_spectrum_then_adds_a_tenth_of_its_mean(tiny_mlp, curvature):
    model, loss_fn, train, _ = tiny_mlp
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the default must not warn
        fitted = influence.fit(
            model, loss_fn, train, method="exact", curvature=curvature, solver="eigh"
        )
    eigenvalues = fitted.estimator.eigenvalues
    expected = max(0.0, -eigenvalues.min().item()) + 0.1 * eigenvalues.mean().item()
    assert fitted.diagnostics["damping"] == pytest.approx(expected)
    assert (eigenvalues + fitted.diagnostics["damping"]).min() > 0


def test_errors(tiny_mlp):
    model, loss_fn, train, query = tiny_mlp
    with pytest.raises(InfluxValueError, match="unknown method"):
        influence.fit(model, loss_fn, train, method="newton")
    with pytest.raises(InfluxValueError, match="takes no option"):
        influence.fit(model, loss_fn, train, method="exact", rank=3)
    with pytest.raises(InfluxValueError, match="damping must be"):
        influence.fit(model, loss_fn, train, method="cg", damping=-1.0)
    with pytest.raises(InfluxValueError, match="curvature must be"):
        influence.fit(model, loss_fn, train, method="exact", curvature="fisher")
    with pytest.raises(InfluxValueError, match="needs checkpoints"):
        influence.fit(model, loss_fn, train, method="tracin")
    with pytest.raises(InfluxValueError, match="2 checkpoints but 3 learning rates"):
        influence.fit(
            model,
            loss_fn,
            train,
            method="tracin",
            checkpoints=[model.state_dict()] * 2,
            learning_rates=[1.0, 1.0, 1.0],
        )
    with pytest.raises(InfluxValueError, match="no per-layer split"):
        influence.fit(model, loss_fn, train, method="trak", dim=8).scores(query, per_layer=True)
    with pytest.raises(InfluxValueError, match="trak needs damping > 0"):
        influence.fit(model, loss_fn, train, method="trak", dim=8, damping=0.0)
    with pytest.raises(InfluxValueError, match="top_k must be"):
        influence.fit(model, loss_fn, train, method="grad_dot").scores(query, top_k=0)
    with pytest.raises(InfluxValueError, match="fisher='sampled'"):
        influence.fit(model, loss_fn, (train[0], train[0][:, :3]), method="kfac", fisher="sampled")
    conv = nn.Sequential(nn.Linear(5, 3), nn.LayerNorm(3)).double()
    with pytest.raises(InfluxValueError, match="others='exclude'"):
        influence.fit(
            conv, loss_fn, train, method="ekfac", others="exclude", params=["0.weight", "1.weight"]
        )
    with pytest.raises(InfluxValueError, match="loss_fn must return per-example"):
        influence.fit(model, lambda o, t: F.cross_entropy(o, t), train, method="grad_dot").scores(
            query
        )


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cg", "ekfac", "tracin"])
def test_batch_size_changes_nothing_but_the_batching(tiny_mlp, method, monkeypatch):
    model, loss_fn, train, query = tiny_mlp
    options = dict(METHOD_OPTIONS[method])
    if method == "tracin":
        options["checkpoints"] = [model.state_dict()] * 2
    seen = []
    real_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda x: seen.append(x.shape[0]) or real_forward(x))
    batched = influence.fit(model, loss_fn, train, method=method, batch_size=7, **options)
    batched_scores = batched.scores(query).values
    assert max(seen) <= 7  # fit and scores alike
    whole = influence.fit(model, loss_fn, train, method=method, **options).scores(query).values
    assert_close(batched_scores, whole, rtol=1e-9, name=method)


def test_train_features_are_cached_only_within_the_budget(tiny_mlp, monkeypatch):
    from influx.influence import stream

    model, loss_fn, train, query = tiny_mlp
    fitted = influence.fit(model, loss_fn, train, method="exact", damping=0.5, batch_size=16)
    block_bytes = 16 * fitted.estimator.bytes_per_example()
    monkeypatch.setattr(stream, "CACHE_BYTES", block_bytes)  # one block fits, the set does not
    streamed = fitted.scores(query).values
    assert fitted._train_features is None
    # grad_dot fits nothing: over budget, its fit reads nothing and keeps nothing either
    assert influence.fit(model, loss_fn, train, method="grad_dot")._train_features is None
    monkeypatch.setattr(stream, "CACHE_BYTES", 1 << 40)
    first, again = fitted.scores(query).values, fitted.scores(query).values
    assert fitted._train_features is not None
    assert_close(first, streamed, rtol=1e-12, name="cached vs streamed")
    assert_close(again, streamed, rtol=1e-12, name="from the cache")


def test_scores_carry_dataset_indices(tiny_mlp):
    model, loss_fn, train, query = tiny_mlp
    indices = torch.arange(100, 160)
    fitted = influence.fit(model, loss_fn, (*train, indices), method="grad_dot", batch_size=16)
    scores = fitted.scores((*query, torch.arange(8) + 7), top_k=3)
    assert torch.equal(scores.train_indices, indices)
    assert torch.equal(scores.query_indices, torch.arange(8) + 7)
    assert torch.equal(scores.top_k.largest_indices, indices[scores.values.topk(3, dim=1).indices])
    dataset = torch.utils.data.TensorDataset(*train)
    assert_close(fitted.scores(query, dataset).values, scores.values, rtol=1e-12, name="dataset")


@pytest.mark.parametrize("method", ["ekfac", "trak"])
def test_factored_methods_cover_convolutions(method):
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    ).double()
    x, y = torch.randn(24, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (24,))
    options = {"projection": "kronecker", "dim": 16} if method == "trak" else {}
    loss_fn = lambda o, t: F.cross_entropy(o, t, reduction="none")
    fitted = influence.fit(model, loss_fn, (x, y), method=method, **options)
    scores = fitted.scores((x, y), per_layer=True)
    assert set(scores.per_layer) == {"0", "3"}
    assert_close(
        fitted.self_influence(),
        -torch.diagonal(scores.values),
        rtol=1e-8,
        name=method,
        elementwise=True,
    )


@pytest.mark.parametrize("method", ["kfac", "ekfac", "trak"])
def test_factored_methods_cover_a_transformer_layer(method):
    # nn.MultiheadAttention reads out_proj's weight without calling out_proj: its rule owns all
    # its parameters, which K-FAC puts in one diagonal block (out_proj is not a Kronecker layer)
    torch.manual_seed(3)
    model = tiny_transformer(tokens=4)
    x, y = torch.randn(20, 4, 8, dtype=torch.float64), torch.randint(0, 3, (20,))
    options = {"projection": "kronecker", "dim": 32} if method == "trak" else {}
    loss_fn = lambda o, t: F.cross_entropy(o, t, reduction="none")  # noqa: E731
    fitted = influence.fit(model, loss_fn, (x, y), method=method, **options)
    scores = fitted.scores((x, y), per_layer=True)
    assert "0.self_attn" in scores.per_layer and "0.self_attn.out_proj" not in scores.per_layer
    if method != "trak":
        coverage = fitted.diagnostics["coverage"]
        assert "0.self_attn.out_proj.weight" in coverage["diagonal"]
        assert "0.linear1.weight" in coverage["kronecker"]
    assert_close(sum(scores.per_layer.values()), scores.values, rtol=1e-10, name=method)
    assert_close(
        fitted.self_influence(),
        -torch.diagonal(scores.values),
        rtol=1e-8,
        name=method,
        elementwise=True,
    )
