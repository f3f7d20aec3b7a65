"""Accuracies and tug-of-war against direct formulas."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from influx.audit.utility import accuracy, correct, splits_accuracy, tug_of_war
from influx.errors import InfluxValueError


def _model_and_data(n: int = 37):
    model = nn.Sequential(nn.Linear(6, 12), nn.Dropout(0.5), nn.ReLU(), nn.Linear(12, 4)).double()
    inputs = torch.randn(n, 6, dtype=torch.float64)
    targets = torch.randint(0, 4, (n,))
    return model, inputs, targets


def test_accuracy_is_eval_mode_top1():
    model, inputs, targets = _model_and_data()
    model.train()
    got = accuracy(model, (inputs, targets), batch_size=5)
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        hits = [
            int(model(inputs[i : i + 1]).argmax().item() == targets[i].item()) for i in range(37)
        ]
    # Integer counts over 37 examples: exact.
    assert got == sum(hits) / 37
    assert correct(model, (inputs, targets), batch_size=8).tolist() == [bool(h) for h in hits]


def test_accuracy_extremes_and_errors():
    model, inputs, _ = _model_and_data(10)
    model.eval()
    with torch.no_grad():
        predicted = model(inputs).argmax(1)
    assert accuracy(model, (inputs, predicted)) == 1.0
    assert accuracy(model, (inputs, (predicted + 1) % 4)) == 0.0
    with pytest.raises(InfluxValueError, match="empty"):
        accuracy(model, (inputs[:0], predicted[:0]))
    with pytest.raises(InfluxValueError, match=r"\[B, C\]"):
        accuracy(nn.Flatten(0), (inputs, predicted))


def test_splits_accuracy():
    model, inputs, targets = _model_and_data(30)
    forget, retain, test = (
        (inputs[:5], targets[:5]),
        (inputs[5:20], targets[5:20]),
        (inputs[20:], targets[20:]),
    )
    got = splits_accuracy(model, forget, retain, test)
    assert got == {
        "forget": accuracy(model, forget),
        "retain": accuracy(model, retain),
        "test": accuracy(model, test),
    }


def test_tug_of_war_matches_its_formula():
    unlearned = {"forget": 0.62, "retain": 0.97, "test": 0.81, "extra": 0.3}
    retrained = {"forget": 0.70, "retain": 0.99, "test": 0.84}
    expected = (1 - 0.08) * (1 - 0.02) * (1 - 0.03)
    assert tug_of_war(unlearned, retrained) == pytest.approx(expected, rel=1e-14)
    assert tug_of_war(retrained, retrained) == 1.0
    # Symmetric in its arguments, 0 when a split is off by 1.
    assert tug_of_war(retrained, unlearned) == pytest.approx(expected, rel=1e-14)
    assert (
        tug_of_war({"forget": 1, "retain": 1, "test": 1}, {"forget": 0, "retain": 1, "test": 1})
        == 0.0
    )


def test_tug_of_war_errors():
    good = {"forget": 0.5, "retain": 0.9, "test": 0.8}
    with pytest.raises(InfluxValueError, match=r"lacks the accuracies of \['test'\]"):
        tug_of_war({"forget": 0.5, "retain": 0.9}, good)
    with pytest.raises(InfluxValueError, match="not percentages"):
        tug_of_war(good, {"forget": 50.0, "retain": 90.0, "test": 80.0})
    with pytest.raises(InfluxValueError, match="mapping"):
        tug_of_war([0.5, 0.9, 0.8], good)


@pytest.mark.parametrize("shape", ["column", "one-hot"])
def test_targets_must_be_class_indices_one_per_example(shape):
    # A [N, 1] column would broadcast against the [N] predictions into an [N, N] comparison.
    model, inputs, targets = _model_and_data(10)
    bad = targets[:, None] if shape == "column" else nn.functional.one_hot(targets, 4)
    forget, retain, test = (inputs[:3], bad[:3]), (inputs[3:7], bad[3:7]), (inputs[7:], bad[7:])
    message = r"class-index targets \[B\] = \[10\].*got shape \(10, "
    with pytest.raises(InfluxValueError, match=message):
        accuracy(model, (inputs, bad))
    with pytest.raises(InfluxValueError, match=message):
        correct(model, (inputs, bad))
    with pytest.raises(InfluxValueError, match=r"class-index targets \[B\] = \[3\]"):
        splits_accuracy(model, forget, retain, test)
