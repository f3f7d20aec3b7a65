"""Tiny float64 problems shared by the unlearning tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from influx.train import cross_entropy_per_example

LOSS = cross_entropy_per_example


def tiny_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def classification(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    inputs = torch.randn(n, 5, generator=generator, dtype=torch.float64, device="cpu")
    targets = torch.randint(0, 3, (n,), generator=generator, device="cpu")
    return inputs, targets


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def mean_loss_of(model: nn.Module, loss_fn, inputs, targets):
    """theta_flat -> mean loss, by functional_call (the reference for closed-form steps)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def objective(theta: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(theta, sizes)
        params = {n: t.reshape(s) for n, t, s in zip(names, pieces, shapes)}
        return loss_fn(functional_call(model, params, (inputs,)), targets).mean()

    return objective
