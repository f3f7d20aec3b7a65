"""influx-score as a user runs it: output files, scores against references, kill and resume,
damaged files, refusals, and every bad input as one line on stderr with exit code 2."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from utils import assert_close

from influx import cli, data, distributed, influence, store
from influx.cli.lock import LOCK_FILE, FolderLock
from influx.errors import InfluxValueError
from influx.grads import projection
from influx.seeds import derive_seed
from influx.train import cross_entropy_per_example

ROOT = Path(__file__).resolve().parent.parent
# 300 digits, 2 epochs, 30 shards per score: small, yet enough shards to kill mid-run.
ARGS = ["--max-examples", "300", "--epochs", "2", "--chunk-size", "10", "--no-progress"]
# What a resumed or recomputed run must reproduce byte for byte (summary.json differs in timings).
EXACT_FILES = (
    "scores.parquet", "scores.csv", "report.md", "report/histograms.png",
    "report/top_examples.png", "report/spearman.png", "report/per_class.png",
    "store/model.safetensors", "store/training.safetensors", "store/manifest.json",
)  # fmt: skip


def run_cli(args, env=None, timeout=300) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "influx.cli", *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
        cwd=ROOT,
    )


def read_table(out: Path) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in pq.read_table(out / "scores.parquet").to_pydict().items()}


def error_line(err: str) -> str:
    """The error: exactly one line of stderr, the last, starts with the command's name."""
    lines = err.strip().splitlines()
    assert [line for line in lines if line.startswith("influx-score:")] == lines[-1:], err
    return lines[-1]


def assert_same_files(a: Path, b: Path) -> None:
    for name in EXACT_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs"


def main_in_process(args) -> tuple[int, str, str]:
    """``cli.main(args)`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(args)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "digits"
    status, stdout, stderr = main_in_process([*ARGS, "--out", str(out)])
    assert status == 0, stderr
    assert "report: " + str(out / "report.md") in stdout
    assert not (out / LOCK_FILE).exists(), "the lock is released on exit"
    return out


@pytest.mark.slow
def test_writes_aligned_scores_summary_and_report(finished):
    table = read_table(finished)
    train = data.load("digits", max_examples=300)
    assert list(table) == [
        "index", "target", "loss", "margin", "grad_norm", "self_influence_ekfac", "tracin"
    ]  # fmt: skip
    assert np.array_equal(table["index"], np.arange(300))
    assert np.array_equal(table["target"], train.targets.numpy())
    with open(finished / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for column in ("loss", "tracin"):
        csv_values = np.array([float(row[column]) for row in rows])
        # 9 significant digits in the CSV.
        assert_close(torch.tensor(csv_values), torch.tensor(table[column]), rtol=1e-8, name=column)
    summary = json.loads((finished / "summary.json").read_text())
    assert summary["sizes"]["train"] == 300 and summary["sizes"]["num_parameters"] == 4810
    assert summary["data"]["train"]["size"] == 300 and len(summary["data"]["train"]["sha256"]) == 64
    assert {"torch", "numpy", "pyarrow", "influx"} <= set(summary["versions"])
    assert summary["timing"]["total_seconds"] > 0 and summary["world_size"] == 1
    assert len(summary["checkpoints"]) == 2, "TracIn over the end of each of the 2 epochs"
    report = (finished / "report.md").read_text()
    for figure in ("histograms", "top_examples", "spearman", "per_class"):
        assert f"(report/{figure}.png)" in report and (finished / f"report/{figure}.png").is_file()
    manifest = json.loads((finished / "store/manifest.json").read_text())
    assert len(manifest["shards"]) == 2 + 3 * 30, "model, record and 3 groups x 30 shards"


@pytest.mark.slow
def test_scores_match_references(finished):
    table = read_table(finished)
    train = data.load("digits", max_examples=300)
    model = cli.build_model("mlp", train.input_shape, train.num_classes)
    state, _ = cli._load_state_bytes((finished / "store/model.safetensors").read_bytes())
    model.load_state_dict(state)
    model.eval()
    positions = torch.tensor([0, 9, 10, 151, 299])
    x, y = train.inputs[positions], train.targets[positions]
    column = lambda name: torch.tensor(table[name][positions.numpy()], dtype=torch.float32)

    def naive_norms(m) -> torch.Tensor:
        norms = []
        for xi, yi in zip(x, y, strict=True):
            m.zero_grad()
            cross_entropy_per_example(m(xi[None]), yi[None]).sum().backward()
            norms.append(torch.sqrt(sum(p.grad.pow(2).sum() for p in m.parameters())))
        return torch.stack(norms)

    # float32 engine vs a per-example loop: same sums in another order (utils.RTOL).
    assert_close(column("grad_norm"), naive_norms(model), rtol=1e-5, name="grad_norm")
    with torch.no_grad():
        logits = model(x)
    assert_close(column("loss"), cross_entropy_per_example(logits, y), name="loss")
    others = logits.clone()
    others[torch.arange(5), y] = -torch.inf
    assert_close(column("margin"), logits[torch.arange(5), y] - others.max(1).values, name="margin")

    record, meta = cli._load_state_bytes((finished / "store/training.safetensors").read_bytes())
    tracin = torch.zeros(5, dtype=torch.float64)
    for state_t, lr in cli.checkpoints_of(record, meta):
        at = cli.build_model("mlp", train.input_shape, train.num_classes)
        at.load_state_dict(state_t)
        tracin += lr * naive_norms(at).double().square()
    assert_close(torch.tensor(table["tracin"][positions.numpy()]), tracin, rtol=1e-5, name="tracin")
    assert [c["step"] for c in meta["checkpoints"]] == [5, 10] and len(meta["epoch_seeds"]) == 2
    assert sorted(record["order.0"].tolist()) == list(range(300)), "each epoch's order recorded"

    # The whole-set library call, with the run's seed, gives the sharded values.
    torch.manual_seed(0)
    fitted = influence.fit(model, cross_entropy_per_example,
                           (train.inputs[:300], train.targets), method="ekfac")  # fmt: skip
    expected = fitted.self_influence().double()
    assert_close(torch.tensor(table["self_influence_ekfac"]), expected, rtol=1e-5, name="s(z)")


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_the_same_files(finished, tmp_path):
    out = tmp_path / "killed"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "influx.cli", *ARGS, "--out", str(out)],
        cwd=ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if len(list((out / "store").glob("*-000*.npy.sha256"))) >= 3:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "killed before it finished"
    assert not (out / "summary.json").exists()
    done = len(list((out / "store").glob("*.npy.sha256")))
    assert 3 <= done < 120, done

    status, _, stderr = main_in_process([*ARGS, "--out", str(out)])
    assert status == 0, stderr
    assert "shards were already done" in stderr
    assert_same_files(out, finished)


@pytest.mark.slow
def test_interrupt_then_rerun_resumes_and_matches(finished, tmp_path, monkeypatch, capsys):
    out = tmp_path / "interrupted"
    real = cli.Scorer.compute
    calls = []

    def interrupted_on_fifth_shard(self, group, positions):
        calls.append((group, int(positions[0])))
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(self, group, positions)

    monkeypatch.setattr(cli.Scorer, "compute", interrupted_on_fifth_shard)
    assert cli.main([*ARGS, "--out", str(out)]) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    monkeypatch.setattr(cli.Scorer, "compute", real)
    assert cli.main([*ARGS, "--out", str(out)]) == 0
    assert "4 shards were already done" in capsys.readouterr().err
    assert_same_files(out, finished)


@pytest.mark.slow
def test_damaged_shards_and_model_are_named_and_recomputed(finished, tmp_path, capsys):
    out = tmp_path / "damaged"
    shutil.copytree(finished, out)
    shard = out / "store/basic-00003.npy"
    shard.write_bytes(shard.read_bytes()[:-8] + b"\x00" * 8)
    for suffix in ("", ".sha256"):
        # A valid shard of chunk 0 copied over chunk 7, checksum record included.
        source = out / f"store/tracin-00000.npy{suffix}"
        (out / f"store/tracin-00007.npy{suffix}").write_bytes(source.read_bytes())
    model = out / "store/model.safetensors"
    model.write_bytes(model.read_bytes()[:100])
    assert cli.main([*ARGS, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"recomputing {shard}: checksum mismatch" in err
    assert "tracin-00007.npy: its checksum differs from the one the manifest lists" in err
    assert f"recomputing {model}: checksum mismatch" in err and "trained mlp" in err
    assert_same_files(out, finished)


@pytest.mark.slow
def test_other_settings_in_the_same_folder_are_refused(finished, tmp_path, capsys):
    out = tmp_path / "other"
    shutil.copytree(finished, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert cli.main([*ARGS, "--out", str(out), "--epochs", "3", "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "epochs: 2 -> 3" in err and "seed: 0 -> 1" in err
    assert "--overwrite" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before, "untouched"


@pytest.mark.slow
def test_another_data_dir_is_another_run(tmp_path, capsys):
    from test_data import write_tiny_cifar10

    write_tiny_cifar10(tmp_path / "a")
    write_tiny_cifar10(tmp_path / "b", images_per_batch=4)
    common = ["--dataset", "cifar10", "--model", "mlp", "--epochs", "1", "--scores",
              "loss,grad_norm", "--chunk-size", "4", "--no-progress", "--out", str(tmp_path / "out")]  # fmt: skip
    assert cli.main([*common, "--data-dir", str(tmp_path / "a")]) == 0
    table = read_table(tmp_path / "out")
    assert table["index"].tolist() == list(range(15)) and np.isfinite(table["grad_norm"]).all()
    assert "report: " in capsys.readouterr().out
    assert cli.main([*common, "--data-dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "holds results of other settings (test_data:" in err and "train_data:" in err
    assert cli.main([*common, "--data-dir", str(tmp_path / "b"), "--overwrite"]) == 0
    assert read_table(tmp_path / "out")["index"].tolist() == list(range(20))


@pytest.mark.parametrize("scores", [["loss"], ["loss", "self_influence:trak"]])
def test_the_device_is_part_of_a_run_only_through_dense_projections(scores, monkeypatch):
    # a dense projection of CUDA gradients is drawn on the GPU: TRAK's scores depend on the kind
    # of device, nothing else does
    monkeypatch.setattr(sys.modules["influx.cli.run"], "data_identity", lambda dataset: {})
    config = {"scores": scores, "checkpoint": None, "seed": 0}
    prints = {
        device: cli.fingerprint(cli.run_identity({**config, "device": device}, None, None))
        for device in ("cpu", "cuda", "cuda:1")
    }
    assert prints["cuda"] == prints["cuda:1"]
    assert (prints["cpu"] == prints["cuda"]) == ("self_influence:trak" not in scores)
    monkeypatch.setattr(projection, "DENSE_DRAWS_ON_GPU", False)
    assert (
        cli.fingerprint(cli.run_identity({**config, "device": "cuda"}, None, None)) == prints["cpu"]
    )


@pytest.mark.slow
def test_checkpoint_scores_an_existing_model(finished, tmp_path, capsys):
    state, _ = cli._load_state_bytes((finished / "store/model.safetensors").read_bytes())
    torch.save(state, tmp_path / "model.pt")
    shutil.copy(finished / "store/model.safetensors", tmp_path / "model.safetensors")
    for name in ("model.pt", "model.safetensors"):
        out = tmp_path / f"from-{name}"
        args = [*ARGS, "--checkpoint", str(tmp_path / name), "--out", str(out)]
        assert cli.main(args) == 0, capsys.readouterr().err
        table, reference = read_table(out), read_table(finished)
        assert "tracin" not in table, "no training checkpoints: tracin left out of the default"
        for column in ("loss", "margin", "grad_norm", "self_influence_ekfac"):
            assert np.array_equal(table[column], reference[column]), column


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo payload ran",))


@pytest.mark.slow
def test_unsafe_or_foreign_checkpoints_are_refused(finished, tmp_path, capsys):
    torch.save({"weights": _Payload()}, tmp_path / "payload.pt")
    (tmp_path / "random.bin").write_bytes(random.Random(0).randbytes(256))
    torch.save({"other.weight": torch.zeros(2)}, tmp_path / "other.pt")
    trained = cli._load_state_bytes((finished / "store/model.safetensors").read_bytes())[0]
    torch.save({k: v.clone().fill_(float("nan")) if k == "1.weight" else v
                for k, v in trained.items()}, tmp_path / "nan.pt")  # fmt: skip
    torch.save({k: v[:5] if k == "3.bias" else v for k, v in trained.items()},
               tmp_path / "five_classes.pt")  # fmt: skip
    cases = {
        "five_classes.pt": "does not fit this --model: shapes differ",
        "payload.pt": "loads with weights_only=True (UnpicklingError",
        "random.bin": "neither a safetensors file nor a torch.save file",
        "other.pt": "does not fit this --model: missing",
        "missing.pt": "does not exist",
        "nan.pt": "holds NaN/inf weights in ['1.weight']; it diverged",
    }
    for name, message in cases.items():
        out = tmp_path / f"out-{name}"
        assert cli.main([*ARGS, "--checkpoint", str(tmp_path / name), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not out.exists(), "refused before anything was written"


def test_any_random_bytes_are_refused_with_the_checkpoint_message(tmp_path):
    # Random input can fail anywhere in the weights-only unpickler (UnpicklingError, EOFError,
    # IndexError, KeyError, ...): every failure is the same one-line InfluxValueError.
    path = tmp_path / "random.bin"
    for seed in range(200):
        path.write_bytes(random.Random(seed).randbytes(64 + seed))
        with pytest.raises(InfluxValueError, match="neither a safetensors file nor a torch.save"):
            cli.read_state_dict(path)


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--out", ""], {}, "--out is empty"),
        (["--device", "cuda"], {}, "CUDA is not available"),
        ([], {"INFLUX_KERNELS": "foo"}, "INFLUX_KERNELS='foo' is not a backend"),
    ],
    ids=["empty-out", "cuda", "kernels-env"],
)
def test_bad_environment_is_one_line_exit_2(tmp_path, monkeypatch, capsys, args, env, message):
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    assert cli.main([*ARGS, "--out", str(tmp_path / "o"), *args]) == 2
    assert message in error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == [], "nothing written, not even into the current folder"


BAD_OPTIONS = [
    (["--lr", "inf"], "--lr must be a finite number > 0; got inf"),
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--chunk-size", "0"], "--chunk-size must be >= 1; got 0"),
    (["--max-examples", "0"], "--max-examples must be >= 1"),
    (["--width", "8"], "--width applies to the cnn and resnet models"),
    (["--scores", "loss,bogus"], "unknown score 'bogus'"),
    (["--scores", "self_influence:nope"], "unknown influence method 'nope'"),
    (["--scores", "gus"], "needs Gaussian poisons: add --poison"),
    (["--scores", ""], "--scores is empty"),
    (["--poison", "gaussian:2:0.1"], "--poison fraction must be in (0, 1]"),
    (["--poison", "uniform:0.1"], "--poison takes gaussian:FRACTION:STD"),
    (["--device", "tpu"], "--device 'tpu' is not a device"),
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--top-k", "33"], "--top-k must be at most 32"),
]


@pytest.mark.parametrize("args, message", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_options_are_one_line_exit_2(tmp_path, capsys, args, message):
    out = tmp_path / "o"
    assert cli.main([*ARGS, "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("influx-score: error: ") and message in err and err.count("\n") == 1
    assert not out.exists(), "refused before anything was written"


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    for out in (tmp_path / "file", tmp_path / "file" / "below"):
        assert cli.main([*ARGS, "--out", str(out)]) == 2
        assert "file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.slow
@pytest.mark.parametrize(
    "code, message",
    [(28, "no space left on the device while writing"), (13, "choose a writable --out")],
    ids=["full-disk", "read-only"],
)
@pytest.mark.slow
def test_write_failures_are_one_line_and_resume(finished, tmp_path, monkeypatch, capsys, code,
                                                message):  # fmt: skip
    out = tmp_path / "failing"
    real = store.atomic_write_bytes
    writes = []

    def failing_after_twenty(path, payload):
        writes.append(path)
        if len(writes) > 20:
            raise OSError(code, os.strerror(code), str(path))
        real(path, payload)

    monkeypatch.setattr(store, "atomic_write_bytes", failing_after_twenty)
    assert cli.main([*ARGS, "--out", str(out)]) == 2
    assert message in error_line(capsys.readouterr().err)
    assert not (out / "summary.json").exists()
    monkeypatch.setattr(store, "atomic_write_bytes", real)
    assert cli.main([*ARGS, "--out", str(out)]) == 0
    assert_same_files(out, finished)


def test_non_finite_scores_fail_with_advice(tmp_path, monkeypatch, capsys):
    real = cli.Scorer.compute

    def diverged(self, group, positions):
        values = real(self, group, positions)
        if group == "basic" and int(positions[0]) == 10:
            values["loss"][3] = np.nan
        return values

    monkeypatch.setattr(cli.Scorer, "compute", diverged)
    out = tmp_path / "nan"
    assert cli.main([*ARGS, "--scores", "loss", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "score loss is NaN/inf for 1 of 10 examples (indices 13)" in err
    assert "lower --lr" in err and not (out / "summary.json").exists()


@pytest.mark.slow
def test_damaged_cifar_file_is_named(tmp_path):
    from test_data import write_tiny_cifar10

    write_tiny_cifar10(tmp_path / "data")
    damaged = tmp_path / "data/cifar-10-batches-py/data_batch_2"
    damaged.write_bytes(damaged.read_bytes()[:50])
    status, _, stderr = main_in_process(["--dataset", "cifar10", "--data-dir",
                                         str(tmp_path / "data"), "--out", str(tmp_path / "o"),
                                         "--no-progress"])  # fmt: skip
    assert status == 2 and str(damaged) in stderr
    assert stderr.count("\n") == 1


def test_parse_scores_defaults_and_methods():
    names = lambda text, **kw: [s.name for s in cli.parse_scores(text, checkpoint=False,
                                                                 poison=False, **kw)]  # fmt: skip
    assert names("default") == ["loss", "margin", "grad_norm", "self_influence:ekfac", "tracin"]
    assert names("self_influence, self_influence:ekfac,loss") == ["self_influence:ekfac", "loss"]
    specs = cli.parse_scores("grad_norm", checkpoint=False, poison=True)
    assert [s.name for s in specs] == ["grad_norm", "gus"], "--poison adds its audit"
    with_checkpoint = cli.parse_scores("default", checkpoint=True, poison=False)
    assert "tracin" not in [s.name for s in with_checkpoint]


@pytest.mark.slow
def test_poisoning_study_scores(tmp_path, capsys):
    out = tmp_path / "poison"
    args = ["--max-examples", "60", "--epochs", "1", "--chunk-size", "30", "--no-progress",
            "--poison", "gaussian:0.1:0.5", "--scores", "loss,memorization,unlearnable",
            "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0, capsys.readouterr().err
    table = read_table(out)
    poisoned = table["poisoned"] > 0
    assert poisoned.sum() == 6, "round(0.1 * 60) poisoned, gus added by --poison"
    assert (
        np.isfinite(table["gus_iz"][poisoned]).all() and np.isnan(table["gus_iz"][~poisoned]).all()
    )
    for column in ("mem_confidence", "mem_cumulative_loss", "mem_curvature", "unlearnable"):
        assert np.isfinite(table[column]).all(), column
    # The cumulative loss over the single checkpoint (the end of the only epoch) is the loss.
    assert_close(torch.tensor(table["mem_cumulative_loss"]), torch.tensor(table["loss"]),
                 rtol=1e-6, name="cumulative loss")  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    expected = table["gus_iz"][poisoned].mean()
    assert summary["gus"]["poisoned"] == 6 and summary["gus"]["gus"] == pytest.approx(expected)


@pytest.mark.slow
def test_a_rerun_of_a_finished_run_reports_the_commutator_reference(tmp_path, capsys):
    args = ["--max-examples", "40", "--epochs", "1", "--scores", "commutator", "--no-progress"]
    out = tmp_path / "commutator"
    summaries = []
    for _ in range(2):  # the second run computes no shard: everything is resumed
        assert cli.main([*args, "--out", str(out)]) == 0
        summaries.append(json.loads((out / "summary.json").read_text()))
    capsys.readouterr()
    reference = summaries[0]["commutator_reference"]
    assert len(reference) > 0 and summaries[1]["commutator_reference"] == reference


def test_a_second_run_into_a_held_folder_is_refused(tmp_path, capsys):
    # Two runs into one --out (the second with --overwrite and another seed) would mix their
    # files: the folder is locked by the first, and the second names its pid.
    out = tmp_path / "held"
    with FolderLock(out):
        assert (out / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} on ")
        args = [*ARGS, "--scores", "loss", "--out", str(out), "--overwrite", "--seed", "1"]
        assert cli.main(args) == 2
        line = error_line(capsys.readouterr().err)
        assert f"is in use by another influx-score (pid {os.getpid()}" in line
        assert "wait for it to finish or choose another --out" in line
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE], "nothing else written"
    assert not (out / LOCK_FILE).exists(), "released"


@pytest.mark.slow
def test_a_run_holds_its_folder_and_a_dead_process_lock_is_reclaimed(tmp_path, monkeypatch, capsys):
    out = tmp_path / "stale"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_FILE).write_text(f"pid {dead.pid} on elsewhere\n")
    real = cli.Scorer.compute
    seen = []

    def holding(self, group, positions):
        seen.append((out / LOCK_FILE).read_text())
        with pytest.raises(InfluxValueError, match="is in use by another influx-score"):
            FolderLock(out).acquire()
        return real(self, group, positions)

    monkeypatch.setattr(cli.Scorer, "compute", holding)
    args = ["--max-examples", "20", "--epochs", "1", "--scores", "loss", "--no-progress"]
    assert cli.main([*args, "--out", str(out)]) == 0, capsys.readouterr().err
    assert seen and all(text.startswith(f"pid {os.getpid()} ") for text in seen)
    assert not (out / LOCK_FILE).exists(), "released on exit"


def test_a_folder_of_the_users_own_score_files_is_refused(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "scores.csv").write_text("my,own\n")
    (out / "report.md").write_text("# my report\n")
    for extra in ([], ["--overwrite"]):
        assert cli.main([*ARGS, "--scores", "loss", "--out", str(out), *extra]) == 2
        line = error_line(capsys.readouterr().err)
        assert f"--out {out} holds scores.csv, report.md, which influx-score did not write" in line
        assert "choose another --out, or move those files away" in line
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "scores.csv"], "untouched"
    assert (out / "scores.csv").read_text() == "my,own\n"


@pytest.mark.slow
def test_a_damaged_store_is_cleared_by_overwrite(tmp_path, capsys):
    out = tmp_path / "damaged-store"
    args = ["--max-examples", "20", "--epochs", "1", "--scores", "loss", "--no-progress",
            "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    (out / "store/manifest.json").write_text("{ not json")
    capsys.readouterr()
    assert cli.main(args) == 2
    line = error_line(capsys.readouterr().err)
    assert "is damaged" in line and "pass --overwrite to clear it and start over" in line
    assert cli.main([*args, "--overwrite"]) == 0
    assert json.loads((out / "store/manifest.json").read_text())["shards"]


def test_a_divergent_learning_rate_is_named(tmp_path, capsys):
    out = tmp_path / "diverged"
    args = ["--max-examples", "100", "--epochs", "1", "--lr", "1e30", "--no-progress"]
    assert cli.main([*args, "--out", str(out)]) == 2
    line = error_line(capsys.readouterr().err)
    assert "training diverged: the train loss went from" in line
    assert "with --lr 1e+30; lower --lr (the digits default is 0.01)" in line
    assert "examples" not in line, "the data is not blamed"


@pytest.mark.slow
def test_flipped_labels_are_planted_and_marked(tmp_path, capsys):
    out = tmp_path / "flipped"
    args = ["--max-examples", "100", "--epochs", "1", "--scores", "loss", "--no-progress",
            "--flip-labels", "0.1", "--seed", "3", "--poison", "gaussian:0.05:0.5",
            "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0, capsys.readouterr().err
    table = pq.read_table(out / "scores.parquet")
    assert table.column_names == ["index", "target", "loss", "flipped", "poisoned", "gus_iz"]
    assert str(table.schema.field("flipped").type) == "bool"
    seed = derive_seed(3, sys.modules["influx.cli.run"]._FLIP_STREAM)
    expected = data.flip_labels(data.load("digits", max_examples=100), 0.1, seed)
    flipped = np.asarray(table.column("flipped").to_pylist())
    assert np.flatnonzero(flipped).tolist() == expected.flipped.tolist() and flipped.sum() == 10
    targets = np.asarray(table.column("target").to_pylist())
    assert np.array_equal(targets, expected.targets.numpy()), "trained and scored on the flips"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["flip_labels"] == {"fraction": 0.1, "flipped": 10}
    poisoned = np.asarray(table.column("poisoned").to_pylist()) > 0
    assert (flipped & poisoned).sum() < poisoned.sum(), "the two kinds are drawn apart"
    assert cli.main([*args[:-2], "--flip-labels", "0.2", "--out", str(out)]) == 2
    assert "flip_labels: 0.1 -> 0.2" in capsys.readouterr().err


@pytest.mark.parametrize("fraction", ["0", "1.5", "-0.1"])
def test_flip_labels_out_of_range_is_refused(tmp_path, capsys, fraction):
    out = tmp_path / "o"
    assert cli.main([*ARGS, "--flip-labels", fraction, "--out", str(out)]) == 2
    assert "--flip-labels takes the fraction of training labels to flip" in error_line(
        capsys.readouterr().err
    )
    assert not out.exists()


@pytest.mark.slow
def test_tracin_and_commutator_entries_are_the_library_calls():
    # No score is computed in the CLI: its entries return what the library returns.
    from influx import commutator

    train = data.load("digits", max_examples=40)
    torch.manual_seed(0)
    model = cli.build_model("mlp", train.input_shape, train.num_classes).eval()
    states = [({k: v + 0.01 * k_ for k, v in model.state_dict().items()}, lr)
              for k_, lr in ((1, 0.1), (2, 0.05))]  # fmt: skip
    scorer = cli.Scorer(model, train, {"device": "cpu", "seed": 0}, states)
    positions = torch.arange(10, 25)
    inputs, targets = train.inputs[10:25], train.targets[10:25]
    tracin = influence.fit(model, cross_entropy_per_example, train, method="tracin",
                           checkpoints=[s for s, _ in states], learning_rates=[0.1, 0.05])  # fmt: skip
    expected = tracin.self_influence((inputs, targets)).double().numpy()
    assert np.array_equal(scorer.compute("tracin", positions)["tracin"], expected)
    reference = (
        train.inputs[scorer.reference_positions()],
        train.targets[scorer.reference_positions()],
    )
    expected = commutator.reference_bracket_norms(
        model, cross_entropy_per_example, (inputs, targets), reference
    )
    computed = scorer.compute("commutator", positions)["commutator"]
    assert np.array_equal(computed, expected.double().numpy())
    assert all(entry.columns == cli.SCORES[name][0] for name, entry in cli.SCORES.items())


def test_every_dataset_has_training_defaults(monkeypatch):
    # --dataset mnist had none: resolving its settings failed with a KeyError
    for name in data.DATASETS:
        args = cli.build_parser().parse_args(["--dataset", name, "--device", "cpu"])
        config = cli.resolve_config(args, distributed.Context())
        assert config["epochs"] >= 1 and config["lr"] > 0 and config["batch_size"] >= 1, name


def test_output_writes_from_plain_columns_without_the_run():
    import ast

    source = (ROOT / "influx/cli/output.py").read_text()
    imported = {
        node.module
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not any(module.startswith("influx.cli") for module in imported), imported


@pytest.mark.slow
def test_a_bad_setting_under_torchrun_is_one_line_from_rank_0(tmp_path):
    # torchrun exits 1 with its own summary whenever a rank fails; the ranks exit 2, and the
    # error itself is said once
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               "2", "-m", "influx.cli", "--lr", "0", "--out", str(tmp_path / "o")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=300)  # fmt: skip
    errors = [line for line in result.stderr.splitlines() if line.startswith("influx-score:")]
    assert errors == ["influx-score: error: --lr must be a finite number > 0; got 0.0. The digits "
                      "default is 0.01"], result.stderr  # fmt: skip
    # the first rank to exit 2 is named; torchrun may stop the other before it exits itself
    assert "exitcode  : 2" in result.stderr and result.returncode == 1, result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_the_loader_that_moves_batches_to_the_device_gives_the_datasets_numbers(monkeypatch):
    # On CUDA the scorer hands the library a DataLoader that moves each batch to the device;
    # here that loader runs on the CPU and must give what the Dataset itself gives.
    from influx.cli import scoring

    train = data.load("digits", max_examples=60)
    torch.manual_seed(0)
    model = cli.build_model("mlp", train.input_shape, train.num_classes).eval()
    scorer = cli.Scorer(model, train, {"device": "cpu", "seed": 0}, [])
    assert scorer.train_data() is train, "on the CPU the Dataset itself, streamed"
    monkeypatch.setattr(scorer, "device", torch.device("meta"))
    loader = scorer.train_data()
    assert isinstance(loader, torch.utils.data.DataLoader)
    moved = torch.utils.data.DataLoader(
        train, batch_size=loader.batch_size, collate_fn=scoring._on_device(torch.device("cpu"))
    )
    loss = cross_entropy_per_example
    for method in ("ekfac", "grad_dot"):
        torch.manual_seed(0)
        expected = influence.fit(model, loss, train, method=method).self_influence()
        torch.manual_seed(0)
        computed = influence.fit(model, loss, moved, method=method).self_influence()
        assert torch.equal(computed, expected), method


def test_the_old_commutator_helper_warns_and_forwards_to_the_library():
    from influx import commutator

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    reference = (x[:2], y[:2])
    with pytest.warns(DeprecationWarning, match="reference_bracket_norms"):
        old = cli.commutator_norms(model, cross_entropy_per_example, x, y, reference)
    new = commutator.reference_bracket_norms(model, cross_entropy_per_example, (x, y), reference)
    assert torch.equal(old, new)
