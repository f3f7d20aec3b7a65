"""Saved K-FAC / EK-FAC factors: a reload scores bit for bit like the fit, in float32 and float64,
and only with the training set the factors were fitted on."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from influx import influence
from influx.errors import InfluxValueError
from influx.influence import factors_io


def loss_fn(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def _setup(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
    x, y = torch.randn(40, 6, dtype=dtype), torch.randint(0, 3, (40,))
    return model, (x, y), (torch.randn(5, 6, dtype=dtype), torch.randint(0, 3, (5,)))


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_reloaded_fit_scores_bit_for_bit_like_the_fit(tmp_path, method, dtype):
    # eigh returns column-major eigenbases and a saved file holds them row-major: unless the fit
    # holds them row-major too, the products round differently (1 ulp in either dtype).
    model, train, query = _setup(dtype)
    fitted = influence.fit(model, loss_fn, train, method=method, batch_size=16, fisher="empirical")
    path = factors_io.save(fitted, tmp_path / "f.safetensors")
    loaded = influence.load(path, model, loss_fn, train)
    assert torch.equal(loaded.scores(query).values, fitted.scores(query).values)
    assert torch.equal(loaded.scores(query, train).values, fitted.scores(query, train).values)
    assert torch.equal(loaded.self_influence(), fitted.self_influence())


def test_another_training_set_of_the_same_size_is_refused(tmp_path):
    model, (x, y), _ = _setup(torch.float64)
    path = factors_io.save(influence.fit(model, loss_fn, (x, y), method="ekfac"), tmp_path / "f.st")
    flipped = y.clone()
    flipped[7] = (flipped[7] + 1) % 3  # one label differs
    others = {
        "one label": (x, flipped),
        "inputs": (x + 1e-12, y),
        "indices": (x, y, torch.arange(40) + 100),
        "order": (x.flip(0), y.flip(0)),
    }
    for what, train in others.items():
        with pytest.raises(InfluxValueError, match="differs from the training set"):
            influence.load(path, model, loss_fn, train)
            pytest.fail(f"{what}: accepted")
    assert influence.load(path, model, loss_fn, (x.clone(), y.clone())).method == "ekfac"


def test_a_file_saved_without_the_training_set_fingerprint_loads_with_a_warning(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model, train, query = _setup(torch.float64)
    fitted = influence.fit(model, loss_fn, train, method="kfac")
    path = factors_io.save(fitted, tmp_path / "new.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["influx"])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    del meta["train"]  # as written before the training set was fingerprinted
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={"influx": json.dumps(meta)})
    with pytest.warns(UserWarning, match="checked by its size only"):
        loaded = influence.load(old, model, loss_fn, train)
    assert torch.equal(loaded.scores(query).values, fitted.scores(query).values)
    with pytest.raises(InfluxValueError, match="fitted on 40 examples but train has 39"):
        influence.load(old, model, loss_fn, (train[0][:39], train[1][:39]))


def test_factors_io_only_serializes_and_a_dataset_is_hashed_in_one_pass(tmp_path):
    import ast
    from pathlib import Path

    from utils import LazyDataset

    source = Path(factors_io.__file__).read_text()
    imported = {
        node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)
    }
    assert "influx.influence.api" not in imported  # api imports factors_io, not the reverse
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    train, query = LazyDataset(30, shape=(5,)), LazyDataset(4, shape=(5,), seed=1)
    fitted = influence.fit(model, loss_fn, train, method="ekfac", batch_size=8)
    path = factors_io.save(fitted, tmp_path / "f.safetensors")
    assert torch.equal(train.reads, torch.full((30,), 3))  # factors, eigenvalues, the hash
    loaded = influence.load(path, model, loss_fn, train)
    assert torch.equal(train.reads, torch.full((30,), 4))  # the hash, which also checks
    assert torch.equal(loaded.scores(query).values, fitted.scores(query).values)
    # the digest of the streamed set is that of the same examples as tensors
    assert influence.load(path, model, loss_fn, train.tensors()).method == "ekfac"
