"""Membership inference: the loss-threshold attack and LiRA, with their ROC statistics.

The signal of LiRA and of the forgetting quality is the logit-scaled confidence

    phi(x, y) = log p_y - log(1 - p_y) = z_y - logsumexp_{j != y} z_j        (z the logits),

computed in that second form so that it stays finite when ``p_y`` rounds to 0 or 1.

Scores follow one convention throughout: **larger means "member"**. The loss attack scores an
example by its negated loss; LiRA online by the log-likelihood ratio of IN vs OUT Gaussians; LiRA
offline by the standardized distance above the OUT Gaussian's mean.

TPR at a fixed FPR is read exactly from the empirical ROC curve (every distinct score a threshold,
tied scores decided together): the largest TPR among the points with FPR <= the target, never an
interpolation between points.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn
from torch.func import functional_call, vmap

from influx.checks import check_integer, check_number
from influx.data import LossFn, as_tensors, iter_batches, num_examples
from influx.ensembles import fit_weighted
from influx.errors import InfluxValueError
from influx.grads.common import call_loss, check_class_targets, example_names

__all__ = [
    "LiraResult",
    "MembershipResult",
    "confidence_from_logits",
    "ensemble_confidence",
    "lira",
    "lira_scores",
    "logit_confidence",
    "loss_attack",
    "loss_attack_from_model",
    "membership_metrics",
    "per_example_losses",
    "shadow_masks",
]

DEFAULT_FPRS = (0.01, 0.001)
# Carlini et al. (2022) fit one variance for all examples below this many shadow models.
GLOBAL_VARIANCE_BELOW = 64


# ---------------------------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------------------------


def _class_indices(targets: torch.Tensor, rows: int, classes: int) -> torch.Tensor:
    """``targets`` as int64 class indices [rows], refused unless each is a whole number in
    ``[0, classes)`` (a cast would truncate 1.7 to 1 without a word)."""
    if not isinstance(targets, torch.Tensor) or targets.shape != (rows,):
        got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise InfluxValueError(
            f"targets must be class indices [B] = [{rows}], one per row of the logits; got {got}"
        )
    if targets.is_floating_point() and not bool((targets == targets.round()).all()):
        bad = (targets != targets.round()).nonzero().flatten()[:10].tolist()
        raise InfluxValueError(
            f"targets must be whole class indices; positions {bad} are not (e.g. "
            f"{targets[bad[0]].item()!r}): pass the integer labels"
        )
    index = targets.long()
    if bool(((index < 0) | (index >= classes)).any()):
        raise InfluxValueError(
            f"targets must lie in [0, {classes}) for logits with {classes} classes; got values "
            f"from {int(index.min())} to {int(index.max())}"
        )
    return index


def confidence_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log p_y - log(1 - p_y)`` [..., B] from logits [..., B, C] and class targets [B].

    Equals ``z_y - logsumexp_{j != y} z_j``: no ``log(1 - exp(.))``, finite for any finite logits.
    Half-precision logits are computed in float32. Targets are whole numbers in ``[0, C)`` of any
    dtype (float labels such as 2.0 are taken, 1.7 is refused).
    """
    if logits.dim() < 2 or logits.shape[-1] < 2:
        raise InfluxValueError(
            "the logit-scaled confidence needs logits [..., B, C] with C >= 2 classes; got shape "
            f"{tuple(logits.shape)}"
        )
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    index = _class_indices(targets, logits.shape[-2], logits.shape[-1]).to(logits.device)
    index = index.reshape(*([1] * (logits.dim() - 2)), -1, 1).expand(*logits.shape[:-1], 1)
    true_logit = logits.gather(-1, index).squeeze(-1)
    others = logits.scatter(-1, index, -torch.inf)
    return true_logit - torch.logsumexp(others, dim=-1)


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.no_grad()
def _per_example(
    model: nn.Module, data, batch_size: int, fn, *, classes: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn(outputs, targets)`` [B] over ``data`` in eval mode: values [N] and dataset indices [N].

    Batches run on the model's device; the results go to the device the data's inputs are on.
    ``classes``: ``fn`` reads the targets as class indices, so targets outside ``[0, C)`` are
    refused, naming the examples; otherwise they are diagnosed only when ``fn`` fails on them.
    """
    if num_examples(data) == 0:
        raise InfluxValueError("data is empty")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    values, indices = [], []
    try:
        for inputs, targets, index in iter_batches(data, batch_size):
            outputs = model(inputs.to(device))
            if classes:
                check_class_targets(outputs, targets, indices=index)
            out = call_loss(fn, outputs, targets.to(device), indices=index)
            values.append(out.to(inputs.device))
            indices.append(index)
    finally:
        model.train(was_training)
    values, indices = torch.cat(values), torch.cat(indices)
    bad = (~torch.isfinite(values)).nonzero().flatten()
    if bad.numel():
        raise InfluxValueError(
            f"non-finite values for the examples at dataset indices "
            f"{example_names(bad.cpu(), indices)}: check the model's outputs on them"
        )
    return values, indices


def logit_confidence(
    model: nn.Module, data, *, batch_size: int = 512, return_indices: bool = False
):
    """``log p_y - log(1 - p_y)`` of every example of ``data`` under ``model`` [N], eval mode.

    Entry i belongs to the i-th example of ``data`` (``return_indices=True`` also returns the
    dataset indices [N] the examples carry). The result is on the device of the data's inputs.
    """
    values, indices = _per_example(model, data, batch_size, confidence_from_logits, classes=True)
    return (values, indices) if return_indices else values


def per_example_losses(
    model: nn.Module, loss_fn: LossFn, data, *, batch_size: int = 512, return_indices: bool = False
):
    """``loss_fn(model(x), y)`` of every example of ``data`` [N], eval mode, in data order."""
    values, indices = _per_example(model, data, batch_size, loss_fn)
    return (values, indices) if return_indices else values


@torch.no_grad()
def ensemble_confidence(
    model: nn.Module, params: Mapping[str, torch.Tensor], data, *, batch_size: int = 512
) -> torch.Tensor:
    """The signal of K stacked models (``params`` name -> [K, *shape]) on ``data``: [K, N].

    One ``vmap``-ed ``functional_call`` of ``model`` (its buffers, eval mode) per batch; the models
    run on the device of ``params`` and the result goes to the device of the data's inputs.
    """
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    device = next(iter(params.values())).device

    def forward(p, x):
        return functional_call(model, {**p, **buffers}, (x,))

    was_training = model.training
    model.eval()
    parts = []
    try:
        for inputs, targets, _ in iter_batches(data, batch_size):
            logits = vmap(forward, in_dims=(0, None))(dict(params), inputs.to(device))
            parts.append(confidence_from_logits(logits, targets).to(inputs.device))
    finally:
        model.train(was_training)
    return torch.cat(parts, dim=1)


# ---------------------------------------------------------------------------------------------
# ROC statistics and the loss attack
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MembershipResult:
    """ROC statistics of a membership score (larger = member).

    ``auc``: area under the ROC curve (ties count one half); ``tpr_at_fpr``: target FPR -> the
    largest TPR among ROC points with FPR <= target; ``fpr`` / ``tpr``: the full empirical ROC
    curve (numpy, one point per distinct score); ``scores`` / ``is_member``: what was scored.
    """

    auc: float
    tpr_at_fpr: dict[float, float]
    num_members: int
    num_nonmembers: int
    fpr: np.ndarray = field(repr=False)
    tpr: np.ndarray = field(repr=False)
    scores: torch.Tensor = field(repr=False)
    is_member: torch.Tensor = field(repr=False)

    def __repr__(self) -> str:
        rates = ", ".join(f"TPR@{k:g}={v:.4f}" for k, v in self.tpr_at_fpr.items())
        return (
            f"MembershipResult(auc={self.auc:.4f}, {rates}, members={self.num_members}, "
            f"nonmembers={self.num_nonmembers})"
        )


def _as_numpy(values, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.isfinite(array).all():
        bad = np.flatnonzero(~np.isfinite(array))
        raise InfluxValueError(f"{name} holds NaN or inf at positions {bad[:10].tolist()}")
    return array


def _as_membership(values, name: str) -> np.ndarray:
    """A bool array from bools or from 0 / 1 numbers; anything else is refused (as bool, 2 or
    0.5 would silently count as a member)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values).reshape(-1)
    if array.dtype == bool:
        return array
    if array.dtype.kind not in "iuf" or not np.isin(array, (0, 1)).all():
        numeric = array.dtype.kind in "iuf"
        shown = f"values {np.unique(array)[:10].tolist()}" if numeric else f"dtype {array.dtype}"
        raise InfluxValueError(f"{name} must hold bools or 0 / 1 (1 = member); got {shown}")
    return array.astype(bool)


def membership_metrics(
    scores, is_member, *, fprs: Sequence[float] = DEFAULT_FPRS
) -> MembershipResult:
    """AUC and TPR at each FPR in ``fprs`` of ``scores`` [M] (larger = member) vs ``is_member`` [M]
    (bools, or 0 / 1 with 1 = member).

    The ROC curve is scikit-learn's ``roc_curve`` without dropping points: every distinct score is
    a threshold ("member if score >= threshold"), so tied examples switch together. TPR at a
    target FPR is the largest TPR of a point with FPR <= target (0 if only the origin qualifies).
    """
    score_array = _as_numpy(scores, "scores")
    labels = _as_membership(is_member, "is_member")
    if score_array.shape != labels.shape:
        raise InfluxValueError(
            f"scores and is_member must have the same size; got {score_array.size} and "
            f"{labels.size}"
        )
    members = int(labels.sum())
    if members == 0 or members == labels.size:
        raise InfluxValueError(
            "membership statistics need both members and non-members; got "
            f"{members} members among {labels.size} examples"
        )
    for target in fprs:
        if not 0 <= target <= 1:
            raise InfluxValueError(f"every FPR must lie in [0, 1]; got {target}")
    fpr, tpr, _ = roc_curve(labels, score_array, drop_intermediate=False)
    # fpr is nondecreasing along the curve; the first point is (0, 0).
    rates = {float(t): float(tpr[fpr <= t].max()) for t in fprs}
    return MembershipResult(
        auc=float(roc_auc_score(labels, score_array)),
        tpr_at_fpr=rates,
        num_members=members,
        num_nonmembers=int(labels.size - members),
        fpr=fpr,
        tpr=tpr,
        scores=torch.as_tensor(score_array, device="cpu"),
        is_member=torch.as_tensor(labels, device="cpu"),
    )


def loss_attack(
    member_losses, nonmember_losses, *, fprs: Sequence[float] = DEFAULT_FPRS
) -> MembershipResult:
    """The loss-threshold attack (Yeom et al. 2018): "member" when the loss is below a threshold.

    ``member_losses`` [M1], ``nonmember_losses`` [M0] (any array); the score is ``-loss``.
    """
    members = _as_numpy(member_losses, "member_losses")
    nonmembers = _as_numpy(nonmember_losses, "nonmember_losses")
    scores = -np.concatenate([members, nonmembers])
    labels = np.concatenate([np.ones(members.size, bool), np.zeros(nonmembers.size, bool)])
    return membership_metrics(scores, labels, fprs=fprs)


def loss_attack_from_model(
    model: nn.Module,
    loss_fn: LossFn,
    members,
    nonmembers,
    *,
    batch_size: int = 512,
    fprs: Sequence[float] = DEFAULT_FPRS,
) -> MembershipResult:
    """:func:`loss_attack` on the per-example losses of ``model`` (eval mode) on two data sets."""
    member_losses = per_example_losses(model, loss_fn, members, batch_size=batch_size)
    nonmember_losses = per_example_losses(model, loss_fn, nonmembers, batch_size=batch_size)
    return loss_attack(member_losses, nonmember_losses, fprs=fprs)


# ---------------------------------------------------------------------------------------------
# LiRA
# ---------------------------------------------------------------------------------------------


def shadow_masks(
    num_shadows: int, num_examples: int, *, fraction: float = 0.5, seed: int = 0
) -> torch.Tensor:
    """[K, N] bool on the CPU: each example is IN for exactly ``int(fraction * K)`` shadows.

    The shadows holding an example are a uniformly random subset, drawn independently per example
    from ``seed`` (the scheme of Carlini et al.'s code); shadow training sets then have about
    ``fraction * N`` examples each.
    """
    num_shadows = check_integer("num_shadows", num_shadows, minimum=2)
    check_number("fraction", fraction, above=0, below=1)
    keep = int(fraction * num_shadows)
    if keep == 0 or keep == num_shadows:
        raise InfluxValueError(
            f"fraction {fraction} of {num_shadows} shadows leaves no IN or no OUT shadow per "
            "example; use more shadows or a fraction nearer 0.5"
        )
    generator = torch.Generator(device="cpu").manual_seed(seed)
    draws = torch.rand(num_shadows, num_examples, generator=generator, device="cpu")
    # Ranks of a uniform draw per column: a random permutation of 0..K-1 per example.
    ranks = draws.argsort(dim=0).argsort(dim=0)
    return ranks < keep


def _as_tensor(values) -> torch.Tensor:
    """A detached tensor; arrays and lists land on the CPU."""
    if isinstance(values, torch.Tensor):
        return values.detach()
    return torch.as_tensor(np.asarray(values), device="cpu")


def _gaussian_fit(signals, mask, global_variance: bool, what: str):
    """Per-example mean [N] and standard deviation [N] (or one pooled value) of masked signals."""
    weights = mask.to(signals.dtype)
    counts = weights.sum(0)
    if (counts == 0).any():
        bad = (counts == 0).nonzero().flatten()
        raise InfluxValueError(
            f"the examples at positions {bad[:10].tolist()} have no {what} shadow model; each "
            f"example needs at least one (two without global_variance) — use more shadows or "
            "shadow_masks"
        )
    mean = (signals * weights).sum(0) / counts
    squares = ((signals - mean) ** 2 * weights).sum(0)
    if global_variance:
        std = (squares.sum() / counts.sum()).sqrt().expand_as(mean)
    else:
        if (counts < 2).any():
            bad = (counts < 2).nonzero().flatten()
            raise InfluxValueError(
                f"the examples at positions {bad[:10].tolist()} have a single {what} shadow: a "
                "per-example variance needs two; pass global_variance=True or use more shadows"
            )
        std = (squares / counts).sqrt()
    if global_variance and bool((std == 0).all()):
        # pooled over examples: zero only when no example's shadows differ at all
        fix = (
            f"each example has a single {what} shadow, so there is no spread to pool: use at "
            "least 4 shadows"
            if bool((counts == 1).all())
            else f"the {what} shadows agree exactly on every example: check that they differ"
        )
        raise InfluxValueError(f"the pooled {what} variance is 0: {fix}")
    if (std == 0).any():
        bad = (std == 0).nonzero().flatten()
        raise InfluxValueError(
            f"the {what} shadows agree exactly on the examples at positions {bad[:10].tolist()} "
            "(zero variance); pass global_variance=True"
        )
    return mean, std


def _gaussian_logpdf(x, mean, std):
    return -0.5 * ((x - mean) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)


def _resolve_global(global_variance: bool | Literal["auto"], num_shadows: int) -> bool:
    if global_variance == "auto":
        return num_shadows < GLOBAL_VARIANCE_BELOW
    if not isinstance(global_variance, bool):
        raise InfluxValueError(
            f"global_variance must be True, False or 'auto'; got {global_variance!r}"
        )
    return global_variance


def lira_scores(
    target_signal,
    shadow_signals,
    in_mask,
    *,
    online: bool = True,
    global_variance: bool | Literal["auto"] = "auto",
) -> torch.Tensor:
    """LiRA membership scores (Carlini et al. 2022) from precomputed signals; larger = member.

    - ``target_signal`` [N] or [T, N]: the signal ``log p_y - log(1 - p_y)`` of each example under
      the target model(s);
    - ``shadow_signals`` [K, N]: the same under K shadow models; ``in_mask`` [K, N] bool: whether
      shadow k trained on example n.

    Per example, Gaussians are fitted to the IN and OUT shadow signals (mean; variance with
    denominator the count). ``online=True`` scores ``log N(s; mu_in, sd_in^2) - log N(s; mu_out,
    sd_out^2)``; ``online=False`` (only OUT shadows used) scores ``(s - mu_out) / sd_out``, the
    one-sided test, rank-equivalent to the paper's ``Phi((s - mu_out) / sd_out)`` without its
    saturation at 1. With ``global_variance`` the IN (and the OUT) variance is pooled over all
    examples, ``sum (s - mu_n)^2 / count``, one value each; ``"auto"`` pools below 64 shadows,
    as the paper advises. (Carlini et al.'s code uses medians for the means and, for the fixed
    variance, the spread of all IN signals around their grand mean for both; here the means are
    means and the pooled variances are within-example.) The result has the target's shape, on the
    device of the shadow signals.
    """
    shadows = _as_tensor(shadow_signals).to(torch.float64)
    target = _as_tensor(target_signal).to(device=shadows.device, dtype=torch.float64)
    mask = _as_tensor(in_mask).to(shadows.device)
    if shadows.dim() != 2:
        raise InfluxValueError(f"shadow_signals must be [K, N]; got shape {tuple(shadows.shape)}")
    if mask.shape != shadows.shape or mask.dtype != torch.bool:
        raise InfluxValueError(
            f"in_mask must be a bool [K, N] = {tuple(shadows.shape)} array; got "
            f"{mask.dtype} {tuple(mask.shape)}"
        )
    if target.dim() not in (1, 2) or target.shape[-1] != shadows.shape[1]:
        raise InfluxValueError(
            f"target_signal must be [N] or [T, N] with N = {shadows.shape[1]}; got shape "
            f"{tuple(target.shape)}"
        )
    for name, values in (("shadow_signals", shadows), ("target_signal", target)):
        bad = (~torch.isfinite(values.reshape(-1, values.shape[-1]))).any(0).nonzero().flatten()
        if bad.numel():
            raise InfluxValueError(f"{name} holds NaN or inf for examples {bad[:10].tolist()}")
    pooled = _resolve_global(global_variance, shadows.shape[0])
    mean_out, std_out = _gaussian_fit(shadows, ~mask, pooled, "OUT")
    if not online:
        return (target - mean_out) / std_out
    mean_in, std_in = _gaussian_fit(shadows, mask, pooled, "IN")
    return _gaussian_logpdf(target, mean_in, std_in) - _gaussian_logpdf(target, mean_out, std_out)


@dataclass(frozen=True)
class LiraResult:
    """What :func:`lira` computed.

    - ``scores`` [T, N]: LiRA scores of the N examples against each of T targets (larger =
      member); ``target_signals`` [T, N]; ``shadow_signals`` [K, N]; ``in_mask`` [K, N];
    - ``metrics``: ROC statistics over all (target, example) pairs when the targets' membership
      was given, else None (``auc`` and ``tpr_at_fpr`` forward to it);
    - ``online``, ``global_variance``: the variant that ran; ``config``: the training settings.
    """

    scores: torch.Tensor = field(repr=False)
    target_signals: torch.Tensor = field(repr=False)
    shadow_signals: torch.Tensor = field(repr=False)
    in_mask: torch.Tensor = field(repr=False)
    metrics: MembershipResult | None
    online: bool
    global_variance: bool
    config: dict[str, Any] = field(repr=False)

    @property
    def auc(self) -> float | None:
        return None if self.metrics is None else self.metrics.auc

    @property
    def tpr_at_fpr(self) -> dict[float, float] | None:
        return None if self.metrics is None else self.metrics.tpr_at_fpr


def _target_signals(model, targets, data, batch_size: int) -> torch.Tensor:
    """[T, N] signals of the target(s): a module, a sequence of modules, or stacked parameters."""
    if isinstance(targets, nn.Module):
        return logit_confidence(targets, data, batch_size=batch_size).unsqueeze(0)
    if isinstance(targets, Mapping):
        return ensemble_confidence(model, targets, data, batch_size=batch_size)
    if isinstance(targets, Sequence) and targets and all(isinstance(t, nn.Module) for t in targets):
        return torch.stack([logit_confidence(t, data, batch_size=batch_size) for t in targets])
    raise InfluxValueError(
        "targets must be an nn.Module, a non-empty sequence of them, or stacked parameters "
        f"(name -> [T, *shape]); got {type(targets).__name__}"
    )


def lira(
    model: nn.Module,
    loss_fn: LossFn,
    data,
    targets,
    *,
    num_shadows: int,
    steps: int,
    lr: float,
    target_members=None,
    online: bool = True,
    global_variance: bool | Literal["auto"] = "auto",
    seed: int = 0,
    init: Mapping[str, torch.Tensor] | None = None,
    chunk: int = 32,
    batch_size: int = 512,
    fprs: Sequence[float] = DEFAULT_FPRS,
    shadow_trainer: Callable[[torch.Tensor], Mapping[str, torch.Tensor]] | None = None,
) -> LiraResult:
    """LiRA end to end: train K shadow models on random halves of ``data``, score the targets.

    ``model`` is the architecture (its parameters, or ``init``, start every shadow);
    ``loss_fn(outputs, targets)`` -> [B] the training loss; ``data`` the N candidate examples
    (the shadows train on subsets of them, full batch, so they must fit in memory).
    :func:`shadow_masks` puts each example IN for half of the ``num_shadows`` shadows (seeded);
    :func:`influx.ensembles.fit_weighted` trains them all at once (vmapped full-batch Adam on the
    summed loss of their subset, ``steps`` steps at ``lr``, ``chunk`` copies at a time); pass
    ``shadow_trainer(in_mask [K, N]) -> {name: [K, *shape]}`` to train them another way (they
    should be trained like the targets). ``targets``: the attacked model(s) — a module, a sequence
    of modules, or stacked parameters [T, ...] evaluated through ``model``. With
    ``target_members`` ([N] or [T, N] bool: which examples each target trained on) the result
    carries AUC and TPR at ``fprs`` over all (target, example) pairs. See :func:`lira_scores` for
    ``online`` and ``global_variance``.
    """
    n = num_examples(data)
    if n == 0:
        raise InfluxValueError("data is empty")
    check_integer("steps", steps, minimum=1)
    check_number("lr", lr, above=0)
    pooled = _resolve_global(global_variance, num_shadows)
    masks = shadow_masks(num_shadows, n, seed=seed)
    if shadow_trainer is None:
        # full-batch training: every step reads every example, so the set is held whole
        inputs, labels, _ = as_tensors(data)
        reference = next(model.parameters())
        params = fit_weighted(
            model,
            loss_fn,
            (inputs.to(reference.device), labels.to(reference.device)),
            masks.to(device=reference.device, dtype=reference.dtype),
            init=init,
            steps=steps,
            lr=lr,
            chunk=chunk,
        )
    else:
        params = dict(shadow_trainer(masks))
    shadow = ensemble_confidence(model, params, data, batch_size=batch_size)
    target = _target_signals(model, targets, data, batch_size).to(shadow.device)
    scores = lira_scores(
        target, shadow, masks.to(shadow.device), online=online, global_variance=pooled
    )
    metrics = None
    if target_members is not None:
        members = _as_membership(target_members, "target_members")
        if members.size not in (n, scores.numel()):
            raise InfluxValueError(
                f"target_members must be [N] or [T, N] = {tuple(scores.shape)}; got "
                f"{members.size} values"
            )
        members = np.broadcast_to(members.reshape(-1, n), tuple(scores.shape))
        metrics = membership_metrics(scores.flatten(), members.flatten(), fprs=fprs)
    config = dict(
        num_shadows=num_shadows, steps=steps, lr=lr, seed=seed, chunk=chunk,
        trainer="fit_weighted" if shadow_trainer is None else repr(shadow_trainer),
    )  # fmt: skip
    return LiraResult(
        scores=scores,
        target_signals=target,
        shadow_signals=shadow,
        in_mask=masks.to(shadow.device),
        metrics=metrics,
        online=online,
        global_variance=pooled,
        config=config,
    )
