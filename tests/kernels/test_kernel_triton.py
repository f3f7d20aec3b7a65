"""Each Triton launcher against its reference on fresh random inputs (interpreter on CPU).

Both sides accumulate in fp32 from the same (possibly half-precision) inputs, so they are compared
at the fp32 tolerance; a separate test bounds the half-precision error against float64 truth. Output
buffers start as NaN (fixture ``poisoned_outputs``) so entries that no program writes fail.
"""

from __future__ import annotations

import kernel_helpers as brute
import numpy as np
import pytest
import torch
from influx.kernels import (
    direct_sqnorm_reference,
    ghost_sqnorm_reference,
    kron_project_reference,
    pairwise_grad_dot_reference,
    score_topk_reference,
)
from influx.kernels.ghost_sqnorm import direct_sqnorm_triton, ghost_sqnorm_triton
from influx.kernels.kron_project import kron_project_triton
from influx.kernels.pairwise_grad_dot import pairwise_grad_dot_triton
from influx.kernels.score_topk import score_topk_triton
from kernel_helpers import TRITON_DTYPES, random
from utils import RTOL, assert_close

pytestmark = pytest.mark.usefixtures("triton_ready", "poisoned_outputs")

# Triton and reference both accumulate in fp32 from identical inputs.
RTOL_SAME_INPUTS = RTOL[torch.float32]

# (N, T, d_in, d_out): one sample at T = 1; ragged T = 5, d = 123; T = 70 spans two 64-row Gram
# tiles (off-diagonal tile pairs count twice); d_out = 70 spans two 64-column G tiles; empty batch.
LAYER_SHAPES = [
    pytest.param((1, 1, 3, 2), id="N1-T1"),
    pytest.param((3, 5, 123, 7), id="T5-d123"),
    pytest.param((2, 70, 20, 33), id="T70"),
    pytest.param((2, 37, 9, 70), id="dout70"),
    pytest.param((0, 4, 5, 6), id="N0"),
]


def layer(shape, dtype, device):
    n, t, d_in, d_out = shape
    return random(n, t, d_in, dtype=dtype, device=device), random(
        n, t, d_out, dtype=dtype, device=device
    )


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("shape", LAYER_SHAPES)
def test_ghost_sqnorm_matches_reference(shape, dtype, device):
    a, b = layer(shape, dtype, device)
    actual = ghost_sqnorm_triton(a, b)
    assert actual.dtype == torch.float32 and actual.shape == (shape[0],)
    assert_close(actual, ghost_sqnorm_reference(a, b), rtol=RTOL_SAME_INPUTS, name="ghost_sqnorm")


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("shape", LAYER_SHAPES)
def test_direct_sqnorm_matches_reference(shape, dtype, device):
    a, b = layer(shape, dtype, device)
    actual = direct_sqnorm_triton(a, b)
    assert actual.dtype == torch.float32 and actual.shape == (shape[0],)
    assert_close(actual, direct_sqnorm_reference(a, b), rtol=RTOL_SAME_INPUTS, name="direct_sqnorm")


# (N, T, d_in, d_out, k_in, k_out): k_in = 70 spans two output tiles, T = 40 two T chunks.
KRON_SHAPES = [
    pytest.param((1, 1, 3, 2, 1, 1), id="N1-T1-k1"),
    pytest.param((3, 5, 123, 7, 17, 9), id="T5-d123"),
    pytest.param((2, 40, 20, 33, 70, 5), id="kin70-T40"),
    pytest.param((0, 3, 4, 5, 2, 3), id="N0"),
]


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("shape", KRON_SHAPES)
def test_kron_project_matches_reference(shape, dtype, device):
    n, t, d_in, d_out, k_in, k_out = shape
    a, b = layer((n, t, d_in, d_out), dtype, device)
    p_in = random(k_in, d_in, dtype=dtype, device=device)
    p_out = random(k_out, d_out, dtype=dtype, device=device)
    actual = kron_project_triton(a, b, p_in, p_out)
    assert actual.shape == (n, k_out, k_in)
    expected = kron_project_reference(a, b, p_in, p_out)
    assert_close(actual, expected, rtol=RTOL_SAME_INPUTS, name="kron_project")


# (N, M, T, T2, d_in, d_out); M = None pairs the batch with itself. N = 70 spans two row tiles.
PAIRWISE_SHAPES = [
    pytest.param((1, 1, 1, 1, 3, 2), id="N1-M1-T1"),
    pytest.param((3, None, 5, None, 123, 7), id="self-T5-d123"),
    pytest.param((70, 3, 1, 1, 9, 4), id="N70-T1"),
    pytest.param((2, 3, 4, 2, 20, 33), id="T4-T2_2"),
    pytest.param((0, 3, 2, 2, 4, 5), id="N0"),
    pytest.param((2, 0, 2, 2, 4, 5), id="M0"),
]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("shape", PAIRWISE_SHAPES)
def test_pairwise_grad_dot_matches_reference(shape, dtype, device):
    n, m, t, t2, d_in, d_out = shape
    a, b = layer((n, t, d_in, d_out), dtype, device)
    second = () if m is None else layer((m, t2, d_in, d_out), dtype, device)
    actual = pairwise_grad_dot_triton(a, b, *second)
    expected = pairwise_grad_dot_reference(a, b, *second)
    assert actual.shape == (n, n if m is None else m)
    assert_close(actual, expected, rtol=RTOL_SAME_INPUTS, name="pairwise_grad_dot")


# (Q, N, K, k, block_q, block_n): streaming over several tiles; k > N (clamped); N = 0; Q = 0;
# Q = 70, N = 130 span several kernel tiles inside one streamed block.
TOPK_CASES = [
    pytest.param((5, 70, 37, 4, 3, 16), id="Q5-N70-tiles3x16"),
    pytest.param((1, 1, 1, 3, None, None), id="k-gt-N"),
    pytest.param((70, 130, 40, 10, None, None), id="Q70-N130"),
    pytest.param((3, 0, 8, 5, None, None), id="N0"),
    pytest.param((0, 5, 8, 2, None, None), id="Q0"),
]


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("case", TOPK_CASES)
def test_score_topk_matches_reference(case, dtype, device):
    n_queries, n_train, depth, k, block_q, block_n = case
    query = random(n_queries, depth, dtype=dtype, device=device)
    train = random(n_train, depth, dtype=dtype, device=device)
    out = torch.full((n_queries, n_train), float("nan"), device=device)
    blocks = {"block_q": block_q, "block_n": block_n}
    actual = score_topk_triton(query, train, k, out=out, **blocks)
    expected_out = torch.full_like(out, float("nan"))
    expected = score_topk_reference(query, train, k, out=expected_out, **blocks)
    assert_close(out, expected_out, rtol=RTOL_SAME_INPUTS, name="full scores")
    for field in ("largest", "smallest"):
        values = getattr(actual, f"{field}_values")
        assert values.shape == (n_queries, min(k, n_train))
        assert_close(
            values, getattr(expected, f"{field}_values"), rtol=RTOL_SAME_INPUTS, name=field
        )
        assert torch.equal(
            getattr(actual, f"{field}_indices"), getattr(expected, f"{field}_indices")
        )


def test_score_topk_writes_through_a_numpy_memmap(tmp_path, device):
    query = random(4, 6, device=device)
    train = random(50, 6, device=device)
    memmap = np.lib.format.open_memmap(
        tmp_path / "scores.npy", mode="w+", dtype=np.float32, shape=(4, 50)
    )
    memmap[:] = np.nan
    score_topk_triton(query, train, 2, out=torch.from_numpy(memmap), block_q=3, block_n=16)
    memmap.flush()
    on_disk = torch.from_numpy(np.load(tmp_path / "scores.npy"))
    assert_close(on_disk, (query @ train.T).cpu(), rtol=RTOL_SAME_INPUTS, name="memmap scores")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16], ids=["fp16"])
def test_half_precision_error_against_float64_truth(dtype, device):
    # Only the input rounding (relative 2**-11) separates these from the float64 values.
    a32, b32 = layer((3, 5, 33, 7), torch.float32, device)
    p_in, p_out = random(6, 33, device=device), random(4, 7, device=device)
    a, b = a32.to(dtype), b32.to(dtype)
    rtol = RTOL[dtype]
    assert_close(ghost_sqnorm_triton(a, b), brute.sqnorm(a32, b32), rtol=rtol, name="ghost fp16")
    assert_close(direct_sqnorm_triton(a, b), brute.sqnorm(a32, b32), rtol=rtol, name="direct fp16")
    assert_close(
        kron_project_triton(a, b, p_in.to(dtype), p_out.to(dtype)),
        brute.kron(a32, b32, p_in, p_out),
        rtol=rtol,
        name="kron fp16",
    )
    assert_close(
        pairwise_grad_dot_triton(a, b), brute.pairwise(a32, b32), rtol=rtol, name="pair fp16"
    )
