"""K-FAC / EK-FAC factors from the engine's captures against their definitions, in float64."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from utils import assert_close

from influx import influence
from influx.curvature import (
    accumulate_ekfac_eigenvalues,
    accumulate_kronecker_factors,
    finalize_ekfac_eigenvalues,
    finalize_kronecker_factors,
)
from influx.errors import InfluxValueError
from influx.grads import capture_matmul_layers
from influx.grads.functional import naive_per_sample_grads


def test_factors_and_ekfac_eigenvalues_match_their_definitions():
    torch.manual_seed(0)
    # A conv (16 positions: G_n is contracted before rotating) and a Linear (1 token: rotated
    # before contracting), so both branches of the eigenvalue refit run.
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)
    ).double()
    x, y = torch.randn(10, 2, 6, 6, dtype=torch.float64), torch.randint(0, 4, (10,))
    loss_fn = lambda o, t: F.cross_entropy(o, t, reduction="none")
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]  # two batches: the sums run over both

    factors, sums = {}, {}
    for xb, yb in batches:
        accumulate_kronecker_factors(factors, capture_matmul_layers(model, loss_fn, xb, yb))
    finalize_kronecker_factors(factors)
    for xb, yb in batches:
        accumulate_ekfac_eigenvalues(factors, capture_matmul_layers(model, loss_fn, xb, yb), sums)
    finalize_ekfac_eigenvalues(factors, sums)

    grads = naive_per_sample_grads(model, loss_fn, x, y)
    patches = F.unfold(x, 3).transpose(1, 2)  # [N, 16, 18] conv inputs
    ones = torch.ones(10, 16, 1, dtype=torch.float64)
    conv_a = torch.cat([patches, ones], dim=2)
    for layer, a in (("0", conv_a), ("3", None)):
        f = factors[layer]
        g = torch.cat([grads[f"{layer}.weight"].flatten(2), grads[f"{layer}.bias"][..., None]], 2)
        if a is not None:
            expected_a = torch.einsum("nti,ntj->ij", a, a) / 10
            assert_close(f.activation, expected_a, rtol=1e-12, name=f"A of {layer}")
        # EK-FAC eigenvalues: (1/N) sum_n (Q_S^T G_n Q_A)^2, G_n the per-example gradient.
        rotated = f.gradient_basis.T @ g @ f.activation_basis
        assert_close(f.eigenvalues, rotated.square().mean(0), rtol=1e-10, name=f"EK-FAC {layer}")


def test_kfac_block_is_the_fisher_of_uncorrelated_positions():
    """With T positions whose a_t and b_t are independent across positions and of each other,
    E[vec G vec G^T] = T C_a (x) C_b: the factors must give that, not T^2 C_a (x) C_b."""
    generator = torch.Generator().manual_seed(0)
    n, tokens, d_in, d_out = 20_000, 8, 3, 2
    mix_a = torch.tensor([[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.2, -0.3, 0.7]], dtype=torch.float64)
    mix_b = torch.tensor([[1.0, 0.0], [0.8, 0.6]], dtype=torch.float64)
    a = torch.randn(n, tokens, d_in, generator=generator, dtype=torch.float64) @ mix_a.T
    b = torch.randn(n, tokens, d_out, generator=generator, dtype=torch.float64) @ mix_b.T

    class Capture:
        weight_name, bias_name = "w", None

    capture = Capture()
    capture.a, capture.b = a, b
    factors = {}
    accumulate_kronecker_factors(factors, {"layer": capture})
    finalize_kronecker_factors(factors)
    f = factors["layer"]
    # Layout [d_out, d_in]: vec G = G.flatten() pairs with S (x) A.
    expected = tokens * torch.kron(mix_b @ mix_b.T, mix_a @ mix_a.T)
    assert_close(torch.kron(f.gradient, f.activation), expected, rtol=0.05, name="K-FAC block")
    grads = (b.transpose(1, 2) @ a).flatten(1)
    empirical = grads.T @ grads / n
    assert_close(empirical, expected, rtol=0.05, name="empirical Fisher (the check's premise)")


def _norm_model():
    """Conv -> GroupNorm (trainable affine) -> Linear -> LayerNorm -> Linear, float64, with a bias
    that is trainable while its weight is frozen: every kind of block K-FAC must cover."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.GroupNorm(2, 4),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
        nn.LayerNorm(5),
        nn.Linear(5, 3),
    ).double()
    model[6].weight.requires_grad_(False)  # its bias gets a diagonal block
    x, y = torch.randn(12, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (12,))
    return model, x, y


def _direct_preconditioned_scores(fitted, model, x, y, xq, yq):
    """Scores and self-influence from the block-diagonal curvature written out as a dense matrix
    in the flat space of the selected parameters, from per-example gradients by torch.func."""
    loss_fn = lambda o, t: F.cross_entropy(o, t, reduction="none")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = naive_per_sample_grads(model, loss_fn, x, y)
    query = naive_per_sample_grads(model, loss_fn, xq, yq)
    sizes = [model.get_parameter(n).numel() for n in names]
    offsets = dict(zip(names, torch.tensor([0, *sizes]).cumsum(0).tolist()))
    total = sum(sizes)
    curvature = torch.zeros(total, total, dtype=torch.float64)
    est = fitted.estimator
    for layer, f in est.factors.items():
        # Kronecker block in the [d_out, d_in | bias] layout, scattered to the flat coordinates.
        index = []
        d_out = f.gradient.shape[0]
        for row in range(d_out):
            d_w = model.get_parameter(f.weight_name)[0].numel()
            start = offsets[f.weight_name] + row * d_w
            index += list(range(start, start + d_w))
            if f.bias_name is not None:
                index.append(offsets[f.bias_name] + row)
        basis = torch.kron(f.gradient_basis, f.activation_basis)
        block = basis @ torch.diag(f.eigenvalues.flatten() + est.dampings[layer]) @ basis.T
        curvature[torch.tensor(index)[:, None], torch.tensor(index)] = block
    flat = lambda g: torch.cat([g[n].flatten(1) for n in names], dim=1)  # noqa: E731
    g_train, g_query = flat(grads), flat(query)
    for name, block in est.diagonal.items():
        # Diagonal block: its entries are the mean squared per-example gradients (the definition).
        index = torch.cat([torch.arange(offsets[n], offsets[n] + model.get_parameter(n).numel())
                           for n in block.names])  # fmt: skip
        expected = g_train[:, index].square().mean(0)
        assert_close(block.diagonal, expected, rtol=1e-12, name=f"diagonal Fisher of {name}")
        curvature[index, index] = expected + est.dampings[name]
    solved = torch.linalg.solve(curvature, g_train.T)  # [P, N]
    return -(g_query @ solved), (g_train * solved.T).sum(1)


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
@pytest.mark.parametrize("basis", ["parameter", "eigen", "auto"])
def test_norm_and_lone_bias_parameters_get_diagonal_blocks(method, basis):
    model, x, y = _norm_model()
    loss_fn = lambda o, t: F.cross_entropy(o, t, reduction="none")
    fitted = influence.fit(
        model, loss_fn, (x, y), method=method, batch_size=5, fisher="empirical",
        feature_basis=basis,
    )  # fmt: skip
    coverage = fitted.diagnostics["coverage"]
    assert coverage["kronecker"] == ["0.weight", "0.bias", "4.weight", "4.bias"]
    assert coverage["diagonal"] == ["1.weight", "1.bias", "5.weight", "5.bias", "6.bias"]
    assert coverage["excluded"] == []
    xq, yq = torch.randn(3, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (3,))
    expected, expected_self = _direct_preconditioned_scores(fitted, model, x, y, xq, yq)
    # float64 throughout; the dense solve and the per-block rotations differ in summation order
    # only, and the damped blocks have condition numbers below ~1e4: 1e-9 relative is ample.
    assert_close(fitted.scores((xq, yq)).values, expected, rtol=1e-9, name="scores")
    assert_close(
        fitted.self_influence(), expected_self, rtol=1e-9, name="self-influence", elementwise=True
    )
    per_layer = fitted.scores((xq, yq), per_layer=True).per_layer
    assert set(per_layer) == {"0", "1", "4", "5", "6"}
    assert_close(sum(per_layer.values()), expected, rtol=1e-9, name="per-layer shares")


def test_others_exclude_scores_linear_and_conv_only():
    model, x, y = _norm_model()
    loss_fn = lambda o, t: F.cross_entropy(o, t, reduction="none")
    fitted = influence.fit(model, loss_fn, (x, y), method="ekfac", others="exclude")
    assert fitted.diagnostics["coverage"]["excluded"] == ["1.weight", "1.bias", "5.weight",
                                                          "5.bias", "6.bias"]  # fmt: skip
    frozen = copy.deepcopy(model)
    for name in fitted.diagnostics["coverage"]["excluded"]:
        frozen.get_parameter(name).requires_grad_(False)
    expected = influence.fit(frozen, loss_fn, (x, y), method="ekfac")
    assert expected.diagnostics["coverage"]["diagonal"] == []
    assert_close(
        fitted.self_influence(),
        expected.self_influence(),
        rtol=1e-12,
        name="exclude",
        elementwise=True,
    )
    with pytest.raises(InfluxValueError, match="others='exclude'.*1.weight"):
        influence.fit(model, loss_fn, (x, y), method="ekfac", others="exclude",
                      params=["0.weight", "1.weight"])  # fmt: skip
