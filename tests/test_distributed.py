"""influx.distributed and influx-score under torchrun: 2 gloo processes on the CPU give the
single-process files byte for byte."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from influx import distributed
from influx.errors import InfluxValueError

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--max-examples", "120", "--epochs", "1", "--chunk-size", "20", "--no-progress",
        "--scores", "loss,margin,grad_norm,self_influence:ekfac,tracin"]  # fmt: skip
# Everything the merge writes except summary.json (timings, world size).
SAME = ("scores.parquet", "scores.csv", "report.md", "report/top_examples.png",
        "store/manifest.json", "store/model.safetensors")  # fmt: skip


def test_without_torchrun_everything_is_a_no_op(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    context = distributed.init("cpu")
    assert context == distributed.Context(0, 1, 0) and context.is_main and not context.active
    distributed.barrier()
    assert distributed.all_errors(None) == [] and distributed.all_errors("boom") == ["boom"]
    distributed.finalize()


def test_rank_and_world_as_given_or_from_the_process_group():
    assert distributed.rank_and_world() == (0, 1)  # no process group
    assert distributed.rank_and_world(2, 3) == (2, 3)
    with pytest.raises(InfluxValueError, match="give both rank and world_size, or neither"):
        distributed.rank_and_world(rank=1)
    with pytest.raises(InfluxValueError, match=r"need 0 <= rank < world_size; got rank=3"):
        distributed.rank_and_world(3, 3)


def test_items_are_dealt_round_robin_and_cover_everything_once():
    contexts = [distributed.Context(rank, 3, rank) for rank in range(3)]
    dealt = [distributed.my_items(range(10), c) for c in contexts]
    assert dealt == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(sum(dealt, [])) == list(range(10))


def test_inconsistent_environment_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(InfluxValueError, match="inconsistent: launch with torchrun"):
        distributed.launched()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(InfluxValueError, match=r"\$RANK must be an integer"):
        distributed.launched()


def _run(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=400)


@pytest.mark.slow
def test_torchrun_two_ranks_equal_the_single_process_run(tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    result = _run([sys.executable, "-m", "influx.cli", *ARGS, "--out", str(single)])
    assert result.returncode == 0, result.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                "2", "-m", "influx.cli"]  # fmt: skip
    result = _run([*torchrun, *ARGS, "--out", str(sharded)])
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("report: ") == 1, "only rank 0 reports"
    for name in SAME:
        assert (single / name).read_bytes() == (sharded / name).read_bytes(), name

    # Rerun with 2 ranks after losing shards of both ranks: each recomputes its own.
    for chunk in (1, 2):
        (sharded / f"store/tracin-0000{chunk}.npy").unlink()
    result = _run([*torchrun, *ARGS, "--out", str(sharded)])
    assert result.returncode == 0, result.stderr
    assert (single / "scores.parquet").read_bytes() == (sharded / "scores.parquet").read_bytes()
