"""Which training examples resist unlearning? Rank them, then check the ranking by unlearning.

:func:`rank` scores every training example by five components, each oriented so that HIGH means
"expected to resist unlearning", and combines them by rank-averaging:

- ``memorization``: a memorization score given by the caller (``memorization.estimate(...).mem``
  or any proxy), else the input-loss curvature proxy ``influx.memorization.curvature``;
- ``self_influence``: ``s(z) = grad l(z)^T (H + damping I)^-1 grad l(z)`` from
  ``influx.influence.fit(..., method=influence_method).self_influence()``;
- ``ood``: out-of-distribution score in the penultimate embedding (the input of the last Linear
  layer, or of ``layer``): ``"mahalanobis"`` (Lee et al. 2018) is the squared distance to the
  example's own class mean under the shared within-class covariance of the retain set,
  ``(z - mu_y)^T (Sigma + r I)^-1 (z - mu_y)`` with ridge ``r = 1e-6 tr(Sigma) / D``;
  ``"knn"`` (Sun et al. 2022) the distance to the k-th nearest retain neighbour of the
  L2-normalized embedding (the example itself excluded);
- ``entanglement``: the entanglement score of Zhao et al. (2024) (docs/architecture.md) between the
  retain set and the one-example forget set ``{z_i}``. With ``F = {z_i}`` the within-F variance
  is 0 and ``mu = (mu_R + z_i) / 2``, so ``ES(R, {z_i})`` reduces to

      ES_i = 4 mean_R ||z - mu_R||^2 / ||z_i - mu_R||^2 ,

  R being the retain set without i. High ES: z_i sits inside the retain distribution, where
  Zhao et al. find unlearning hardest (it opposes ``ood``; the rank average weighs both);
- ``ascent_residual``: ``||theta_end - theta_0||`` after gradient descent then ascent on the
  example alone (``influx.commutator.ascent_residual(mode="point")``): how far ascent fails to
  undo the example's own descent.

Ranks are fractions in [0, 1] (``scipy.stats.rankdata``, ties averaged); the combined ``score``
is their (weighted) mean over the components defined for the example.

:func:`verify` unlearns the top-k and random k-sets (gradient ascent, or any method of
``influx.unlearn``) and retrains the oracle without each set; it reports how far each unlearned model ends from its
oracle and a one-sided permutation p-value for "ranked examples end further from the oracle than
random ones".
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from influx import commutator, memorization
from influx.checks import check_choice
from influx.data import LossFn, as_tensors, iter_batches, num_examples
from influx.errors import InfluxValueError
from influx.grads.common import call_loss

Pair = tuple[torch.Tensor, torch.Tensor]
# retrain(forget, retain) and method(model, loss_fn, forget, retain) return a model, or an
# influx.unlearn.UnlearnResult (its .model is used).
Retrain = Callable[[Pair, Pair], Any]
UnlearnMethod = Callable[..., Any]

COMPONENTS = ("memorization", "self_influence", "ood", "entanglement", "ascent_residual")
OOD_METHODS = ("mahalanobis", "knn")

__all__ = [
    "COMPONENTS",
    "Ranking",
    "Verification",
    "embeddings",
    "entanglement",
    "entanglement_score",
    "ood_score",
    "rank",
    "verify",
]


# ---------------------------------------------------------------------------------------------
# Embedding-space components
# ---------------------------------------------------------------------------------------------


def _last_linear(model: nn.Module) -> str:
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise InfluxValueError(
            "model has no nn.Linear layer to take the penultimate embedding from; pass "
            "layer=<module name> (its input is the embedding)"
        )
    return names[-1]


@torch.no_grad()
def embeddings(model: nn.Module, data, *, layer: str | None = None, batch_size: int = 512):
    """Eval-mode inputs of module ``layer`` (default: the last ``nn.Linear``), flattened: [N, D].

    ``data`` (a tuple, Dataset or DataLoader) is streamed ``batch_size`` examples at a time."""
    return _embed(model, data, layer, batch_size)[0]


@torch.no_grad()
def _embed(model: nn.Module, data, layer: str | None, batch_size: int):
    """(embeddings [N, D], targets [N], dataset indices [N]) from one streamed pass."""
    name = layer if layer is not None else _last_linear(model)
    modules = dict(model.named_modules())
    if name not in modules:
        raise InfluxValueError(f"model has no module {name!r}; see model.named_modules()")
    captured: list[torch.Tensor] = []
    handle = modules[name].register_forward_hook(
        lambda module, inputs, output: captured.append(inputs[0].detach().flatten(1))
    )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    targets, indices = [], []
    try:
        for x, y, index in iter_batches(data, batch_size):
            model(x.to(device))
            targets.append(y)
            indices.append(index)
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(captured), torch.cat(targets), torch.cat(indices)


def entanglement_score(retain: torch.Tensor, forget: torch.Tensor) -> float:
    """ES between retain [R, D] and forget [F, D] embeddings (Zhao et al. 2024, docs/architecture.md):

    ``(mean_R ||z - mu_R||^2 + mean_F ||z - mu_F||^2) / (0.5 (||mu_R - mu||^2 +
    ||mu_F - mu||^2))`` with ``mu = (mu_R + mu_F) / 2``.
    """
    if retain.dim() != 2 or forget.dim() != 2 or retain.shape[1] != forget.shape[1]:
        raise InfluxValueError(
            f"retain and forget must be [R, D] and [F, D]; got {tuple(retain.shape)}, "
            f"{tuple(forget.shape)}"
        )
    if retain.shape[0] == 0 or forget.shape[0] == 0:
        raise InfluxValueError("retain and forget must each hold at least one embedding")
    mu_r, mu_f = retain.mean(0), forget.mean(0)
    mu = (mu_r + mu_f) / 2
    within = (retain - mu_r).square().sum(1).mean() + (forget - mu_f).square().sum(1).mean()
    between = 0.5 * ((mu_r - mu).square().sum() + (mu_f - mu).square().sum())
    return float(within / between)


def entanglement(embedded: torch.Tensor, *, retain: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example ES_i = ES(R without i, {z_i}) = 4 mean ||z - mu_R||^2 / ||z_i - mu_R||^2 [N].

    ``embedded`` [N, D]; ``retain`` a bool mask [N] of the retain set (default: every example,
    each one scored against all the others). Leave-one-out means and variances in closed form.
    """
    n = embedded.shape[0]
    mask = (
        torch.ones(n, dtype=torch.bool, device=embedded.device)
        if retain is None
        else torch.as_tensor(retain, dtype=torch.bool).to(embedded.device)
    )
    if mask.shape != (n,):
        raise InfluxValueError(f"retain must be a bool mask [{n}]; got {tuple(mask.shape)}")
    z = embedded.to(torch.float64)
    members = z[mask]
    count = members.shape[0]
    total, total_sq = members.sum(0), members.square().sum()
    # For members of R, drop themselves: sums over R \ {i}.
    own = mask.to(z.dtype)[:, None]
    counts = count - own.squeeze(1)
    if (counts < 2).any():
        raise InfluxValueError("the retain set needs at least 2 examples besides the one scored")
    mu = (total - own * z) / counts[:, None]
    sq = total_sq - own.squeeze(1) * z.square().sum(1)
    # mean ||z - mu||^2 = mean ||z||^2 - ||mu||^2
    variance = sq / counts - mu.square().sum(1)
    distance = (z - mu).square().sum(1)
    return (4 * variance / distance).to(embedded.dtype)


def ood_score(
    embedded: torch.Tensor,
    targets: torch.Tensor,
    *,
    retain: torch.Tensor | None = None,
    method: str = "mahalanobis",
    k: int = 10,
) -> torch.Tensor:
    """Out-of-distribution score [N] of each embedding against the retain set (mask [N],
    default all): ``"mahalanobis"`` (own-class mean, shared within-class covariance) or ``"knn"``
    (distance to the k-th nearest other retain example, normalized embeddings). See the module
    docstring for the formulas."""
    check_choice("method", method, OOD_METHODS)
    n = embedded.shape[0]
    mask = (
        torch.ones(n, dtype=torch.bool, device=embedded.device)
        if retain is None
        else torch.as_tensor(retain, dtype=torch.bool).to(embedded.device)
    )
    z = embedded.to(torch.float64)
    targets = targets.to(embedded.device)
    if method == "mahalanobis":
        classes = targets.unique()
        means = torch.zeros(int(targets.max()) + 1, z.shape[1], dtype=z.dtype, device=z.device)
        for c in classes:
            members = mask & (targets == c)
            if not members.any():
                raise InfluxValueError(f"class {int(c)} has no retain example to take a mean from")
            means[c] = z[members].mean(0)
        centred = z[mask] - means[targets[mask]]
        covariance = centred.T @ centred / centred.shape[0]
        ridge = 1e-6 * covariance.trace().clamp_min(1e-12) / z.shape[1]
        precision_factor = torch.linalg.cholesky(
            covariance + ridge * torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
        )
        offsets = z - means[targets]
        whitened = torch.linalg.solve_triangular(precision_factor, offsets.T, upper=False)
        return whitened.square().sum(0).to(embedded.dtype)
    # method == "knn"
    if not isinstance(k, int) or not 1 <= k < int(mask.sum()):
        raise InfluxValueError(f"k must lie in [1, retain size - 1]; got {k!r}")
    unit = torch.nn.functional.normalize(z, dim=1)
    distances = torch.cdist(unit, unit[mask])
    # An example is not its own neighbour.
    positions = mask.nonzero().flatten()
    distances[positions, torch.arange(positions.numel(), device=z.device)] = float("inf")
    return distances.kthvalue(k, dim=1).values.to(embedded.dtype)


# ---------------------------------------------------------------------------------------------
# The ranking
# ---------------------------------------------------------------------------------------------


def _fraction_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks scaled to [0, 1] (ties averaged); NaN stays NaN."""
    from scipy import stats

    array = values.detach().to(torch.float64).cpu().numpy()
    finite = np.isfinite(array)
    ranks = np.full(array.shape, np.nan)
    if finite.sum() > 1:
        ranks[finite] = (stats.rankdata(array[finite]) - 1) / (finite.sum() - 1)
    elif finite.sum() == 1:
        ranks[finite] = 0.5
    return torch.from_numpy(ranks)


def _positions_by_score(score: torch.Tensor) -> torch.Tensor:
    """Positions [N], highest score first (undefined scores last, ties in position order)."""
    return torch.argsort(score.nan_to_num(-1.0), descending=True, stable=True)


@dataclass(frozen=True)
class Ranking:
    """Components [N] (raw values, high = resists), their fraction ranks [N], the combined
    ``score`` [N] (weighted mean rank, float64, CPU) and ``order`` (dataset indices, most
    resistant first)."""

    components: dict[str, torch.Tensor] = field(repr=False)
    ranks: dict[str, torch.Tensor] = field(repr=False)
    score: torch.Tensor = field(repr=False)
    order: torch.Tensor = field(repr=False)
    weights: dict[str, float]
    config: dict[str, Any] = field(default_factory=dict, repr=False)

    def top(self, k: int) -> torch.Tensor:
        """Dataset indices of the k highest-scoring examples."""
        return self.order[:k]

    @property
    def positions(self) -> torch.Tensor:
        """Like ``order``, as positions in the data the ranking was computed on."""
        return _positions_by_score(self.score)

    def correlations(self) -> dict[tuple[str, str], float]:
        """Spearman correlation of every pair of components (over examples defined in both)."""
        names = list(self.ranks)
        found = {}
        for a in range(len(names)):
            for b in range(a + 1, len(names)):
                x, y = self.ranks[names[a]], self.ranks[names[b]]
                keep = torch.isfinite(x) & torch.isfinite(y)
                found[(names[a], names[b])] = float(
                    np.corrcoef(x[keep].numpy(), y[keep].numpy())[0, 1]
                )
        return found


def _indices(data) -> torch.Tensor:
    """The dataset indices [N] of ``data``: a tuple's own; a Dataset's from one streamed pass."""
    if isinstance(data, (tuple, list)):
        return as_tensors(data)[2]
    return torch.cat([batch[2] for batch in iter_batches(data, 1024)])


def rank(
    model: nn.Module,
    loss_fn: LossFn,
    train,
    *,
    retain: torch.Tensor | None = None,
    memorization_scores: torch.Tensor | None = None,
    influence_method: str = "ekfac",
    influence_options: Mapping[str, Any] | None = None,
    layer: str | None = None,
    ood: str = "mahalanobis",
    knn_k: int = 10,
    ascent_lr: float = 0.1,
    ascent_epochs: int = 1,
    components: Sequence[str] = COMPONENTS,
    weights: Mapping[str, float] | None = None,
    batch_size: int = 512,
) -> Ranking:
    """Rank the examples of ``train`` by how much they are expected to resist unlearning.

    ``retain`` (bool mask [N], default all) is the set the embedding statistics come from.
    ``memorization_scores`` [N] replaces the default curvature proxy. ``components`` chooses
    which of :data:`COMPONENTS` to compute; ``weights`` (default 1 each) weight their ranks.
    See the module docstring for every component.
    """
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown or not components:
        raise InfluxValueError(
            f"components must be a non-empty subset of {COMPONENTS}; got {unknown}"
        )
    check_choice("ood", ood, OOD_METHODS)
    weights = {name: float((weights or {}).get(name, 1.0)) for name in components}
    if any(w < 0 for w in weights.values()) or sum(weights.values()) == 0:
        raise InfluxValueError(f"weights must be >= 0 and not all 0; got {weights}")
    n = num_examples(train)
    if n == 0:
        raise InfluxValueError(
            "train is empty: rank needs the examples to rank (a tuple (inputs, targets), a "
            "Dataset or a DataLoader with at least one example)"
        )
    # A tuple goes on as (inputs, targets); a Dataset or DataLoader is streamed by each component.
    data = tuple(as_tensors(train)[:2]) if isinstance(train, (tuple, list)) else train
    if memorization_scores is not None:
        memorization_scores = torch.as_tensor(memorization_scores, device="cpu")
        if memorization_scores.shape != (n,):
            raise InfluxValueError(f"memorization_scores must be [{n}], aligned to train")
    found: dict[str, torch.Tensor] = {}
    if "memorization" in components:
        found["memorization"] = (
            memorization_scores
            if memorization_scores is not None
            else memorization.curvature(model, loss_fn, data, batch_size=batch_size)
        )
    if "self_influence" in components:
        found["self_influence"] = memorization.self_influence(
            model, loss_fn, data, method=influence_method, **(influence_options or {})
        )
    indices = None
    if "ood" in components or "entanglement" in components:
        embedded, targets, indices = _embed(model, data, layer, batch_size)
        if "ood" in components:
            found["ood"] = ood_score(embedded, targets, retain=retain, method=ood, k=knn_k)
        if "entanglement" in components:
            found["entanglement"] = entanglement(embedded, retain=retain)
    if "ascent_residual" in components:
        found["ascent_residual"] = commutator.ascent_residual(
            model, loss_fn, data, lr=ascent_lr, epochs=ascent_epochs, mode="point"
        ).residual
    if indices is None or isinstance(train, (tuple, list)):
        indices = _indices(train)
    components_cpu = {name: found[name].detach().to(torch.float64).cpu() for name in components}
    ranks = {name: _fraction_ranks(values) for name, values in components_cpu.items()}
    stacked = torch.stack([ranks[name] for name in components])
    weight = torch.tensor([weights[name] for name in components], dtype=torch.float64, device="cpu")
    defined = torch.isfinite(stacked)
    weighted = (stacked.nan_to_num() * weight[:, None]).sum(0)
    score = weighted / (defined * weight[:, None]).sum(0)
    order = indices[_positions_by_score(score)]
    config = dict(
        influence_method=influence_method, ood=ood, knn_k=knn_k, ascent_lr=ascent_lr,
        ascent_epochs=ascent_epochs, layer=layer or _last_linear(model),
        memorization="given" if memorization_scores is not None else "curvature proxy",
    )  # fmt: skip
    return Ranking(components_cpu, ranks, score, order, weights, config)


# ---------------------------------------------------------------------------------------------
# Verification by unlearning
# ---------------------------------------------------------------------------------------------


def _model_of(result) -> nn.Module:
    model = getattr(result, "model", result)
    if not isinstance(model, nn.Module):
        raise InfluxValueError(
            f"retrain and every method must return an nn.Module or an UnlearnResult; got "
            f"{type(result).__name__}"
        )
    return model


def _options_for(name: str, fn: UnlearnMethod, shared: Mapping[str, Any], given: Mapping[str, Any]):
    """The shared settings ``fn`` takes (all of them when it takes ``**options``; newton and ssd
    take no lr or max_steps), then the caller's own options for it, checked by name."""
    parameters = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return {**shared, **given}
    names = {p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(set(given) - names)
    if unknown:
        raise InfluxValueError(
            f"method_options[{name!r}] names options {name} does not take: {unknown}; it takes "
            f"{sorted(names - {'budget'})}"
        )
    return {**{key: value for key, value in shared.items() if key in names}, **given}


def _resolve_methods(methods, lr, max_steps, k, method_options) -> dict[str, UnlearnMethod]:
    """Names of influx.unlearn.METHODS become budget-free calls with the shared settings."""
    if isinstance(methods, Mapping):
        resolved = dict(methods)
    else:
        from influx import unlearn

        resolved = {}
        for name in methods:
            if name not in unlearn.METHODS:
                raise InfluxValueError(
                    f"unknown unlearning method {name!r}; choose from {sorted(unlearn.METHODS)} "
                    "or pass {name: fn(model, loss_fn, forget, retain)}"
                )
            shared = dict(lr=lr, max_steps=max_steps, batch_size=k, progress=False)
            options = _options_for(
                name, unlearn.METHODS[name], shared, dict(method_options.get(name, {}))
            )

            def run(model, loss_fn, forget, retain, fn=unlearn.METHODS[name], options=options):
                return fn(model, loss_fn, forget, retain, budget=math.inf, **options)

            resolved[name] = run
    if not resolved:
        raise InfluxValueError("methods is empty: name at least one unlearning method")
    return resolved


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@torch.no_grad()
def _losses_and_hits(model: nn.Module, loss_fn: LossFn, data):
    """Per-example losses (float64, CPU) and top-1 hits of ``data`` in eval mode: a tuple in one
    batch, a Dataset streamed."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = [tuple(data)] if isinstance(data, tuple) else iter_batches(data, 512)
    losses, hits = [], []
    try:
        for inputs, targets, *_ in batches:
            logits = model(inputs.to(device))
            targets = targets.to(device)
            losses.append(call_loss(loss_fn, logits, targets).double().cpu())
            hits.append((logits.argmax(1) == targets).cpu())
    finally:
        model.train(was_training)
    return torch.cat(losses), torch.cat(hits)


class _Parts:
    """Forget / retain parts of the training data by position: tensors for a tuple (as the
    ``retrain`` callback's tuples), ``Subset`` views of a Dataset (never concatenated)."""

    def __init__(self, train):
        self.tensors = as_tensors(train)[:2] if isinstance(train, (tuple, list)) else None
        self.dataset = train.dataset if isinstance(train, DataLoader) else train

    def __call__(self, positions: torch.Tensor):
        if self.tensors is not None:
            inputs, targets = self.tensors
            return inputs[positions], targets[positions]
        return Subset(self.dataset, positions.tolist())


@dataclass(frozen=True)
class Verification:
    """How far unlearning the ranked top-k and random k-sets ends from the retrain oracle.

    ``rows``: one dict per (forget set, method) with ``param_distance`` ||theta_u - theta_o||,
    ``start_distance`` ||theta_0 - theta_o||, their ratio, forget loss / accuracy of the unlearned
    model, of the oracle and (loss) of the model before unlearning, the gaps, retain and test
    accuracy. ``per_example`` maps (set, method) to the per-example forget-loss gaps
    ``|l_u(i) - l_o(i)|`` [k].

    ``tests``, per method: ``p_value``, the one-sided permutation p-value that the ranked set's
    per-example gaps exceed the random sets' (difference of means), with a bootstrap CI of the
    difference and ``resists`` (p < alpha); ``distance_rank_p``, the fraction of random sets
    whose parameter distance reaches the ranked set's (with one ranked set and R random ones it
    cannot go below 1 / (R + 1)). Examples the model fits worse sit further from the oracle
    before any unlearning, so the gap after unlearning mixes "was far" with "stayed far":
    ``ranked_change`` / ``random_change`` are the mean per-example changes of the gap (after -
    before; negative = unlearning moved the example toward the oracle) and ``change_p_value``
    the one-sided permutation p-value that the ranked set's change is the larger.
    """

    rows: list[dict[str, Any]]
    per_example: dict[tuple[str, str], torch.Tensor] = field(repr=False)
    tests: dict[str, dict[str, Any]]
    forget_sets: dict[str, torch.Tensor] = field(repr=False)

    def summary(self) -> str:
        lines = []
        for method, test in self.tests.items():
            verdict = "resist" if test["resists"] else "do NOT measurably resist"
            lines.append(
                f"{method}: ranked examples {verdict} unlearning more than random ones "
                f"(per-example forget-loss gap to the oracle {test['ranked_gap']:.4g} vs "
                f"{test['random_gap']:.4g}; before unlearning {test['ranked_start_gap']:.4g} vs "
                f"{test['random_start_gap']:.4g}; difference CI [{test['difference_ci'][0]:.4g}, "
                f"{test['difference_ci'][1]:.4g}], permutation p = {test['p_value']:.4g}; "
                f"change of the gap by unlearning {test['ranked_change']:+.4g} vs "
                f"{test['random_change']:+.4g}, p = {test['change_p_value']:.4g}; "
                f"parameter distance {test['ranked_distance']:.4g} vs random mean "
                f"{test['random_distance']:.4g})"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Verification(\n{self.summary()}\n)"


def _permutation_test(ranked: np.ndarray, random: np.ndarray, n_permutations: int, rng):
    """One-sided p-value of mean(ranked) - mean(random) under exchangeable labels."""
    pooled = np.concatenate([ranked, random])
    observed = ranked.mean() - random.mean()
    shuffled = np.stack([rng.permutation(pooled) for _ in range(n_permutations)])
    stats = shuffled[:, : ranked.size].mean(1) - shuffled[:, ranked.size :].mean(1)
    return observed, (1 + np.sum(stats >= observed - 1e-12)) / (1 + n_permutations)


def verify(
    model: nn.Module,
    loss_fn: LossFn,
    train,
    ranking: Ranking | torch.Tensor,
    *,
    retrain: Retrain,
    k: int,
    test=None,
    methods: Sequence[str] | Mapping[str, UnlearnMethod] = ("gradient_ascent",),
    lr: float = 0.01,
    max_steps: int = 10,
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
    n_random: int = 3,
    n_permutations: int = 10_000,
    n_boot: int = 2_000,
    alpha: float = 0.05,
    seed: int = 0,
) -> Verification:
    """Unlearn the ranked top-k and ``n_random`` random k-sets; compare each with its oracle.

    ``model`` is trained on all of ``train``; ``retrain(forget, retain)`` (each a tuple
    (inputs, targets) when ``train`` is a tuple, else a ``Subset`` of its Dataset, which is
    streamed and never concatenated) must return a model trained from scratch on ``retain`` with the recipe,
    initialization and seed that made ``model`` -- e.g. ``lambda f, r: influx.unlearn.retrain(
    model, loss_fn, f, r, epochs=E, init=initial_state, progress=False)`` -- so the oracle
    differs from ``model`` by the removed examples only. ``ranking``: a :class:`Ranking` or
    dataset positions, most resistant first. Random sets are drawn (seeded) from the examples
    outside the top-k.

    ``methods``: names of ``influx.unlearn.METHODS`` (default: gradient ascent), or a mapping
    name -> ``fn(model, loss_fn, forget, retain)`` returning the unlearned model (or an
    UnlearnResult). A named method runs on a copy of ``model`` without a compute budget, for
    ``max_steps`` steps at ``lr`` on batches of k examples; ``method_options[name]`` adds or
    overrides options. Each gets only the settings it takes: the one-step ``newton`` and ``ssd``
    take no ``lr``, ``max_steps`` or ``batch_size``, and their ``method_options`` are checked
    against their keywords before any model is trained.
    """
    n = num_examples(train)
    part = _Parts(train)
    order = (
        ranking.positions
        if isinstance(ranking, Ranking)
        else torch.as_tensor(ranking, device="cpu")
    )
    order = order.to(device="cpu", dtype=torch.long)
    if not isinstance(k, int) or not 1 <= k <= n // 2:
        raise InfluxValueError(f"k must lie in [1, N/2 = {n // 2}]; got {k!r}")
    if not isinstance(n_random, int) or n_random < 1:
        raise InfluxValueError(f"n_random must be a positive integer; got {n_random!r}")
    methods = _resolve_methods(methods, lr, max_steps, k, method_options or {})
    rng = np.random.default_rng(seed)
    ranked = order[:k]
    rest = np.setdiff1d(np.arange(n), ranked.numpy())
    forget_sets = {"ranked": ranked}
    for r in range(n_random):
        forget_sets[f"random_{r}"] = torch.from_numpy(np.sort(rng.choice(rest, k, replace=False)))
    if isinstance(test, (tuple, list)):
        test = tuple(as_tensors(test)[:2])
    theta_0 = _flat(model)
    rows, per_example, start_gaps = [], {}, {}
    for set_name, forget_positions in forget_sets.items():
        keep = torch.ones(n, dtype=torch.bool, device="cpu")
        keep[forget_positions] = False
        forget, retain = part(forget_positions), part(keep.nonzero().flatten())
        oracle = _model_of(retrain(forget, retain))
        theta_o = _flat(oracle)
        oracle_losses, oracle_hits = _losses_and_hits(oracle, loss_fn, forget)
        start_losses, _ = _losses_and_hits(model, loss_fn, forget)
        start_gaps[set_name] = (start_losses - oracle_losses).abs()
        for method_name, method in methods.items():
            unlearned = _model_of(method(copy.deepcopy(model), loss_fn, forget, retain))
            losses, hits = _losses_and_hits(unlearned, loss_fn, forget)
            per_example[(set_name, method_name)] = (losses - oracle_losses).abs()
            row = dict(
                forget_set=set_name, method=method_name, k=k,
                param_distance=float((_flat(unlearned) - theta_o).norm()),
                start_distance=float((theta_0 - theta_o).norm()),
                forget_loss=float(losses.mean()), oracle_forget_loss=float(oracle_losses.mean()),
                start_forget_loss=float(start_losses.mean()),
                forget_acc=float(hits.double().mean()),
                oracle_forget_acc=float(oracle_hits.double().mean()),
                retain_acc=float(_losses_and_hits(unlearned, loss_fn, retain)[1].double().mean()),
            )  # fmt: skip
            row["distance_ratio"] = row["param_distance"] / max(row["start_distance"], 1e-300)
            row["forget_loss_gap"] = abs(row["forget_loss"] - row["oracle_forget_loss"])
            row["forget_acc_gap"] = abs(row["forget_acc"] - row["oracle_forget_acc"])
            if test is not None:
                row["test_acc"] = float(
                    _losses_and_hits(unlearned, loss_fn, test)[1].double().mean()
                )
                row["oracle_test_acc"] = float(
                    _losses_and_hits(oracle, loss_fn, test)[1].double().mean()
                )
            rows.append(row)
    tests = {}
    random_names = [name for name in forget_sets if name != "ranked"]
    for method_name in methods:
        ranked_gaps = per_example[("ranked", method_name)].numpy()
        random_gaps = np.concatenate(
            [per_example[(name, method_name)].numpy() for name in random_names]
        )
        observed, p_value = _permutation_test(ranked_gaps, random_gaps, n_permutations, rng)
        boot = np.array([
            rng.choice(ranked_gaps, ranked_gaps.size).mean()
            - rng.choice(random_gaps, random_gaps.size).mean()
            for _ in range(n_boot)
        ])  # fmt: skip
        distances = {
            r["forget_set"]: r["param_distance"] for r in rows if r["method"] == method_name
        }
        random_distances = np.array([distances[name] for name in random_names])
        # How much each example's gap changed by unlearning (after - before; < 0 = closer).
        ranked_change = ranked_gaps - start_gaps["ranked"].numpy()
        random_change = random_gaps - np.concatenate(
            [start_gaps[name].numpy() for name in random_names]
        )
        _, change_p = _permutation_test(ranked_change, random_change, n_permutations, rng)
        tests[method_name] = dict(
            ranked_gap=float(ranked_gaps.mean()), random_gap=float(random_gaps.mean()),
            ranked_start_gap=float(start_gaps["ranked"].mean()),
            random_start_gap=float(
                torch.cat([start_gaps[name] for name in random_names]).mean()
            ),
            difference=float(observed),
            difference_ci=tuple(float(q) for q in np.quantile(boot, [alpha / 2, 1 - alpha / 2])),
            p_value=float(p_value), resists=bool(p_value < alpha),
            ranked_change=float(ranked_change.mean()), random_change=float(random_change.mean()),
            change_p_value=float(change_p),
            ranked_distance=distances["ranked"], random_distance=float(random_distances.mean()),
            distance_rank_p=float(
                (1 + np.sum(random_distances >= distances["ranked"])) / (1 + len(random_names))
            ),
        )  # fmt: skip
    return Verification(rows, per_example, tests, forget_sets)
