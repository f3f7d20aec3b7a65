"""influx.report: figures and tables from score columns, checked against direct computations."""

from __future__ import annotations

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
