"""K-FAC / EK-FAC factors from the engine's captures against their definitions, in float64."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from utils import assert_close

from influx.curvature import (
    accumulate_ekfac_eigenvalues,
    accumulate_kronecker_factors,
    finalize_ekfac_eigenvalues,
    finalize_kronecker_factors,
)
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
