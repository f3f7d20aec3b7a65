"""Models: output shapes, parameter counts, GroupNorm by default, BatchNorm conversion."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from utils import assert_close

from influx import models
from influx.errors import InfluxValueError


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


SMALL_MODELS = {
    "mlp": lambda: (models.mlp(), (3, 1, 8, 8)),
    "mlp-relu-2hidden": lambda: (models.mlp(64, (32, 16), 5, "relu"), (3, 64)),
    "cnn-digits": lambda: (models.cnn(1, 10), (3, 1, 8, 8)),
    "cnn-cifar": lambda: (models.cnn(3, 10, width=8), (3, 3, 32, 32)),
    "resnet8-cifar": lambda: (models.resnet(8, width=8), (2, 3, 32, 32)),
    "resnet18-cifar": lambda: (models.resnet18(width=4, num_classes=7), (2, 3, 32, 32)),
    "resnet8-digits": lambda: (models.resnet(8, width=4, in_channels=1), (2, 1, 8, 8)),
}


@pytest.mark.parametrize("name", list(SMALL_MODELS))
def test_output_shape_and_clean_graph(name):
    model, input_shape = SMALL_MODELS[name]()
    outputs = model(torch.randn(input_shape))
    num_classes = 5 if "2hidden" in name else 7 if "resnet18" in name else 10
    assert outputs.shape == (input_shape[0], num_classes)
    assert torch.isfinite(outputs).all()
    assert not batchnorms(model), "models must default to GroupNorm"
    assert not any(getattr(m, "inplace", False) for m in model.modules()), "no in-place ops"


@pytest.mark.parametrize(
    "factory, expected",
    [
        (lambda: models.mlp(), 64 * 64 + 64 + 64 * 10 + 10),
        (lambda: models.cnn(1, 10), 7_514),
        (lambda: models.cnn(3, 10), 7_802),
        (lambda: models.resnet18(), 11_173_962),
        (lambda: models.resnet(8), 4_903_242),
        (lambda: models.resnet(18, norm="batch"), 11_173_962),
    ],
    ids=["mlp", "cnn-1ch", "cnn-3ch", "resnet18", "resnet8", "resnet18-batchnorm"],
)
def test_parameter_counts_match_docstrings(factory, expected):
    assert num_parameters(factory()) == expected


def test_resnet_structure_is_the_cifar_variant():
    model = models.resnet(8, width=8)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    blocks = [m for m in model.modules() if isinstance(m, models.BasicBlock)]
    assert len(blocks) == 4
    assert (
        len([m for m in models.resnet18(width=8).modules() if isinstance(m, models.BasicBlock)])
        == 8
    )
    assert model.fc.in_features == 64


def test_norm_none_has_no_normalization():
    model = models.resnet(8, width=4, norm="none")
    assert not any(isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)) for m in model.modules())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_convert_batchnorm_replaces_all_and_copies_affine():
    model = models.resnet(8, width=8, norm="batch")
    model.add_module("extra", nn.BatchNorm1d(10))
    with torch.no_grad():
        for bn in batchnorms(model):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    before = batchnorms(model)
    expected_weights = [bn.weight.detach().clone() for bn in before]

    converted = models.convert_batchnorm(model, num_groups=4)

    assert converted is model
    assert not batchnorms(model)
    group_norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(group_norms) == len(before)
    for group_norm, weight in zip(group_norms, expected_weights, strict=True):
        assert group_norm.num_groups == math.gcd(4, group_norm.num_channels)
        assert_close(group_norm.weight, weight, name="copied GroupNorm weight")
    model.eval()
    outputs = model(torch.randn(4, 3, 32, 32))
    assert outputs.shape == (4, 10) and torch.isfinite(outputs).all()


def test_convert_batchnorm_uses_gcd_groups_and_handles_bare_layer():
    group_norm = models.convert_batchnorm(nn.BatchNorm2d(48), num_groups=32)
    assert isinstance(group_norm, nn.GroupNorm)
    assert group_norm.num_groups == 16 and group_norm.num_channels == 48
    sequential = models.convert_batchnorm(nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6)))
    assert isinstance(sequential[1], nn.GroupNorm) and sequential[1].num_groups == 2
    assert sequential(torch.randn(5, 3)).shape == (5, 6)


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda: models.resnet(34), "depth must be one of"),
        (lambda: models.resnet(8, norm="layer"), "norm must be one of"),
        (lambda: models.cnn(1, 10, norm="batchnorm"), "norm must be one of"),
        (lambda: models.mlp(activation="gelu"), "activation must be one of"),
        (lambda: models.mlp(hidden=(0,)), "every hidden width must be an integer >= 1"),
        (lambda: models.cnn(0, 10), "in_channels must be an integer >= 1"),
        (lambda: models.convert_batchnorm(nn.Linear(2, 2), num_groups=0), "num_groups must be"),
    ],
    ids=["depth", "resnet-norm", "cnn-norm", "activation", "hidden", "channels", "groups"],
)
def test_invalid_arguments_raise_clear_errors(factory, match):
    with pytest.raises(InfluxValueError, match=match):
        factory()


@pytest.mark.parametrize("name", ["linear", "mlp", "cnn", "resnet8"])
def test_build_by_name(name):
    model = models.build(name, (3, 8, 8), 4, width=8)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 4)


def test_build_unknown_name():
    with pytest.raises(InfluxValueError, match="unknown model 'vgg'.*linear, mlp, cnn"):
        models.build("vgg", (3, 8, 8), 4)


def test_convert_batchnorm_keeps_frozen_parameters_frozen_and_shared_layers_shared():
    shared = nn.BatchNorm1d(4)
    frozen = nn.BatchNorm1d(4)
    frozen.requires_grad_(False)
    model = nn.Sequential(nn.Linear(4, 4), shared, frozen, shared)
    models.convert_batchnorm(model, num_groups=2)
    assert model[1] is model[3] and isinstance(model[1], nn.GroupNorm)
    assert not model[2].weight.requires_grad and not model[2].bias.requires_grad
    assert model[1].weight.requires_grad
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 20 + 8


def test_convert_batchnorm_refuses_a_lazy_batchnorm_before_its_first_forward():
    with pytest.raises(InfluxValueError, match="run one forward pass before convert_batchnorm"):
        models.convert_batchnorm(nn.Sequential(nn.LazyBatchNorm1d()))
