"""Device discipline: no tensor factory in influx/ or kernels/ leaves its device to the default.

A factory call (``torch.zeros``, ``randn``, ``arange``, ``tensor``, ...) created on the default
device works on a CPU-only machine and breaks as soon as the data lives on a GPU. Every factory
call must name its device (``device=x.device``, or ``device="cpu"`` where the CPU is meant), or be
moved with ``.to(device)`` in the same expression. ``*_like`` and ``x.new_*`` calls inherit the
device of ``x`` and are not factories here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCANNED = (ROOT / "influx", ROOT / "kernels")

FACTORIES = frozenset(
    {
        "arange",
        "as_tensor",
        "empty",
        "empty_strided",
        "eye",
        "full",
        "linspace",
        "logspace",
        "ones",
        "rand",
        "randint",
        "randn",
        "randperm",
        "range",
        "scalar_tensor",
        "sparse_coo_tensor",
        "tensor",
        "tril_indices",
        "triu_indices",
        "zeros",
    }
)
# Arguments of ``.to(...)`` that change only the dtype, not the device.
_DTYPE_NAMES = frozenset(
    {
        "float",
        "double",
        "half",
        "bfloat16",
        "float16",
        "float32",
        "float64",
        "int",
        "int8",
        "int16",
        "int32",
        "int64",
        "long",
        "bool",
        "uint8",
        "complex64",
        "complex128",
    }
)


def _torch_aliases(tree: ast.AST) -> tuple[set[str], set[str]]:
    """Names bound to the torch module, and factory names imported directly from torch."""
    modules, direct = {"torch"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "torch":
                    modules.add(alias.asname or "torch")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            for alias in node.names:
                if alias.name in FACTORIES:
                    direct.add(alias.asname or alias.name)
    return modules, direct


def _factory_name(call: ast.Call, modules: set[str], direct: set[str]) -> str | None:
    func = call.func
    if isinstance(func, ast.Attribute) and func.attr in FACTORIES:
        if isinstance(func.value, ast.Name) and func.value.id in modules:
            return func.attr
    if isinstance(func, ast.Name) and func.id in direct:
        return func.id
    return None


def _is_dtype(node: ast.AST) -> bool:
    text = ast.unparse(node)
    last = text.rsplit(".", 1)[-1]
    return last in _DTYPE_NAMES or "dtype" in last


def _moves_device(to_call: ast.Call) -> bool:
    """``.to(device)``, ``.to(device=...)`` or ``.to(other_tensor)``; not ``.to(dtype)``."""
    if any(k.arg == "device" for k in to_call.keywords):
        return True
    return bool(to_call.args) and not _is_dtype(to_call.args[0])


def offenders(path: Path, root: Path = ROOT) -> list[str]:
    """``file:line: ...`` for every factory call in ``path`` that leaves its device to the default."""
    tree = ast.parse(path.read_text(), filename=str(path))
    modules, direct = _torch_aliases(tree)
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _factory_name(node, modules, direct)
        if name is None or any(k.arg == "device" for k in node.keywords):
            continue
        # Moved in the same expression: an enclosing ``(... factory ...).to(device)``.
        child, parent, moved = node, parents.get(node), False
        while parent is not None and not isinstance(parent, ast.stmt):
            if (
                isinstance(parent, ast.Attribute)
                and parent.attr == "to"
                and parent.value is child
                and isinstance(parents.get(parent), ast.Call)
                and parents[parent].func is parent
                and _moves_device(parents[parent])
            ):
                moved = True
                break
            child, parent = parent, parents.get(parent)
        if not moved:
            found.append(
                (node.lineno, f"{path.relative_to(root)}:{node.lineno}: torch.{name}(...)")
            )
    return [line for _, line in sorted(found)]


def scanned_files() -> list[Path]:
    return sorted(p for root in SCANNED for p in root.rglob("*.py"))


def test_the_scan_finds_the_package():
    names = {p.name for p in scanned_files()}
    assert {"engine.py", "gus.py", "api.py", "ghost_sqnorm.py"} <= names


@pytest.mark.slow
def test_every_tensor_factory_names_its_device():
    found = [line for path in scanned_files() for line in offenders(path)]
    assert not found, (
        "tensor factories that leave their device to the default (pass device=..., or move the\n"
        "result with .to(device) in the same expression):\n" + "\n".join(found)
    )


def test_the_checker_catches_and_allows_what_it_should(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text(
        "import torch\n"
        "from torch import zeros as z\n"
        "a = torch.zeros(3)\n"  # 3: flagged
        "b = torch.zeros(3, device=x.device)\n"
        "c = torch.randn(3, generator=g).to(x.device)\n"
        "d = torch.randint(0, 2, (3,)).to(torch.float64) * 2\n"  # 6: .to(dtype) does not move
        "e = (torch.arange(3) * 2).to(device=x.device)\n"
        "f = z(2)\n"  # 8: flagged through the alias
        "g = torch.zeros_like(x) + x.new_zeros(2)\n"
        "h = torch.tensor([1.0], dtype=torch.float64).to(x)\n"
    )
    lines = [line.split(":")[1] for line in offenders(source, tmp_path)]
    assert lines == ["3", "6", "8"]


# --------------------------------------------------------------------------------------------------
# At run time: every output stays on the data's device. On a CPU-only machine the data sit on the
# CPU while the *default* device is set to "meta": a factory that leaves its device to the
# default then makes a meta tensor, and mixing it with the CPU data fails. With CUDA (see
# benchmarks/gpu_check.sh) the same tests run on real GPU tensors.
# --------------------------------------------------------------------------------------------------

import contextlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

DEVICES = [
    pytest.param("cpu", id="cpu-default-meta"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    ),
]


def _default_device_trap(device: str):
    """On CPU data, make the default device "meta" so default-device factories fail loudly."""
    return torch.device("meta") if device == "cpu" else contextlib.nullcontext()


def _on(device: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        assert t.device.type == device, (t.shape, t.device)


def _loss(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def _tiny(device: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double().to(device)
    x = torch.randn(24, 5, dtype=torch.float64).to(device)
    y = torch.randint(0, 3, (24,)).to(device)
    return model, x, y


@pytest.mark.parametrize("device", DEVICES)
def test_curvature_probes_and_solvers_stay_on_device(device):
    from influx.curvature import estimate_spectrum, hutchinson_trace, lanczos, power_iteration
    from influx.influence.iterative import conjugate_gradients, largest_eigenvalue, lissa

    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(12, 12, generator=generator, dtype=torch.float64).to(device)
    matrix = basis @ basis.T / 12 + torch.eye(12, dtype=torch.float64, device=device)
    rhs = torch.randn(3, 12, generator=generator, dtype=torch.float64).to(device)
    block = lambda v: v @ matrix  # noqa: E731
    with _default_device_trap(device):
        values, vectors = lanczos(block, 12, iterations=12, device=device)
        spectrum = estimate_spectrum(block, 12, iterations=12, trace_samples=4, device=device)
        trace = hutchinson_trace(block, 12, samples=4, device=device)
        top = power_iteration(lambda v: matrix @ v, 12, iterations=5, device=device)
        top_ratio = largest_eigenvalue(
            block, 12, iterations=5, seed=0, dtype=rhs.dtype, device=device
        )
        solved, _, _ = conjugate_gradients(
            block, rhs, damping=0.1, max_iterations=30, tolerance=1e-12
        )
        series, _ = lissa(block, rhs, damping=0.1, scale=1.1 * spectrum.maximum + 0.2,
                          max_iterations=5, tolerance=1e-12)  # fmt: skip
    _on(device, values, vectors, solved, series)
    assert trace > 0 and top > 0 and top_ratio > 0
    expected = torch.linalg.solve(matrix + 0.1 * torch.eye(12, dtype=torch.float64, device=device),
                                  rhs.T).T  # fmt: skip
    torch.testing.assert_close(solved, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_grads_engine_and_projections_stay_on_device(device):
    from influx import grads

    model, x, y = _tiny(device)
    with _default_device_trap(device):
        norms = grads.per_sample_norms(model, _loss, x, y)
        kron = grads.per_sample_projected(model, _loss, x, y, dim=16)
        dense = grads.per_sample_projected(model, _loss, x, y, dim=16, kind="dense")
        gram = grads.per_sample_gram(model, _loss, x, y)
    _on(device, norms, kron, dense, gram)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dense_projection_of_cuda_gradients_is_drawn_on_the_gpu(monkeypatch):
    from influx.grads import projection

    monkeypatch.setattr(projection, "CACHE", projection.ProjectionCache(budget_bytes=0))
    width, dim = 2 * projection.DENSE_BLOCK_COLUMNS + 7, 64
    flat = torch.randn(3, width, dtype=torch.float64, device="cuda")
    with _default_device_trap("cuda"):
        got = projection.dense_project(flat, dim, seed=1)
    blocks = [
        projection.gaussian_matrix(dim, min(projection.DENSE_BLOCK_COLUMNS, width - start),
                                   seed=1, name=f"dense:{start}", dtype=torch.float64,
                                   device="cuda", draw_on_device=True)
        for start in range(0, width, projection.DENSE_BLOCK_COLUMNS)
    ]  # fmt: skip
    _on("cuda", got, *blocks)
    matrix = torch.cat(blocks, dim=1)
    # the same seeded draws, regenerated (no cache); float64 products summed in another order
    torch.testing.assert_close(got, flat @ matrix.T, rtol=1e-12, atol=1e-12)
    again = projection.gaussian_matrix(dim, projection.DENSE_BLOCK_COLUMNS, seed=1,
                                       name="dense:0", dtype=torch.float64, device="cuda",
                                       draw_on_device=True)  # fmt: skip
    assert torch.equal(again, blocks[0])  # seeded: the same draw again
    # N(0, 1/K) entries: 524,736 of them, so the mean is within 5 standard errors of 0 and the
    # variance within 1% of 1/K
    assert abs(float(matrix.mean())) < 5 * (1 / dim / matrix.numel()) ** 0.5
    assert float(matrix.var()) * dim == pytest.approx(1.0, rel=0.01)
    # a different stream from the CPU's (which is why influx-score fingerprints it)
    cpu = projection.gaussian_matrix(dim, projection.DENSE_BLOCK_COLUMNS, seed=1,
                                     name="dense:0", dtype=torch.float64, device="cpu")  # fmt: skip
    assert not torch.equal(cpu, blocks[0].cpu())
    # switched off, the GPU uses the CPU's draws: the projection of the same gradients on the CPU
    monkeypatch.setattr(projection, "DENSE_DRAWS_ON_GPU", False)
    on_cpu = projection.dense_project(flat.cpu(), dim, seed=1)
    torch.testing.assert_close(projection.dense_project(flat, dim, seed=1).cpu(), on_cpu,
                               rtol=1e-12, atol=1e-12)  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("exact", {"damping": 0.5}),
        ("exact", {"damping": 0.5, "solver": "eigh"}),
        ("cg", {"damping": 0.5, "max_iterations": 10}),
        ("cg", {"damping": 0.5, "max_iterations": 10, "preconditioner": "ekfac"}),
        ("lissa", {"damping": 0.5, "max_iterations": 10}),
        ("arnoldi", {"damping": 0.5, "rank": 8}),
        ("kfac", {}),
        ("ekfac", {}),
        ("trak", {"dim": 8}),
        ("trak", {"dim": 8, "projection": "kronecker"}),
        ("tracin", {"learning_rates": 0.1}),
        ("grad_dot", {}),
        ("grad_cos", {}),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={w}" for k, w in v.items()),
)
def test_every_influence_method_keeps_scores_on_the_data_device(device, method, options, tmp_path):
    from influx import influence

    model, x, y = _tiny(device)
    if method == "tracin":
        options = {**options, "checkpoints": [model.state_dict(), model.state_dict()]}
    fitted = influence.fit(model, _loss, (x, y), method=method, **options)
    layered = fitted.estimator.layout.layered
    query = (x[:4], y[:4])
    scores = fitted.scores(query, top_k=3, per_layer=layered, store=tmp_path / "s.npy")
    top_only = fitted.scores(query, dense=False, top_k=3)
    _on(device, scores.values, fitted.self_influence(), *scores.top_k.__dict__.values())
    _on(device, *top_only.top_k.__dict__.values())
    if layered:
        _on(device, *scores.per_layer.values())
    # the stored file holds the same numbers, in the scores' dtype
    import numpy as np

    stored = np.load(tmp_path / "s.npy")
    assert stored.dtype == np.float64
    torch.testing.assert_close(torch.from_numpy(stored), scores.values.cpu(), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_commutator_paths_stay_on_device(device):
    from influx import commutator

    model, x, y = _tiny(device)
    with _default_device_trap(device):
        pair = commutator.pairwise(model, _loss, (x[:6], y[:6]))
        stepped = commutator.step(model, _loss, (x[0], y[0]), (x[1], y[1]), lr=0.1)
    shift = commutator.order_shift(model, _loss, (x, y), lr=0.05, epochs=1, perms=2, batch_size=8)
    _on(device, pair.norms, stepped.vector, shift.measured, shift.predicted)
