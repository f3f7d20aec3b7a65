"""Helpers of the kernel tests: module access, dtype cases, float64 brute-force versions.

The brute-force versions materialize every G_i explicitly, one sample at a time, in float64.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# The interpreter computes bf16 wrongly: bf16 runs only compiled, on CUDA.
TRITON_DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(
        torch.bfloat16,
        id="bf16",
        marks=pytest.mark.skipif(not HAS_CUDA, reason="bf16 Triton runs on CUDA only"),
    ),
]


def kernel_module(name: str) -> ModuleType:
    """The module ``influx.kernels.<name>`` (the package attribute of that name is the function)."""
    return importlib.import_module(f"influx.kernels.{name}")


def random(*shape: int, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
    """Standard normal entries drawn in fp32 then cast, so every dtype sees the same values."""
    return torch.randn(*shape, device=device).to(dtype)


def as_sequence(x: torch.Tensor) -> torch.Tensor:
    """[N, d] -> [N, 1, d]; [N, T, d] unchanged."""
    return x.unsqueeze(1) if x.dim() == 2 else x


def per_sample_grads(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """G_i = b_i^T a_i for each sample, in float64: [N, d_out, d_in]."""
    a, b = as_sequence(a).double(), as_sequence(b).double()
    grads = [b[i].T @ a[i] for i in range(a.shape[0])]
    if not grads:
        return torch.zeros(0, b.shape[2], a.shape[2], dtype=torch.float64, device=a.device)
    return torch.stack(grads)


def sqnorm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return per_sample_grads(a, b).pow(2).sum(dim=(1, 2))


def kron(a: torch.Tensor, b: torch.Tensor, p_in: torch.Tensor, p_out: torch.Tensor) -> torch.Tensor:
    grads = per_sample_grads(a, b)  # [N, d_out, d_in]
    return p_out.double() @ grads @ p_in.double().T  # [N, k_out, k_in]


def pairwise(a, b, a2=None, b2=None) -> torch.Tensor:
    grads = per_sample_grads(a, b).flatten(1)  # [N, d_out * d_in]
    grads2 = grads if a2 is None else per_sample_grads(a2, b2).flatten(1)  # [M, d_out * d_in]
    return grads @ grads2.T


def scores(query: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    return query.double() @ train.double().T  # [Q, N]
