"""The dependency arrows of docs/architecture.md point one way; only the CLI prints or exits."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "influx"

# module (or subpackage) -> influx modules it must never import
_LAB = {"poison", "unlearn", "audit", "unlearnable", "shift"}
_TOP = {"report", "cli"}
_ABOVE_CURVATURE = {"influence", "commutator", "memorization", "dp", "ensembles"} | _LAB | _TOP
_LEAF = {
    "grads", "curvature", "influence", "commutator", "memorization", "dp", "ensembles", "train",
    "models",
    "data", "tails", "store", "aggregate", "distributed", "seeds", "kernels", "checks",
    "stats", "provenance",
} | _LAB | _TOP  # fmt: skip
FORBIDDEN = {
    "grads": {"curvature", "train", "models"} | _ABOVE_CURVATURE,
    "curvature": _ABOVE_CURVATURE,
    "influence": {"commutator", "memorization"} | _LAB | _TOP,
    "commutator": {"influence", "memorization"} | _LAB | _TOP,
    "memorization": _LAB | _TOP,
    # K models trained at once: above train / grads / data / models / seeds / store /
    # distributed, below memorization, audit and the lab
    "ensembles": {"memorization"} | _LAB | _TOP,
    "dp": _LAB | _TOP,
    **{name: _TOP for name in _LAB},
    "data": {"grads", "curvature", "models", "train"} | _ABOVE_CURVATURE,
    "models": {"grads", "curvature", "data", "train"} | _ABOVE_CURVATURE,
    # train.train_ensemble, deprecated, forwards to influx.ensembles
    "train": ({"grads", "curvature", "dp"} | _ABOVE_CURVATURE) - {"ensembles"},
    # leaves import no other module; the validators of influx.checks sit below them all
    **{
        name: _LEAF - {name, "checks"}
        for name in (
            "tails",
            "store",
            "aggregate",
            "distributed",
            "seeds",
            "checks",
            "stats",
            "provenance",
        )
    },
}


_DYNAMIC_IMPORTS = {("importlib", "import_module"), (None, "import_module"), (None, "__import__")}


def _dynamic_import_target(node: ast.AST) -> str | None:
    """The module a call ``importlib.import_module(...)`` / ``__import__(...)`` names, as far as
    it is written out (an f-string gives its literal head, ``"influx.influence."``); else None."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    func = node.func
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        called = (func.value.id, func.attr)
    elif isinstance(func, ast.Name):
        called = (None, func.id)
    else:
        return None
    if called not in _DYNAMIC_IMPORTS:
        return None
    target = node.args[0]
    if isinstance(target, ast.Constant) and isinstance(target.value, str):
        return target.value
    if isinstance(target, ast.JoinedStr) and target.values:
        head = target.values[0]
        if isinstance(head, ast.Constant) and isinstance(head.value, str):
            return head.value
    return "<unknown>"


def influx_imports(path: Path) -> set[str]:
    """First component after ``influx.`` of every import in a file (``from influx import x`` -> x),
    imports through ``importlib`` included (see :func:`_dynamic_import_target`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[0] == "influx":
                found |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names}
            if parts[0] in ("benchmarks", "examples", "tests"):
                found.add(parts[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "influx" and len(parts) > 1:
                    found.add(parts[1])
                if parts[0] in ("benchmarks", "examples", "tests"):
                    found.add(parts[0])
        elif (target := _dynamic_import_target(node)) is not None:
            parts = target.split(".")
            if parts[0] == "influx" and len(parts) > 1 and parts[1]:
                found.add(parts[1])
            if parts[0] in ("benchmarks", "examples", "tests"):
                found.add(parts[0])
    return found


def _own_package(path: Path) -> str:
    """``influx.<first component>.`` of a file: what it may load lazily without an arrow."""
    relative = path.relative_to(PACKAGE).with_suffix("")
    return f"influx.{relative.parts[0]}."


def test_no_module_hides_an_import_of_influx_behind_importlib():
    # An arrow loaded through importlib is one the layering test above might not see: every
    # import of another influx module is written as an import statement (lazily inside a
    # function where an optional dependency needs it). The package root's lazy attributes and a
    # registry that loads its own package's modules cross no arrow.
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            target = _dynamic_import_target(node)
            if target is None or target.startswith(_own_package(path)):
                continue
            assert not (target == "<unknown>" or target.split(".")[0] == "influx"), (
                f"{path.relative_to(ROOT)}:{node.lineno} imports {target!r} through importlib; "
                "write it as an import statement, so that tests/test_architecture.py sees it"
            )


def test_the_architecture_test_sees_imports_through_importlib(tmp_path):
    source = tmp_path / "lazy.py"
    source.write_text(
        "import importlib\n"
        "def f(name):\n"
        "    importlib.import_module('influx.unlearnable')\n"
        "    importlib.import_module(f'influx.audit.{name}')\n"
        "    __import__('influx.poison')\n"
    )
    assert influx_imports(source) == {"unlearnable", "audit", "poison"}


def files_of(name: str) -> list[Path]:
    package = PACKAGE / name
    return sorted(package.rglob("*.py")) if package.is_dir() else [PACKAGE / f"{name}.py"]


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_dependency_arrows(module):
    for path in files_of(module):
        if not path.exists():
            pytest.skip(f"{path.name} not present")
        bad = influx_imports(path) & FORBIDDEN[module]
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)} against the layering"


def test_checks_imports_only_the_errors():
    assert influx_imports(PACKAGE / "checks.py") <= {"errors"}


def test_library_never_imports_benchmarks_examples_or_tests():
    for path in PACKAGE.rglob("*.py"):
        bad = influx_imports(path) & {"benchmarks", "examples", "tests"}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_kernels_know_nothing_of_influx():
    for path in (ROOT / "kernels").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names.append(node.module)
            assert not any(n.split(".")[0] == "influx" for n in names), (
                f"{path.name} imports influx"
            )


@pytest.mark.slow
def test_only_the_cli_prints_or_exits():
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[0] in ("cli", "cli.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in ("print", "exit"), (
                    f"{path.relative_to(ROOT)} calls {node.func.id}()"
                )
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                is_sys_exit = isinstance(node.func.value, ast.Name) and node.func.value.id == "sys"
                assert not (is_sys_exit and node.func.attr == "exit"), (
                    f"{path.relative_to(ROOT)} calls sys.exit"
                )
