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
