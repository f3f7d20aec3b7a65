"""Where a result came from: commit, clean tree, versions, device, command, date and duration.

A result file without provenance cannot be checked or reproduced. :func:`capture` reads the state
at the start of a run (before the run writes anything) and :func:`finish` adds the wall time:

    record = provenance.capture()
    ...                                    # the experiment
    result["provenance"] = provenance.finish(record)

``dirty`` is True when ``git status`` shows changes (tracked or untracked) outside the paths in
``ignore``: by default the folders that experiments write their results into
(``examples/results/``, ``benchmarks/results/``, ``runs/``), so that regenerating every result in
a row from one clean commit does not mark the later ones dirty. Outside a git checkout (an
installed package) ``git_sha`` is None and ``dirty`` is None: unknown, not clean.
"""

from __future__ import annotations

import datetime as _dt
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["RESULT_FOLDERS", "capture", "finish", "git_state"]

RESULT_FOLDERS = ("examples/results/", "benchmarks/results/", "runs/")
_ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str, root: Path) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              timeout=30, check=False)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def git_state(root: Path | None = None, ignore: Sequence[str] = RESULT_FOLDERS) -> dict:
    """``{"git_sha", "dirty", "changed"}`` of the checkout at ``root`` (influx's own by default).

    ``changed`` lists the paths (at most 20) that make the tree dirty.
    """
    root = Path(root) if root is not None else _ROOT
    sha = _git("rev-parse", "HEAD", root=root)
    status = _git("status", "--porcelain", "--untracked-files=all", root=root)
    if sha is None or status is None:
        return {"git_sha": None, "dirty": None, "changed": []}
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    changed = [path for path in changed if not path.strip('"').startswith(tuple(ignore))]
    return {"git_sha": sha.strip(), "dirty": bool(changed), "changed": changed[:20]}


def _device() -> str:
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def capture(command: Sequence[str] | None = None, root: Path | None = None) -> dict:
    """The provenance of a run starting now (``command`` defaults to ``sys.argv``)."""
    import influx

    return {
        **git_state(root),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "influx": influx.__version__,
        },  # fmt: skip
        "device": _device(),
        "command": list(command if command is not None else [sys.executable, *sys.argv]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": None,
        "_start": time.perf_counter(),
    }


def finish(record: dict) -> dict:
    """A copy of ``record`` with ``wall_seconds`` since :func:`capture` (call it at each write:
    a run stopped early keeps its partial wall time)."""
    out = {key: value for key, value in record.items() if key != "_start"}
    out["wall_seconds"] = round(time.perf_counter() - record["_start"], 3)
    return out
