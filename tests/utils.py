"""Shared test helpers: one comparison function, one tolerance table, a model that calls a
module with keyword arguments, a tiny Transformer and a lazy dataset that counts its reads."""

from __future__ import annotations

import torch

# Relative tolerances by dtype. float64: the engine and the references perform the same sums in a
# different order, so errors are a few hundred ulps at most (2.2e-16 * ~1e3 < 1e-10). float32: the
# same argument with eps 1.2e-7 and reductions over up to ~1e3 terms. float16: Triton kernels
# accumulate in fp32 but read fp16 inputs (eps 9.8e-4).
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def assert_close(
    actual,
    expected,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    name="",
    elementwise: bool = False,
):
    """Compare two tensors; report max-abs and max-relative error; NaN/Inf anywhere fails.

    By default the relative error is measured against the largest magnitude of ``expected`` (a
    norm-wise criterion), so entries that are zero up to cancellation do not produce meaningless
    ratios. ``elementwise=True`` bounds every entry by its own magnitude,
    ``|actual_i - expected_i| <= rtol * |expected_i| + atol``: use it for vectors whose entries
    span orders of magnitude (scores, norms), where a wrong small entry hides under the largest
    one. Entries that may be zero up to cancellation then need an ``atol``.
    """
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    if actual.shape != expected.shape:
        raise AssertionError(
            f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
        )
    if not torch.isfinite(actual).all():
        raise AssertionError(f"{name}: actual has NaN/Inf")
    if not torch.isfinite(expected).all():
        raise AssertionError(f"{name}: expected has NaN/Inf")
    if rtol is None:
        rtol = RTOL[expected.dtype if expected.is_floating_point() else torch.float64]
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if a.numel() == 0:
        return
    atol = atol or 0.0
    err = (a - e).abs()
    if elementwise:
        # The worst entry is the one that exceeds its own bound by the largest factor (an
        # entry with a zero bound and any error exceeds it infinitely).
        bound = rtol * e.abs() + atol
        over = err > bound
        unbounded = torch.where(over, float("inf"), 0.0)
        ratio = torch.where(bound > 0, err / bound.clamp_min(1e-300), unbounded)
        flat = int(ratio.reshape(-1).argmax())
        if over.any():
            index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), e.shape))
            got, want = a.reshape(-1)[flat].item(), e.reshape(-1)[flat].item()
            worst = err.reshape(-1)[flat].item()
            rel = worst / abs(want) if want != 0 else float("inf")
            count = int(over.sum())
            raise AssertionError(
                f"{name}: {count} of {e.numel()} entries out of tolerance; worst at index "
                f"{index}: actual {got:.6e}, expected {want:.6e}, abs err {worst:.3e}, rel err "
                f"{rel:.3e} (elementwise rtol {rtol:.1e}, atol {atol:.1e})"
            )
        return
    max_abs = err.max().item()
    scale = e.abs().max().item()
    rel = max_abs / scale if scale > 0 else max_abs
    bound = rtol * scale + atol
    if max_abs > bound:
        raise AssertionError(
            f"{name}: max abs err {max_abs:.3e}, max rel err {rel:.3e} (rtol {rtol:.1e}, "
            f"atol {atol:.1e}, scale {scale:.3e})"
        )


class KeywordNet(torch.nn.Module):
    """A parameter-owning block called with keyword arguments: a float and a per-example mask,
    which per-sample rules must replay."""

    class Block(torch.nn.Module):
        def __init__(self, width: int):
            super().__init__()
            self.w = torch.nn.Parameter(torch.linspace(-1.0, 1.0, width))

        def forward(self, x, scale=1.0, mask=None):
            out = torch.tanh(x * self.w) * scale
            return out if mask is None else out * mask

    def __init__(self, width: int = 5, classes: int = 3):
        super().__init__()
        self.block = self.Block(width)
        self.head = torch.nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.block(x, scale=3.0, mask=(x > 0).to(x.dtype)))


def tiny_transformer(tokens: int, width: int = 8, classes: int = 3) -> torch.nn.Module:
    """A Transformer encoder layer on [N, tokens, width] inputs, then a linear head (float64, eval)."""
    return torch.nn.Sequential(
        torch.nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, batch_first=True),
        torch.nn.Flatten(),
        torch.nn.Linear(tokens * width, classes),
    ).double().eval()  # fmt: skip


class IndexedDataset(torch.utils.data.Dataset):
    """Yields ``(input, target, index)`` with the given dataset indices (other than positions)."""

    def __init__(self, inputs, targets, indices):
        self.inputs, self.targets, self.indices = inputs, targets, indices

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, position: int):
        return self.inputs[position], self.targets[position], int(self.indices[position])


def numbers(node):
    """Every int or float leaf of nested dicts (booleans excluded), e.g. a per-seed result."""
    if isinstance(node, dict):
        for value in node.values():
            yield from numbers(value)
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield node


class LazyDataset(torch.utils.data.Dataset):
    """``n`` classification examples generated from their index on every read (no tensor of all
    inputs exists anywhere), counting how often each example is read: ``reads`` [n].

    Items are ``(input [*shape], target, index)``; the same index always gives the same example.
    """

    def __init__(self, n: int, shape=(6,), classes: int = 3, *, seed: int = 0, dtype=torch.float64):
        self.n, self.shape, self.classes = n, tuple(shape), classes
        self.seed, self.dtype = seed, dtype
        self.reads = torch.zeros(n, dtype=torch.long)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        index = int(index)
        self.reads[index] += 1
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        x = torch.randn(self.shape, generator=generator, dtype=self.dtype)
        return x, torch.tensor(index % self.classes), index

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole set in memory (for references in tests; does not count as reads)."""
        reads = self.reads.clone()
        items = [self[i] for i in range(self.n)]
        self.reads = reads
        return torch.stack([x for x, _, _ in items]), torch.stack([y for _, y, _ in items])
