"""The engine against Opacus' per-sample gradients on the layers both support.

Opacus computes in the model's dtype with its own einsums; in float64 both are exact up to
rounding, so they agree to 1e-10.
"""

from __future__ import annotations

import pytest
import torch
from grad_models import cross_entropy
from torch import nn
from utils import assert_close

from influx.grads import per_sample_grads

opacus = pytest.importorskip("opacus")


class Supported(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.conv = nn.Conv2d(2, 4, 3, padding=1, stride=2)
        self.group_norm = nn.GroupNorm(2, 4)
        self.layer_norm = nn.LayerNorm(4)
        self.head = nn.Linear(4 * 4 * 4 + 4, 3)

    def forward(self, x):
        tokens = (x[:, :3].abs() * 10).long() % 10
        image = x[:, 3:].reshape(-1, 2, 8, 8)
        h = self.layer_norm(self.embedding(tokens)).mean(1)
        g = torch.tanh(self.group_norm(self.conv(image))).flatten(1)
        return self.head(torch.cat([g, h], 1))


def test_matches_opacus_float64():
    model = Supported().double()
    x = torch.randn(6, 3 + 128, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    ours = per_sample_grads(model, cross_entropy, x, y)
    wrapped = opacus.GradSampleModule(model, loss_reduction="sum")
    cross_entropy(wrapped(x), y).sum().backward()
    for name, param in model.named_parameters():
        assert_close(ours[name], param.grad_sample, name=name)
