"""Budgets (counted independently of the methods), behaviour, trajectories and errors."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn
from unlearn_helpers import LOSS, classification, flat, tiny_mlp
from utils import assert_close

from influx import unlearn
from influx.errors import InfluxValueError, UnsupportedModelError
from influx.train import evaluate, train

FORGET, RETAIN = 6, 40
# (method, settings, largest cost of one step: the unspent remainder is below it)
BUDGETED = [
    ("gradient_ascent", {}, 6),
    ("fine_tune", {}, 16),
    ("noisy_gd", {"noise_std": 0.5}, 16),
    ("neggrad_plus", {"beta": 0.9}, 22),
    ("eu_k", {"k": 1}, 16),
    ("cf_k", {"k": 2}, 16),
    ("scrub", {"max_rounds": 2}, 32),
    ("ssd", {"alpha": 1.0}, None),
    ("newton", {"solver": "cg", "damping": 0.5}, 80),
]


def _data():
    return classification(FORGET, 1), classification(RETAIN, 2)


class ExampleCounter:
    """Counts examples through every forward of a model and of its copies: deepcopy copies the
    hook, and a plain function (unlike a bound method) is shared by the copies, not copied."""

    def __init__(self, model: nn.Module):
        counts = self.counts = []
        model.register_forward_hook(
            lambda module, inputs, output: counts.append(inputs[0].shape[0])
        )

    @property
    def count(self) -> int:
        return sum(self.counts)


def _run(name, model, budget, **settings):
    forget, retain = _data()
    settings.setdefault("progress", False)
    if name not in ("ssd", "newton"):
        settings.setdefault("batch_size", 16)
    return getattr(unlearn, name)(model, LOSS, forget, retain, budget=budget, **settings)


@pytest.mark.parametrize("name, settings, step_cost", BUDGETED, ids=[b[0] for b in BUDGETED])
def test_every_method_respects_its_budget(name, settings, step_cost):
    budget = 203 if name != "ssd" else 30  # ssd: needs |F| = 6, then a retain subsample of 24
    model = tiny_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    counter = ExampleCounter(model)
    result = _run(name, model, budget, **settings)
    # Counted by the hook: every example through the model (student, teacher, products).
    assert 0 < counter.count <= budget, f"{name}: {counter.count} examples for budget {budget}"
    assert counter.count <= result.spent <= budget
    if step_cost is not None:
        assert budget - result.spent < step_cost, f"{name} left {budget - result.spent} unspent"
    else:
        assert result.spent == budget and result.options["retain_used"] == 24
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{name} changed the caller's model ({key})"
    assert not torch.equal(flat(result.model), flat(model)), f"{name} did not change its copy"
    assert result.model is not model and result.method == name and result.budget == budget


@pytest.mark.parametrize("name", [b[0] for b in BUDGETED if b[0] != "ssd"])
def test_a_budget_below_one_step_changes_nothing(name):
    model = tiny_mlp()
    with pytest.warns(UserWarning) if name == "newton" else contextlib.nullcontext():
        result = _run(name, model, 5, **dict(BUDGETED_SETTINGS[name]))
    assert result.steps == 0 and result.spent == 0
    # EU-k re-initializes its layers before any step (free); nothing else may change.
    changed = [n for n, p in result.model.named_parameters()
               if not torch.equal(p, model.get_parameter(n))]  # fmt: skip
    assert changed == (["2.weight", "2.bias"] if name == "eu_k" else [])


BUDGETED_SETTINGS = {name: settings for name, settings, _ in BUDGETED}


def test_retrain_records_its_compute_and_matches_train():
    forget, retain = _data()
    model = tiny_mlp()
    init = {k: v.clone() for k, v in tiny_mlp(7).state_dict().items()}
    counter = ExampleCounter(model)
    result = unlearn.retrain(model, LOSS, forget, retain, epochs=3, init=init, lr=0.05,
                             batch_size=16, seed=4, progress=False)  # fmt: skip
    # 3 epochs of training + the final evaluation pass that influx.train.train makes.
    assert result.spent == 3 * RETAIN and counter.count == 4 * RETAIN
    assert math.isinf(result.budget)
    reference = tiny_mlp(7)
    train(reference, retain, loss_fn=LOSS, lr=0.05, epochs=3, batch_size=16, seed=4, progress=False)
    assert_close(flat(result.model), flat(reference), rtol=0, name="retrain = train from init")


def test_gradient_ascent_raises_and_fine_tune_lowers_the_loss():
    forget, retain = _data()
    model = tiny_mlp()
    ascent = unlearn.gradient_ascent(model, LOSS, forget, retain, budget=60, lr=0.1,
                                     progress=False)  # fmt: skip
    assert (
        evaluate(ascent.model, forget, loss_fn=LOSS)[0]
        > evaluate(model, forget, loss_fn=LOSS)[0] + 0.1
    )
    tuned = unlearn.fine_tune(model, LOSS, forget, retain, budget=400, lr=0.1, progress=False)
    assert (
        evaluate(tuned.model, retain, loss_fn=LOSS)[0]
        < evaluate(model, retain, loss_fn=LOSS)[0] - 0.05
    )


def test_last_k_methods_touch_only_the_last_layers():
    forget, retain = _data()
    model = tiny_mlp()
    for method in (unlearn.eu_k, unlearn.cf_k):
        result = method(model, LOSS, forget, retain, budget=64, k=1, lr=0.1, progress=False)
        assert result.options["layers"] == ["2"]
        assert torch.equal(result.model[0].weight, model[0].weight)
        assert not torch.equal(result.model[2].weight, model[2].weight)
        assert all(p.requires_grad for p in result.model.parameters())


def test_noisy_gd_is_seeded_and_reduces_to_fine_tuning():
    forget, retain = _data()
    model = tiny_mlp()
    kwargs = dict(budget=64, lr=0.1, batch_size=16, progress=False)
    a = unlearn.noisy_gd(model, LOSS, forget, retain, noise_std=0.3, seed=1, **kwargs)
    b = unlearn.noisy_gd(model, LOSS, forget, retain, noise_std=0.3, seed=1, **kwargs)
    c = unlearn.noisy_gd(model, LOSS, forget, retain, noise_std=0.3, seed=2, **kwargs)
    assert torch.equal(flat(a.model), flat(b.model)) and not torch.equal(
        flat(a.model), flat(c.model)
    )
    quiet = unlearn.noisy_gd(model, LOSS, forget, retain, noise_std=0.0, **kwargs)
    tuned = unlearn.fine_tune(model, LOSS, forget, retain, **kwargs)
    assert_close(flat(quiet.model), flat(tuned.model), rtol=0, name="noise 0")


def test_trajectory_states_and_callback():
    forget, retain = _data()
    model = tiny_mlp()
    seen = []

    def on_checkpoint(m, step):
        seen.append(m.training)
        return {"forget_loss": evaluate(m, forget, loss_fn=LOSS)[0]}

    result = unlearn.fine_tune(model, LOSS, forget, retain, budget=16 * 7, batch_size=16,
                               record_every=3, on_checkpoint=on_checkpoint, progress=False)  # fmt: skip
    assert [p.step for p in result.trajectory] == [0, 3, 6, 7]
    assert [p.spent for p in result.trajectory] == [0, 48, 96, 112]
    assert seen == [False] * 4 and result.model.training
    first, last = result.trajectory[0], result.trajectory[-1]
    assert all(v.device.type == "cpu" for v in last.state_dict.values())
    assert_close(torch.cat([v.reshape(-1) for v in first.state_dict.values()]), flat(model), rtol=0)
    assert_close(torch.cat([v.reshape(-1) for v in last.state_dict.values()]), flat(result.model),
                 rtol=0)  # fmt: skip
    assert result.metric("forget_loss")[0] == pytest.approx(
        evaluate(model, forget, loss_fn=LOSS)[0]
    )


def test_results_stay_on_the_models_device_and_inplace_mutates():
    forget, retain = _data()
    model = tiny_mlp()
    device = next(model.parameters()).device
    result = unlearn.gradient_ascent(model, LOSS, forget, retain, budget=12, progress=False)
    assert all(p.device == device for p in result.model.parameters())
    inplace = unlearn.gradient_ascent(model, LOSS, forget, retain, budget=12, inplace=True,
                                      progress=False)  # fmt: skip
    assert inplace.model is model
    assert_close(flat(model), flat(result.model), rtol=0, name="inplace = copy")


def test_default_budget_is_a_tenth_of_training_compute():
    forget, retain = _data()
    result = unlearn.fine_tune(tiny_mlp(), LOSS, forget, retain, train_compute=1000,
                               batch_size=16, progress=False)  # fmt: skip
    assert result.budget == 100 and result.spent == 96


def test_errors():
    forget, retain = _data()
    empty = (forget[0][:0], forget[1][:0])
    with pytest.raises(InfluxValueError, match="forget set is empty"):
        unlearn.gradient_ascent(tiny_mlp(), LOSS, empty, retain, budget=10)
    with pytest.raises(InfluxValueError, match="retain set is empty"):
        unlearn.scrub(tiny_mlp(), LOSS, forget, empty, budget=10)
    with pytest.raises(InfluxValueError, match="no budget"):
        unlearn.fine_tune(tiny_mlp(), LOSS, forget, retain)
    with pytest.raises(InfluxValueError, match="not both"):
        unlearn.fine_tune(tiny_mlp(), LOSS, forget, retain, budget=5, train_compute=50)
    with pytest.raises(InfluxValueError, match="unknown option"):
        unlearn.fine_tune(tiny_mlp(), LOSS, forget, retain, budget=5, learning_rate=0.1)
    with pytest.raises(InfluxValueError, match="per-example losses"):
        unlearn.fine_tune(tiny_mlp(), lambda o, y: LOSS(o, y).mean(), forget, retain, budget=50)
    with pytest.raises(InfluxValueError, match="solver='cg'"):
        unlearn.newton(tiny_mlp(), LOSS, forget, retain, budget=100, solver="dense")
    with pytest.raises(InfluxValueError, match="forget-set gradient"):
        unlearn.ssd(tiny_mlp(), LOSS, forget, retain, budget=3)
    with pytest.raises(InfluxValueError, match="with budget=math.inf give max_steps"):
        unlearn.gradient_ascent(tiny_mlp(), LOSS, forget, retain, budget=math.inf)
    assert (
        unlearn.gradient_ascent(
            tiny_mlp(), LOSS, forget, retain, budget=math.inf, max_steps=2, progress=False
        ).steps
        == 2
    )
    for setting in ("momentum", "weight_decay"):
        with pytest.raises(InfluxValueError, match=f"{setting} must be a finite number >= 0"):
            unlearn.fine_tune(tiny_mlp(), LOSS, forget, retain, budget=5, **{setting: math.nan})
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.LazyLinear(3))
    images = (torch.randn(4, 1, 5, 5, device="cpu"), torch.zeros(4, dtype=torch.long, device="cpu"))
    with pytest.raises(UnsupportedModelError, match="convert_batchnorm"):
        unlearn.fine_tune(conv, LOSS, images, images, budget=10)


def test_nonfinite_losses_name_the_examples():
    forget, retain = _data()
    retain[0][3, 0] = float("nan")
    with pytest.raises(Exception, match=r"examples \[3\]"):
        unlearn.fine_tune(tiny_mlp(), LOSS, forget, retain, budget=40, batch_size=40,
                          progress=False)  # fmt: skip
