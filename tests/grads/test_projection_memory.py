"""Projection memory is bounded by design: the matrix cache by bytes, dense blocks by columns."""

from __future__ import annotations

import pytest
import torch
from utils import assert_close

from influx.errors import InfluxValueError
from influx.grads import projection
from influx.grads.projection import DENSE_BLOCK_COLUMNS, ProjectionCache, dense_project


def test_the_cache_never_holds_more_than_its_budget():
    cache = ProjectionCache(budget_bytes=10_000)
    shapes = [(10, 50), (20, 30), (5, 100), (40, 40), (10, 50), (30, 10), (100, 20)]
    for rows, cols in shapes:
        made = cache.get(
            (rows, cols), lambda r=rows, c=cols: torch.zeros(r, c, dtype=torch.float64)
        )
        assert made.shape == (rows, cols)
        held = sum(m.numel() * m.element_size() for m in cache._entries.values())
        assert held == cache.bytes <= 10_000
    # a matrix larger than the whole budget is handed out but not kept
    big = cache.get("big", lambda: torch.zeros(2_000, dtype=torch.float64))
    assert big.numel() == 2_000 and "big" not in cache._entries
    cache.set_budget(0)
    assert len(cache) == 0 and cache.bytes == 0


def test_cached_and_regenerated_matrices_are_the_same(monkeypatch):
    monkeypatch.setattr(projection, "CACHE", ProjectionCache(budget_bytes=1 << 20))
    kwargs = dict(seed=4, name="layer", dtype=torch.float64, device="cpu")
    first = projection.gaussian_matrix(8, 30, **kwargs)
    assert projection.gaussian_matrix(8, 30, **kwargs) is first  # from the cache
    projection.CACHE.set_budget(0)
    assert_close(projection.gaussian_matrix(8, 30, **kwargs), first, rtol=0, name="regenerated")


@pytest.mark.parametrize("window_bytes", [1, 2 * 4 * 8 * DENSE_BLOCK_COLUMNS, 64 << 20])
def test_dense_projection_draws_fixed_column_blocks_only(monkeypatch, window_bytes):
    # windows of one block, of two (dim 4 in float64; the last window ragged) and of all three
    monkeypatch.setattr(projection, "DRAW_WINDOW_BYTES", window_bytes)
    monkeypatch.setattr(projection, "CACHE", ProjectionCache(budget_bytes=0))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the threaded path on any machine
    widths = []
    real = projection.gaussian_matrix

    def recording(rows, cols, **kwargs):
        widths.append(cols)
        return real(rows, cols, **kwargs)

    monkeypatch.setattr(projection, "gaussian_matrix", recording)
    width = 2 * DENSE_BLOCK_COLUMNS + 7
    flat = torch.randn(3, width, dtype=torch.float64)
    got = dense_project(flat, 4, seed=1)
    # never the whole [dim, P] matrix; ragged last block (threads draw in any order)
    assert sorted(widths) == [7, DENSE_BLOCK_COLUMNS, DENSE_BLOCK_COLUMNS]
    widths.sort(reverse=True)
    blocks = [
        real(
            4, w, seed=1, name=f"dense:{i * DENSE_BLOCK_COLUMNS}", dtype=torch.float64, device="cpu"
        )
        for i, w in enumerate(widths)
    ]
    # float64, 8,199 products per entry summed in another order
    assert_close(got, flat @ torch.cat(blocks, dim=1).T, rtol=1e-12, name="blockwise JL")


@pytest.mark.parametrize("budget", [-1])
def test_budget_must_be_nonnegative(budget):
    with pytest.raises(ValueError, match="cache budget must be >= 0"):
        ProjectionCache().set_budget(budget)


def test_shares_of_any_column_split_add_up_to_the_projection():
    width = 2 * DENSE_BLOCK_COLUMNS + 7
    flat = torch.randn(3, width, dtype=torch.float64)
    whole = dense_project(flat, 5, seed=2)
    # cuts inside blocks, on a block boundary, and a one-column piece
    cuts = [0, 100, DENSE_BLOCK_COLUMNS, DENSE_BLOCK_COLUMNS + 1, width - 3, width]
    shares = sum(
        dense_project(flat[:, a:b], 5, seed=2, start=a, width=width)
        for a, b in zip(cuts, cuts[1:], strict=False)
    )
    # float64, a few thousand products per entry summed in another order
    assert_close(shares, whole, rtol=1e-12, name="sum of column shares")
    with pytest.raises(InfluxValueError, match="outside"):
        dense_project(flat[:, :10], 5, seed=2, start=width - 5, width=width)


def test_a_matrix_drawn_on_the_cpu_itself_is_the_cpu_draw(monkeypatch):
    # draw_on_device names where the generator runs: for the CPU that is the default's generator
    monkeypatch.setattr(projection, "CACHE", ProjectionCache(budget_bytes=0))
    kwargs = dict(seed=5, name="dense:0", dtype=torch.float64, device="cpu")
    assert_close(
        projection.gaussian_matrix(6, 40, draw_on_device=True, **kwargs),
        projection.gaussian_matrix(6, 40, **kwargs),
        rtol=0,
        name="CPU draw",
    )
