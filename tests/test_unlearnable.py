"""influx.unlearnable: every component against a direct computation; verify end to end."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, vmap
from utils import IndexedDataset, assert_close

from influx import data, memorization, models, unlearn, unlearnable
from influx.errors import InfluxValueError
from influx.train import cross_entropy_per_example, train

LOSS = cross_entropy_per_example


def _embeddings(n=40, d=5, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    targets = torch.arange(n, device="cpu") % classes
    centres = 3 * torch.randn(classes, d, generator=generator, dtype=torch.float64)
    points = centres[targets] + torch.randn(n, d, generator=generator, dtype=torch.float64)
    return points, targets


def _design_es(retain: torch.Tensor, forget: torch.Tensor) -> float:
    """docs/architecture.md (Formulas), written out term by term."""
    mu_r, mu_f = retain.mean(0), forget.mean(0)
    mu = (mu_r + mu_f) / 2
    within_r = sum(float((z - mu_r) @ (z - mu_r)) for z in retain) / len(retain)
    within_f = sum(float((z - mu_f) @ (z - mu_f)) for z in forget) / len(forget)
    between = 0.5 * (float((mu_r - mu) @ (mu_r - mu)) + float((mu_f - mu) @ (mu_f - mu)))
    return (within_r + within_f) / between


def test_entanglement_score_follows_the_design_formula():
    points, _ = _embeddings()
    # float64 sums over 40 points: the two orders of summation agree to ~1e-15 relative.
    assert unlearnable.entanglement_score(points[:30], points[30:]) == pytest.approx(
        _design_es(points[:30], points[30:]), rel=1e-12
    )


@pytest.mark.parametrize("partial_retain", [False, True])
def test_per_example_entanglement_is_the_set_score_of_a_single_forget_point(partial_retain):
    points, _ = _embeddings()
    retain = torch.rand(40, generator=torch.Generator().manual_seed(1)) < 0.7
    retain = retain if partial_retain else torch.ones(40, dtype=torch.bool, device="cpu")
    fast = unlearnable.entanglement(points, retain=retain if partial_retain else None)
    for i in range(40):
        others = retain.clone()
        others[i] = False
        expected = _design_es(points[others], points[i : i + 1])
        # Closed-form leave-one-out moments vs direct sums: cancellation in mean||z||^2 -
        # ||mu||^2 costs a few digits at most on O(10) embeddings in float64.
        assert fast[i].item() == pytest.approx(expected, rel=1e-9), i


def test_mahalanobis_ood_equals_the_direct_formula():
    points, targets = _embeddings()
    retain = torch.ones(40, dtype=torch.bool, device="cpu")
    retain[:5] = False
    fast = unlearnable.ood_score(points, targets, retain=retain)
    z, y = points.numpy(), targets.numpy()
    kept = retain.numpy()
    means = np.stack([z[kept & (y == c)].mean(0) for c in range(3)])
    centred = z[kept] - means[y[kept]]
    covariance = centred.T @ centred / kept.sum()
    covariance += 1e-6 * np.trace(covariance) / 5 * np.eye(5)
    offsets = z - means[y]
    expected = np.einsum("nd,de,ne->n", offsets, np.linalg.inv(covariance), offsets)
    # Cholesky solve vs explicit inverse of a well-conditioned 5x5 covariance.
    assert_close(fast, torch.from_numpy(expected), rtol=1e-10, name="mahalanobis")


def test_knn_ood_equals_sorted_distances():
    points, targets = _embeddings()
    fast = unlearnable.ood_score(points, targets, method="knn", k=3)
    unit = points / points.norm(dim=1, keepdim=True)
    for i in range(40):
        distances = sorted(float((unit[i] - unit[j]).norm()) for j in range(40) if j != i)
        assert fast[i].item() == pytest.approx(distances[2], rel=1e-10)
    with pytest.raises(InfluxValueError, match=r"method must be one of \('mahalanobis', 'knn'\)"):
        unlearnable.ood_score(points, targets, method="lof")
    # rank refuses it before computing any component
    with pytest.raises(InfluxValueError, match=r"ood must be one of \('mahalanobis', 'knn'\)"):
        unlearnable.rank(None, LOSS, (points, targets), ood="lof")


def _tiny_problem(n=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 6, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 3, (n,), generator=generator)
    torch.manual_seed(seed)
    model = models.mlp(6, (5,), 3).double()
    train(model, (inputs, targets), epochs=5, lr=2e-2, batch_size=8, progress=False)
    return model.eval(), inputs, targets


def test_rank_of_an_empty_set_says_so():
    model, inputs, targets = _tiny_problem()
    with pytest.raises(InfluxValueError, match="train is empty: rank needs the examples"):
        unlearnable.rank(model, LOSS, (inputs[:0], targets[:0]))


def test_rank_streams_a_dataset_to_the_same_ranking():
    model, inputs, targets = _tiny_problem()
    dataset = IndexedDataset(inputs, targets, torch.arange(100, 124))
    options = dict(components=("memorization", "ood", "entanglement"), batch_size=5)
    streamed = unlearnable.rank(model, LOSS, dataset, **options)
    expected = unlearnable.rank(model, LOSS, (inputs, targets, torch.arange(100, 124)), **options)
    assert torch.equal(streamed.order, expected.order)
    assert torch.equal(streamed.score, expected.score)


def test_rank_components_equal_direct_computations():
    model, inputs, targets = _tiny_problem()
    result = unlearnable.rank(
        model, LOSS, (inputs, targets), influence_method="grad_dot", ascent_lr=0.1, knn_k=3
    )
    params = {k: v.detach() for k, v in model.named_parameters()}

    def example_loss(p, x, y):
        return LOSS(functional_call(model, p, (x[None],)), y[None]).squeeze()

    grads = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, inputs, targets)
    squared_norms = sum(g.flatten(1).square().sum(1) for g in grads.values())
    # float64 per-example gradients by two routes: agreement to rounding.
    assert_close(
        result.components["self_influence"], squared_norms, name="self-influence", elementwise=True
    )
    embedded = model[:-1](inputs).detach()
    assert_close(result.components["entanglement"], unlearnable.entanglement(embedded))
    assert_close(result.components["ood"], unlearnable.ood_score(embedded, targets))
    assert_close(
        result.components["memorization"], memorization.curvature(model, LOSS, (inputs, targets))
    )
    # Ascent residual: descent then ascent on each point alone, by hand.
    residuals = []
    for i in range(inputs.shape[0]):
        p = dict(params)
        g = grad(example_loss)(p, inputs[i], targets[i])
        p = {k: p[k] - 0.1 * g[k] for k in p}
        g = grad(example_loss)(p, inputs[i], targets[i])
        p = {k: p[k] + 0.1 * g[k] for k in p}
        residuals.append(torch.cat([(p[k] - params[k]).flatten() for k in p]).norm())
    assert_close(result.components["ascent_residual"], torch.stack(residuals), name="residual")
    # The score is the mean of the five fraction ranks; the order sorts it.
    ranks = np.stack([
        (np.argsort(np.argsort(v.numpy())) / 23.0) for v in result.components.values()
    ])  # fmt: skip
    assert_close(result.score, torch.from_numpy(ranks.mean(0)), rtol=1e-12, name="score")
    assert torch.equal(result.order[:5], torch.argsort(result.score, descending=True)[:5])


def test_rank_uses_given_memorization_and_weights():
    model, inputs, targets = _tiny_problem()
    scores = torch.arange(24, dtype=torch.float64, device="cpu")
    scores[3] = float("nan")
    result = unlearnable.rank(
        model, LOSS, (inputs, targets), memorization_scores=scores,
        components=("memorization", "ood"), weights={"ood": 0.0},
    )  # fmt: skip
    assert torch.equal(result.order[:3], torch.tensor([23, 22, 21], device="cpu"))
    # An undefined component leaves the example ranked by the others (here: weight 0 -> NaN).
    assert torch.isnan(result.score[3])
    with pytest.raises(InfluxValueError, match="subset of"):
        unlearnable.rank(model, LOSS, (inputs, targets), components=("novelty",))


def test_verify_runs_end_to_end_on_a_tiny_model():
    x, y, _ = data.as_tensors(data.load("digits"))
    train_set = (x[:120], y[:120])
    test_x, test_y, _ = data.as_tensors(data.load("digits", split="test"))
    torch.manual_seed(0)
    model = models.mlp(64, (16,), 10)
    initial = {name: t.clone() for name, t in model.state_dict().items()}
    recipe = dict(epochs=6, lr=1e-2, batch_size=32, seed=0)
    train(model, train_set, progress=False, **recipe)
    model.eval()

    def retrain(forget, retain):
        return unlearn.retrain(model, LOSS, forget, retain, init=initial, progress=False, **recipe)

    # The oracle on the full set with nothing removed is the model itself: same recipe, same start
    # (the oracle ignores its forget set, here a test example).
    oracle = retrain((test_x[:1], test_y[:1]), train_set).model
    for name, value in oracle.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name
    ranking = unlearnable.rank(
        model, LOSS, train_set, influence_method="grad_dot",
        components=("memorization", "self_influence", "ood"),
    )  # fmt: skip

    def halve_last_layer(m, loss_fn, forget, retain):
        with torch.no_grad():
            m[-1].weight.mul_(0.5)
        return m

    report = unlearnable.verify(
        model, LOSS, train_set, ranking, retrain=retrain, k=8, n_random=2,
        test=(test_x, test_y), methods=("gradient_ascent", "neggrad_plus"), max_steps=5,
        n_permutations=500, n_boot=200,
    )  # fmt: skip
    assert len(report.rows) == 6
    assert {r["forget_set"] for r in report.rows} == {"ranked", "random_0", "random_1"}
    for method in ("gradient_ascent", "neggrad_plus"):
        test = report.tests[method]
        assert 0 < test["p_value"] <= 1 and isinstance(test["resists"], bool)
        assert test["difference_ci"][0] <= test["difference"] <= test["difference_ci"][1]
        assert 0 < test["change_p_value"] <= 1
        assert test["ranked_change"] == pytest.approx(test["ranked_gap"] - test["ranked_start_gap"])
    for row in report.rows:
        assert np.isfinite(row["param_distance"]) and row["param_distance"] > 0
        assert 0 <= row["forget_acc"] <= 1 and 0 <= row["test_acc"] <= 1
        # Unlearning moved the model: it no longer sits where it started.
        assert row["param_distance"] != pytest.approx(row["start_distance"], rel=1e-9)
    assert set(report.forget_sets["ranked"].tolist()) == set(ranking.top(8).tolist())
    assert not set(report.forget_sets["random_0"].tolist()) & set(ranking.top(8).tolist())
    assert "gradient_ascent: ranked examples" in report.summary()
    # A method given as a function: its model is measured as returned.
    custom = unlearnable.verify(
        model, LOSS, train_set, ranking, retrain=retrain, k=8, n_random=1,
        methods={"halve": halve_last_layer}, n_permutations=100, n_boot=50,
    )  # fmt: skip
    halved = halve_last_layer(copy.deepcopy(model), None, None, None).eval()
    forget = custom.forget_sets["ranked"]
    row = custom.rows[0]
    assert row["method"] == "halve" and row["forget_set"] == "ranked"
    # float32 forward of the same model on the same inputs: equal up to the mean's rounding.
    assert row["forget_loss"] == pytest.approx(
        LOSS(halved(x[forget]), y[forget]).mean().item(), rel=1e-6
    )
    with pytest.raises(InfluxValueError, match="k must lie"):
        unlearnable.verify(model, LOSS, train_set, ranking, retrain=retrain, k=0)
    with pytest.raises(InfluxValueError, match="unknown unlearning method"):
        unlearnable.verify(model, LOSS, train_set, ranking, retrain=retrain, k=4, methods=("x",))


def test_permutation_p_value_matches_exact_enumeration():
    from itertools import combinations

    ranked, random = np.array([3.0, 4.0, 0.5]), np.array([0.0, 1.0, 2.0, 3.5])
    pooled = np.concatenate([ranked, random])
    observed = ranked.mean() - random.mean()
    splits = [
        pooled[list(c)].mean() - np.delete(pooled, list(c)).mean()
        for c in combinations(range(7), 3)
    ]
    exact = np.mean(np.array(splits) >= observed - 1e-12)
    _, p_value = unlearnable._permutation_test(ranked, random, 20_000, np.random.default_rng(0))
    # Monte Carlo over 20,000 permutations: standard error sqrt(p (1 - p) / 20000) < 0.004.
    assert p_value == pytest.approx(exact, abs=0.012)


def _tiny_verification_problem():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(30, 4, generator=generator, dtype=torch.float64)
    targets = torch.arange(30, device="cpu") % 3
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()
    initial = {name: t.clone() for name, t in model.state_dict().items()}

    def retrain(forget, retain):
        return unlearn.retrain(model, LOSS, forget, retain, epochs=2, init=initial, progress=False)

    return model, (inputs, targets), retrain


@pytest.mark.parametrize("method", sorted(unlearn.METHODS))
def test_verify_runs_every_named_method(method):
    # newton and ssd take no lr / max_steps / batch_size: each method gets only what it takes.
    model, train_set, retrain = _tiny_verification_problem()
    # The untrained model's Hessian has eigenvalues down to -0.23: damp past them.
    report = unlearnable.verify(
        model, LOSS, train_set, torch.arange(30), retrain=retrain, k=3, methods=(method,),
        method_options={"newton": {"damping": 1.0}}, n_random=1, n_permutations=10, n_boot=10,
    )  # fmt: skip
    assert [row["method"] for row in report.rows] == [method, method]
    assert all(np.isfinite(row["param_distance"]) for row in report.rows)
    assert 0 < report.tests[method]["p_value"] <= 1


def test_verify_refuses_method_options_a_method_does_not_take():
    model, train_set, retrain = _tiny_verification_problem()
    with pytest.raises(InfluxValueError, match=r"method_options\['newton'\].*\['lr'\]"):
        unlearnable.verify(
            model, LOSS, train_set, torch.arange(30), retrain=retrain, k=3, methods=("newton",),
            method_options={"newton": {"lr": 0.1}},
        )  # fmt: skip
    # Options it does take reach it.
    report = unlearnable.verify(
        model, LOSS, train_set, torch.arange(30), retrain=retrain, k=3, methods=("newton",),
        method_options={"newton": {"damping": 0.5, "solver": "cg"}}, n_random=1,
        n_permutations=10, n_boot=10,
    )  # fmt: skip
    assert len(report.rows) == 2


def test_verify_streams_a_dataset_to_the_same_verification():
    model, (inputs, targets), retrain = _tiny_verification_problem()
    loss_fn = LOSS
    dataset = IndexedDataset(inputs, targets, torch.arange(len(inputs)))
    options = dict(retrain=retrain, k=4, n_random=1, max_steps=3, n_permutations=200, n_boot=50,
                   methods=("gradient_ascent",))  # fmt: skip
    by_tensors = unlearnable.verify(model, loss_fn, (inputs, targets), torch.arange(30), **options)
    by_dataset = unlearnable.verify(model, loss_fn, dataset, torch.arange(30), **options)
    for row, expected in zip(by_dataset.rows, by_tensors.rows, strict=True):
        assert row == expected
