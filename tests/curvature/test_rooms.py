"""influx.curvature: four rooms with explicit public names, one home for each algorithm."""

from __future__ import annotations

import ast
import functools
import importlib
from pathlib import Path

import pytest

import influx.curvature

ROOT = Path(__file__).resolve().parents[2]
ROOMS = ("products", "spectrum", "factors", "solvers")


@pytest.mark.parametrize("room", ROOMS)
def test_every_public_name_of_a_room_is_importable_from_the_package(room):
    module = importlib.import_module(f"influx.curvature.{room}")
    defined = {
        node.name
        for node in ast.parse(Path(module.__file__).read_text()).body
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_")
    }
    assert defined <= set(module.__all__), f"{room} defines {sorted(defined - set(module.__all__))}"
    for name in module.__all__:
        assert getattr(influx.curvature, name) is getattr(module, name)
        assert name in influx.curvature.__all__


def test_the_package_exports_nothing_but_its_rooms():
    exported = set().union(
        *(importlib.import_module(f"influx.curvature.{r}").__all__ for r in ROOMS)
    )
    assert set(influx.curvature.__all__) == exported


def test_the_solvers_keep_their_old_addresses():
    from influx.curvature import solvers, spectrum
    from influx.influence import iterative

    for name in ("conjugate_gradients", "lissa", "solve_with_positive_damping", "NegativeCurvature",
                 "DIVERGENCE_GROWTH", "MAX_DAMPING_RAISES"):  # fmt: skip
        assert getattr(iterative, name) is getattr(solvers, name)
    assert iterative.largest_eigenvalue is spectrum.largest_eigenvalue


@functools.cache
def _functions() -> tuple[str, ...]:
    """``path:name`` of every function of the library and the examples."""
    found = []
    for folder in ("influx", "examples"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef):
                    found.append(f"{path.relative_to(ROOT)}:{node.name}")
    return tuple(found)


def _definitions(name: str) -> list[str]:
    """Every function of the library and the examples whose name holds ``name``."""
    return [f for f in _functions() if name in f.rsplit(":", 1)[1]]


@pytest.mark.parametrize(
    "algorithm, home",
    [
        ("conjugate_gradients", "influx/curvature/solvers.py"),
        ("power_iteration", "influx/curvature/spectrum.py"),
        ("lanczos", "influx/curvature/spectrum.py"),
    ],
)
def test_one_definition_of_each_algorithm(algorithm, home):
    assert _definitions(algorithm) == [f"{home}:{algorithm}"]


@pytest.mark.parametrize("room", ROOMS)
def test_each_room_stays_small(room):
    lines = (ROOT / "influx" / "curvature" / f"{room}.py").read_text().count("\n")
    assert lines <= 800, f"influx/curvature/{room}.py has {lines} lines"


def test_influence_kfac_and_the_factors_room_share_coverage_and_label_sampling():
    """The K-FAC of influx.influence and of influx.shift cover the same layers and draw the same
    labels: influence's K-FAC uses the factors room's rules themselves, not copies."""
    from influx.curvature import factors
    from influx.influence import kfac

    for name in ("FACTORED_LAYERS", "is_factored", "fisher_draws", "sample_labels"):
        assert getattr(kfac, name) is getattr(factors, name), name
