"""Smoke runs of the example scripts at toy size: each writes its JSON (with provenance and
seeds) and figure into a temporary folder, in this process (no subprocess)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def run_example(tmp_path, monkeypatch):
    """``run_example("model_shift.py", "--seeds", "2", ...)`` -> (parsed JSON, results folder).

    The script runs as ``__main__`` with ``sys.argv`` set, its outputs redirected to
    ``tmp_path`` through ``INFLUX_RESULTS_DIR``; the JSON is the single one it wrote (or the one
    named by ``json_name``)."""

    def run(script: str, *argv: str, json_name: str | None = None):
        monkeypatch.setenv("INFLUX_RESULTS_DIR", str(tmp_path))
        monkeypatch.syspath_prepend(str(EXAMPLES))
        monkeypatch.setattr(sys, "argv", [str(EXAMPLES / script), *argv])
        sys.modules.pop("_setup", None)  # re-read RESULTS from the environment
        runpy.run_path(str(EXAMPLES / script), run_name="__main__")
        found = [tmp_path / json_name] if json_name else sorted(tmp_path.glob("*.json"))
        assert len(found) == 1, f"expected one JSON result, found {[p.name for p in found]}"
        result = json.loads(found[0].read_text())
        assert {"provenance", "seeds", "per_seed"} <= result.keys()
        assert len(result["per_seed"]) == len(result["seeds"])
        return result, tmp_path

    return run
