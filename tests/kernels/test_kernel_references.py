"""The pure-torch references against float64 brute force (explicit G_i), at rtol 1e-10."""

from __future__ import annotations

import kernel_helpers as brute
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from influx.kernels import (
    direct_sqnorm_reference,
    ghost_sqnorm_reference,
    kron_project_reference,
    pairwise_grad_dot_reference,
    score_topk_reference,
)
from utils import RTOL, assert_close

F64 = torch.float64
# A few hundred ulps of reordering in float64 (see tests/utils.py).
RTOL_F64 = RTOL[F64]
# Budgets that force chunking over N, tiling over T, and the single-chunk path.
MAX_ELEMENTS = st.sampled_from([1, 7, 2**24])
HYPOTHESIS = settings(max_examples=25, deadline=None)


def f64(*shape: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=F64)


@st.composite
def layer_shapes(draw) -> tuple[int, int, int, int]:
    """(N, T, d_in, d_out) including the empty batch and T = 1."""
    return (
        draw(st.integers(0, 4)),
        draw(st.integers(1, 6)),
        draw(st.integers(1, 9)),
        draw(st.integers(1, 9)),
    )


@HYPOTHESIS
@given(shape=layer_shapes(), max_elements=MAX_ELEMENTS, seed=st.integers(0, 2**31 - 1))
def test_sqnorm_references_match_brute_force(shape, max_elements, seed):
    n, t, d_in, d_out = shape
    a, b = f64(n, t, d_in, seed=seed), f64(n, t, d_out, seed=seed + 1)
    expected = brute.sqnorm(a, b)
    ghost = ghost_sqnorm_reference(a, b, max_elements=max_elements)
    direct = direct_sqnorm_reference(a, b, max_elements=max_elements)
    assert ghost.dtype == direct.dtype == F64
    assert_close(ghost, expected, rtol=RTOL_F64, name="ghost_sqnorm_reference")
    assert_close(direct, expected, rtol=RTOL_F64, name="direct_sqnorm_reference")


@HYPOTHESIS
@given(
    shape=layer_shapes(),
    k_in=st.integers(1, 5),
    k_out=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_kron_project_reference_matches_brute_force(shape, k_in, k_out, seed):
    n, t, d_in, d_out = shape
    a, b = f64(n, t, d_in, seed=seed), f64(n, t, d_out, seed=seed + 1)
    p_in, p_out = f64(k_in, d_in, seed=seed + 2), f64(k_out, d_out, seed=seed + 3)
    actual = kron_project_reference(a, b, p_in, p_out)
    assert actual.shape == (n, k_out, k_in)
    assert_close(
        actual, brute.kron(a, b, p_in, p_out), rtol=RTOL_F64, name="kron_project_reference"
    )


@HYPOTHESIS
@given(
    shape=layer_shapes(),
    m=st.integers(0, 4),
    t2=st.integers(1, 4),
    max_elements=MAX_ELEMENTS,
    seed=st.integers(0, 2**31 - 1),
)
def test_pairwise_reference_matches_brute_force(shape, m, t2, max_elements, seed):
    n, t, d_in, d_out = shape
    a, b = f64(n, t, d_in, seed=seed), f64(n, t, d_out, seed=seed + 1)
    a2, b2 = f64(m, t2, d_in, seed=seed + 2), f64(m, t2, d_out, seed=seed + 3)
    cross = pairwise_grad_dot_reference(a, b, a2, b2, max_elements=max_elements)
    within = pairwise_grad_dot_reference(a, b, max_elements=max_elements)
    assert_close(cross, brute.pairwise(a, b, a2, b2), rtol=RTOL_F64, name="pairwise (cross)")
    assert_close(within, brute.pairwise(a, b), rtol=RTOL_F64, name="pairwise (within)")


@HYPOTHESIS
@given(
    n_queries=st.integers(0, 5),
    n_train=st.integers(0, 12),
    depth=st.integers(1, 6),
    k=st.integers(0, 15),
    block_q=st.integers(1, 4),
    block_n=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_score_topk_reference_matches_full_sort(
    n_queries, n_train, depth, k, block_q, block_n, seed
):
    query, train = f64(n_queries, depth, seed=seed), f64(n_train, depth, seed=seed + 1)
    out = torch.full((n_queries, n_train), float("nan"), dtype=F64)
    top = score_topk_reference(query, train, k, out=out, block_q=block_q, block_n=block_n)
    scores = brute.scores(query, train)
    kept = min(k, n_train)
    descending = scores.sort(dim=1, descending=True)
    ascending = scores.sort(dim=1)
    assert_close(out, scores, rtol=RTOL_F64, name="full scores")
    assert_close(top.largest_values, descending.values[:, :kept], rtol=RTOL_F64, name="largest")
    assert_close(top.smallest_values, ascending.values[:, :kept], rtol=RTOL_F64, name="smallest")
    assert torch.equal(top.largest_indices, descending.indices[:, :kept])
    assert torch.equal(top.smallest_indices, ascending.indices[:, :kept])
    assert top.largest_indices.dtype == top.smallest_indices.dtype == torch.int64


def test_two_dimensional_inputs_mean_one_position():
    a, b = f64(4, 6, seed=0), f64(4, 3, seed=1)
    expected = brute.sqnorm(a, b)
    assert_close(ghost_sqnorm_reference(a, b), expected, rtol=RTOL_F64, name="ghost 2-D")
    assert_close(pairwise_grad_dot_reference(a, b), brute.pairwise(a, b), rtol=RTOL_F64, name="T=1")
    # T = 1: <G_i, G_j> = (a_i . a_j)(b_i . b_j)
    assert_close(pairwise_grad_dot_reference(a, b), (a @ a.T) * (b @ b.T), name="T=1 closed form")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_inputs_accumulate_and_return_fp32(dtype):
    a, b = f64(3, 4, 5, seed=0).to(dtype), f64(3, 4, 2, seed=1).to(dtype)
    expected = brute.sqnorm(a, b)
    for reference in (ghost_sqnorm_reference, direct_sqnorm_reference):
        result = reference(a, b)
        assert result.dtype == torch.float32
        assert_close(result, expected, rtol=RTOL[torch.float32], name=reference.__name__)
    top = score_topk_reference(f64(2, 5, seed=2).to(dtype), f64(7, 5, seed=3).to(dtype), 3)
    assert top.largest_values.dtype == torch.float32


def test_large_sequence_is_tiled_not_materialized():
    # T = 300 with a budget of 1,000 Gram entries: 31 x 31 tiles of the 300 x 300 plane.
    a, b = f64(2, 300, 3, seed=0), f64(2, 300, 2, seed=1)
    actual = ghost_sqnorm_reference(a, b, max_elements=1000)
    assert_close(actual, brute.sqnorm(a, b), rtol=RTOL_F64, name="tiled ghost")
