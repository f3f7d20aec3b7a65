"""Smoke test of benchmarks/dense_draws.py on a CPU: one CPU-drawn row per K, the cache left as it
was. Times are not checked."""

from __future__ import annotations

import json

from benchmarks import dense_draws
from influx.grads import projection


def test_dense_draws_times_each_dim_and_restores_the_settings(tmp_path):
    out = tmp_path / "draws.json"
    budget = projection.CACHE.budget_bytes
    dense_draws.main(
        ["--columns", "5000", "--batch", "3", "--dims", "4", "8", "--warmup", "0",
         "--repeats", "1", "--out", str(out)]
    )  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [(r["dim"], r["drawn_on"], r["x_cpu_drawn"]) for r in rows] == [
        (4, "cpu", 1.0),
        (8, "cpu", 1.0),
    ]
    assert all(r["median_s"] > 0 and r["columns"] == 5000 and r["batch"] == 3 for r in rows)
    assert projection.CACHE.budget_bytes == budget and projection.DENSE_DRAWS_ON_GPU
