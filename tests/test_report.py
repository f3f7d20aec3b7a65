"""influx.report: figures and tables from score columns, checked against direct computations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import rankdata

from influx import report
from influx.errors import InfluxValueError


def columns(n: int = 60, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    loss = rng.exponential(size=n)
    return {
        "loss": loss,
        "margin": -loss + 0.1 * rng.standard_normal(n),
        "noise": rng.standard_normal(n),
    }


def test_spearman_is_the_pearson_correlation_of_ranks():
    cols = columns()
    cols["noise"][[3, 7]] = np.nan
    matrix = report.spearman_matrix(cols)
    values = list(cols.values())
    for i, a in enumerate(values):  # each pair over the rows where both are finite
        for j, b in enumerate(values):
            both = np.isfinite(a) & np.isfinite(b)
            expected = np.corrcoef(rankdata(a[both]), rankdata(b[both]))[0, 1]
            np.testing.assert_allclose(matrix[i, j], expected, rtol=1e-12, atol=1e-12)
    assert matrix[0, 1] < -0.9 and np.allclose(np.diag(matrix), 1.0)
    pair = report.spearman_matrix({"a": cols["loss"], "b": cols["margin"]})
    both = np.corrcoef(rankdata(cols["loss"]), rankdata(cols["margin"]))
    np.testing.assert_allclose(pair, both, rtol=1e-12, atol=1e-12)


def test_top_positions_are_largest_first_with_ties_by_position():
    values = np.array([1.0, 5.0, np.nan, 5.0, 3.0, -np.inf])
    assert report._top_positions(values, 3).tolist() == [1, 3, 4]
    assert report._top_positions(values, 10).tolist() == [1, 3, 4, 0], "finite values only"


def test_per_class_means_are_the_class_averages():
    cols = columns(30)
    targets = np.arange(30) % 3
    classes, counts, means = report._per_class(cols, targets)
    assert classes == [0, 1, 2] and counts.tolist() == [10, 10, 10]
    for i in classes:
        assert means[i, 0] == pytest.approx(cols["loss"][targets == i].mean(), rel=1e-12)


@pytest.mark.slow
def test_writes_report_and_figures_deterministically(tmp_path):
    cols = columns()
    targets = np.arange(60) % 4
    images = lambda i: np.full((8, 8), i / 60.0)
    summary = {"dataset": "toy", "model": "m", "score_definitions": {"loss": "the loss"}}
    for out in (tmp_path / "a", tmp_path / "b"):
        path = report.write_report(
            out, cols, targets=targets, images=images, summary=summary, top_k=5,
            class_names=["w", "x", "y", "z"],
        )  # fmt: skip
        assert path == out / "report.md"
    text = (tmp_path / "a/report.md").read_text()
    assert text.startswith("# influx-score report: toy / m")
    top_loss = ", ".join(map(str, np.argsort(-cols["loss"], kind="stable")[:5]))
    top_margin = ", ".join(map(str, np.argsort(cols["margin"], kind="stable")[:5]))
    assert f"| `loss` | {top_loss} |" in text
    assert f"| `margin` | {top_margin} |" in text, "margin: the lowest are the notable ones"
    assert "| z | 15 |" in text
    for name in ("report.md", "report/histograms.png", "report/top_examples.png",
                 "report/spearman.png", "report/per_class.png"):  # fmt: skip
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_rejects_misaligned_columns_and_bad_top_k(tmp_path):
    with pytest.raises(InfluxValueError, match="one value per example"):
        report.write_report(tmp_path, {"a": np.zeros(3)}, targets=np.zeros(4))
    with pytest.raises(InfluxValueError, match="top_k must be in 1..32"):
        report.write_report(tmp_path, {"a": np.zeros(4)}, targets=np.zeros(4), top_k=0)
    with pytest.raises(InfluxValueError, match="at least one score column"):
        report.write_report(tmp_path, {}, targets=np.zeros(4))


def test_a_score_defined_on_some_rows_leaves_the_other_pairs_whole():
    # GUS is NaN off the poisoned rows: the other pairs must still use every row
    cols = columns()
    cols["noise"][5:] = np.nan
    matrix = report.spearman_matrix(cols)
    whole = np.corrcoef(rankdata(cols["loss"]), rankdata(cols["margin"]))[0, 1]
    np.testing.assert_allclose(matrix[0, 1], whole, rtol=1e-12)
    partial = np.corrcoef(rankdata(cols["loss"][:5]), rankdata(cols["noise"][:5]))[0, 1]
    np.testing.assert_allclose(matrix[0, 2], partial, rtol=1e-12)


def test_tail_fits_follow_the_sign_of_the_scores():
    cols = columns(400)
    loss = report.tail_fits(cols["loss"])  # exponential: non-negative
    assert loss["support"] == "positive"
    assert {name for name, _, _ in loss["fits"]} == {"lognormal", "gamma", "exponential"}
    assert [aic for _, _, aic in loss["fits"]] == sorted(aic for _, _, aic in loss["fits"])
    alpha, x_min, share = loss["power_law"]
    assert alpha > 1 and x_min > 0 and 0 < share <= 1
    noise = report.tail_fits(cols["noise"])  # signed
    assert noise["support"] == "real" and noise["power_law"] is None
    assert {name for name, _, _ in noise["fits"]} == {"normal", "laplace", "t", "cauchy"}


def test_survival_panel_for_positive_scores_and_a_density_floor_for_signed_ones():
    from matplotlib.figure import Figure

    cols = columns(400)
    figure = Figure()
    survival, density = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    report._survival_panel(survival, cols["loss"], report.tail_fits(cols["loss"]))
    assert survival.get_xscale() == survival.get_yscale() == "log"
    assert survival.get_ylim()[0] == pytest.approx(0.5 / 400)
    report._density_panel(density, cols["noise"], report.tail_fits(cols["noise"]))
    # The Cauchy / t densities reach ~1e-5 in the range; the axis stops at half a count per bin.
    low = density.get_ylim()[0]
    width = np.ptp(cols["noise"]) / 20  # 400 // 20 bins
    assert low == pytest.approx(0.5 / (400 * width), rel=1e-9)


@pytest.mark.slow
def test_report_table_shows_the_power_law_of_non_negative_scores(tmp_path):
    cols = columns(200)
    path = report.write_report(tmp_path, cols, targets=np.arange(200) % 4)
    text = path.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `loss` |"))
    assert "(x >= " in row and any(f in row for f in ("lognormal", "gamma", "exponential"))
    row = next(line for line in text.splitlines() if line.startswith("| `noise` |"))
    assert "(x >= " not in row


# --- planted examples: how well each score finds them ---------------------------------------


def detections(columns, planted, **options):
    found = report.planted_detection(columns, planted, **options)
    return {(d.kind, d.score): d for d in found}


def test_auc_and_precision_match_hand_computed_values_with_ties_and_ascending():
    # planted {0, 2}: pairs (planted, clean) = (.9, .8) win, (.9, .1) win, (.8, .8) tie = 1/2,
    # (.8, .1) win: AUC 3.5 / 4. The top 2 are .9 and one of the tied .8s (one planted of two):
    # precision (1 + 1/2) / 2. Row 4 is NaN: left out of both, though marked.
    values = np.array([0.9, 0.8, 0.8, 0.1, np.nan])
    flipped = np.array([True, False, True, False, True])
    last = np.array([False, False, False, True, False])
    found = detections(
        {"loss": values, "margin": values}, {"flipped": flipped, "last": last}
    )  # margin: ascending by default, its suspicious end is the smallest
    d = found["flipped", "loss"]
    assert (d.examples, d.planted) == (4, 2)
    assert d.auc == pytest.approx(3.5 / 4, abs=1e-15)
    assert d.precision == pytest.approx(0.75, abs=1e-15) and d.base_rate == 0.5
    d = found["flipped", "margin"]  # lowest first: .1 (clean), then one of the tied .8s
    assert d.auc == pytest.approx(0.5 / 4, abs=1e-15)
    assert d.precision == pytest.approx(0.25, abs=1e-15)
    assert found["last", "loss"].auc == 0.0 and found["last", "loss"].precision == 0.0
    assert found["last", "margin"].auc == 1.0 and found["last", "margin"].precision == 1.0
    assert found["last", "loss"].base_rate == 0.25
    # ascending= names the scores read from the smallest; nothing else is special about margin
    plain = detections({"margin": values}, {"flipped": flipped}, ascending=())
    assert plain["flipped", "margin"].auc == pytest.approx(3.5 / 4, abs=1e-15)


def test_a_constant_score_finds_nothing():
    mask = np.array([True, False, False, True, False, False])
    d = detections({"flat": np.ones(6)}, {"x": mask})["x", "flat"]
    assert d.auc == 0.5 and d.precision == pytest.approx(d.base_rate, abs=1e-15) == 1 / 3


@pytest.mark.slow
def test_auc_and_precision_equal_brute_force_over_pairs_and_tie_orders():
    # AUC: the share of (planted, clean) pairs the planted one wins, ties 1/2; precision: the
    # mean, over every order of the tied values, of the planted share among the first k.
    rng = np.random.default_rng(5)
    for trial in range(20):
        values = rng.integers(0, 3, size=6).astype(float)  # many ties
        mask = rng.random(6) < 0.4
        if not 0 < mask.sum() < 6:
            continue
        d = detections({"s": values}, {"k": mask})["k", "s"]
        wins = [
            1.0 if a > b else 0.5 if a == b else 0.0
            for a, b in itertools.product(values[mask], values[~mask])
        ]
        assert d.auc == pytest.approx(np.mean(wins), abs=1e-12), trial
        k = int(mask.sum())
        shares = [
            mask[np.lexsort((order, -values))[:k]].mean()
            for order in itertools.permutations(range(6))
        ]
        assert d.precision == pytest.approx(np.mean(shares), abs=1e-12), trial


def test_a_score_defined_on_some_examples_is_judged_there_and_never_picked_best():
    flipped = np.zeros(10, dtype=bool)
    flipped[[0, 1]] = True
    loss = np.arange(10.0)[::-1].copy()  # examples 0, 1 largest: AUC 1
    loss[0], loss[5] = loss[5], loss[0]  # one flipped example drops to the middle
    partial = np.full(10, np.nan)
    partial[[0, 2]] = [5.0, 1.0]  # perfect on its two examples
    found = report.planted_detection({"loss": loss, "gus": partial}, {"flipped": flipped})
    by_score = {d.score: d for d in found}
    assert by_score["gus"].auc == 1.0 and by_score["gus"].examples == 2
    assert by_score["loss"].auc < 1.0
    assert report._best_detections(found)["flipped"].score == "loss"
    # one picture row per best score, naming every kind it finds best
    poisoned = np.zeros(10, dtype=bool)
    poisoned[[1, 3]] = True
    both = report.planted_detection({"loss": loss}, {"flipped": flipped, "poisoned": poisoned})
    best = report._best_detections(both)
    assert report._kinds_by_score(best) == {"loss": ["flipped", "poisoned"]}
    masks = {"flipped": flipped, "poisoned": poisoned}
    section = "\n".join(report._planted_section(both, masks, ["loss"], report.ASCENDING))
    assert "`poisoned` 2 of 10 (20.0%); 1 example is both `flipped` and `poisoned`" in section
    section = "\n".join(
        report._planted_section(found, {"flipped": flipped}, ["loss", "gus"], report.ASCENDING)
    )
    assert "`flipped` 2 of 10 (20.0%)." in section, "no overlap: nothing said about it"
    assert f"| `flipped` | `loss` | {by_score['loss'].auc:.4g} | 0.5 | 2 | 0.2 | 10 |" in section
    assert "| `flipped` | `gus` | 1 | 1 | 1 | 0.5 | 2 |" in section
    assert "Best at finding `flipped`: `loss`" in section
    assert "1 of its top 2 are `flipped`" in section


def test_planted_masks_are_checked_before_any_work(tmp_path):
    cols = {"loss": np.arange(4.0)}
    cases = [
        ({"flipped": np.array([0, 1, 0, 0])}, "boolean mask with one entry per example"),
        ({"flipped": np.array([True, False])}, "one entry per example \\(4\\)"),
        ({"flipped": np.zeros(4, dtype=bool)}, "marks 0 of 4 examples"),
        ({"flipped": np.ones(4, dtype=bool)}, "marks 4 of 4 examples"),
    ]
    for planted, message in cases:
        with pytest.raises(InfluxValueError, match=message):
            report.write_report(tmp_path / "out", cols, targets=np.zeros(4), planted=planted)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_report_with_planted_examples_says_how_well_each_score_finds_them(tmp_path):
    rng = np.random.default_rng(6)
    n = 80
    flipped = np.zeros(n, dtype=bool)
    flipped[:8] = True
    poisoned = np.zeros(n, dtype=bool)
    poisoned[[10, 11, 12]] = True
    loss = rng.exponential(size=n) + 4 * flipped
    cols = {"loss": loss, "margin": -loss, "grad_norm": rng.exponential(size=n) + 5 * poisoned}
    planted = {"flipped": flipped, "poisoned": poisoned}
    images = lambda i: np.full((8, 8), i / n)
    for out in (tmp_path / "a", tmp_path / "b"):
        report.write_report(out, cols, targets=np.arange(n) % 4, images=images, planted=planted)
    text = (tmp_path / "a/report.md").read_text()
    assert text.index("## Finding the planted examples") < text.index("## Distributions")
    expected = {d.kind + d.score: d for d in report.planted_detection(cols, planted)}
    for kind, score in itertools.product(("flipped", "poisoned"), cols):
        d = expected[kind + score]
        row = f"| `{kind}` | `{score}` | {report._fmt(d.auc)} | {report._fmt(d.precision)} |"
        assert row in text, row
    assert "Best at finding `poisoned`: `grad_norm`" in text
    assert "![what the best scores found](report/planted.png)" in text
    for name in ("report.md", "report/planted.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    without = report.write_report(tmp_path / "a", cols, targets=np.arange(n) % 4, images=images)
    assert "planted" not in without.read_text()
    assert not (tmp_path / "a/report/planted.png").exists(), "no picture left from the last run"


# --- heatmap numbers readable on every cell colour -----------------------------------------


def test_text_colour_follows_the_cell_luminance():
    import matplotlib

    assert report._text_colour((0.0, 0.0, 0.0, 1.0)) == "white"
    assert report._text_colour((1.0, 1.0, 1.0, 1.0)) == "black"
    assert report._text_colour((0.0, 0.0, 0.0, 0.0)) == "black", "a NaN cell shows the white page"
    cmap = matplotlib.colormaps["RdBu_r"]
    assert report._text_colour(cmap(0.0)) == report._text_colour(cmap(1.0)) == "white"
    assert report._text_colour(cmap(0.5)) == "black"

    def luminance(rgb):
        linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    for level in np.linspace(0, 1, 101):  # WCAG contrast of the chosen text on every colour
        cell = luminance(cmap(level)[:3])
        text = 1.0 if report._text_colour(cmap(level)) == "white" else 0.0
        ratio = (max(cell, text) + 0.05) / (min(cell, text) + 0.05)
        assert ratio >= 4.5, (level, ratio)


def test_heatmap_numbers_take_the_colour_chosen_for_their_cell():
    matrix = np.array([[1.0, 0.0], [np.nan, -1.0]])
    figure = report._heatmap_figure(matrix, ["a", "b"], ["a", "b"], title="t",
                                    annotations=matrix, symmetric=True)  # fmt: skip
    texts = {t.get_text(): t.get_color() for t in figure.axes[0].texts}
    assert texts == {"1": "white", "0": "black", "n/a": "black", "-1": "white"}
