"""EK-FAC's ``fisher_draws="auto"`` rule (extra label draws only where a pass over the train set
is cheap, at most 8,192 draws per pass and 8 per example) and a smoke run of
benchmarks/ekfac_draws.py, which measured it. Times are not checked."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from benchmarks import ekfac_draws
from influx import influence, models
from influx.curvature import factors
from influx.train import cross_entropy_per_example


def digits_sized_mlp() -> nn.Module:
    torch.manual_seed(0)
    return models.mlp(in_features=64, hidden=(64,), num_classes=10, activation="tanh")


def test_multiply_adds_count_each_matmul_output_once_per_example():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    inputs = torch.randn(5, 3, 8, 8)
    # Conv: 4 x 8 x 8 outputs of 3 x 3 x 3 products each; Linear: 10 outputs of 256 products.
    assert factors._multiply_adds_per_example(conv, inputs[:1]) == 4 * 64 * 27 + 10 * 256
    # Layers the count does not see still cost their parameters once per example.
    embedding = nn.Sequential(nn.Embedding(1000, 8), nn.Flatten(), nn.Linear(16, 3))
    tokens = torch.zeros(1, 2, dtype=torch.long)
    assert factors._multiply_adds_per_example(embedding, tokens) == 8000 + 16 * 3 + 3


def test_auto_draws_on_small_models_only():
    rows = torch.randn(4, 64)
    # digits MLP, 4,810 parameters: 8,192 draws per pass bind up to ~8,000 examples
    mlp = digits_sized_mlp()
    assert [factors.fisher_draws("auto", n, mlp, rows) for n in (100, 1000, 1600, 5000, 9000)] == [
        8, 8, 6, 2, 1,
    ]  # fmt: skip
    # 76,810 parameters: the work bound, 2^28 // (examples x 76,810), binds first
    wide = models.mlp(in_features=64, hidden=(1024,), num_classes=10)
    assert [factors.fisher_draws("auto", n, wide, rows) for n in (100, 1000, 1600, 5000)] == [
        8, 3, 2, 1,
    ]  # fmt: skip
    images = torch.randn(2, 3, 32, 32)
    for width in (8, 16):
        resnet = models.resnet(8, width=width, norm="group")
        # millions of multiply-adds per example: one draw from 100 examples on
        assert [factors.fisher_draws("auto", n, resnet, images) for n in (100, 1000, 50_000)] == [
            1
        ] * 3
    assert factors.fisher_draws(3, 10**6, resnet, images) == 3  # a number is taken as given


def test_auto_draws_leave_the_random_state_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    inputs = torch.randn(4, 6)
    state = torch.get_rng_state()
    factors.fisher_draws("auto", 100, model, inputs)
    assert torch.equal(torch.get_rng_state(), state)


def test_fit_at_auto_draws_as_many_labels_as_the_rule_says():
    model = digits_sized_mlp()
    torch.manual_seed(1)
    inputs, targets = torch.randn(300, 64), torch.randint(0, 10, (300,))
    draws = factors.fisher_draws("auto", 300, model, inputs)
    assert draws == 8

    def self_influence(**options):
        fitted = influence.fit(
            model, cross_entropy_per_example, (inputs, targets), method="ekfac", **options
        )
        return fitted.self_influence()

    auto = self_influence()
    assert torch.equal(auto, self_influence(fisher_draws=draws))
    assert not torch.allclose(auto, self_influence(fisher_draws=1))


@pytest.mark.slow
def test_ekfac_draws_check_runs(tmp_path):
    out = tmp_path / "draws.json"
    ekfac_draws.main(
        ["--tasks", "resnet8-w8", "--train", "48", "--queries", "3", "--steps", "2",
         "--draws", "1", "2", "--label-seeds", "0", "--reference-draws", "4",
         "--out", str(out)]
    )  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [(r["row"], r["draws"]) for r in rows] == [
        ("ekfac reference", 4),
        ("ekfac", 1),
        ("ekfac", 2),
    ]
    assert all(-1 <= r["vs_reference"] <= 1 and r["fit_s"] > 0 for r in rows)
