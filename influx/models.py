"""Small models for per-example analytics: MLP, a small CNN and CIFAR ResNets.

Every model normalizes with GroupNorm by default: per-sample gradients are ill-defined with
BatchNorm in train mode, because BatchNorm mixes the examples of a batch (docs/architecture.md, Conventions).
:func:`convert_batchnorm` turns an existing BatchNorm model into a GroupNorm one.

No activation is in-place: the per-sample gradient hooks read the input activations of each layer
after the backward pass, and an in-place ReLU would overwrite them.

Shapes: inputs are ``[N, C, H, W]`` images (the MLP flattens any ``[N, ...]`` input); every model
returns logits ``[N, num_classes]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from influx.checks import check_integer
from influx.errors import InfluxValueError

Norm = Literal["group", "batch", "none"]

_NORMS = ("group", "batch", "none")
_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}
_RESNET_BLOCKS = {8: (1, 1, 1, 1), 18: (2, 2, 2, 2)}

__all__ = ["cnn", "convert_batchnorm", "mlp", "resnet", "resnet18"]


def _check_norm(norm: str) -> None:
    if norm not in _NORMS:
        raise InfluxValueError(
            f"norm must be one of {', '.join(map(repr, _NORMS))}; got {norm!r}. "
            "Use 'group' (the default) for per-sample gradients."
        )


def _norm_layer(norm: str, channels: int, max_groups: int = 32) -> nn.Module:
    """A normalization layer over ``channels`` channels.

    GroupNorm uses ``gcd(max_groups, channels)`` groups so that every width divides evenly.
    """
    if norm == "group":
        return nn.GroupNorm(math.gcd(max_groups, channels), channels)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


def mlp(
    in_features: int = 64,
    hidden: tuple[int, ...] | list[int] = (64,),
    num_classes: int = 10,
    activation: Literal["tanh", "relu"] = "tanh",
) -> nn.Sequential:
    """A multilayer perceptron that flattens its input ``[N, ...]`` to ``[N, in_features]``.

    Layers: ``Flatten -> (Linear -> activation) per hidden width -> Linear``, giving logits
    ``[N, num_classes]``.
    Parameter count: ``sum over consecutive widths (d_in * d_out + d_out)``; the default
    (64 -> 64 -> 10) has 64*64 + 64 + 64*10 + 10 = 4,810 parameters.
    """
    in_features = check_integer("in_features", in_features, minimum=1)
    num_classes = check_integer("num_classes", num_classes, minimum=1)
    hidden = [check_integer("every hidden width", width, minimum=1) for width in hidden]
    if activation not in _ACTIVATIONS:
        raise InfluxValueError(
            f"activation must be one of {sorted(_ACTIVATIONS)}; got {activation!r}"
        )
    layers: list[nn.Module] = [nn.Flatten()]
    widths = [in_features, *hidden]
    for d_in, d_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(d_in, d_out), _ACTIVATIONS[activation]()]
    layers.append(nn.Linear(widths[-1], num_classes))
    return nn.Sequential(*layers)


def _conv_block(c_in: int, c_out: int, norm: str, max_groups: int) -> list[nn.Module]:
    # The conv bias is redundant before a normalization layer (the norm re-centres it).
    return [
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=norm == "none"),
        _norm_layer(norm, c_out, max_groups),
        nn.ReLU(),
    ]


def cnn(
    in_channels: int = 1,
    num_classes: int = 10,
    width: int = 16,
    norm: Norm = "group",
) -> nn.Sequential:
    """A small CNN for ``[N, in_channels, H, W]`` images with H, W >= 2 (8x8 digits, 32x32 CIFAR).

    Layers: ``conv3x3(in, w)-norm-ReLU -> conv3x3(w, w)-norm-ReLU -> maxpool 2 ->
    conv3x3(w, 2w)-norm-ReLU -> global average pool -> Linear(2w, num_classes)``. GroupNorm uses
    ``gcd(8, channels)`` groups (2 channels per group at width 16). With GroupNorm the parameter
    count is ``9 w (in_channels + w + 2 w) + 2 (w + w + 2 w) + 2 w num_classes + num_classes``:
    7,514 for ``cnn(1, 10)`` and 7,802 for ``cnn(3, 10)``.
    """
    in_channels = check_integer("in_channels", in_channels, minimum=1)
    num_classes = check_integer("num_classes", num_classes, minimum=1)
    width = check_integer("width", width, minimum=1)
    _check_norm(norm)
    # Small widths: 8 groups keep at least 2 channels per group, so GroupNorm is not InstanceNorm.
    max_groups = 8
    return nn.Sequential(
        *_conv_block(in_channels, width, norm, max_groups),
        *_conv_block(width, width, norm, max_groups),
        nn.MaxPool2d(2),
        *_conv_block(width, 2 * width, norm, max_groups),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection: ``[N, c_in, H, W] -> [N, c_out, H/s, W/s]``.

    The shortcut is a 1x1 convolution + norm when the stride or the width changes, else identity.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str):
        super().__init__()
        use_bias = norm == "none"
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=use_bias)
        self.bn1 = _norm_layer(norm, c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=use_bias)
        self.bn2 = _norm_layer(norm, c_out)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=use_bias),
                _norm_layer(norm, c_out),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem (stride 1, no max-pool), 4 stages of BasicBlocks, average pool, head.

    Stage widths are ``width * (1, 2, 4, 8)`` with strides ``(1, 2, 2, 2)``. Input
    ``[N, in_channels, H, W]`` (any H, W >= 1; 32x32 for CIFAR), output ``[N, num_classes]``.
    """

    def __init__(
        self,
        blocks_per_stage: tuple[int, ...],
        width: int,
        norm: str,
        num_classes: int,
        in_channels: int,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=norm == "none")
        self.bn1 = _norm_layer(norm, width)
        self.relu = nn.ReLU()
        stages = []
        c_in = width
        for stage, num_blocks in enumerate(blocks_per_stage):
            c_out = width * 2**stage
            strides = [1 if stage == 0 else 2] + [1] * (num_blocks - 1)
            blocks = []
            for stride in strides:
                blocks.append(BasicBlock(c_in, c_out, stride, norm))
                c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(self.flatten(self.pool(out)))


def resnet(
    depth: Literal[8, 18] = 18,
    *,
    width: int = 64,
    norm: Norm = "group",
    num_classes: int = 10,
    in_channels: int = 3,
) -> ResNet:
    """A CIFAR ResNet of ``depth`` 8 (one BasicBlock per stage) or 18 (two per stage).

    Parameter counts with the defaults (width 64, 10 classes, 3 input channels; GroupNorm and
    BatchNorm have the same affine parameters): ResNet-18 11,173,962; ResNet-8 4,903,242.
    The count scales about as ``width**2``.
    """
    if depth not in _RESNET_BLOCKS:
        raise InfluxValueError(f"depth must be one of {sorted(_RESNET_BLOCKS)}; got {depth!r}")
    width = check_integer("width", width, minimum=1)
    num_classes = check_integer("num_classes", num_classes, minimum=1)
    in_channels = check_integer("in_channels", in_channels, minimum=1)
    _check_norm(norm)
    return ResNet(_RESNET_BLOCKS[depth], width, norm, num_classes, in_channels)


def resnet18(**kwargs) -> ResNet:
    """``resnet(18, **kwargs)``: the CIFAR ResNet-18 (11,173,962 parameters at width 64)."""
    return resnet(18, **kwargs)


def _group_norm_like(batchnorm: nn.modules.batchnorm._BatchNorm, num_groups: int) -> nn.GroupNorm:
    if (
        isinstance(batchnorm, nn.modules.lazy.LazyModuleMixin)
        and batchnorm.has_uninitialized_params()
    ):
        raise InfluxValueError(
            f"{type(batchnorm).__name__} does not know its channels yet: run one forward pass "
            "before convert_batchnorm"
        )
    channels = batchnorm.num_features
    group_norm = nn.GroupNorm(
        math.gcd(num_groups, channels), channels, eps=batchnorm.eps, affine=batchnorm.affine
    )
    if batchnorm.affine:
        group_norm = group_norm.to(device=batchnorm.weight.device, dtype=batchnorm.weight.dtype)
        with torch.no_grad():
            group_norm.weight.copy_(batchnorm.weight)
            group_norm.bias.copy_(batchnorm.bias)
        group_norm.weight.requires_grad_(batchnorm.weight.requires_grad)
        group_norm.bias.requires_grad_(batchnorm.bias.requires_grad)
    group_norm.train(batchnorm.training)
    return group_norm


def convert_batchnorm(model: nn.Module, num_groups: int = 32) -> nn.Module:
    """Replace every BatchNorm (1d/2d/3d, SyncBatchNorm) in ``model`` by GroupNorm, in place.

    Each replacement has ``gcd(num_groups, channels)`` groups, the BatchNorm's ``eps`` and a copy of
    its affine weight and bias (running statistics have no GroupNorm counterpart and are dropped).
    Frozen affine parameters stay frozen, and a BatchNorm used in several places becomes one
    GroupNorm used in the same places. Returns ``model``; if ``model`` is itself a BatchNorm
    layer, returns its GroupNorm replacement. The converted model computes a different function:
    fine-tune it before relying on it.
    """
    num_groups = check_integer("num_groups", num_groups, minimum=1)
    return _convert(model, num_groups, {})


def _convert(module: nn.Module, num_groups: int, done: dict[int, nn.Module]) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if id(module) not in done:
            done[id(module)] = _group_norm_like(module, num_groups)
        return done[id(module)]
    # _modules, not named_children(): the latter skips the second place a shared module sits
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        replacement = _convert(child, num_groups, done)
        if replacement is not child:
            setattr(module, name, replacement)
    return module


MODEL_NAMES = ("linear", "mlp", "cnn", "resnet8", "resnet18")


def build(
    name: str, input_shape: Sequence[int], num_classes: int, *, width: int | None = None
) -> nn.Module:
    """A model by name for inputs of ``input_shape`` (C, H, W) and ``num_classes`` outputs.

    ``linear`` is a single Linear layer on the flattened input (softmax regression); ``mlp`` has
    one hidden layer of ``width`` (default 64); ``cnn`` and ``resnet8``/``resnet18`` take
    ``width`` as their base channel count (defaults 16 and 64).
    """
    features = math.prod(input_shape)
    if name == "linear":
        return mlp(features, (), num_classes)
    if name == "mlp":
        return mlp(features, (width or 64,), num_classes)
    width_kw = {} if width is None else {"width": width}
    if name == "cnn":
        return cnn(input_shape[0], num_classes, **width_kw)
    if name in ("resnet8", "resnet18"):
        depth = int(name.removeprefix("resnet"))
        return resnet(depth, in_channels=input_shape[0], num_classes=num_classes, **width_kw)
    raise InfluxValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
