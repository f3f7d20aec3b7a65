"""Seeded random projections: dense Johnson-Lindenstrauss and Kronecker (per-layer) factors.

Entries are N(0, 1/k), so E||P g||^2 = ||g||^2 and inner products are preserved in expectation.
Matrices are drawn in float64 on the CPU from a generator seeded by (seed, name) and then cast, so
a run in float32 and one in float64, or on CPU and GPU, use the same projection.
"""

from __future__ import annotations

import functools
import math
import zlib

import torch

from influx.errors import InfluxValueError


@functools.lru_cache(maxsize=512)
def gaussian_matrix(rows: int, cols: int, *, seed: int, name: str, dtype, device) -> torch.Tensor:
    """[rows, cols] with N(0, 1/rows) entries, a pure function of (seed, name, shape).

    Cached: repeated calls (chunks, batches of a dataset) reuse the same matrix; callers must not
    modify it in place.
    """
    generator = torch.Generator().manual_seed(
        (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63
    )
    matrix = torch.randn(rows, cols, generator=generator, dtype=torch.float64) / rows**0.5
    return matrix.to(dtype=dtype, device=device)


def kronecker_sizes(target: int, d_in: int, d_out: int) -> tuple[int, int]:
    """Split a per-layer budget of ``target`` dims into (k_in, k_out), k_in * k_out <= target."""
    k_out = max(1, min(d_out, math.isqrt(max(target, 1))))
    k_in = max(1, min(d_in, target // k_out))
    return k_in, k_out


class Projector:
    """Hands out the projection of each parameter block, within a per-block budget of dims.

    A block no larger than its budget is kept as it is (the identity is the best projection).
    """

    def __init__(self, *, budget: int, seed: int, dtype, device):
        if budget < 1:
            raise InfluxValueError(f"projection dim per block must be >= 1; got {budget}")
        self.budget, self.seed, self.dtype, self.device = budget, seed, dtype, device

    def matrix(self, name: str, rows: int, cols: int) -> torch.Tensor:
        return gaussian_matrix(
            rows, cols, seed=self.seed, name=name, dtype=self.dtype, device=self.device
        )

    def kronecker_factors(
        self, name: str, d_in: int, d_out: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_in [k_in, d_in], P_out [k_out, d_out]) with k_in * k_out <= budget."""
        k_in, k_out = kronecker_sizes(self.budget, d_in, d_out)
        return self.matrix(name + ":in", k_in, d_in), self.matrix(name + ":out", k_out, d_out)

    def dense_block(
        self, name: str, grads: torch.Tensor, budget: int | None = None
    ) -> torch.Tensor:
        """[N, D] -> [N, min(D, budget)] (default budget: the whole per-block budget)."""
        budget = self.budget if budget is None else budget
        width = grads.shape[1]
        if width <= budget:
            return grads
        return grads @ self.matrix(name, budget, width).T


def dense_project(
    flat_grads: torch.Tensor, dim: int, *, seed: int, chunk: int = 1 << 16
) -> torch.Tensor:
    """Project [N, P] per-sample gradients to [N, dim] with one seeded Gaussian matrix [dim, P].

    The matrix is drawn column block by column block, so memory stays O(dim * chunk).
    """
    n, width = flat_grads.shape
    out = flat_grads.new_zeros(n, dim)
    for start in range(0, width, chunk):
        stop = min(width, start + chunk)
        block = gaussian_matrix(
            dim,
            stop - start,
            seed=seed,
            name=f"dense:{start}",
            dtype=flat_grads.dtype,
            device=flat_grads.device,
        )
        out += flat_grads[:, start:stop] @ block.T
    return out
