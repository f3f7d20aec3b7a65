"""Curvature products against brute force, and the checks the public products make first."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from utils import assert_close

from influx import curvature
from influx.errors import InfluxValueError, UnsupportedModelError

DTYPE = torch.float64
# float64, the same derivatives summed in another order than torch.autograd.functional's: a few
# hundred ulps at most on these ~60-parameter models.
BRUTE_FORCE_RTOL = 1e-10


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


class LearnedTemperature(nn.Module):
    """A classifier whose logits are scaled by a learned 0-dim parameter."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(4, 5)
        self.temperature = nn.Parameter(torch.tensor(0.7))
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x) * self.temperature))


def small_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)


def batch(size: int = 6):
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(size, 4, generator=generator, dtype=DTYPE)
    return inputs, torch.randint(0, 3, (size,), generator=generator)


def flat_objective(model: nn.Module, names, inputs, targets, reduction="mean"):
    """``f(theta)`` over the parameters ``names`` in that order, split and reshaped here."""
    named = dict(model.named_parameters())
    shapes = [named[n].shape for n in names]
    numels = [named[n].numel() for n in names]
    theta = torch.cat([named[n].detach().reshape(-1) for n in names])

    def objective(flat: torch.Tensor) -> torch.Tensor:
        state = {n: p.view(s) for n, p, s in zip(names, flat.split(numels), shapes)}
        losses = cross_entropy(torch.func.functional_call(model, state, (inputs,)), targets)
        return losses.mean() if reduction == "mean" else losses.sum()

    return objective, theta


def test_a_zero_dim_parameter_gets_the_brute_force_gradient_hessian_and_products():
    torch.manual_seed(0)
    model = LearnedTemperature().to(DTYPE)
    data = batch()
    names = [name for name, _ in model.named_parameters()]
    objective, theta = flat_objective(model, names, *data)
    expected_gradient = torch.autograd.functional.jacobian(objective, theta)
    expected_hessian = torch.autograd.functional.hessian(objective, theta)
    vectors = torch.randn(3, theta.numel(), dtype=DTYPE)

    assert_close(curvature.gradient(model, cross_entropy, data), expected_gradient,
                 rtol=BRUTE_FORCE_RTOL, name="gradient")  # fmt: skip
    assert_close(curvature.hvp(model, cross_entropy, data, vectors), vectors @ expected_hessian,
                 rtol=BRUTE_FORCE_RTOL, name="hvp")  # fmt: skip
    assert_close(curvature.dense_hessian(model, cross_entropy, data), expected_hessian,
                 rtol=BRUTE_FORCE_RTOL, name="dense Hessian")  # fmt: skip
    unflat = curvature.ParamSpace.of(model).unflatten(theta)
    assert unflat["temperature"].shape == () and unflat["temperature"] == model.temperature


def test_vectors_follow_the_order_params_names():
    model = small_mlp()
    data = batch()
    names = ["2.bias", "0.weight"]  # last first: not named_parameters() order
    objective, theta = flat_objective(model, names, *data)
    assert curvature.ParamSpace.of(model, names).names == tuple(names)
    assert_close(curvature.dense_hessian(model, cross_entropy, data, params=names),
                 torch.autograd.functional.hessian(objective, theta),
                 rtol=BRUTE_FORCE_RTOL, name="dense Hessian in params order")  # fmt: skip


@pytest.mark.parametrize("reduction", ["Mean", "none", "batchmean"])
def test_the_gauss_newton_products_refuse_an_unknown_reduction(reduction):
    model = small_mlp()
    data = batch()
    vector = torch.ones(curvature.ParamSpace.of(model).size, dtype=DTYPE)
    with pytest.raises(InfluxValueError, match=r"reduction must be one of \('mean', 'sum'\)"):
        curvature.ggn_vp(model, cross_entropy, data, vector, reduction=reduction)
    with pytest.raises(InfluxValueError, match=r"reduction must be one of \('mean', 'sum'\)"):
        curvature.dense_hessian(model, cross_entropy, data, kind="ggn", reduction=reduction)


def products(model: nn.Module):
    """Each public product as ``call(batch)``."""
    vector = torch.ones(curvature.ParamSpace.of(model).size, dtype=DTYPE)
    return {
        "gradient": lambda b: curvature.gradient(model, cross_entropy, b),
        "hvp": lambda b: curvature.hvp(model, cross_entropy, b, vector),
        "ggn_vp": lambda b: curvature.ggn_vp(model, cross_entropy, b, vector),
        "dense_hessian": lambda b: curvature.dense_hessian(model, cross_entropy, b),
        "dense_ggn": lambda b: curvature.dense_hessian(model, cross_entropy, b, kind="ggn"),
    }


@pytest.mark.parametrize("name", list(products(small_mlp())))
def test_public_products_refuse_empty_and_non_finite_batches(name):
    call = products(small_mlp())[name]
    inputs, targets = batch()
    with pytest.raises(InfluxValueError, match="batch is empty"):
        call((inputs[:0], targets[:0]))
    inputs[2, 1], inputs[4, 0] = float("nan"), float("inf")
    with pytest.raises(InfluxValueError, match=r"inputs of 2 example\(s\).*indices \[2, 4\]"):
        call((inputs, targets))


@pytest.mark.parametrize("name", list(products(small_mlp())))
def test_public_products_refuse_training_batchnorm_with_the_fix(name):
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).to(DTYPE)
    with pytest.raises(UnsupportedModelError, match="BatchNorm1d.*train mode.*convert_batchnorm"):
        products(model)[name](batch())
