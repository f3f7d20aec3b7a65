"""Every committed example result says where it came from: a clean commit, versions, command,
and the seeds it was measured over."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[2] / "examples" / "results"
FILES = sorted(RESULTS.glob("*.json"))


def test_there_are_committed_results():
    assert FILES, f"no results under {RESULTS}"


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_result_has_clean_provenance_and_seeds(path):
    result = json.loads(path.read_text())
    prov = result.get("provenance")
    assert isinstance(prov, dict), f"{path.name} has no top-level provenance"
    missing = {"git_sha", "dirty", "versions", "device", "command", "date",
               "wall_seconds"} - prov.keys()  # fmt: skip
    assert not missing, f"{path.name} provenance lacks {sorted(missing)}"
    assert re.fullmatch(r"[0-9a-f]{40}", prov["git_sha"] or ""), f"{path.name}: no commit"
    assert prov["dirty"] is False, f"{path.name} was made from a dirty tree: {prov.get('changed')}"
    assert {"python", "torch", "numpy", "influx"} <= prov["versions"].keys()
    assert isinstance(prov["command"], list) and prov["command"]
    seeds = result.get("seeds")
    assert isinstance(seeds, list) and len(seeds) >= 8, f"{path.name}: fewer than 8 seeds"
    assert len(set(seeds)) == len(seeds)
