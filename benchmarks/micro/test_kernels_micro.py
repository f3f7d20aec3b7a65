"""Kernel micro-benchmarks with pytest-benchmark: each kernel in kernels/, its pure-torch reference
and (on CUDA) its Triton version, on the kernel suite's small shapes.

    python -m pytest benchmarks/micro --benchmark-only      (or: make bench-micro)

Never part of the default test run (pyproject's ``testpaths = ["tests"]``). Each case is checked
before it is timed: the reference against the plain torch composition it replaces, the Triton
version against the reference. Timing: 2 warm-up rounds, then 7 rounds of one call each
(pytest-benchmark reports their median, mean, min and spread).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.suites.kernels import MATCH_RTOL, case_specs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
USE_TRITON = DEVICE == "cuda"
WARMUP, ROUNDS = 2, 7


def _cases() -> list:
    """(spec, implementation name) for every reference (and, on CUDA, Triton) implementation."""
    params = []
    for spec in case_specs(DEVICE, quick=True):
        builder, shape, dtype = spec
        # the implementations' names, without allocating inputs
        for impl in builder(shape, dtype, "meta", USE_TRITON).impls:
            if impl.backend in ("reference", "triton"):
                label = "-".join(f"{k}{v}" for k, v in shape.items())
                params.append(pytest.param(spec, impl.name, id=f"{impl.name}-{label}"))
    return params


def _first(result) -> torch.Tensor:
    """The tensor a result is compared on: the values of top-k results, flattened per sample."""
    tensor = result[0] if isinstance(result, tuple) else result
    return tensor.double().flatten(1) if tensor.dim() > 1 else tensor.double()


def _relative_error(actual, expected) -> float:
    actual, expected = _first(actual), _first(expected)
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize(("spec", "name"), _cases())
def test_kernel(benchmark, spec, name):
    builder, shape, dtype = spec
    torch.manual_seed(0)
    case = builder(shape, dtype, DEVICE, USE_TRITON)
    impl = next(impl for impl in case.impls if impl.name == name)
    # The reference is checked against the plain torch it replaces; Triton against the reference.
    against = "composition" if impl.backend == "reference" else "reference"
    expected = next(other for other in case.impls if other.backend == against).fn()
    error = _relative_error(impl.fn(), expected)
    assert error <= MATCH_RTOL[dtype], f"{name}: relative error {error:.2e} against the {against}"

    def call():
        impl.fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(
        kernel=case.kernel, backend=impl.backend, dtype=str(dtype), device=DEVICE, max_rel_err=error
    )
    benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
