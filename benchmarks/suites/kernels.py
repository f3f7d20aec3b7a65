"""Kernel suite: each Triton kernel vs its torch reference vs the torch composition it replaces.

``run(args)`` returns one dict per (kernel, shape, dtype, implementation) with the median time,
achieved GB/s (minimum bytes: inputs read once, outputs written once) and TFLOP/s (of the algorithm
that row runs), its peak memory, and the error against the reference, checked after timing. Every
row is timed alike: warm-up calls (which also absorb Triton compilation), then the median of the
timed calls. Peak memory is each row's own: on CPU every row runs in its own fresh process
(``run_one``); on CUDA rows share a process (one CUDA context) and the allocator's peak counter is
reset before each row and read above the memory allocated then, with one case's inputs alive at a
time. Triton rows only run on CUDA; on CPU the suite times the references and the compositions.
Provenance (machine, versions, git sha) and output files are added by ``benchmarks/run.py``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from influx.kernels import (
    direct_sqnorm_reference,
    ghost_sqnorm_reference,
    kron_project_reference,
    pairwise_grad_dot_reference,
    score_topk_reference,
)
from influx.kernels._dispatch import HAS_TRITON

from benchmarks.common import memory_mark, peak_mem_mb, run_child, time_call, timing_label

if HAS_TRITON:
    from influx.kernels.ghost_sqnorm import direct_sqnorm_triton, ghost_sqnorm_triton
    from influx.kernels.kron_project import kron_project_triton
    from influx.kernels.pairwise_grad_dot import pairwise_grad_dot_triton
    from influx.kernels.score_topk import score_topk_triton

SUITE = "kernels"
# Columns of the markdown table written by benchmarks/run.py (the JSON rows carry every field).
COLUMNS = [
    "kernel", "impl", "backend", "dtype", "shape", "median_s", "gbps", "tflops", "peak_mem_mb",
    "timing", "max_rel_err", "matches_reference",
]  # fmt: skip
NOTES = (
    "backend: triton (CUDA only), reference (the pure-torch `<name>_reference`), composition "
    "(the plain torch it replaces, e.g. materialize G then take norms). gbps: minimum bytes "
    "(inputs read once, outputs written once) over the median time. tflops: FLOPs of the "
    "algorithm of that row over the median time. timing: warm-up calls, then the median of the "
    "timed calls. peak_mem_mb: peak resident (CPU: each row in its own fresh process) or "
    "allocated (CUDA: allocator peak reset before each row) memory above the state after "
    "building the inputs. max_rel_err: max abs error over max |reference|, checked after timing."
)
# Relative error (norm-wise, against the reference) above which a row is flagged as mismatching.
MATCH_RTOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclass
class Impl:
    """One way of computing a kernel's result: ``fn()`` runs it on prepared inputs."""

    name: str
    backend: str  # "triton", "reference" or "composition"
    fn: Callable[[], Any]
    flops: float


@dataclass
class Case:
    """One kernel on one shape: inputs prepared, the bytes any implementation must move."""

    kernel: str
    shape: dict[str, int]
    dtype: torch.dtype
    min_bytes: float
    impls: list[Impl] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------------


def layer_shapes(quick: bool, device: str) -> list[dict[str, int]]:
    """Layers as (N, T, d_in, d_out): a CIFAR ResNet-18 conv (3x3x64 -> 64 on 16x16 positions),
    its linear head (T = 1), and (full GPU runs) a transformer projection (T = 128, 768 -> 768)."""
    batch = 8 if quick or device == "cpu" else 64
    shapes = [
        {"N": batch, "T": 256, "d_in": 576, "d_out": 64},
        {"N": batch, "T": 1, "d_in": 512, "d_out": 10},
    ]
    if not quick and device == "cuda":
        shapes.append({"N": batch, "T": 128, "d_in": 768, "d_out": 768})
    return shapes


def pairwise_shapes(quick: bool, device: str) -> list[dict[str, int]]:
    """Pairwise products suit short sequences (cost N^2 T^2): a linear head over a larger batch
    and a T = 16 layer. Long-T layers are cheaper by materializing G (the composition row)."""
    batch = 64 if quick or device == "cpu" else 512
    return [
        {"N": batch, "T": 1, "d_in": 512, "d_out": 10},
        {"N": min(batch, 64), "T": 16, "d_in": 64, "d_out": 64},
    ]


def score_shapes(quick: bool, device: str) -> list[dict[str, int]]:
    """(Q queries, N train, K features, k kept): influence-style scoring of projected gradients."""
    if quick or device == "cpu":
        return [{"Q": 64, "N": 8192, "K": 512, "k": 10}]
    return [{"Q": 2000, "N": 50000, "K": 4096, "k": 10}]


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------


def _randn(*shape: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.randn(*shape, device=device).to(dtype)


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _materialized_grads(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The composition the kernels replace: G_i = b_i^T a_i for every sample, [N, d_out, d_in]."""
    return torch.einsum("nto,nti->noi", b.float(), a.float())


def sqnorm_case(shape: dict[str, int], dtype: torch.dtype, device: str, use_triton: bool) -> Case:
    n, t, d_in, d_out = shape["N"], shape["T"], shape["d_in"], shape["d_out"]
    a, b = (
        _randn(n, t, d_in, dtype=dtype, device=device),
        _randn(n, t, d_out, dtype=dtype, device=device),
    )
    ghost_flops = 2.0 * n * t * t * (d_in + d_out + 1)
    direct_flops = 2.0 * n * t * d_in * d_out + 2.0 * n * d_in * d_out
    case = Case("sqnorm", shape, dtype, _nbytes(a, b) + 4 * n)
    if use_triton:
        # The kernel visits only the upper triangle of tile pairs: about half the nominal Gram work.
        case.impls.append(
            Impl("ghost_sqnorm_triton", "triton", lambda: ghost_sqnorm_triton(a, b), ghost_flops)
        )
        case.impls.append(
            Impl("direct_sqnorm_triton", "triton", lambda: direct_sqnorm_triton(a, b), direct_flops)
        )
    case.impls += [
        Impl(
            "ghost_sqnorm_reference", "reference", lambda: ghost_sqnorm_reference(a, b), ghost_flops
        ),
        Impl(
            "direct_sqnorm_reference",
            "reference",
            lambda: direct_sqnorm_reference(a, b),
            direct_flops,
        ),
        Impl(
            "materialize+norm (einsum)",
            "composition",
            lambda: _materialized_grads(a, b).pow(2).sum(dim=(1, 2)),
            direct_flops,
        ),
    ]
    return case


def kron_case(shape: dict[str, int], dtype: torch.dtype, device: str, use_triton: bool) -> Case:
    n, t, d_in, d_out = shape["N"], shape["T"], shape["d_in"], shape["d_out"]
    # LoGra-style sizes: k_in = k_out = 64 (4k projected dims per layer), capped by the layer.
    k_in, k_out = min(64, d_in), min(64, d_out)
    a, b = (
        _randn(n, t, d_in, dtype=dtype, device=device),
        _randn(n, t, d_out, dtype=dtype, device=device),
    )
    p_in, p_out = (
        _randn(k_in, d_in, dtype=dtype, device=device),
        _randn(k_out, d_out, dtype=dtype, device=device),
    )
    fused_flops = 2.0 * n * t * (d_in * k_in + d_out * k_out + k_in * k_out)
    materialize_flops = 2.0 * n * (t * d_in * d_out + k_out * d_out * d_in + k_out * d_in * k_in)
    case = Case(
        "kron_project",
        {**shape, "k_in": k_in, "k_out": k_out},
        dtype,
        _nbytes(a, b, p_in, p_out) + 4 * n * k_in * k_out,
    )
    if use_triton:
        case.impls.append(
            Impl(
                "kron_project_triton",
                "triton",
                lambda: kron_project_triton(a, b, p_in, p_out),
                fused_flops,
            )
        )
    case.impls += [
        Impl(
            "kron_project_reference",
            "reference",
            lambda: kron_project_reference(a, b, p_in, p_out),
            fused_flops,
        ),
        Impl(
            "materialize+project (einsum)",
            "composition",
            lambda: p_out.float() @ _materialized_grads(a, b) @ p_in.float().T,
            materialize_flops,
        ),
    ]
    return case


def pairwise_case(shape: dict[str, int], dtype: torch.dtype, device: str, use_triton: bool) -> Case:
    n, t, d_in, d_out = shape["N"], shape["T"], shape["d_in"], shape["d_out"]
    a, b = (
        _randn(n, t, d_in, dtype=dtype, device=device),
        _randn(n, t, d_out, dtype=dtype, device=device),
    )
    gram_flops = 2.0 * n * n * t * t * (d_in + d_out + 1)
    materialize_flops = 2.0 * n * t * d_in * d_out + 2.0 * n * n * d_in * d_out
    case = Case("pairwise_grad_dot", shape, dtype, _nbytes(a, b) + 4 * n * n)

    def materialize_then_gemm() -> torch.Tensor:
        grads = _materialized_grads(a, b).flatten(1)  # [N, d_out * d_in]
        return grads @ grads.T

    if use_triton:
        case.impls.append(
            Impl(
                "pairwise_grad_dot_triton",
                "triton",
                lambda: pairwise_grad_dot_triton(a, b),
                gram_flops,
            )
        )
    case.impls += [
        Impl(
            "pairwise_grad_dot_reference",
            "reference",
            lambda: pairwise_grad_dot_reference(a, b),
            gram_flops,
        ),
        Impl("materialize+gemm", "composition", materialize_then_gemm, materialize_flops),
    ]
    return case


def topk_case(shape: dict[str, int], dtype: torch.dtype, device: str, use_triton: bool) -> Case:
    q, n, depth, k = shape["Q"], shape["N"], shape["K"], shape["k"]
    query, train = (
        _randn(q, depth, dtype=dtype, device=device),
        _randn(n, depth, dtype=dtype, device=device),
    )
    flops = 2.0 * q * n * depth
    case = Case("score_topk", shape, dtype, _nbytes(query, train) + 2 * 12 * q * k)

    def full_matrix_then_topk() -> tuple[torch.Tensor, ...]:
        scores = query.float() @ train.float().T  # [Q, N] all at once
        largest = torch.topk(scores, k, dim=1)
        smallest = torch.topk(scores, k, dim=1, largest=False)
        return largest.values, largest.indices, smallest.values, smallest.indices

    if use_triton:
        case.impls.append(
            Impl(
                "score_topk_triton",
                "triton",
                lambda: tuple(score_topk_triton(query, train, k)),
                flops,
            )
        )
    case.impls += [
        Impl(
            "score_topk_reference",
            "reference",
            lambda: tuple(score_topk_reference(query, train, k)),
            flops,
        ),
        Impl("full S + torch.topk", "composition", full_matrix_then_topk, flops),
    ]
    return case


# --------------------------------------------------------------------------------------------------
# Checking and timing
# --------------------------------------------------------------------------------------------------


def relative_error(actual: Any, expected: Any) -> float:
    """Norm-wise relative error of the first tensor of each result (values for top-k)."""
    actual = actual[0] if isinstance(actual, tuple) else actual
    expected = expected[0] if isinstance(expected, tuple) else expected
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    error = (actual - expected).abs().max().item() if expected.numel() else 0.0
    return error / scale if scale > 0 else error


def measure(case: Case, impl: Impl, device: str, warmup: int, repeats: int) -> dict[str, Any]:
    """Time one implementation and take its peak memory, then check it against the reference."""
    base = memory_mark(device)
    seconds = time_call(impl.fn, device=device, repeats=repeats, warmup=warmup)["median_s"]
    peak = peak_mem_mb(base, device)
    reference = next(other for other in case.impls if other.backend == "reference").fn()
    error = relative_error(impl.fn(), reference)
    return {
        "suite": SUITE,
        "kernel": case.kernel,
        "impl": impl.name,
        "backend": impl.backend,
        "device": device,
        "dtype": str(case.dtype).removeprefix("torch."),
        "shape": " ".join(f"{key}={value}" for key, value in case.shape.items()),
        "dims": dict(case.shape),
        "median_s": seconds,
        "repeats": repeats,
        "timing": timing_label(warmup, repeats),
        "gbps": case.min_bytes / seconds / 1e9,
        "tflops": impl.flops / seconds / 1e12,
        "peak_mem_mb": peak,
        "max_rel_err": error,
        "matches_reference": error <= MATCH_RTOL[case.dtype],
    }


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def case_specs(device: str, quick: bool) -> list[tuple[Callable[..., Case], dict, torch.dtype]]:
    """Every (case builder, shape, dtype) of a run, in order; a case's inputs are built only when
    it is measured (seeded, so a child process builds the same inputs)."""
    dtypes = [torch.float32] + ([torch.bfloat16] if device == "cuda" and not quick else [])
    specs = []
    for dtype in dtypes:
        for shape in layer_shapes(quick, device):
            specs += [(sqnorm_case, shape, dtype), (kron_case, shape, dtype)]
        specs += [(pairwise_case, shape, dtype) for shape in pairwise_shapes(quick, device)]
        specs += [(topk_case, shape, dtype) for shape in score_shapes(quick, device)]
    return specs


def _settings(args: argparse.Namespace) -> tuple[str, bool, bool, int, int]:
    device = str(getattr(args, "device", "cpu"))
    quick = bool(getattr(args, "quick", False))
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but torch sees no CUDA device")
    warmup, repeats = (1, 3) if quick else (3, 10)
    repeats = getattr(args, "repeats", None) or repeats
    return device, quick, HAS_TRITON and device == "cuda", warmup, repeats


def _build(spec, device: str, use_triton: bool) -> Case:
    builder, shape, dtype = spec
    torch.manual_seed(0)
    return builder(shape, dtype, device, use_triton)


def run_one(args: argparse.Namespace) -> int:
    """Child process: row ``<case index>:<impl name>``, printed as JSON on the last line."""
    device, quick, use_triton, warmup, repeats = _settings(args)
    index, name = args.one.split(":", 1)
    case = _build(case_specs(device, quick)[int(index)], device, use_triton)
    impl = next(impl for impl in case.impls if impl.name == name)
    print(json.dumps(measure(case, impl, device, warmup, repeats)))
    return 0


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the suite; ``args.device`` is "cpu" or "cuda", ``args.quick`` picks small shapes."""
    device, quick, use_triton, warmup, repeats = _settings(args)
    rows = []
    for index, spec in enumerate(case_specs(device, quick)):
        if device == "cuda":
            case = _build(spec, device, use_triton)
            rows += [measure(case, impl, device, warmup, repeats) for impl in case.impls]
            del case  # one case's inputs alive at a time
            continue
        # the implementations' names, without allocating inputs
        for impl in _build(spec, "meta", use_triton).impls:
            row = run_child(SUITE, f"{index}:{impl.name}", args)
            rows.append(row if "kernel" in row else {"impl": impl.name, **row})
    return rows


if __name__ == "__main__":  # a quick look without benchmarks/run.py
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    for row in run(parser.parse_args()):
        print(
            f"{row['kernel']:18s} {row['impl']:30s} {row['dtype']:8s} "
            f"{row['median_s'] * 1e3:9.3f} ms "
            f"{row['gbps']:8.2f} GB/s {row['tflops']:7.3f} TFLOP/s rel.err {row['max_rel_err']:.1e}"
        )
