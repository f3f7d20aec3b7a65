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
            found.append((node.lineno, f"{path.relative_to(root)}:{node.lineno}: torch.{name}(...)"))
    return [line for _, line in sorted(found)]


def scanned_files() -> list[Path]:
    return sorted(p for root in SCANNED for p in root.rglob("*.py"))


def test_the_scan_finds_the_package():
    names = {p.name for p in scanned_files()}
    assert {"engine.py", "curvature.py", "api.py", "ghost_sqnorm.py"} <= names


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
