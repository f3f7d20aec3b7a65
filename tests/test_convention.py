"""The one argument convention of docs/architecture.md, checked over every public function.

A function that takes a model and a loss is called ``f(model, loss_fn, data..., *, settings)``
(``model_fn`` in place of ``model`` for trainers from scratch); the loss function is always
``loss_fn``; the data is one argument (a tuple or a Dataset), not ``inputs, targets``; and every
setting after the data is keyword-only. "Public" means a name in a module's ``__all__``, or, in a
module without one, a name defined there that does not start with ``_``.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

from influx.data import LossFn

PACKAGES = (
    "grads",
    "curvature",
    "influence",
    "commutator",
    "memorization",
    "dp",
    "poison",
    "unlearn",
    "audit",
    "unlearnable",
    "shift",
    "train",
    "ensembles",
)
MODEL_NAMES = ("model", "model_fn")
LOSS_NAMES = ("loss", "loss_func", "loss_function", "criterion")
POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)

# The rules a signature can break (the keys of `violations`).
RULES = ("model-first", "loss-second", "loss-name", "one-data-argument", "keyword-settings")

# Today's exceptions: (public name, rule) -> why. A name is its shortest path under `influx.`.
# `test_allowed_exceptions_are_still_true` fails for an entry that no longer applies, so this
# list only shrinks; a new function that breaks a rule fails `test_public_functions_follow_...`.
_BATCH_ENGINE = (
    "per-sample engine on one in-memory batch, `(inputs, targets)` tensors; the streaming entry "
    "points call it once per batch of influx.data.iter_batches"
)
_BATCH_HELPER = (
    "internal helper that works on one in-memory batch handed over by a streaming caller, not an "
    "entry point that takes user data"
)
_OLD_TARGETS = (
    "`targets=None` (and the rest of the older `(inputs, targets, ...)` form) stays positional "
    "so that calls written before data became one argument still work"
)
_OLD_ORDER = (
    "`train=None` lets the deprecated older order, without `loss_fn`, through (it warns); the "
    "data is not a setting"
)
_SAVED_FILE = "the saved file is the subject and comes first, then (model, loss_fn, train)"
_TRAINER_LOSS = (
    "trainers take the loss as a keyword defaulting to cross-entropy (a name or a function), so "
    "that `train(model, data)` works"
)
ALLOWED = {
    # Data as one argument, with the older positional form still accepted.
    ("grads.per_sample_grads", "keyword-settings"): _OLD_TARGETS,
    ("grads.per_sample_norms", "keyword-settings"): _OLD_TARGETS,
    ("grads.per_sample_projected", "keyword-settings"): _OLD_TARGETS,
    ("dp.clipped_grad", "keyword-settings"): _OLD_TARGETS,
    ("poison.input_gradients", "keyword-settings"): _OLD_TARGETS,
    ("unlearn.fisher_diagonal", "keyword-settings"): _OLD_TARGETS,
    ("audit.gus", "keyword-settings"): _OLD_TARGETS,
    ("memorization.estimate", "keyword-settings"): _OLD_ORDER,
    ("memorization.margin", "keyword-settings"): _OLD_ORDER,
    ("memorization.fit_ensemble", "loss-second"): "deprecated alias keeping the older order; "
    "influx.ensembles.fit_ensemble(model_fn, loss_fn, train, masks) is the new form",
    # The batch-level engine and the helpers that a streaming caller hands one batch.
    ("grads.per_sample_gram", "one-data-argument"): _BATCH_ENGINE,
    ("grads.capture_matmul_layers", "one-data-argument"): _BATCH_ENGINE,
    ("grads.reference.per_sample_grads", "one-data-argument"): _BATCH_ENGINE,
    ("grads.reference.naive_per_sample_grads", "one-data-argument"): _BATCH_ENGINE,
    ("grads.capture.capture", "one-data-argument"): _BATCH_ENGINE,
    ("grads.capture.capture_streaming", "one-data-argument"): _BATCH_ENGINE,
    ("grads.capture.capture", "keyword-settings"): "`parameters` (the tensors to watch) is "
    "engine plumbing, passed positionally by the engine's call sites",
    ("grads.capture.capture_streaming", "keyword-settings"): "as grads.capture.capture",
    ("train.mean_gradient", "one-data-argument"): "the per-batch `gradient=` hook of train.train",
    ("influence.base.per_example_gradients", "one-data-argument"): _BATCH_HELPER,
    ("influence.stream.check_batch", "one-data-argument"): _BATCH_HELPER,
    ("influence.stream.check_batch", "keyword-settings"): "helper: `values` names what the "
    "message says was checked",
    ("influence.kfac.resolve_fisher", "one-data-argument"): _BATCH_HELPER,
    # Helpers whose subject is not the model: the model and loss only resolve or evaluate it.
    ("influence.kfac.resolve_fisher", "model-first"): "the Fisher option is the subject; the "
    "model and batch only resolve 'auto'",
    ("influence.kfac.resolve_fisher", "loss-second"): "as model-first",
    ("curvature.fisher_draws", "model-first"): "the option is the subject; the model and a "
    "batch of inputs only size 'auto' (multiply-adds per example)",
    ("influence.stream.checked", "model-first"): "wraps `data`, its subject, for a check of its "
    "first pass; the model and loss only evaluate it",
    ("influence.stream.checked", "loss-second"): "as model-first",
    ("influence.load", "model-first"): _SAVED_FILE,
    ("influence.load", "loss-second"): _SAVED_FILE,
    ("influence.factors_io.read", "model-first"): _SAVED_FILE,
    ("influence.factors_io.read", "loss-second"): _SAVED_FILE,
    # The trainer and its evaluation; `loss=` is the deprecated spelling of `loss_fn=`.
    ("train.train", "loss-second"): _TRAINER_LOSS,
    ("train.evaluate", "loss-second"): _TRAINER_LOSS,
    ("train.train", "loss-name"): "`loss=` is a deprecated alias of `loss_fn=` (it warns)",
    ("train.evaluate", "loss-name"): "`loss=` is a deprecated alias of `loss_fn=` (it warns)",
    # The probe sets are optional data (the sets the shift is measured on), not settings.
    ("shift.analyze", "keyword-settings"): "`probes` is optional data, not a setting",
    ("shift.trajectory", "keyword-settings"): "`probes` is optional data, not a setting",
    # Small helpers whose second argument is part of what they compute.
    ("curvature.check_steps", "keyword-settings"): "helper: `name` labels the message",
    ("grads.select_parameters", "keyword-settings"): "helper: `params` is the selection itself",
    ("grads.common.example_names", "keyword-settings"): "helper: `offset` locates the rows",
    ("influence.base.default_batch_size", "keyword-settings"): "helper: the memory budget",
    ("poison.concentrated", "keyword-settings"): "schedule(mask, batch_size, seed) reads as a "
    "sampler's constructor; the seed is its only other input",
    ("poison.interlaced", "keyword-settings"): "as poison.concentrated",
}


def violations(signature: inspect.Signature) -> dict[str, str]:
    """The convention's rules a signature breaks: rule -> what is wrong and the fix."""
    params = list(signature.parameters.values())
    names = [p.name for p in params]
    found = {}
    model = next((name for name in names if name in MODEL_NAMES), None)
    if model is not None and names[0] != model:
        found["model-first"] = f"`{model}` is parameter {names.index(model)}; it comes first"
    if model is not None and "loss_fn" in names:
        loss_fn = signature.parameters["loss_fn"]
        if names.index("loss_fn") != 1 or loss_fn.kind not in POSITIONAL:
            found["loss-second"] = f"`loss_fn` must be the positional parameter after `{model}`"
    for p in params:
        # A string under `from __future__ import annotations`, else the alias itself.
        is_loss = p.annotation is LossFn or "LossFn" in str(p.annotation)
        if p.name in LOSS_NAMES or (p.name != "loss_fn" and is_loss):
            found["loss-name"] = f"`{p.name}` takes a loss function: call it `loss_fn`"
    for first, second in zip(params, params[1:]):
        if (
            first.name.endswith("inputs")
            and second.name == "targets"
            and second.kind in POSITIONAL
            and "loss_fn" in names
        ):
            found["one-data-argument"] = (
                f"data arrives as `{first.name}, targets`: take one data argument "
                "(a tuple or Dataset)"
            )
    positional_settings = [
        p.name for p in params if p.kind in POSITIONAL and p.default is not p.empty
    ]
    if positional_settings:
        found["keyword-settings"] = (
            f"settings {positional_settings} can be passed by position: put them after `*`"
        )
    return found


def _modules(package: str):
    root = importlib.import_module(f"influx.{package}")
    yield root
    for info in pkgutil.walk_packages(getattr(root, "__path__", []), prefix=f"{root.__name__}."):
        yield importlib.import_module(info.name)


def public_functions() -> dict[str, object]:
    """Every public function of PACKAGES, once, under its shortest name below ``influx.``."""
    found: dict[int, tuple[str, object]] = {}
    for package in PACKAGES:
        for module in _modules(package):
            listed = getattr(module, "__all__", None)
            names = listed if listed is not None else [n for n in vars(module) if n[0] != "_"]
            for name in names:
                obj = getattr(module, name)
                if not inspect.isfunction(obj) or not obj.__module__.startswith("influx."):
                    continue
                if listed is None and obj.__module__ != module.__name__:
                    continue  # imported from elsewhere; checked where it is defined or listed
                path = f"{module.__name__.removeprefix('influx.')}.{name}"
                known = found.get(id(obj))
                if known is None or len(path) < len(known[0]):
                    found[id(obj)] = (path, obj)
    return dict(found.values())


@pytest.fixture(scope="module")
def functions() -> dict[str, object]:
    return public_functions()


def test_the_scan_sees_the_public_entry_points(functions):
    for name in ("influence.fit", "unlearn.newton", "train.train", "commutator.pairwise"):
        assert name in functions, f"{name} was not found by the scan"
    assert len(functions) > 100


def test_public_functions_follow_the_argument_convention(functions):
    broken = [
        f"influx.{name}: {message}"
        for name, fn in sorted(functions.items())
        for rule, message in violations(inspect.signature(fn)).items()
        if (name, rule) not in ALLOWED
    ]
    assert not broken, (
        "the one argument convention of docs/architecture.md, (model, loss_fn, data, *, "
        "settings), is broken by:\n" + "\n".join(broken)
    )


def test_allowed_exceptions_are_still_true(functions):
    stale = []
    for (name, rule), reason in sorted(ALLOWED.items()):
        assert rule in RULES and reason, f"allow-list entry {name}/{rule} needs a rule and a reason"
        if name not in functions:
            stale.append(f"{name} ({rule}): no such public function any more")
        elif rule not in violations(inspect.signature(functions[name])):
            stale.append(f"{name} ({rule}): now follows the rule")
    assert not stale, "remove from ALLOWED in tests/test_convention.py:\n" + "\n".join(stale)


# Made-up signatures: the checker must flag each broken rule and pass the convention itself.
def _loss_first(loss_fn, model, data): ...
def _loss_keyword(model, data, *, loss_fn=None): ...
def _loss_named_loss(model, data, *, loss="cross_entropy"): ...
def _loss_annotated(model, objective: LossFn, data): ...
def _split_data(model, loss_fn, inputs, targets, *, lr=0.1): ...
def _positional_setting(model, loss_fn, data, lr=0.1): ...
def _factory_loss_last(model_fn, data, *, epochs, loss_fn=None): ...
def _good(model, loss_fn, train, query, *, lr=0.1, seed=0): ...
def _good_factory(model_fn, loss_fn, data, *, n_models, **options): ...
def _good_without_loss(model, data, *, batch_size=512): ...


@pytest.mark.parametrize(
    "fn, expected",
    [
        (_loss_first, {"model-first", "loss-second"}),
        (_loss_keyword, {"loss-second"}),
        (_loss_named_loss, {"loss-name"}),
        (_loss_annotated, {"loss-name"}),
        (_split_data, {"one-data-argument"}),
        (_positional_setting, {"keyword-settings"}),
        (_factory_loss_last, {"loss-second"}),
        (_good, set()),
        (_good_factory, set()),
        (_good_without_loss, set()),
    ],
)
def test_the_checker_flags_made_up_signatures(fn, expected):
    assert set(violations(inspect.signature(fn))) == expected


def test_a_new_violation_fails_the_convention_test(functions):
    """The whole test, not only `violations`, fails for a public function it has not seen."""
    extra = dict(functions, **{"train.made_up": _positional_setting})
    with pytest.raises(AssertionError, match=r"influx\.train\.made_up: settings \['lr'\]"):
        test_public_functions_follow_the_argument_convention(extra)
