"""Kernel tests: Triton kernels run compiled on CUDA, or in the Triton interpreter on CPU.

TRITON_INTERPRET must be set before a kernel is first launched (influx.kernels compiles lazily, so
setting it here works even if another test module imported the package earlier).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from kernel_helpers import HAS_CUDA, kernel_module

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

_dispatch = kernel_module("_dispatch")
KERNEL_MODULES = tuple(
    kernel_module(name)
    for name in ("ghost_sqnorm", "kron_project", "pairwise_grad_dot", "score_topk")
)


@pytest.fixture
def device() -> torch.device:
    """Where the Triton tests put their tensors: CUDA when present, else CPU (interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def triton_ready(monkeypatch):
    """Skip without Triton; on CPU make sure the interpreter is on for this test."""
    if not _dispatch.HAS_TRITON:
        pytest.skip("Triton is not installed")
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every kernel output buffer starts as NaN, so an entry no program writes fails the test."""

    def nan_output(*shape: int, device: torch.device, dtype: torch.dtype = torch.float32):
        return torch.full(shape, math.nan, dtype=dtype, device=device)

    for module in KERNEL_MODULES:
        monkeypatch.setattr(module, "empty_output", nan_output)
