"""influx-score end to end on digits: files, columns, gradient norms, resuming, errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from utils import assert_close

from influx import cli, data
from influx.train import cross_entropy_per_example

# One epoch, 4 chunks of 400 examples: small, yet enough chunks to interrupt and resume.
ARGS = ["--dataset", "digits", "--model", "mlp", "--epochs", "1", "--chunk-size", "400",
        "--no-progress"]  # fmt: skip


def read_scores(path) -> dict[str, np.ndarray]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames == ["index", "target", "loss", "grad_norm", "margin"]
    return {name: np.array([float(row[name]) for row in rows]) for name in reader.fieldnames}


def naive_grad_norms(model, inputs, targets) -> torch.Tensor:
    """Per-example gradient norms from one backward per example: [N]."""
    norms = []
    for x, y in zip(inputs, targets, strict=True):
        model.zero_grad()
        cross_entropy_per_example(model(x[None]), y[None]).sum().backward()
        norms.append(torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())))
    return torch.stack(norms)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "digits-mlp"
    assert cli.main([*ARGS, "--out", str(out)]) == 0
    return out


def test_writes_scores_and_summary(finished_run):
    scores = read_scores(finished_run / "scores.csv")
    train = data.load("digits")
    assert np.array_equal(scores["index"], np.arange(1600))
    assert np.array_equal(scores["target"], train.targets.numpy())
    assert (scores["loss"] >= 0).all() and (scores["grad_norm"] >= 0).all()
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["dataset"] == "digits" and summary["model"] == "mlp"
    assert summary["sizes"]["train"] == 1600 and summary["sizes"]["test"] == 197
    assert summary["sizes"]["num_parameters"] == 4810
    assert 0.5 < summary["accuracy"]["test"] <= 1.0
    assert summary["config"]["epochs"] == 1 and summary["config"]["lr"] == 1e-2
    assert {"torch", "numpy", "influx", "python"} <= set(summary["versions"])
    assert summary["timing"]["total_seconds"] > 0 and summary["resumed_chunks"] == 0


def test_scores_match_a_per_example_loop(finished_run):
    scores = read_scores(finished_run / "scores.csv")
    train = data.load("digits")
    model = cli.build_model("mlp", train.input_shape, train.num_classes)
    model.load_state_dict(torch.load(finished_run / "model.pt"))
    model.eval()
    positions = torch.tensor([0, 1, 399, 400, 1234, 1599])
    inputs, targets = train.inputs[positions], train.targets[positions]
    as_float32 = lambda column: torch.tensor(scores[column][positions.numpy()], dtype=torch.float32)

    expected_norms = naive_grad_norms(model, inputs, targets)
    assert_close(as_float32("grad_norm"), expected_norms, rtol=1e-5, name="grad_norm")
    with torch.no_grad():
        logits = model(inputs)
    assert_close(as_float32("loss"), cross_entropy_per_example(logits, targets), name="loss")
    others = logits.clone()
    others[torch.arange(len(targets)), targets] = -torch.inf
    margins = logits[torch.arange(len(targets)), targets] - others.max(1).values
    assert_close(as_float32("margin"), margins, name="margin")


def test_interrupted_run_resumes_without_recomputing_chunks(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_score_chunk = cli.score_chunk
    calls = []

    def interrupted_on_third_chunk(*args, **kwargs):
        calls.append(args[2][0].item())
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_score_chunk(*args, **kwargs)

    monkeypatch.setattr(cli, "score_chunk", interrupted_on_third_chunk)
    assert cli.main([*ARGS, "--out", str(out)]) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "parts").glob("chunk_*.npy")) == [
        "chunk_00000.npy",
        "chunk_00001.npy",
    ]
    model_bytes = (out / "model.pt").read_bytes()

    calls.clear()
    monkeypatch.setattr(cli, "score_chunk", lambda *a, **k: calls.append(a[2][0].item()) or
                        real_score_chunk(*a, **k))  # fmt: skip
    assert cli.main([*ARGS, "--out", str(out)]) == 0
    assert calls == [800, 1200], "only the chunks not yet on disk are scored"
    assert "resuming" in capsys.readouterr().err
    assert (out / "model.pt").read_bytes() == model_bytes, "the trained model is reused"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_chunks"] == 2
    assert len(read_scores(out / "scores.csv")["index"]) == 1600

    # A different configuration in the same folder starts over instead of mixing results.
    calls.clear()
    assert cli.main([*ARGS, "--out", str(out), "--seed", "1"]) == 0
    assert calls == [0, 400, 800, 1200]


def test_missing_cifar10_is_a_clean_error(tmp_path, capsys):
    status = cli.main(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--no-progress",
                       "--out", str(tmp_path / "out")])  # fmt: skip
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("influx-score: error: CIFAR-10 not found")
    assert "cifar-10-batches-py" in err and "--data-dir" in err


def test_invalid_option_values_are_clean_errors(tmp_path, capsys):
    assert cli.main([*ARGS, "--chunk-size", "0", "--out", str(tmp_path)]) == 2
    assert "--chunk-size must be >= 1; got 0" in capsys.readouterr().err
    assert cli.main([*ARGS, "--width", "8", "--out", str(tmp_path)]) == 2
    assert "--width applies to the cnn and resnet models" in capsys.readouterr().err


def test_build_model_covers_every_choice():
    for name in cli.MODELS:
        model = cli.build_model(name, (1, 8, 8), 10, width=4 if name != "mlp" else None)
        assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_scores_a_cifar10_folder(tmp_path):
    from test_data import write_tiny_cifar10

    write_tiny_cifar10(tmp_path / "data")
    out = tmp_path / "out"
    status = cli.main(["--dataset", "cifar10", "--model", "cnn", "--width", "4", "--epochs", "1",
                       "--data-dir", str(tmp_path / "data"), "--out", str(out), "--no-progress"])  # fmt: skip
    assert status == 0
    scores = read_scores(out / "scores.csv")
    assert len(scores["index"]) == 15 and np.isfinite(scores["grad_norm"]).all()
    assert json.loads((out / "summary.json").read_text())["sizes"]["input_shape"] == [3, 32, 32]
