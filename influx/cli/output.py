"""The files of a finished ``influx-score`` run, written from plain columns: scores.parquet,
scores.csv, report.md with its figures, and summary.json (last: it marks the run finished)."""

from __future__ import annotations

import io
import json
import math
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import influx
from influx import data as datasets
from influx import store

# scores.csv is written beside scores.parquet up to this many rows (a few MB).
CSV_MAX_ROWS = 100_000
OUTPUT_FILES = ("scores.parquet", "scores.csv", "report.md", "summary.json")
# Columns that mark what a run planted (flags, not scores): in the table, not in the report.
PLANTED_COLUMNS = ("poisoned", "flipped")


def scores_table_bytes(table: dict[str, np.ndarray], columns: Sequence[str]) -> bytes:
    """Parquet bytes of the table (index, target, then ``columns``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = ["index", "target", *columns]
    arrow = pa.table({name: table[name] for name in names})
    buffer = io.BytesIO()
    pq.write_table(arrow, buffer, compression="zstd")
    return buffer.getvalue()


def scores_csv_text(table: dict[str, np.ndarray], columns: Sequence[str]) -> str:
    """CSV of the table; 9 significant digits (float32-exact; scores.parquet is exact)."""
    names = ["index", "target", *columns]
    lines = [",".join(names)]
    values = [table[name] for name in names]
    for row in range(table["index"].shape[0]):
        cells = [str(int(values[0][row])), str(int(values[1][row]))]
        cells += [f"{v[row]:.9g}" for v in values[2:]]
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"


def _json_safe(value):
    """``value`` with numpy scalars as Python numbers and NaN/inf as None (valid JSON)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def json_text(content: dict[str, Any]) -> str:
    return json.dumps(_json_safe(content), indent=2, allow_nan=False) + "\n"


def _versions() -> dict[str, str]:
    import importlib.metadata as metadata

    found = {
        "influx": influx.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    for name in ("pyarrow", "safetensors", "matplotlib", "scipy"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def score_statistics(table: dict[str, np.ndarray], columns: Sequence[str]) -> dict[str, Any]:
    stats = {}
    for column in columns:
        values = table[column][np.isfinite(table[column])]
        if values.size == 0:
            continue
        stats[column] = {
            "mean": float(values.mean()),
            "std": float(values.std()),
            "min": float(values.min()),
            "median": float(np.median(values)),
            "max": float(values.max()),
            "count": int(values.size),
        }
    return stats


def _gus_summary(table: dict[str, np.ndarray]) -> dict[str, Any] | None:
    if "gus_iz" not in table:
        return None
    values = table["gus_iz"][table["poisoned"] > 0]
    if values.size == 0:
        return None
    from scipy.stats import norm

    values = values[np.isfinite(values)]
    gus = float(values.mean())
    # The per-point test of docs/architecture.md: I_z ~ N(0, 1) when theta is independent of the noise.
    threshold = float(norm.ppf(0.99))
    return {
        "gus": gus,
        "z": gus * math.sqrt(values.size),
        "tpr_at_fpr_0.01": float((values > threshold).mean()),
        "poisoned": int(values.size),
    }


def image_getter(dataset) -> Callable[[int], np.ndarray]:
    """``position -> image`` [H, W] or [H, W, 3] in [0, 1] for the report's grids."""
    if isinstance(dataset, datasets.Cifar10Dataset):
        return lambda i: dataset.images[i].permute(1, 2, 0).numpy() / 255.0

    def generic(i: int) -> np.ndarray:
        image = dataset[i][0].detach().float().cpu()
        image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)
        return image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()

    return generic


def write_outputs(
    out: Path,
    table: dict[str, np.ndarray],
    columns: Sequence[str],
    summary: dict[str, Any],
    *,
    images,
    class_names: Sequence[str] | None,
    top_k: int,
    planted: Mapping[str, np.ndarray],
    timings: dict[str, float],
    started: float,
) -> dict[str, Any]:
    """Write the table (Parquet, and CSV up to :data:`CSV_MAX_ROWS` rows), the report and, last,
    summary.json with the timings; return the summary.

    ``table`` maps "index", "target" and every one of ``columns`` to an array [N]; ``images``
    is the dataset whose examples the report's grids show; ``planted`` the boolean masks [N] of
    what the run planted ({"flipped": ..., "poisoned": ...}, only the kinds it planted).
    """
    from influx import report

    num_examples = table["index"].shape[0]
    store.atomic_write_bytes(out / "scores.parquet", scores_table_bytes(table, columns))
    if num_examples <= CSV_MAX_ROWS:
        store.atomic_write_text(out / "scores.csv", scores_csv_text(table, columns))
    else:
        (out / "scores.csv").unlink(missing_ok=True)
    report_started = time.perf_counter()
    report.write_report(
        out,
        {c: table[c] for c in columns if c not in PLANTED_COLUMNS},
        targets=table["target"],
        images=image_getter(images),
        class_names=class_names,
        summary=summary,
        top_k=top_k,
        planted=dict(planted) or None,
    )
    timings["report_seconds"] = timings.get("report_seconds", 0.0) + (
        time.perf_counter() - report_started
    )
    summary["timing"] = {**timings, "total_seconds": time.perf_counter() - started}
    store.atomic_write_text(out / "summary.json", json_text(summary))
    return summary
