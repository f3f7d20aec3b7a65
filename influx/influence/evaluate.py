"""Evaluations of influence scores: LDS, mislabel detection, retraining ground truth, agreement.

* :func:`lds` — linear datamodeling score (Park et al. 2023): train m models on random subsets
  S_j (fraction alpha), predict each query's loss under S_j by the additive group influence
  ``-sign * sum_{i in S_j} score(q, i)`` (higher = larger predicted loss), and report the Spearman
  correlation with the measured losses across subsets, averaged over queries, with a bootstrap
  interval over queries.
* :func:`mislabel_auc` — rank train points by self-influence; AUC of finding the flipped labels
  (given by dataset index) and the fraction of them found among the top k.
* :func:`retrain_ground_truth` — upweight a train point by eps in the mean loss, warm-start retrain
  and measure the change of each query loss; I_up,loss predicts ``eps * I_up,loss``.
  :func:`strongest_pairs` picks the (query, train) pairs to retrain for.
* :func:`agreement` — Spearman (pooled and per query) and top-k overlap between two score matrices.

The subset and retrain models are trained together as one vmapped ensemble (``torch.func``) with
full-batch Adam on per-model example weights, so m models cost about one batched run. Data
arguments follow the package convention: a tuple ``(inputs, targets[, indices])``, a Dataset or a
DataLoader. Query losses stream; the training set of the subset and retrain models is held whole,
since full-batch training reads all of it at every step (these are small-scale evaluations).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from torch import nn
from torch.func import functional_call, vmap

from influx import ensembles
from influx.data import as_tensors, iter_batches
from influx.errors import InfluxValueError
from influx.grads.common import LossFn, check_finite

# Query examples per forward of every ensemble member at once.
LOSS_BATCH = 1024

# --------------------------------------------------------------------------------------------------
# A weighted ensemble trainer: K models, one objective each, sum_i w_ki l(model_k, z_i)
# --------------------------------------------------------------------------------------------------


def ensemble_losses(
    model: nn.Module,
    loss_fn: LossFn,
    stacked: Mapping[str, torch.Tensor],
    data,
    *,
    batch_size: int = LOSS_BATCH,
) -> torch.Tensor:
    """Per-example losses of every ensemble member on ``data`` (any data argument, streamed
    ``batch_size`` examples at a time): [K, M]."""
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    parts = []
    with torch.no_grad():
        for inputs, targets, _ in iter_batches(data, batch_size):

            def losses(params, inputs=inputs, targets=targets):
                return loss_fn(functional_call(model, {**params, **buffers}, (inputs,)), targets)

            parts.append(vmap(losses)(dict(stacked)))
    if not parts:
        raise InfluxValueError("the query set is empty: pass at least one example")
    return torch.cat(parts, dim=1)


# --------------------------------------------------------------------------------------------------
# Agreement between score matrices
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Agreement:
    """Spearman pooled over all pairs and averaged per query, and mean top-k overlap (by |score|
    of the reference's most positive and most negative entries)."""

    spearman_pooled: float
    spearman_per_query: float
    top_k_overlap: float
    k: int

    def __repr__(self) -> str:
        return (
            f"Agreement(pooled={self.spearman_pooled:.3f}, per_query={self.spearman_per_query:.3f}, "
            f"top{self.k}={self.top_k_overlap:.2f})"
        )


def agreement(scores: torch.Tensor, reference: torch.Tensor, *, k: int = 10) -> Agreement:
    """Compare ``scores`` [Q, N] with ``reference`` [Q, N] (same sign convention)."""
    if scores.shape != reference.shape:
        raise InfluxValueError(
            f"score shapes differ: {tuple(scores.shape)} vs {tuple(reference.shape)}"
        )
    a, b = scores.detach().double().cpu().numpy(), reference.detach().double().cpu().numpy()
    pooled = spearmanr(a.ravel(), b.ravel()).statistic
    per_query = np.nanmean([spearmanr(a[i], b[i]).statistic for i in range(a.shape[0])])
    overlaps = []
    for i in range(a.shape[0]):
        ours = set(np.argsort(-np.abs(a[i]))[:k])
        theirs = set(np.argsort(-np.abs(b[i]))[:k])
        overlaps.append(len(ours & theirs) / k)
    return Agreement(float(pooled), float(per_query), float(np.mean(overlaps)), k)


# --------------------------------------------------------------------------------------------------
# Linear datamodeling score
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LDSResult:
    """Mean over queries of the Spearman correlation across subsets, with a bootstrap interval."""

    mean: float
    interval: tuple[float, float]
    per_query: np.ndarray = field(repr=False)
    num_subsets: int = 0
    fraction: float = 0.0

    def __repr__(self) -> str:
        return (
            f"LDSResult(mean={self.mean:.3f}, 95% CI=[{self.interval[0]:.3f}, {self.interval[1]:.3f}], "
            f"m={self.num_subsets}, alpha={self.fraction})"
        )


@dataclass(frozen=True)
class SubsetModels:
    """Measured query losses [m, Q] of models trained on subsets given by ``masks`` [m, N]."""

    masks: torch.Tensor
    query_losses: torch.Tensor


def train_subset_models(
    model: nn.Module,
    loss_fn: LossFn,
    train,
    query,
    *,
    num_subsets: int = 100,
    fraction: float = 0.5,
    steps: int = 300,
    lr: float = 1e-2,
    init: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> SubsetModels:
    """Train ``num_subsets`` models on random subsets (full-batch Adam, shared ``init``).

    ``masks`` [m, N] are over the positions of ``train`` (the columns of a score matrix)."""
    if num_subsets < 2:
        raise InfluxValueError(
            f"num_subsets must be >= 2 for a rank correlation; got {num_subsets}"
        )
    if not 0 < fraction < 1:
        raise InfluxValueError(f"fraction must be in (0, 1); got {fraction}")
    inputs, targets, _ = as_tensors(train)
    n = inputs.shape[0]
    size = round(fraction * n)
    # Subsets drawn on a CPU generator (the same on every device), the masks on the data's device.
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(num_subsets, n, dtype=inputs.dtype, device=inputs.device)
    for j in range(num_subsets):
        chosen = torch.randperm(n, generator=generator, device="cpu")[:size]
        masks[j, chosen.to(inputs.device)] = 1.0
    stacked = ensembles.fit_weighted(
        model, loss_fn, (inputs, targets), masks / size, init=init, steps=steps, lr=lr
    )
    return SubsetModels(masks, ensemble_losses(model, loss_fn, stacked, query))


def lds(
    scores,
    subsets: SubsetModels,
    *,
    sign: float | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
) -> LDSResult:
    """LDS of ``scores`` ([Q, N] tensor, or :class:`Scores`) against models trained on subsets.

    Build ``subsets`` once with :func:`train_subset_models` (defaults m = 100, alpha = 0.5) and
    score every method against them. Predicted loss of query q under subset S:
    ``-sign * sum_{i in S} scores[q, i]`` (sign -1 for I_up,loss, where a negative score marks a
    helpful point whose presence lowers the loss; +1 for tracin / grad_dot / grad_cos). A
    :class:`Scores` carries its sign; a plain tensor needs ``sign=`` (default -1).

    Non-finite scores or losses raise an error naming the queries. A query whose predicted or
    measured losses are constant across subsets has no rank correlation: it is left out of the
    mean with a warning (never counted as 0).
    """
    if not isinstance(scores, torch.Tensor):  # a Scores, which carries its sign
        if sign is None:
            sign = scores.sign
        scores = scores.values
        if scores is None:
            raise InfluxValueError("lds needs the [Q, N] score values: score with dense=True")
    sign = -1.0 if sign is None else sign
    check_finite(scores, "scores")
    predicted = -sign * (subsets.masks.to(scores) @ scores.T)  # [m, Q]
    measured = subsets.query_losses.to(predicted)
    check_finite(measured.T, "measured subset-model losses")
    predicted, measured = predicted.cpu().numpy(), measured.cpu().numpy()
    per_query = np.array(
        [
            spearmanr(predicted[:, q], measured[:, q]).statistic
            if np.ptp(predicted[:, q]) > 0 and np.ptp(measured[:, q]) > 0
            else np.nan
            for q in range(scores.shape[0])
        ]
    )
    undefined = np.flatnonzero(np.isnan(per_query))
    if undefined.size == per_query.size:
        raise InfluxValueError(
            "no query has a rank correlation: every query's predicted or measured losses are "
            "constant across subsets (all-zero scores, or subset models that did not train)"
        )
    if undefined.size:
        warnings.warn(
            f"{undefined.size} of {per_query.size} queries (positions {undefined[:10].tolist()}) "
            "have constant predicted or measured losses across subsets: left out of the LDS mean",
            stacklevel=2,
        )
        per_query = per_query[~np.isnan(per_query)]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, per_query.size, size=(bootstrap, per_query.size))
    means = per_query[draws].mean(axis=1)
    interval = (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))
    return LDSResult(
        float(per_query.mean()),
        interval,
        per_query,
        subsets.masks.shape[0],
        float(subsets.masks[0].mean()),
    )


# --------------------------------------------------------------------------------------------------
# Mislabel detection by self-influence
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MislabelResult:
    """AUC of separating flipped from clean labels by a score (higher = more suspicious) and the
    fraction of flipped labels found among the top ``k`` for each k in ``checked``."""

    auc: float
    checked: np.ndarray = field(repr=False)
    found: np.ndarray = field(repr=False)

    def found_at(self, fraction_checked: float) -> float:
        k = int(round(fraction_checked * self.checked[-1]))
        return float(self.found[max(0, min(k, self.found.size) - 1)])

    def __repr__(self) -> str:
        return (
            f"MislabelResult(auc={self.auc:.4f}, found@10%={self.found_at(0.1):.2f}, "
            f"found@20%={self.found_at(0.2):.2f})"
        )


def _flipped_positions(flipped, indices, size: int) -> torch.Tensor:
    """Positions in the scores [size] of the dataset indices ``flipped``; each must be one of
    ``indices`` (the dataset index of every score; default positions 0..size-1)."""
    if size == 0:
        raise InfluxValueError("scores are empty: pass one score per train example")
    flipped = torch.as_tensor(flipped, device="cpu")
    if flipped.dtype == torch.bool or flipped.is_floating_point() or flipped.is_complex():
        raise InfluxValueError(
            f"flipped must hold dataset indices (integers); got dtype {flipped.dtype}: for a "
            "mask over the examples pass mask.nonzero().flatten()"
        )
    flipped = flipped.flatten().long()
    indices_given = indices
    if indices is None:
        indices = torch.arange(size, device="cpu")
    indices = torch.as_tensor(indices, device="cpu").flatten().long()
    if indices.numel() != size or torch.unique(indices).numel() != size:
        raise InfluxValueError(
            f"indices must hold the {size} distinct dataset indices of the scores; got "
            f"{indices.numel()} ({torch.unique(indices).numel()} distinct)"
        )
    ordered, order = indices.sort()
    at = torch.searchsorted(ordered, flipped).clamp_max(size - 1)
    unknown = flipped[ordered[at] != flipped]
    if unknown.numel():
        known = f"0..{size - 1}" if indices_given is None else "those of indices="
        raise InfluxValueError(
            f"flipped holds {unknown.numel()} index(es) that no score has, e.g. "
            f"{unknown[:5].tolist()}: flipped takes dataset indices ({known}; a negative "
            "position is not one)"
        )
    return order[at]


def mislabel_auc(scores: torch.Tensor, flipped, *, indices=None) -> MislabelResult:
    """Rank train points by ``scores`` [N] (e.g. self-influence); AUC of the flipped labels.

    ``flipped`` holds the *dataset indices* of the flipped examples (``dataset.flipped`` of
    :func:`influx.data.flip_labels`), like every index in influx. ``indices`` [N] gives the
    dataset index of each score (``fitted.train_indices`` of the fit, ``Scores.train_indices``);
    default the positions 0..N-1, which they are for data that carries no indices. An index
    that no score has (a negative one included) is refused.
    """
    from sklearn.metrics import roc_auc_score

    scores = torch.as_tensor(scores, device="cpu").detach().double().numpy()
    if not np.isfinite(scores).all():
        raise InfluxValueError(
            f"scores of examples {np.flatnonzero(~np.isfinite(scores))[:10].tolist()} are NaN/inf"
        )
    labels = np.zeros(scores.size, dtype=bool)
    labels[_flipped_positions(flipped, indices, scores.size).numpy()] = True
    if labels.all() or not labels.any():
        raise InfluxValueError("flipped must hold some but not all train indices")
    order = np.argsort(-scores, kind="stable")
    found = np.cumsum(labels[order]) / labels.sum()
    return MislabelResult(
        float(roc_auc_score(labels, scores)), np.arange(1, scores.size + 1), found
    )


# --------------------------------------------------------------------------------------------------
# Ground truth by warm-start retraining
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrainResult:
    """Measured query-loss changes [P] of (query, train) ``pairs`` [P, 2] after upweighting the
    train point by ``epsilon`` in the mean loss, relative to retraining without upweighting."""

    pairs: torch.Tensor
    measured: torch.Tensor
    epsilon: float

    def compare(self, scores: torch.Tensor, *, sign: float = -1.0) -> dict[str, float]:
        """Sign agreement and Pearson of ``epsilon * I_up,loss`` predictions with the measurement.

        For sign +1 scores (TracIn-like, positive = helpful) the prediction is ``-epsilon * score``.
        """
        # Upweighting by epsilon changes the loss by epsilon * I_up,loss (sign -1 scores), or by
        # -epsilon * score for sign +1 scores (positive = helpful).
        predicted = -sign * self.epsilon * scores[self.pairs[:, 0], self.pairs[:, 1]]
        predicted = predicted.detach().double().cpu().numpy()
        measured = self.measured.detach().double().cpu().numpy()
        return {
            "sign_agreement": float(np.mean(np.sign(predicted) == np.sign(measured))),
            "pearson": float(pearsonr(predicted, measured).statistic),
        }


def strongest_pairs(
    reference: torch.Tensor, *, queries: int = 5, per_query: int = 12
) -> torch.Tensor:
    """(query, train) pairs [queries * per_query, 2]: for each of the first ``queries`` rows of
    ``reference`` [Q, N], the train points with the largest |influence| on that query.

    Chosen per query on purpose: a train point that is strong for another query often has a
    near-zero effect on this one, and the sign of a near-zero retraining effect is noise.
    """
    if reference.dim() != 2 or not 0 < queries <= reference.shape[0]:
        raise InfluxValueError(
            f"reference must be [Q, N] with Q >= queries={queries} > 0; got {tuple(reference.shape)}"
        )
    per_query = min(per_query, reference.shape[1])
    top = reference[:queries].abs().topk(per_query, dim=1).indices  # [queries, per_query]
    rows = torch.arange(queries, device=top.device).unsqueeze(1).expand_as(top)
    return torch.stack([rows, top], -1).reshape(-1, 2)


def retrain_ground_truth(
    model: nn.Module,
    loss_fn: LossFn,
    train,
    query,
    pairs: torch.Tensor,
    *,
    epsilon: float | None = None,
    steps: int = 300,
    lr: float = 1e-3,
) -> RetrainResult:
    """Upweight each distinct train point of ``pairs`` [P, 2] and retrain.

    ``pairs`` holds (query position, train position): a row and a column of the score matrix, as
    :func:`strongest_pairs` gives them. Every run starts from the model's parameters (warm start) and runs ``steps`` full-batch Adam
    steps on ``(1/N) sum_i l_i + epsilon * l_z``; a run with epsilon = 0 is the baseline, so drift
    from an imperfectly converged model cancels. Default epsilon: -1/N (leave z out).
    """
    inputs, targets, _ = as_tensors(train)
    n = inputs.shape[0]
    epsilon = -1.0 / n if epsilon is None else float(epsilon)
    pairs = torch.as_tensor(pairs, dtype=torch.long, device=inputs.device)
    points = torch.unique(pairs[:, 1])
    weights = torch.full((points.numel() + 1, n), 1.0 / n, dtype=inputs.dtype, device=inputs.device)
    weights[torch.arange(1, points.numel() + 1, device=inputs.device), points] += epsilon
    stacked = ensembles.fit_weighted(model, loss_fn, (inputs, targets), weights, steps=steps, lr=lr)
    losses = ensemble_losses(model, loss_fn, stacked, query)  # [1 + points, Q]
    row = {int(p): j + 1 for j, p in enumerate(points)}
    measured = torch.stack([losses[row[int(z)], int(q)] - losses[0, int(q)] for q, z in pairs])
    return RetrainResult(pairs, measured, epsilon)
