"""A markdown report with plots of per-example scores: what ``influx-score`` writes as report.md.

:func:`write_report` takes score columns aligned to the dataset indices (name -> [N]) and writes

    report.md                  tables and the figures below, with a short reading guide
    report/histograms.png      each score with the tail fits of influx.tails: log-log survival
                               with log-normal / gamma / exponential and a power-law tail for a
                               non-negative score, log density with normal / Laplace / t /
                               Cauchy for a signed one (best by AIC; Hill tail index), else the
                               plain histogram
    report/top_examples.png    the top-k examples of each score as an image grid
    report/spearman.png        Spearman rank correlations between the scores
    report/per_class.png       per-class means of each score (z-scored across classes)
    report/planted.png         with ``planted=`` (flipped labels, poisons): the top examples of
                               the score that finds each planted kind best, planted ones framed

With ``planted=``, the report opens with how well each score finds each planted kind: ROC AUC
and the precision among its top k for k = the number planted, beside the base rate.

The report holds no timings: the same scores give the same files, byte for byte (the PNGs are
rendered by matplotlib's Agg canvas without a pyplot state or a global backend change).
"""

from __future__ import annotations

import io
import itertools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from influx import tails
from influx.errors import InfluxValueError
from influx.store import atomic_write_bytes, atomic_write_text

FIGURES = "report"
# Images larger than this many examples per score are not drawn (a grid stays readable).
MAX_TOP_K = 32
# Score columns shown in the image grid (one row each).
MAX_GRID_ROWS = 8
# Scores whose notable examples are the lowest (a small margin or confidence marks a hard or
# mislabeled example); the others' are the highest.
ASCENDING = ("margin", "mem_confidence")
# Frame colours of the planted kinds in report/planted.png, in the order they are given.
PLANTED_COLOURS = ("#d62728", "#ff7f0e", "#9467bd", "#2ca02c", "#8c564b")

__all__ = ["Detection", "planted_detection", "spearman_matrix", "tail_fits", "write_report"]


def _save(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    # No "Software" entry: the file does not change with the matplotlib version.
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    atomic_write_bytes(path, buffer.getvalue())


def _fmt(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4g}"


def spearman_matrix(columns: Mapping[str, np.ndarray]) -> np.ndarray:
    """[S, S] Spearman correlations of the score columns, each pair over the rows where both are
    finite (a score defined on some rows only, like GUS on the poisoned ones, does not shrink the
    other pairs); NaN where fewer than 3 such rows remain or a column is constant there."""
    from scipy.stats import spearmanr

    names = list(columns)
    values = [np.asarray(columns[n], dtype=np.float64) for n in names]
    result = np.eye(len(names))
    for i, j in itertools.combinations(range(len(names)), 2):
        both = np.isfinite(values[i]) & np.isfinite(values[j])
        if both.sum() < 3:
            result[i, j] = result[j, i] = np.nan
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a constant column: NaN, as documented
            result[i, j] = result[j, i] = spearmanr(values[i][both], values[j][both]).statistic
    return result


@dataclass(frozen=True)
class Detection:
    """How well one score finds one planted kind, over the ``examples`` where the score is finite.

    The score ranks the examples from its suspicious end (largest first, smallest first for the
    scores in ``ascending``). ``auc``: the probability that a planted example ranks above a clean
    one, ties counting one half (0.5 is chance); ``precision``: the planted share of the ``k``
    top-ranked examples, ``k = planted`` (a tie across the k-th place shares its slots in
    proportion, the expectation over the orders of the tie); ``base_rate = planted / examples``,
    what a random ranking gets. NaN where undefined (no planted or no clean example there).
    """

    score: str
    kind: str
    examples: int
    planted: int
    auc: float
    precision: float
    base_rate: float


def _suspicion(name: str, values: np.ndarray, ascending: Sequence[str]) -> np.ndarray:
    """The values oriented so that larger is more suspicious (the end the report lists first)."""
    values = np.asarray(values, dtype=np.float64)
    return -values if name in ascending else values


def _precision_at_k(oriented: np.ndarray, mask: np.ndarray, k: int) -> float:
    """Planted share of the k largest values, a tie across the k-th place counted in proportion."""
    threshold = np.sort(oriented)[::-1][k - 1]
    above, tied = oriented > threshold, oriented == threshold
    slots = k - int(above.sum())
    return float((mask[above].sum() + slots * mask[tied].mean()) / k)


def _check_planted(planted: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    masks = {}
    for kind, mask in planted.items():
        mask = np.asarray(mask)
        if mask.dtype != bool or mask.shape != (size,):
            raise InfluxValueError(
                f"planted[{kind!r}] must be a boolean mask with one entry per example ({size}); "
                f"got dtype {mask.dtype}, shape {mask.shape}: pass np.isin(np.arange({size}), "
                "planted_indices)"
            )
        if not mask.any() or mask.all():
            raise InfluxValueError(
                f"planted[{kind!r}] marks {int(mask.sum())} of {size} examples: it must mark "
                "some but not all of them (leave out a kind that was not planted)"
            )
        masks[str(kind)] = mask
    return masks


def planted_detection(
    columns: Mapping[str, np.ndarray],
    planted: Mapping[str, np.ndarray],
    *,
    ascending: Sequence[str] = ASCENDING,
) -> list[Detection]:
    """How well each score finds each planted kind: one :class:`Detection` per (kind, score).

    ``planted``: kind -> boolean mask [N] (e.g. ``{"flipped": ..., "poisoned": ...}``); each
    score is judged over the examples where it is finite (GUS is defined on the poisoned ones
    only), ranked from the end the report lists first.
    """
    from sklearn.metrics import roc_auc_score

    sizes = {np.asarray(values).shape for values in columns.values()}
    if len(sizes) != 1 or len(next(iter(sizes))) != 1:
        raise InfluxValueError(f"score columns must share one shape [N]; got {sorted(sizes)}")
    masks = _check_planted(planted, next(iter(sizes))[0])
    found = []
    for kind, mask in masks.items():
        for name, values in columns.items():
            oriented = _suspicion(name, values, ascending)
            finite = np.isfinite(oriented)
            oriented, hits = oriented[finite], mask[finite]
            count = int(hits.sum())
            auc = precision = math.nan
            if 0 < count < hits.size:
                auc = float(roc_auc_score(hits, oriented))
            if count:
                precision = _precision_at_k(oriented, hits, count)
            base = count / hits.size if hits.size else math.nan
            found.append(Detection(name, kind, int(hits.size), count, auc, precision, base))
    return found


def tail_fits(values: np.ndarray) -> dict[str, Any] | None:
    """influx.tails' maximum-likelihood fits of ``values`` (no bootstrap), or None.

    The families follow the sign of the values (``influx.tails.choose_support``): log-normal,
    gamma and exponential (on the positive values) plus a power-law tail for non-negative
    scores; normal, Laplace, Student-t and Cauchy for signed ones. Returns ``{"support":
    "positive" | "real", "fits": [(name, frozen scipy law, AIC)] best first (degenerate fits
    left out), "best": name, "hill": alpha, "power_law": (alpha, x_min, tail fraction) or None,
    "zero_fraction": share of exact zeros}``; None when influx.tails cannot
    fit these values (e.g. all equal), in which case the report shows the plain histogram.
    """
    try:
        with warnings.catch_warnings():
            # tied scores (memorization) collapse a t / Cauchy fit: it is left out below, and
            # the report need not warn about it
            warnings.simplefilter("ignore", UserWarning)
            fitted = tails.fit(values, bootstrap=0)
    except InfluxValueError:
        return None
    fits = sorted((f for f in fitted.fits.values() if not f.degenerate), key=lambda f: f.aic)
    power = fitted.power_law
    return {
        "support": fitted.support,
        "fits": [(f.name, f.dist, f.aic) for f in fits],
        "best": fitted.best,
        "hill": float(fitted.hill.alpha),
        "power_law": None if power is None else (power.alpha, power.x_min, power.tail_fraction),
        "zero_fraction": fitted.zero_fraction,
    }


def _survival_panel(axis, values: np.ndarray, fitted: dict[str, Any]) -> None:
    """Log-log P(X > x) of the positive values with the three best fits and the power law."""
    x = np.sort(values[values > 0])
    axis.loglog(x, 1.0 - np.arange(x.size) / x.size, "k.", ms=2, label="empirical")
    grid = np.geomspace(x[0], x[-1], 200)
    for family, law, _ in fitted["fits"][:3]:
        axis.loglog(grid, law.sf(grid), lw=1.2, label=family)
    if fitted["power_law"] is not None:
        alpha, x_min, share = fitted["power_law"]
        tail = grid[grid >= x_min]
        axis.loglog(tail, share * (tail / x_min) ** (1 - alpha), "k--", lw=1.2,
                    label=f"power law ({alpha:.2f})")  # fmt: skip
    axis.set_ylim(0.5 / x.size, 1.5)
    axis.set_ylabel("P(X > x), x > 0", fontsize=8)


def _density_panel(axis, values: np.ndarray, fitted: dict[str, Any] | None) -> None:
    """Histogram on a log density axis floored at half a count per bin, with the best fits."""
    bins = min(60, max(10, values.size // 20))
    _, edges, _ = axis.hist(values, bins=bins, density=True, color="#4c72b0")
    if fitted:
        grid = np.linspace(values.min(), values.max(), 400)
        for family, law, _ in fitted["fits"][:3]:
            axis.plot(grid, law.pdf(grid), lw=1.2, label=family)
    axis.set_yscale("log")
    floor = 0.5 / (values.size * (edges[1] - edges[0]))  # no axis running down to 1e-93
    axis.set_ylim(bottom=floor)


def _histograms(columns: Mapping[str, np.ndarray], path: Path) -> dict[str, dict[str, Any]]:
    """One panel per score: log-log survival with the fits for a non-negative score, log density
    with the fits for a signed one; returns each score's tail fit."""
    names = list(columns)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    figure = Figure(figsize=(4.2 * cols, 3.0 * rows), layout="constrained")
    found: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(names):
        axis = figure.add_subplot(rows, cols, k + 1)
        values = np.asarray(columns[name], dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size == 0:
            axis.set_title(f"{name} (no finite values)")
            continue
        fitted = tail_fits(values)
        if fitted and fitted["support"] == "positive":
            _survival_panel(axis, values, fitted)
        else:
            _density_panel(axis, values, fitted)
        if fitted:
            axis.legend(fontsize=7)
            found[name] = fitted
        axis.set_title(name, fontsize=10)
        axis.tick_params(labelsize=8)
    _save(figure, path)
    return found


def _top_positions(values: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest finite values, largest first (ties: lower position first)."""
    finite = np.flatnonzero(np.isfinite(values))
    order = np.lexsort((finite, -values[finite]))
    return finite[order[:k]]


def _mosaic(tiles: list[np.ndarray]) -> tuple[np.ndarray, int]:
    """Images [H, W] or [H, W, 3] side by side on white, 1/16 of a width apart; and the step."""
    rgb = [np.repeat(t[..., None], 3, axis=2) if t.ndim == 2 else t for t in tiles]
    gap = max(1, rgb[0].shape[1] // 16)
    height = max(t.shape[0] for t in rgb)
    width = sum(t.shape[1] for t in rgb) + gap * (len(rgb) - 1)
    canvas = np.ones((height, width, 3))
    x = 0
    for tile in rgb:
        canvas[: tile.shape[0], x : x + tile.shape[1]] = np.clip(tile, 0.0, 1.0)
        x += tile.shape[1] + gap
    return canvas, rgb[0].shape[1] + gap


def _grid(
    rows: Sequence[tuple[str, np.ndarray, np.ndarray]],
    targets: np.ndarray,
    images: Callable[[int], np.ndarray],
    class_names: Sequence[str] | None,
    k: int,
    path: Path,
    marks: Mapping[str, np.ndarray] | None = None,
) -> None:
    """One row per (label, values, positions): the images at ``positions`` as one mosaic, each
    captioned with index, label and value; those in a ``marks`` mask framed in its colour."""
    marks = marks or {}
    colours = dict(zip(marks, itertools.cycle(PLANTED_COLOURS)))
    # inches per row and above the first: a marked caption has a third line (the kinds)
    step, top_margin = (1.85, 0.3) if marks else (1.6, 0.0)
    height = top_margin + step * len(rows)
    figure = Figure(figsize=(1.1 * k + 1.2, height))
    for row, (label, values, top) in enumerate(rows):
        tiles = [images(int(position)) for position in top]
        bottom = 1 - (top_margin + (row + 0.8) * step) / height
        axis = figure.add_axes((0.1, bottom, 0.88, 0.6 * step / height))
        canvas, width = _mosaic(tiles)
        axis.imshow(canvas, interpolation="nearest")
        for col, position in enumerate(top):
            target = int(targets[position])
            caption = f"#{int(position)} {class_names[target] if class_names else target}"
            caption += f"\n{values[position]:.3g}"
            kinds = [kind for kind, mask in marks.items() if mask[position]]
            if kinds:
                tile_height, tile_width = tiles[col].shape[:2]
                frame = Rectangle((col * width - 0.5, -0.5), tile_width, tile_height,
                                  fill=False, edgecolor=colours[kinds[0]], lw=2.5, clip_on=False)  # fmt: skip
                axis.add_patch(frame)
                caption += "\n" + ", ".join(kinds)
            axis.text(col * width + width / 2, -1, caption, ha="center", va="bottom", fontsize=7,
                      color=colours[kinds[0]] if kinds else "black")  # fmt: skip
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_ylabel(label, fontsize=8)
    _save(figure, path)


def _image_grid(
    columns: Mapping[str, np.ndarray],
    targets: np.ndarray,
    images: Callable[[int], np.ndarray],
    class_names: Sequence[str] | None,
    k: int,
    path: Path,
    ascending: Sequence[str],
) -> dict[str, list[int]]:
    """One row per score: its top-k images as one mosaic, captioned with index, label, value."""
    rows, tops = [], {}
    for name in list(columns)[:MAX_GRID_ROWS]:
        values = np.asarray(columns[name], dtype=np.float64)
        top = _top_positions(_suspicion(name, values, ascending), k)
        tops[name] = [int(i) for i in top]
        rows.append((name + (" (lowest)" if name in ascending else ""), values, top))
    _grid(rows, targets, images, class_names, k, path)
    return tops


def _best_detections(found: Sequence[Detection]) -> dict[str, Detection]:
    """Per planted kind, the score with the highest AUC (the first listed among equals), among
    the scores defined on the most examples: an AUC over the few examples where a score like
    GUS is defined says little about finding the planted ones among all."""
    widest = max(d.examples for d in found)
    best: dict[str, Detection] = {}
    for d in found:
        if d.examples == widest and math.isfinite(d.auc):
            if d.kind not in best or d.auc > best[d.kind].auc:
                best[d.kind] = d
    return best


def _kinds_by_score(best: Mapping[str, Detection]) -> dict[str, list[str]]:
    """The best scores, each with the kinds it finds best: one picture row per score."""
    kinds: dict[str, list[str]] = {}
    for kind, d in best.items():
        kinds.setdefault(d.score, []).append(kind)
    return kinds


def _text_colour(rgba: Sequence[float]) -> str:
    """Black or white, whichever contrasts more with a cell of colour ``rgba`` (WCAG 2 relative
    luminance; the two are equal at luminance 0.179). A transparent cell (NaN) shows the white
    figure behind it: black."""
    if len(rgba) > 3 and rgba[3] == 0:
        return "black"
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3]]
    luminance = 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    return "white" if 1.05 / (luminance + 0.05) > (luminance + 0.05) / 0.05 else "black"


def _heatmap_figure(matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], *, title: str,
                    annotations: np.ndarray, symmetric: bool) -> Figure:  # fmt: skip
    figure = Figure(
        figsize=(1.2 + 0.9 * len(cols), 1.0 + 0.45 * len(rows) + 0.8), layout="constrained"
    )
    axis = figure.add_subplot(1, 1, 1)
    limit = np.nanmax(np.abs(matrix)) if np.isfinite(matrix).any() else 1.0
    limit = 1.0 if symmetric else max(float(limit), 1e-12)
    image = axis.imshow(matrix, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    axis.set_xticks(range(len(cols)), cols, rotation=40, ha="right", fontsize=8)
    axis.set_yticks(range(len(rows)), rows, fontsize=8)
    for i in range(len(rows)):
        for j in range(len(cols)):
            colour = _text_colour(image.cmap(image.norm(matrix[i, j])))
            axis.text(j, i, _fmt(annotations[i, j]), ha="center", va="center", fontsize=7,
                      color=colour)  # fmt: skip
    axis.set_title(title, fontsize=10)
    figure.colorbar(image, ax=axis, shrink=0.8)
    return figure


def _heatmap(matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], path: Path,
             **options) -> None:  # fmt: skip
    _save(_heatmap_figure(matrix, rows, cols, **options), path)


def _per_class(
    columns: Mapping[str, np.ndarray], targets: np.ndarray
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Classes present, their counts [K] and per-class means [K, S] (finite values only)."""
    classes = sorted(int(c) for c in np.unique(targets))
    counts = np.array([(targets == c).sum() for c in classes])
    means = np.full((len(classes), len(columns)), np.nan)
    for j, name in enumerate(columns):
        values = np.asarray(columns[name], dtype=np.float64)
        for i, c in enumerate(classes):
            chosen = values[(targets == c) & np.isfinite(values)]
            if chosen.size:
                means[i, j] = chosen.mean()
    return classes, counts, means


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _count(number: int, one: str, many: str) -> str:
    return f"{number} {one if number == 1 else many}"


def _planted_section(
    found: Sequence[Detection],
    masks: Mapping[str, np.ndarray],
    names: Sequence[str],
    ascending: Sequence[str],
) -> list[str]:
    """Markdown: what was planted, one table row per (kind, score) best AUC first, the best."""
    size = next(iter(masks.values())).size
    lowest = ", ".join(f"`{n}`" for n in names if n in ascending)
    lines = ["## Finding the planted examples\n"]
    lines.append(
        "Planted: "
        + ", ".join(
            f"`{kind}` {int(m.sum())} of {size} ({m.mean():.1%})" for kind, m in masks.items()
        )
        + "".join(
            f"; {_count(int((masks[a] & masks[b]).sum()), 'example is', 'examples are')} both "
            f"`{a}` and `{b}` (each kind's numbers count them)"
            for a, b in itertools.combinations(masks, 2)
            if (masks[a] & masks[b]).any()
        )
        + ". Each score ranks the examples from its suspicious end (largest first"
        + (f"; smallest first for {lowest}" if lowest else "")
        + "). AUC: the chance that a planted example ranks above a clean one (0.5 is chance, 1 "
        "puts every planted one first). Precision: the planted share of the top k, k = the "
        "number planted, beside the base rate that a random ranking gets. A score undefined on "
        "some examples is judged on the rest (n/a: none or all of them planted).\n"
    )
    rows = []
    for kind in masks:
        mine = [d for d in found if d.kind == kind]
        # best AUC first, the scores defined on fewer examples after the others
        mine.sort(key=lambda d: (d.examples < size, -d.auc if math.isfinite(d.auc) else math.inf))
        rows += [
            [f"`{kind}`", f"`{d.score}`", _fmt(d.auc), _fmt(d.precision), str(d.planted),
             _fmt(d.base_rate), str(d.examples)]
            for d in mine
        ]  # fmt: skip
    header = ["planted", "score", "AUC", "precision in top k", "k", "base rate", "examples"]
    lines.append(_table(header, rows))
    for kind, d in _best_detections(found).items():
        lines.append(
            f"Best at finding `{kind}`: `{d.score}`, AUC {_fmt(d.auc)}; "
            f"{d.precision * d.planted:.4g} of its top {d.planted} are `{kind}` (precision "
            f"{_fmt(d.precision)} against a base rate of {_fmt(d.base_rate)}).\n"
        )
    return lines


def write_report(
    out: str | Path,
    columns: Mapping[str, np.ndarray],
    *,
    targets: np.ndarray,
    images: Callable[[int], np.ndarray] | None = None,
    class_names: Sequence[str] | None = None,
    summary: Mapping[str, Any] | None = None,
    top_k: int = 10,
    ascending: Sequence[str] = ASCENDING,
    planted: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Write ``out/report.md`` and its figures under ``out/report/``; return the report's path.

    ``columns``: score name -> values [N] aligned to the dataset indices 0..N-1 (NaN where a
    score is undefined); ``targets`` [N] the labels; ``images(position)`` returns an image
    [H, W] or [H, W, 3] in [0, 1] for the top-k grid (no grid without it); ``summary`` the run's
    summary (dataset, model, sizes, accuracy, score_definitions) for the header. The grid and
    the top-k table list the largest values of each score, the smallest for those in
    ``ascending``. ``planted``: kind -> boolean mask [N] of the examples planted in the run
    (``{"flipped": ..., "poisoned": ...}``); the report then opens with how well each score
    finds each kind (:func:`planted_detection`) and the top examples of the best one.
    """
    if not columns:
        raise InfluxValueError("write_report needs at least one score column")
    targets = np.asarray(targets)
    sizes = {name: np.asarray(values).shape for name, values in columns.items()}
    if any(shape != targets.shape for shape in sizes.values()):
        raise InfluxValueError(
            f"every score column must have one value per example ({targets.shape[0]}); got "
            f"{ {name: shape[0] for name, shape in sizes.items()} }"
        )
    if not 1 <= top_k <= MAX_TOP_K:
        raise InfluxValueError(f"top_k must be in 1..{MAX_TOP_K}; got {top_k}")
    found = planted_detection(columns, planted, ascending=ascending) if planted else []
    out = Path(out)
    figures = out / FIGURES
    figures.mkdir(parents=True, exist_ok=True)
    planted_figure = figures / "planted.png"
    summary = dict(summary or {})
    names = list(columns)
    k = min(top_k, targets.shape[0])

    lines = [f"# influx-score report: {summary.get('dataset', '?')} / {summary.get('model', '?')}"]
    sizes_info = summary.get("sizes", {})
    accuracy = summary.get("accuracy", {})
    lines.append(
        f"\n{targets.shape[0]} training examples, {sizes_info.get('num_parameters', '?')} "
        f"parameters; train accuracy {_fmt(accuracy.get('train'))}, test accuracy "
        f"{_fmt(accuracy.get('test'))}. Every score is aligned to the dataset index "
        "(scores.parquet, scores.csv).\n"
    )
    definitions = summary.get("score_definitions", {})
    if definitions:
        lines.append("Scores:\n")
        lines += [f"- `{name}`: {text}" for name, text in definitions.items()]
        lines.append("")
    best = _best_detections(found) if found else {}
    if found:
        masks = _check_planted(planted, targets.shape[0])
        lines += _planted_section(found, masks, names, ascending)
    if found and images is not None and best:
        rows = [
            (f"{', '.join(kinds)}: {score}" + (" (lowest)" if score in ascending else ""),
             np.asarray(columns[score], dtype=np.float64),
             _top_positions(_suspicion(score, columns[score], ascending), k))
            for score, kinds in _kinds_by_score(best).items()
        ]  # fmt: skip
        _grid(rows, targets, images, class_names, k, planted_figure, masks)
        lines.append(f"![what the best scores found]({FIGURES}/planted.png)\n")
        lines.append(
            f"Each row: the top {k} examples of the score that finds the kinds named on its "
            "left best (highest AUC), planted ones framed and named in the kind's colour.\n"
        )
    else:
        planted_figure.unlink(missing_ok=True)  # an earlier report's, of other planted examples

    lines.append("## Distributions\n")
    fitted = _histograms(columns, figures / "histograms.png")
    lines.append(f"![score histograms]({FIGURES}/histograms.png)\n")
    if fitted:
        lines.append(
            "Non-negative scores: log-log survival P(X > x) of the positive values with the three "
            "best maximum-likelihood fits (influx.tails: log-normal, gamma, exponential; best = "
            "lowest AIC) and the power law fitted above x_min (Clauset-Shalizi-Newman). Signed "
            "scores: log density with the best of normal, Laplace, Student-t, Cauchy. Hill "
            "alpha: tail index of |score| (P(|X| > x) ~ x^-alpha; small = heavy tail; below 1 "
            "the mean is infinite). Power law: density exponent (x^-alpha above x_min).\n"
        )
    else:
        lines.append("Plain histograms (log density): influx.tails is not installed.\n")
    rows = []
    for name in names:
        values = np.asarray(columns[name], dtype=np.float64)
        finite = values[np.isfinite(values)]
        stats = (
            [finite.mean(), finite.std(), finite.min(), np.median(finite), finite.max()]
            if finite.size
            else [math.nan] * 5
        )
        fit = fitted.get(name, {})
        power = fit.get("power_law")
        rows.append(
            [f"`{name}`", str(finite.size), *map(_fmt, stats), fit.get("best", ""),
             _fmt(fit["hill"]) if fit else "",
             f"{_fmt(power[0])} (x >= {_fmt(power[1])})" if power else ""]
        )  # fmt: skip
    header = ["score", "count", "mean", "std", "min", "median", "max", "best fit", "Hill alpha",
              "power law alpha"]  # fmt: skip
    lines.append(_table(header, rows))

    if images is not None:
        lines.append(f"## Top {k} examples per score\n")
        tops = _image_grid(
            columns, targets, images, class_names, k, figures / "top_examples.png", ascending
        )
        lines.append(f"![top examples]({FIGURES}/top_examples.png)\n")
        lines.append(
            "Largest values first (smallest for "
            + (", ".join(f"`{n}`" for n in names if n in ascending) or "none")
            + "); each image shows its index, label and score.\n"
        )
        lines.append(
            _table(
                ["score", "indices"], [[f"`{n}`", ", ".join(map(str, t))] for n, t in tops.items()]
            )
        )

    lines.append("## Correlations between scores (Spearman)\n")
    correlations = spearman_matrix(columns)
    if len(names) > 1:
        _heatmap(correlations, names, names, figures / "spearman.png",
                 title="Spearman rank correlation", annotations=correlations, symmetric=True)  # fmt: skip
        lines.append(f"![Spearman correlations]({FIGURES}/spearman.png)\n")
    lines.append(
        _table(
            ["", *[f"`{n}`" for n in names]],
            [
                [f"`{a}`", *[_fmt(correlations[i, j]) for j in range(len(names))]]
                for i, a in enumerate(names)
            ],
        )  # fmt: skip
    )

    lines.append("## Per class\n")
    classes, counts, means = _per_class(columns, targets)
    labels = [class_names[c] if class_names else str(c) for c in classes]
    spread = np.nanstd(means, axis=0, keepdims=True)
    centered = means - np.nanmean(means, axis=0, keepdims=True)
    z_scores = np.divide(centered, spread, out=np.zeros_like(means), where=spread > 0)
    _heatmap(z_scores, labels, names, figures / "per_class.png",
             title="per-class mean (colour: z-score across classes)", annotations=means,
             symmetric=False)  # fmt: skip
    lines.append(f"![per-class means]({FIGURES}/per_class.png)\n")
    lines.append(
        _table(
            ["class", "count", *[f"mean `{n}`" for n in names]],
            [
                [label, str(int(count)), *map(_fmt, row)]
                for label, count, row in zip(labels, counts, means)
            ],
        )  # fmt: skip
    )
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
