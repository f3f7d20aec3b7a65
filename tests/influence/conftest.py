import pytest
import torch
import torch.nn.functional as F
from torch import nn


def cross_entropy(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


@pytest.fixture(scope="module")
def tiny_mlp():
    """A float64 5-6-3 tanh MLP trained a little on 60 points, with 8 queries; 57 parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    inputs = torch.randn(68, 5, dtype=torch.float64)
    targets = (inputs[:, 0] + 0.5 * inputs[:, 1] > 0).long() + (inputs[:, 2] > 1).long()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        optimizer.zero_grad()
        cross_entropy(model(inputs[:60]), targets[:60]).mean().backward()
        optimizer.step()
    return model, cross_entropy, (inputs[:60], targets[:60]), (inputs[60:], targets[60:])
