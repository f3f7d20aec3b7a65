"""Smoke run of the kronfluence_defaults suite (EK-FAC at each library's defaults) at its quick
size: one run per library, each in its own process, the ratios and the agreement between them,
and a result file with provenance. Numbers are not checked (they belong to benchmarks/results)."""

from __future__ import annotations

import json
from argparse import Namespace

import pytest
import torch

from benchmarks import common
from benchmarks.suites import kronfluence_defaults

pytest.importorskip("kronfluence")


@pytest.mark.slow
def test_quick_run_compares_both_libraries_and_writes_provenance(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setenv("INFLUX_KD_THREADS", "1")  # the rows' processes
    threads = torch.get_num_threads()
    try:
        rows = kronfluence_defaults.run(Namespace(quick=True))
    finally:
        torch.set_num_threads(threads)
    ours, theirs = rows
    assert (ours["impl"], theirs["impl"]) == ("influx", "kronfluence")
    assert ours["runs"] == theirs["runs"] == 1 and ours["train"] == 256
    assert ours["time_ratio"] > 0 and ours["mem_ratio"] >= 0
    assert -1 <= ours["spearman_pooled"] <= 1 and 0 <= ours["top10"] <= 1
    assert "fisher_draws 'auto' = 1" in ours["notes"]
    saved = json.loads((tmp_path / "kronfluence_defaults-cpu.json").read_text())
    assert saved["meta"]["git_sha"] and len(saved["rows"]) == 2
    assert "| time_ratio |" in (tmp_path / "kronfluence_defaults-cpu.md").read_text()


def test_rows_of_other_sizes_from_the_same_clean_commit_are_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    saved = {"meta": {"git_sha": "abc1234"}, "rows": [{"train": 1000}, {"train": 2000}]}
    (tmp_path / "kronfluence_defaults-cpu.json").write_text(json.dumps(saved))
    monkeypatch.setattr(common, "git_sha", lambda: "abc1234")
    assert kronfluence_defaults._earlier_rows([2000, 5000]) == [{"train": 1000}]
    monkeypatch.setattr(common, "git_sha", lambda: "def5678")  # another commit
    assert kronfluence_defaults._earlier_rows([5000]) == []
    monkeypatch.setattr(common, "git_sha", lambda: "abc1234+dirty")
    assert kronfluence_defaults._earlier_rows([5000]) == []
