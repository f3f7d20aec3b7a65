"""Smoke test of benchmarks/profile_persample.py on a tiny MLP batch: each method gets a total row
and its top operators, ranked by self time, with shares of that total. Times are not checked."""

from __future__ import annotations

import json

from benchmarks import profile_persample


def test_profile_lists_each_methods_top_operators(tmp_path):
    out = tmp_path / "profile.json"
    profile_persample.main(
        ["--models", "mlp", "--batches", "4", "--methods", "floor", "influx_norms",
         "--warmup", "1", "--steps", "2", "--top", "3", "--out", str(out)]
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["meta"]["git_sha"]
    rows = report["rows"]
    for method in ("floor", "influx_norms"):
        total, *top = [r for r in rows if r["method"] == method]
        assert total["rank"] == "total" and total["share"] == 1.0 and total["ms_per_call"] > 0
        assert [r["rank"] for r in top] == [1, 2, 3]
        times = [r["ms_per_call"] for r in top]
        assert times == sorted(times, reverse=True) and times[-1] > 0
        assert 0 < sum(r["share"] for r in top) <= 1 + 1e-9
        assert all(r["op"] for r in top)
        assert all(isinstance(r["calls"], int) and r["calls"] >= 1 for r in top)
    # the backward of a Linear layer multiplies matrices: some matmul ranks among the top three
    assert any("mm" in r["op"] for r in rows if r["method"] == "floor" and r["rank"] != "total")
