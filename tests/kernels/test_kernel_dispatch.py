"""Backend choice (INFLUX_KERNELS, TRITON_INTERPRET) and input validation of the public API."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from influx.kernels import (
    KernelBackendError,
    KernelInputError,
    direct_sqnorm,
    ghost_sqnorm,
    kron_project,
    pairwise_grad_dot,
    score_topk,
    select_backend,
)
from kernel_helpers import HAS_CUDA, kernel_module, random

_dispatch = kernel_module("_dispatch")
ghost_module = kernel_module("ghost_sqnorm")

# name -> (public function, module holding its Triton launcher, launcher name).
SMALL_CALLS = {
    "ghost_sqnorm": (ghost_sqnorm, "ghost_sqnorm", "ghost_sqnorm_triton"),
    "direct_sqnorm": (direct_sqnorm, "ghost_sqnorm", "direct_sqnorm_triton"),
    "kron_project": (kron_project, "kron_project", "kron_project_triton"),
    "pairwise_grad_dot": (pairwise_grad_dot, "pairwise_grad_dot", "pairwise_grad_dot_triton"),
    "score_topk": (score_topk, "score_topk", "score_tile_triton"),
}


def small_arguments(name: str, dtype: torch.dtype = torch.float32) -> tuple:
    a, b = random(2, 3, 4, dtype=dtype), random(2, 3, 5, dtype=dtype)
    if name == "kron_project":
        return a, b, random(2, 4, dtype=dtype), random(3, 5, dtype=dtype)
    if name == "score_topk":
        return random(2, 4, dtype=dtype), random(6, 4, dtype=dtype), 2
    return a, b


def spy_on_triton(monkeypatch, name: str) -> list:
    """Replace the Triton launcher behind ``name`` with a recorder that still runs it."""
    _, module_name, launcher_name = SMALL_CALLS[name]
    module = kernel_module(module_name)
    launcher = getattr(module, launcher_name)
    calls = []

    def recording(*args, **kwargs):
        calls.append(launcher_name)
        return launcher(*args, **kwargs)

    monkeypatch.setattr(module, launcher_name, recording)
    return calls


@pytest.mark.parametrize("name", list(SMALL_CALLS))
def test_cpu_tensors_use_the_reference_by_default(name, monkeypatch):
    monkeypatch.delenv("INFLUX_KERNELS", raising=False)
    calls = spy_on_triton(monkeypatch, name)
    SMALL_CALLS[name][0](*small_arguments(name))
    assert calls == []


@pytest.mark.parametrize("name", list(SMALL_CALLS))
def test_forced_triton_runs_the_kernel_under_the_interpreter(name, monkeypatch):
    if not _dispatch.HAS_TRITON:
        pytest.skip("Triton is not installed")
    if HAS_CUDA:
        # Where a GPU is visible Triton was imported in compiled mode, and its interpreter cannot
        # run those kernels' helpers (seen on an H200); the compiled kernels are tested there.
        pytest.skip("the interpreter is tested on CPU-only machines")
    monkeypatch.setenv("INFLUX_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = spy_on_triton(monkeypatch, name)
    SMALL_CALLS[name][0](*small_arguments(name))
    assert calls, f"{name} did not launch its Triton kernel"


@pytest.mark.parametrize("name", list(SMALL_CALLS))
def test_forced_torch_never_launches_triton(name, monkeypatch):
    monkeypatch.setenv("INFLUX_KERNELS", "torch")
    calls = spy_on_triton(monkeypatch, name)
    SMALL_CALLS[name][0](*small_arguments(name))
    assert calls == []


def test_forced_triton_on_cpu_without_interpreter_says_how_to_fix(monkeypatch):
    if not _dispatch.HAS_TRITON:
        pytest.skip("Triton is not installed")
    monkeypatch.setenv("INFLUX_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelBackendError, match=r"TRITON_INTERPRET=1.*INFLUX_KERNELS=torch"):
        ghost_sqnorm(*small_arguments("ghost_sqnorm"))


def test_forced_triton_without_triton_installed(monkeypatch):
    monkeypatch.setenv("INFLUX_KERNELS", "triton")
    monkeypatch.setattr(_dispatch, "HAS_TRITON", False)
    with pytest.raises(KernelBackendError, match="Triton is not installed"):
        select_backend("ghost_sqnorm", torch.zeros(1))


def test_unknown_backend_is_rejected(monkeypatch):
    monkeypatch.setenv("INFLUX_KERNELS", "cuda")
    with pytest.raises(KernelBackendError, match=r"'cuda' is not a backend: expected 'torch'"):
        ghost_sqnorm(*small_arguments("ghost_sqnorm"))


def test_float64_forced_to_triton_runs_the_reference(monkeypatch):
    monkeypatch.setenv("INFLUX_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = spy_on_triton(monkeypatch, "ghost_sqnorm")
    result = ghost_sqnorm(*small_arguments("ghost_sqnorm", torch.float64))
    assert calls == [] and result.dtype == torch.float64


def test_triton_launcher_rejects_float64():
    with pytest.raises(
        KernelInputError, match=r"reads float32/float16/bfloat16, got torch.float64"
    ):
        ghost_module.ghost_sqnorm_triton(*small_arguments("ghost_sqnorm", torch.float64))


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_tensors_use_triton_where_it_is_faster(monkeypatch):
    monkeypatch.delenv("INFLUX_KERNELS", raising=False)
    half = torch.zeros(1, device="cuda", dtype=torch.bfloat16)
    single = torch.zeros(1, device="cuda")
    assert select_backend("ghost_sqnorm", half) == "triton"
    assert select_backend("ghost_sqnorm", single) == "torch"
    assert select_backend("direct_sqnorm", single) == "triton"


@pytest.mark.parametrize("name", list(SMALL_CALLS))
def test_automatic_backend_follows_the_measured_dtypes(name, monkeypatch):
    monkeypatch.setattr(_dispatch, "HAS_TRITON", True)
    faster = _dispatch.TRITON_FASTER[name]
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        expected = "triton" if dtype in faster else "torch"
        assert _dispatch.automatic_backend(name, [dtype, dtype], on_cuda=True) == expected
        assert _dispatch.automatic_backend(name, [dtype], on_cuda=False) == "torch"
    # every operand must qualify: one float32 operand keeps a half-precision-only kernel on torch
    mixed = [torch.bfloat16, torch.float32]
    assert _dispatch.automatic_backend(name, mixed, on_cuda=True) == (
        "triton" if torch.float32 in faster else "torch"
    )
    assert torch.float64 not in faster and set(_dispatch.HALF_DTYPES) <= set(faster)


def test_lazy_kernel_compiles_for_the_mode_in_effect(monkeypatch):
    if not _dispatch.HAS_TRITON:
        pytest.skip("Triton is not installed")
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernel = _dispatch.LazyKernel(ghost_module._ghost_sqnorm_kernel.fn)
    kernel[(1,)]  # noqa: B018  (indexing compiles)
    assert isinstance(kernel._jitted[True], InterpretedFunction)


def test_lazy_kernel_jits_its_helpers_for_the_same_mode(monkeypatch):
    if not _dispatch.HAS_TRITON:
        pytest.skip("Triton is not installed")
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for interpret, expected in (("1", InterpretedFunction), ("0", JITFunction)):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        kernel = _dispatch.LazyKernel(ghost_module._ghost_sqnorm_kernel.fn)
        scope = kernel.jitted().fn.__globals__
        assert isinstance(scope["gram_tile"], expected), interpret
        # gram_tile's own helpers follow the same mode
        assert isinstance(scope["gram_tile"].fn.__globals__["load_tile"], expected), interpret


@pytest.mark.slow
def test_kernels_compile_for_cuda_without_a_gpu(tmp_path):
    # A fresh process: Triton cannot compile where it was imported in interpreter mode.
    if not _dispatch.HAS_TRITON:
        pytest.skip("Triton is not installed")
    script = Path(__file__).with_name("compile_for_cuda.py")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600
    )
    if result.returncode == 77:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------------
# Input errors
# --------------------------------------------------------------------------------------------------

A, B = random(2, 3, 4), random(2, 3, 5)

INPUT_ERRORS = [
    pytest.param(
        lambda: ghost_sqnorm(random(2, 3, 4, 1), B),
        r"`a` must be \[N, T, d_in\].*got shape \[2, 3, 4, 1\]",
        id="rank",
    ),
    pytest.param(
        lambda: direct_sqnorm(A, random(3, 3, 5)),
        r"share the leading \[N, T\].*\[2, 3\] vs \[3, 3\]",
        id="N-mismatch",
    ),
    pytest.param(
        lambda: ghost_sqnorm(A, B.double()),
        r"`b` has dtype torch.float64 but `a` has torch.float32",
        id="dtype",
    ),
    pytest.param(
        lambda: ghost_sqnorm(A.numpy(), B), r"must be a torch.Tensor, got ndarray", id="numpy"
    ),
    pytest.param(
        lambda: ghost_sqnorm(A.long(), B), r"must be floating point, got torch.int64", id="integer"
    ),
    pytest.param(
        lambda: kron_project(A, B, random(2, 7), random(3, 5)),
        r"`p_in` \[2, 7\] must have last dimension 4",
        id="p_in",
    ),
    pytest.param(
        lambda: kron_project(A, B, random(2, 4), random(5)),
        r"`p_out` must be a matrix \[k, d_out\]",
        id="p_out-rank",
    ),
    pytest.param(lambda: pairwise_grad_dot(A, B, a2=A), r"pass both `a2` and `b2`", id="a2-alone"),
    pytest.param(
        lambda: pairwise_grad_dot(A, B, random(2, 3, 6), B),
        r"`a2` \[2, 3, 6\] must have last dimension 4",
        id="a2-width",
    ),
    pytest.param(
        lambda: score_topk(random(2, 4), random(6, 5), 1),
        r"must share K: got 4 vs 5",
        id="K-mismatch",
    ),
    pytest.param(
        lambda: score_topk(random(2, 4, 1), random(6, 4), 1),
        r"`query` must be a matrix \[Q, K\]",
        id="query-rank",
    ),
    pytest.param(
        lambda: score_topk(random(2, 4), random(6, 4), -1),
        r"`k` must be an int >= 0, got -1",
        id="k-negative",
    ),
    pytest.param(
        lambda: score_topk(random(2, 4), random(6, 4), True),
        r"`k` must be an int >= 0, got True",
        id="k-bool",
    ),
    pytest.param(
        lambda: score_topk(random(2, 4), random(6, 4), 1, out=torch.empty(6, 2)),
        r"`out` must have shape \[Q, N\] = \[2, 6\], got \[6, 2\]",
        id="out-shape",
    ),
    pytest.param(
        lambda: score_topk(random(2, 4), random(6, 4), 1, out=[[0.0]]),
        r"`out` must be a torch.Tensor",
        id="out-type",
    ),
    pytest.param(
        lambda: score_topk(random(2, 4), random(6, 4), 1, block_n=0),
        r"`block_n` must be a positive int",
        id="block",
    ),
]


@pytest.mark.parametrize(("call", "message"), INPUT_ERRORS)
def test_input_errors_name_expected_and_got(call, message):
    with pytest.raises(KernelInputError, match=message):
        call()


def test_input_errors_are_value_errors():
    assert issubclass(KernelInputError, ValueError)
    assert issubclass(KernelBackendError, RuntimeError)


def test_oversize_launch_is_rejected_with_the_numbers():
    with pytest.raises(
        KernelInputError, match=r"grid axis 1 needs 70000 programs \(T = .*\) but CUDA allows 65535"
    ):
        _dispatch.check_grid("ghost_sqnorm", (1, 70000), ("N = 1", "T = 4480000 / BLOCK_T 64"))


def test_tile_grid_counts_blocks_and_names_the_oversize_axis():
    assert _dispatch.tile_grid("kron_project", ("N", 3, 1), ("k_out", 65, 64)) == (3, 2)
    with pytest.raises(
        KernelInputError, match=r"grid axis 1 needs 70000 programs \(T = 4480000 / 64\)"
    ):
        _dispatch.tile_grid("ghost_sqnorm", ("N", 1, 1), ("T", 70000 * 64, 64))


def test_ghost_launcher_rejects_a_sequence_beyond_the_grid(monkeypatch):
    # T = 65536 * 64 positions with d = 0 features: no memory, but 65536 T blocks on grid axis 1.
    a = torch.empty(1, 65536 * 64, 0)
    with pytest.raises(KernelInputError, match=r"ghost_sqnorm: input too large.*65536 programs"):
        ghost_module.ghost_sqnorm_triton(a, a)


def test_kernels_package_imports_nothing_from_influx():
    # kernels/ sits below everything in the dependency order (docs/architecture.md).
    package_dir = Path(_dispatch.__file__).parent
    offenders = [
        f"{path.name}:{number}"
        for path in sorted(package_dir.glob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if re.match(r"\s*(from|import)\s+influx\b", line)
    ]
    assert offenders == [], f"influx imported from kernels/: {offenders}"
