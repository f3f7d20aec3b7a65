"""Forgetting quality: the (eps, delta)-unlearning estimate of the NeurIPS 2023 unlearning competition.

The rules are those of the competition's released evaluation (google-deepmind/unlearning_evaluation,
``metric.py`` and ``main.py``); the computation here is vectorized over examples and thresholds
(rates come from counts by binary search in the sorted signals, not from an [models, thresholds]
comparison table) and runs on the device of its inputs.

Per forget example, the signal ``s = log p_y - log(1 - p_y)`` (:func:`influx.audit.mia.logit_confidence`)
of N unlearned models is compared with that of N models retrained without the forget set. For a
decision rule with false-positive rate FPR and false-negative rate FNR (between the two groups of
models), an (eps, delta) guarantee requires

    eps >= max(log(1 - delta - FPR) - log FNR,  log(1 - delta - FNR) - log FPR),

and the example's epsilon is the largest such value over a family of threshold rules. The score of
an example is ``2^-j`` when its epsilon lies in the bucket ``[j/2, (j+1)/2)`` (j < B), 0 beyond; the
forgetting quality F is the mean score over the forget set.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from influx.checks import check_count_or_none, check_number
from influx.errors import InfluxValueError

__all__ = [
    "ForgettingQuality",
    "bucket_points",
    "bucket_scores",
    "example_epsilons",
    "final_score",
    "forgetting_quality",
]

DELTA = 1e-5
EPSILON_CAP = 50.0
THRESHOLDS_PER_UNIT = 100
# The interval rule scans its right end over [max - 2, max + 2] of the peakier group and, for each,
# its left end over a window of +-2 around ``right - width``.
INTERVAL_BUFFER = 2.0
LEFT_THRESHOLDS = int(math.ceil(2 * INTERVAL_BUFFER * THRESHOLDS_PER_UNIT))
SPREAD_RATIO = 0.01
BUCKET_WIDTH = 0.5
# Thresholds (times examples) evaluated at once: bounds the working memory to ~10 float64 arrays
# of this many entries (~0.3 GB); one example's interval rule alone has ~1.6e5 thresholds.
_CHUNK_ELEMENTS = 2**22


@dataclass(frozen=True)
class ForgettingQuality:
    """The forgetting quality of an unlearning method against retraining.

    - ``epsilons`` [E]: per forget example, the estimated epsilon in ``[0, 50]``;
    - ``example_scores`` [E]: its bucket score (1, 1/2, 1/4, ... or 0);
    - ``score``: F, the mean of ``example_scores``;
    - ``bucket_edges`` [B + 1]: ``0, 0.5, ..., B/2``; ``bucket_points`` [B]: ``1, 1/2, ...``;
      ``bucket_counts`` [B + 1]: examples per bucket, the last entry those beyond ``B/2`` (score 0);
    - ``spread_capped`` [E]: examples given the cap by the spread rule (see
      :func:`example_epsilons`);
    - ``num_models``: N, the number of unlearned (= retrained) models; ``delta``.

    Tensors live on the device of the signals passed in.
    """

    epsilons: torch.Tensor = field(repr=False)
    example_scores: torch.Tensor = field(repr=False)
    score: float
    bucket_edges: torch.Tensor = field(repr=False)
    bucket_points: torch.Tensor = field(repr=False)
    bucket_counts: torch.Tensor = field(repr=False)
    spread_capped: torch.Tensor = field(repr=False)
    num_models: int
    delta: float

    def __repr__(self) -> str:
        return (
            f"ForgettingQuality(score={self.score:.4f}, examples={self.epsilons.numel()}, "
            f"models={self.num_models}, buckets={self.bucket_points.numel()}, "
            f"median_eps={self.epsilons.median().item():.3g}, "
            f"capped={int((self.epsilons >= EPSILON_CAP).sum())})"
        )


def bucket_points(num_models: int) -> torch.Tensor:
    """Scores ``1, 1/2, 1/4, ...`` of the width-0.5 epsilon buckets for N models [B], on the CPU.

    The buckets cover ``[0, ceil(ln(N - 1)))``: B = 2 ceil(ln(N - 1)) (14 for N = 512, 0 for N = 2,
    when every example scores 0). An epsilon at or beyond ``B/2`` scores 0.
    """
    if num_models < 2:
        raise InfluxValueError(f"the forgetting quality needs at least 2 models; got {num_models}")
    max_epsilon = math.ceil(math.log(num_models - 1))
    count = int(max_epsilon / BUCKET_WIDTH)
    return 0.5 ** torch.arange(count, dtype=torch.float64, device="cpu")


def _bucket_of(epsilons: torch.Tensor, count: int) -> torch.Tensor:
    # e in [j/2, (j+1)/2) <=> floor(2 e) = j (exact: dividing by 0.5 is a power-of-two scaling);
    # everything from count/2 on shares the last index, which scores 0. Clamped before the cast:
    # inf or anything beyond 2^63 would not convert to int64 (CPUs give -2^63, bucket 0).
    return torch.floor(epsilons / BUCKET_WIDTH).clamp(0, count).long()


def bucket_scores(epsilons, num_models: int) -> torch.Tensor:
    """Score of each epsilon [E] for N models: ``2^-j`` on ``[j/2, (j+1)/2)``, ``j < B``; else 0.

    Epsilons must be >= 0 (as :func:`example_epsilons` returns them; inf scores 0); a result on
    the epsilons' device, float64.
    """
    epsilons = _as_float64(epsilons).reshape(-1)
    if torch.isnan(epsilons).any():
        raise InfluxValueError("epsilons hold NaN")
    if (epsilons < 0).any():
        raise InfluxValueError(
            f"epsilons must be >= 0 (as example_epsilons returns them); got minimum "
            f"{epsilons.min().item():g}"
        )
    points = bucket_points(num_models).to(epsilons.device)
    padded = torch.cat([points, points.new_zeros(1)])
    return padded[_bucket_of(epsilons, points.numel())]


def _as_float64(values) -> torch.Tensor:
    """A float64 tensor on the device of ``values`` (the CPU for numpy arrays and lists)."""
    if isinstance(values, torch.Tensor):
        return values.detach().to(torch.float64)
    return torch.as_tensor(np.asarray(values, dtype=np.float64), device="cpu")


def _as_signals(values, name: str) -> torch.Tensor:
    signals = _as_float64(values)
    if signals.dim() != 2:
        raise InfluxValueError(
            f"{name} must be [models, examples] (the signal of each forget example under each "
            f"model); got shape {tuple(signals.shape)}"
        )
    bad = (~torch.isfinite(signals)).any(dim=0).nonzero().flatten()
    if bad.numel():
        raise InfluxValueError(
            f"{name} holds NaN or inf for the examples at positions {bad[:10].tolist()}"
            f"{' ...' if bad.numel() > 10 else ''}; check the models' logits on those examples"
        )
    return signals


def _median_sorted(values: torch.Tensor) -> torch.Tensor:
    """numpy's median of rows already sorted [E, N]: the middle value, or the mean of the two."""
    n = values.shape[1]
    if n % 2:
        return values[:, n // 2]
    return (values[:, n // 2 - 1] + values[:, n // 2]) / 2


def _numpy_linspace(start: torch.Tensor, stop: torch.Tensor, num: torch.Tensor, width: int):
    """``numpy.linspace(start, stop, num)`` row by row, bit for bit: ``i * step + start``, last = stop.

    ``start``, ``stop`` [...], ``num`` [...] (>= 2) -> values [..., width] and the mask of valid
    positions ``i < num``; positions beyond ``num`` hold ``stop``.
    """
    i = torch.arange(width, dtype=torch.float64, device=start.device)
    step = (stop - start) / (num - 1).to(torch.float64)
    values = i * step.unsqueeze(-1) + start.unsqueeze(-1)
    positions = torch.arange(width, device=start.device)
    last = positions >= (num - 1).unsqueeze(-1)
    values = torch.where(last, stop.unsqueeze(-1), values)
    return values, positions < num.unsqueeze(-1)


def _count_below(sorted_rows: torch.Tensor, thresholds: torch.Tensor, *, inclusive: bool):
    """Per row, how many of the sorted values are < (or <= when inclusive) each threshold."""
    shape = thresholds.shape
    flat = thresholds.reshape(shape[0], -1).contiguous()
    return torch.searchsorted(sorted_rows, flat, right=inclusive).reshape(shape)


def _epsilon_table(num_models: int, delta: float, device: torch.device) -> torch.Tensor:
    """Epsilon of a threshold by its error counts: ``table[fp * (N + 1) + fn]``, [(N + 1)^2].

    Both counts 0 (perfect separation) -> inf; exactly one 0 -> -inf (the threshold is discarded);
    otherwise the larger of the two log ratios whose ``1 - delta - rate`` is >= 0, floored at 0
    (-inf, discarded, when neither is). A threshold's epsilon depends on its counts only, so the
    ~1e5 thresholds of an example gather from this table instead of taking logs.
    """
    counts = torch.arange(num_models + 1, dtype=torch.float64, device=device)
    false_pos, false_neg = counts.unsqueeze(1), counts.unsqueeze(0)
    fpr, fnr = false_pos / num_models, false_neg / num_models
    # log of a negative number is NaN and fmax ignores one NaN: the kit's nanmax of the two terms.
    epsilon = torch.fmax(
        torch.log(1 - delta - fpr) - torch.log(fnr), torch.log(1 - delta - fnr) - torch.log(fpr)
    ).clamp_min(0.0)
    one_zero = (false_pos == 0) | (false_neg == 0)
    epsilon = torch.where(one_zero | torch.isnan(epsilon), -torch.inf, epsilon)
    return torch.where((false_pos == 0) & (false_neg == 0), torch.inf, epsilon).flatten()


def _best(table, false_pos, false_neg, valid) -> torch.Tensor:
    """Largest epsilon over the kept thresholds [c, T] (-inf when none is kept)."""
    keys = false_pos * int(round(math.sqrt(table.numel()))) + false_neg
    return torch.where(valid, table[keys], -torch.inf).amax(dim=-1)


def _interval_counts(pos, neg, pos_range, neg_range):
    """Error counts of the interval (two-threshold) rule for a chunk of examples.

    ``pos``, ``neg`` [c, N] sorted rows -> false positives, false negatives and validity [c, T].
    """
    num_models = pos.shape[1]
    # The positive class of this rule is the peakier group (smaller range; ties: the negatives);
    # a signal inside [left, right] (both ends included) is predicted positive.
    swap = (pos_range >= neg_range).unsqueeze(1)
    peaky, other = torch.where(swap, neg, pos), torch.where(swap, pos, neg)
    width = torch.minimum(pos_range, neg_range)
    low = peaky[:, 0] + width - INTERVAL_BUFFER
    high = peaky[:, -1] + INTERVAL_BUFFER
    num_right = torch.ceil((high - low) * THRESHOLDS_PER_UNIT).long()
    right, right_valid = _numpy_linspace(low, high, num_right, int(num_right.max()))
    centre = right - width.unsqueeze(1)
    num_left = torch.full_like(centre, LEFT_THRESHOLDS, dtype=torch.long)
    left, _ = _numpy_linspace(
        centre - INTERVAL_BUFFER, centre + INTERVAL_BUFFER, num_left, LEFT_THRESHOLDS
    )

    def inside(rows):
        # [c, R, L]: how many of the sorted rows fall in [left, right].
        at_most_right = _count_below(rows, right, inclusive=True).unsqueeze(-1)
        return (at_most_right - _count_below(rows, left, inclusive=False)).clamp_min(0)

    false_pos = inside(other)
    false_neg = num_models - inside(peaky)
    valid = right_valid.unsqueeze(-1).expand_as(false_pos)
    return false_pos.flatten(1), false_neg.flatten(1), valid.flatten(1)


def _single_counts(pos, neg):
    """Error counts of the single-threshold rule: [c, N] sorted rows -> three [c, T]."""
    num_models = pos.shape[1]
    low = torch.minimum(pos[:, 0], neg[:, 0])
    high = torch.maximum(pos[:, -1], neg[:, -1])
    counts = torch.ceil((high - low) * THRESHOLDS_PER_UNIT).long().tolist()
    width = max(max(counts), 1)
    # The kit's grid is torch.linspace in the default float32 on the CPU; built the same way so
    # that signals exactly on a grid point fall on the same side.
    grid = torch.zeros(len(counts), width, dtype=torch.float64, device="cpu")
    for row, (start, stop, count) in enumerate(zip(low.tolist(), high.tolist(), counts)):
        grid[row, :count] = torch.linspace(start, stop, count, dtype=torch.float32, device="cpu")
    grid = grid.to(pos.device)
    valid = torch.arange(width, device=pos.device) < torch.as_tensor(
        counts, device=pos.device
    ).unsqueeze(1)
    # A signal >= threshold is predicted positive (the group with the larger median).
    false_neg = _count_below(pos, grid, inclusive=False)
    false_pos = num_models - _count_below(neg, grid, inclusive=False)
    return false_pos, false_neg, valid


def _roles(unlearned: torch.Tensor, retrained: torch.Tensor):
    """Sorted positive and negative rows [E, N] (positive: the larger median) and their ranges."""
    u_sorted = unlearned.T.contiguous().sort(dim=1).values
    r_sorted = retrained.T.contiguous().sort(dim=1).values
    retrain_positive = (_median_sorted(r_sorted) > _median_sorted(u_sorted)).unsqueeze(1)
    pos = torch.where(retrain_positive, r_sorted, u_sorted)
    neg = torch.where(retrain_positive, u_sorted, r_sorted)
    return pos, neg, pos[:, -1] - pos[:, 0], neg[:, -1] - neg[:, 0]


def example_epsilons(
    unlearned, retrained, *, delta: float = DELTA, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example epsilon [E] and the spread-capped mask [E], by the competition's rules.

    ``unlearned``, ``retrained``: [N, E] signals of the forget examples under N models each. For
    every example:

    1. Roles. The *positive* group is the one with the larger median over models (numpy's median:
       the mean of the two middle values for even N); on a tie, the unlearned models.
    2. Spread rule. With the range (max - min) of each group, if ``smallest / largest < 0.01`` the
       epsilon is the cap, 50 (one group is far peakier than the other). When both ranges are 0,
       the ratio is 0/0 (NaN) and the rule does not fire.
    3. Single-threshold rule: a signal ``>= t`` is predicted positive; ``t`` runs over
       ``ceil(100 (max - min))`` points of ``torch.linspace(min, max)`` in float32 over both groups
       (no threshold when the groups share one value).
    4. Interval rule: the peakier group (smaller range; on equal ranges the negative group) is the
       positive class and a signal in ``[left, right]`` (ends included) is predicted positive. With
       ``min``, ``max``, ``w`` its smallest value, largest value and range, ``right`` runs over
       ``numpy.linspace(a, b, ceil(100 (b - a)))`` with ``a = min + w - 2``, ``b = max + 2``
       (400 or 401 points, as ``min + w`` is ``max`` up to rounding), and for each ``right``,
       ``left`` over ``numpy.linspace(right - w - 2, right - w + 2, 400)``: ~1.6e5 intervals.
    5. Per threshold, with FPR / FNR the error rates (counts / N):
       FPR = FNR = 0 (perfect separation) gives inf; exactly one of them 0 discards the threshold
       (too few samples to tell); otherwise ``max(log(1 - delta - FPR) - log FNR,
       log(1 - delta - FNR) - log FPR)`` where a term with ``1 - delta - rate < 0`` (log of a
       negative) is left out, the threshold discarded when both are, and the value floored at 0.
    6. The example's epsilon is the largest over the kept thresholds of both rules, clipped to
       ``[0, 50]`` (so perfect separation gives 50).

    Deviations from the released code, none of which changes a rule: rates and logs are in
    float64 (the kit's rates are float32, so epsilons agree to ~1e-6 relative); an example with no
    kept threshold (both groups one identical constant) gets epsilon 0, where the released code
    stops at an assertion; the released ``assert`` on a numpy array of surviving thresholds raises
    for more than one of them unless Python runs with ``-O``, and the evident intent (the maximum)
    is followed.
    ``chunk_size`` examples are processed at once (default: as many as fit ~4e6 thresholds).
    """
    unlearned = _as_signals(unlearned, "unlearned")
    retrained = _as_signals(retrained, "retrained").to(unlearned.device)
    if unlearned.shape != retrained.shape:
        raise InfluxValueError(
            "unlearned and retrained must have the same shape [models, examples] (the same "
            f"number of models of each kind, as in the competition); got {tuple(unlearned.shape)} "
            f"and {tuple(retrained.shape)}"
        )
    num_models, num_examples = unlearned.shape
    if num_examples == 0:
        raise InfluxValueError(
            "the forgetting quality needs at least one forget example; the signals are "
            f"{tuple(unlearned.shape)} [models, examples]"
        )
    if num_models < 2:
        raise InfluxValueError(f"the forgetting quality needs at least 2 models; got {num_models}")
    check_number("delta", delta, at_least=0, below=1)
    chunk_size = check_count_or_none("chunk_size", chunk_size)

    # [E, N], each row sorted: ranges, medians and rates (by binary search) all come from it.
    pos, neg, pos_range, neg_range = _roles(unlearned, retrained)
    largest = torch.maximum(pos_range, neg_range)
    smallest = torch.minimum(pos_range, neg_range)
    spread_capped = smallest / largest < SPREAD_RATIO

    epsilons = torch.full((num_examples,), EPSILON_CAP, dtype=torch.float64, device=pos.device)
    todo = (~spread_capped).nonzero().flatten()
    table = _epsilon_table(num_models, delta, pos.device)
    per_example = (2 * INTERVAL_BUFFER * THRESHOLDS_PER_UNIT + 1) * LEFT_THRESHOLDS
    step = chunk_size or max(1, int(_CHUNK_ELEMENTS // per_example))
    for block in todo.split(step) if todo.numel() else ():
        p, q = pos[block], neg[block]
        best = torch.maximum(
            _best(table, *_interval_counts(p, q, pos_range[block], neg_range[block])),
            _best(table, *_single_counts(p, q)),
        )
        # No kept threshold (-inf) happens only for two identical constant groups: epsilon 0.
        epsilons[block] = best.clamp(0.0, EPSILON_CAP)
    return epsilons, spread_capped


def forgetting_quality(
    unlearned, retrained, *, delta: float = DELTA, chunk_size: int | None = None
) -> ForgettingQuality:
    """The competition's forgetting quality F of ``unlearned`` against ``retrained`` models.

    ``unlearned``, ``retrained``: [N, E] arrays (numpy or torch, any device) of the signal
    ``log p_y - log(1 - p_y)`` of the E forget examples under N unlearned and N retrained models
    (:func:`influx.audit.mia.logit_confidence` per model, stacked; it is exact where the kit's
    ``log(p + 1e-45)`` form saturates near +-103.6, which only widens the single-threshold grid). Per-example epsilons follow
    :func:`example_epsilons`; an epsilon in ``[j/2, (j+1)/2)`` scores ``2^-j`` for
    ``j < B = 2 ceil(ln(N - 1))`` and 0 beyond (:func:`bucket_points`; N = 2 gives no bucket, so
    F = 0); ``F`` is the mean score. Identical distributions give epsilons near 0 and F near 1; a
    perfectly separated example gets 50 and scores 0.
    """
    epsilons, spread_capped = example_epsilons(
        unlearned, retrained, delta=delta, chunk_size=chunk_size
    )
    num_models = len(unlearned)
    points = bucket_points(num_models).to(epsilons.device)
    count = points.numel()
    if count == 0:
        warnings.warn(
            f"with {num_models} models there is no epsilon bucket: every example scores 0",
            stacklevel=2,
        )
    example_scores = bucket_scores(epsilons, num_models)
    bucket = _bucket_of(epsilons, count)
    edges = BUCKET_WIDTH * torch.arange(count + 1, dtype=torch.float64, device=epsilons.device)
    return ForgettingQuality(
        epsilons=epsilons,
        example_scores=example_scores,
        score=float(example_scores.mean()),
        bucket_edges=edges,
        bucket_points=points,
        bucket_counts=torch.bincount(bucket, minlength=count + 1),
        spread_capped=spread_capped,
        num_models=num_models,
        delta=delta,
    )


def _mean_accuracy(values: float | Sequence[float] | np.ndarray | torch.Tensor, name: str):
    array = np.asarray(
        values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64
    )
    if array.size == 0 or not np.isfinite(array).all():
        raise InfluxValueError(f"{name} must be non-empty and finite; got {values!r}")
    if ((array < 0) | (array > 1)).any():
        raise InfluxValueError(
            f"{name}: accuracies must be fractions in [0, 1] (not percentages); got {values!r}"
        )
    return float(array.mean())


def final_score(
    forgetting: ForgettingQuality | float,
    retain_acc_unlearned,
    retain_acc_retrained,
    test_acc_unlearned,
    test_acc_retrained,
) -> float:
    """The competition's final score ``F * (retain ratio) * (test ratio)``.

    Each accuracy argument is a number or an array over models; as in the competition, each is
    averaged over models first: ``F * (mean retain acc unlearned / mean retain acc retrained) *
    (mean test acc unlearned / mean test acc retrained)``. The ratios are not capped at 1.
    Accuracies are fractions in [0, 1], as in :func:`influx.audit.utility.tug_of_war`.
    """
    score = forgetting.score if isinstance(forgetting, ForgettingQuality) else float(forgetting)
    if not 0.0 <= score <= 1.0:
        raise InfluxValueError(
            f"forgetting must be a ForgettingQuality or its score F in [0, 1]; got {score!r}"
        )
    retain_u = _mean_accuracy(retain_acc_unlearned, "retain_acc_unlearned")
    retain_r = _mean_accuracy(retain_acc_retrained, "retain_acc_retrained")
    test_u = _mean_accuracy(test_acc_unlearned, "test_acc_unlearned")
    test_r = _mean_accuracy(test_acc_retrained, "test_acc_retrained")
    if retain_r <= 0 or test_r <= 0:
        raise InfluxValueError(
            "the retrained models' mean retain and test accuracies must be > 0 (they divide); "
            f"got {retain_r} and {test_r}"
        )
    return score * (retain_u / retain_r) * (test_u / test_r)
