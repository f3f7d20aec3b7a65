"""Seeded random projections: dense Johnson-Lindenstrauss and Kronecker (per-layer) factors.

Entries are N(0, 1/k), so E||P g||^2 = ||g||^2 and inner products are preserved in expectation.
Matrices are drawn in float32 from a generator seeded by (seed, name) and then cast, so a run in
float32 and one in float64 use the same projection (float32 because its draw is vectorized: about
6x the float64 rate on CPU, which is what a dense projection of a large network spends its time
on). Kronecker factors and per-parameter blocks are drawn on the CPU, so CPU and GPU runs use the
same ones. Dense JL blocks of CUDA gradients are drawn on the GPU, from a CUDA generator with the
same seed: a CPU draws about 0.26 G normals a second per core, and a dense projection of ResNet-18
at K = 2,048 needs 23 G per batch of examples, which a GPU draws in place of shipping 92 GB over
the bus. A seed then fixes the dense projection per kind of device (possibly per GPU model too:
CUDA's generator spreads its stream over a grid sized by the GPU), not across them; set
:data:`DENSE_DRAWS_ON_GPU` to False for the CPU's draws everywhere.
"""

from __future__ import annotations

import math
import threading
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import torch

from influx.errors import InfluxValueError

# Projection matrices kept for reuse, at most this many bytes in all (least recently used first
# out). 1 GiB holds every Kronecker factor of a ResNet-18 at 4,096 dims many times over; a dense
# projection block too large for it is regenerated per use instead of cached.
DEFAULT_CACHE_BYTES = 1 << 30


class ProjectionCache:
    """An LRU cache of projection matrices bounded by their total size in bytes."""

    def __init__(self, budget_bytes: int = DEFAULT_CACHE_BYTES):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self._lock = threading.Lock()  # dense projections draw their blocks from worker threads

    def set_budget(self, budget_bytes: int) -> None:
        """Change the budget (0 disables caching), evicting what no longer fits."""
        if budget_bytes < 0:
            raise InfluxValueError(f"cache budget must be >= 0 bytes; got {budget_bytes}")
        with self._lock:
            self.budget_bytes = budget_bytes
            self._evict(0)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple, make) -> torch.Tensor:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        matrix = make()  # outside the lock: threads draw different matrices at once
        size = matrix.numel() * matrix.element_size()
        with self._lock:
            if size <= self.budget_bytes and key not in self._entries:
                self._evict(size)
                self._entries[key] = matrix
                self.bytes += size
        return matrix

    def _evict(self, incoming: int) -> None:
        while self._entries and self.bytes + incoming > self.budget_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


CACHE = ProjectionCache()


def gaussian_matrix(
    rows: int, cols: int, *, seed: int, name: str, dtype, device, draw_on_device: bool = False
) -> torch.Tensor:
    """[rows, cols] with N(0, 1/rows) entries, a pure function of (seed, name, shape) and of
    where it is drawn: on a CPU generator (the default: the same matrix on every device), or with
    ``draw_on_device=True`` on a generator of ``device`` itself (the same matrix as the CPU's
    when ``device`` is the CPU).

    Cached in :data:`CACHE` (bounded in bytes): repeated calls (chunks, batches of a dataset)
    reuse the same matrix while it fits; callers must not modify it in place.
    """
    device = torch.device(device)
    drawn_on = device if draw_on_device else torch.device("cpu")
    key = (rows, cols, seed, name, dtype, str(device), drawn_on.type)
    return CACHE.get(key, lambda: _draw(rows, cols, seed, name, dtype, device, drawn_on))


def _draw(rows: int, cols: int, seed: int, name: str, dtype, device, drawn_on) -> torch.Tensor:
    # Drawn in float32 on ``drawn_on``'s generator, then cast and moved.
    generator = torch.Generator(device=drawn_on).manual_seed(
        (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63
    )
    # scaled inside the draw: one single-threaded op per block on a CPU (a separate mul_ would be
    # a parallel op inside each drawing thread)
    matrix = torch.empty(rows, cols, dtype=torch.float32, device=drawn_on)
    matrix.normal_(0.0, rows**-0.5, generator=generator)
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


# Dense blocks of CUDA gradients are drawn on the GPU (module doc); False: on the CPU, as every
# other matrix, so that CPU and GPU runs share the dense projection too, at the CPU's drawing rate.
DENSE_DRAWS_ON_GPU = True
# The dense projection [dim, P] is defined block by block over this many parameter columns (the
# block's seed name is its first column): part of the seeding rule, so the projection does not
# depend on memory settings. One block is dim x 4,096 (32 MiB at dim = 2,048 in float32).
DENSE_BLOCK_COLUMNS = 4096
# Blocks drawn ahead of their matmuls, at most this many bytes of them (at least one block).
DRAW_WINDOW_BYTES = 64 << 20


def dense_project(
    flat_grads: torch.Tensor, dim: int, *, seed: int, start: int = 0, width: int | None = None
) -> torch.Tensor:
    """Project [N, P] per-sample gradients to [N, dim] with one seeded Gaussian matrix [dim, P].

    The matrix is drawn column block by column block (:data:`DENSE_BLOCK_COLUMNS`), never whole,
    so memory stays O(dim * DENSE_BLOCK_COLUMNS + DRAW_WINDOW_BYTES) plus what the bounded cache
    keeps. Given columns [start, start + w) of a flat gradient ``width`` columns wide, it returns
    their share of that gradient's projection: the shares of any split of the columns add up to
    the whole, so a gradient can be projected one parameter at a time and never held flat.
    """
    n, columns = flat_grads.shape
    width = start + columns if width is None else width
    stop = start + columns
    if start < 0 or stop > width:
        raise InfluxValueError(f"columns [{start}, {stop}) lie outside a gradient of {width}")
    spans = []  # (block_start, block width, the block's columns [low, high) within the call)
    for block_start in range(start - start % DENSE_BLOCK_COLUMNS, stop, DENSE_BLOCK_COLUMNS):
        block_stop = min(width, block_start + DENSE_BLOCK_COLUMNS)
        spans.append(
            (block_start, block_stop - block_start, max(start, block_start), min(stop, block_stop))
        )
    out = flat_grads.new_zeros(n, dim)
    on_gpu = DENSE_DRAWS_ON_GPU and flat_grads.device.type == "cuda"

    def draw(span):
        block_start, block_width = span[:2]
        return gaussian_matrix(
            dim,
            block_width,
            seed=seed,
            name=f"dense:{block_start}",
            dtype=flat_grads.dtype,
            device=flat_grads.device,
            draw_on_device=on_gpu,
        )

    window = max(1, DRAW_WINDOW_BYTES // (dim * DENSE_BLOCK_COLUMNS * flat_grads.element_size()))
    # a GPU draws a block in one launch of many threads: no CPU threads needed
    blocks = map(draw, spans) if on_gpu else _drawn_in_parallel(draw, spans, window)
    for (block_start, _, low, high), block in zip(spans, blocks):
        out += (
            flat_grads[:, low - start : high - start]
            @ block[:, low - block_start : high - block_start].T
        )
    return out


def _drawn_in_parallel(draw, items, window: int):
    """``draw(item)`` for each item, in order: ``window`` items at a time, drawn side by side
    by one thread per intra-op thread, then handed out.

    A generator's draw runs on one core, and drawing is what a dense projection of a large network
    spends much of its time on; each block has its own generator, so blocks can be drawn at once.
    Draws and the caller's matmuls alternate by whole windows: interleaved block by block, the
    threaded draws gained nothing on a 2-core CPU (the matmul's OpenMP threads hold the cores).
    """
    threads = min(torch.get_num_threads(), len(items))
    if threads <= 1:
        yield from map(draw, items)
        return
    with ThreadPoolExecutor(threads) as pool:
        for first in range(0, len(items), window):
            yield from list(pool.map(draw, items[first : first + window]))
