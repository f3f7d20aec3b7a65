"""Shared benchmark plumbing: timing, peak memory, provenance, and result files."""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
PEERS = (
    "torch",
    "numpy",
    "triton",
    "opacus",
    "backpack-for-pytorch",
    "kronfluence",
    "traker",
    "captum",
)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(
    fn: Callable[[], object], *, device: str = "cpu", repeats: int = 5, warmup: int = 1
) -> dict:
    """Median and min wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


def peak_rss_bytes() -> int:
    """High-water mark of this process' resident memory: VmHWM, which `memory_mark` can reset
    (getrusage's ru_maxrss, in KiB on Linux, where /proc is missing)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_free_memory() -> None:
    """Collect garbage and hand free heap pages back to the OS (glibc ``malloc_trim``), so that
    memory a previous step freed but malloc kept does not hide the next step's allocations."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_mark(device: str = "cpu") -> int:
    """Start measuring a step's peak memory; return the baseline for ``peak_mem_mb``.

    CUDA: the allocator's peak counter is reset and the baseline is the memory allocated now.
    CPU: free heap is trimmed, the resident high-water mark is reset (``/proc/self/clear_refs``)
    and the baseline is the resident size now, so the peak is the step's own even when building
    its inputs went higher."""
    if device.startswith("cuda"):
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    _release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        # without the reset, the peak is the process' high-water mark since it started
        pass
    return current_rss_bytes()


def peak_mem_mb(base: int, device: str = "cpu") -> float:
    """Peak memory (MiB) above ``base`` from ``memory_mark``: resident (CPU) or allocated (CUDA)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss_bytes()
    return max(0, peak - base) / 2**20


def timing_label(warmup: int, repeats: int) -> str:
    """How a row was timed, for the ``timing`` column."""
    if warmup == 0 and repeats == 1:
        return "one cold run"
    return f"{warmup} warm-up, median of {repeats}"


def fingerprint(*objects) -> str:
    """SHA-256 (first 16 hex digits) of tensors, nested in dicts / lists / tuples, in order: two
    processes that built the same task get the same fingerprint."""
    digest = hashlib.sha256()

    def feed(obj) -> None:
        if isinstance(obj, torch.Tensor):
            tensor = obj.detach().cpu().contiguous()
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            for key, value in obj.items():
                digest.update(str(key).encode())
                feed(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                feed(value)
        else:
            digest.update(repr(obj).encode())

    for obj in objects:
        feed(obj)
    return digest.hexdigest()[:16]


def run_child(
    suite: str, one: str, args, *, quick: bool | None = None, note_column: str = "note"
) -> dict:
    """Run one row of ``suite`` in a fresh process (``benchmarks/run.py --one``) and return the
    JSON object the child printed on its last stdout line, or ``{note_column: "failed: ..."}``
    (the column the suite's table keeps its notes in)."""
    command = [
        sys.executable, str(Path(__file__).resolve().parent / "run.py"), "--suite", suite,
        "--device", getattr(args, "device", "cpu"), "--one", one,
    ]  # fmt: skip
    if getattr(args, "quick", False) if quick is None else quick:
        command.append("--quick")
    if getattr(args, "repeats", None):
        command += ["--repeats", str(args.repeats)]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {note_column: f"failed (exit {done.returncode}): {tail[:200]}"}


def json_of_child(command: list[str]) -> dict:
    """Run ``command`` and return the JSON object it printed last; raise with its stderr if none."""
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError) as error:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}") from error


def git_sha() -> str:
    # A copy of the tree on another machine (a lent GPU) may carry stale git metadata or none: its
    # sender names the commit it copied in INFLUX_SOURCE_SHA and checks there that it was clean.
    source = os.environ.get("INFLUX_SOURCE_SHA")
    if source:
        return f"{source} (copied tree)"
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
        # The results a suite writes are its output, not the measured code: a run of several
        # suites from one clean tree stays clean after the first has written its files.
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", ":/", ":(exclude,top)benchmarks/results"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict[str, str]:
    found = {}
    for name in PEERS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def provenance(device: str) -> dict:
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        # other work on the machine skews CPU timings: record how busy it was
        "load_average_1m": round(os.getloadavg()[0], 2),
        "device": device,
        "device_name": device_name(device),
        "versions": versions(),
    }


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    if columns is None:
        columns = []
        for row in rows:
            columns += [k for k in row if k not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def report_check(
    name: str,
    rows: list[dict],
    meta: dict,
    *,
    columns,
    notes: str,
    out: Path | None = None,
    device: str = "cpu",
) -> None:
    """Print a standalone check's table, then write ``out`` (JSON alone) when given, else
    ``benchmarks/results/<name>-<device>.json`` and ``.md``."""
    print(markdown_table(rows, columns))
    if out is not None:
        out.write_text(json.dumps({"meta": meta, "notes": notes, "rows": rows}, indent=2))
        print(f"-> {out}")
    else:
        print(f"-> {write_results(name, device, rows, meta, columns=columns, notes=notes)}")


def write_results(
    suite: str, device: str, rows: list[dict], meta: dict, *, columns=None, notes: str = ""
) -> Path:
    """Write ``<suite>-<device>.json`` and ``.md`` under benchmarks/results; return the JSON path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"{suite}-{device.split(':')[0]}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    dirty = (
        "**DIRTY TREE: these numbers were not measured on a committed state; do not quote them.**"
        "\n\n"
        if meta["git_sha"].endswith("+dirty")
        else ""
    )
    header = (
        f"# {suite} suite on {meta['device_name']}\n\n{dirty}"
        f"git {meta['git_sha']}, {meta['timestamp']}, load {meta['load_average_1m']}, "
        f"python {meta['python']}, "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + "\n\n"
    )
    stem.with_suffix(".md").write_text(
        header + (notes + "\n\n" if notes else "") + markdown_table(rows, columns)
    )
    return stem.with_suffix(".json")


def kronfluence_classification_task():
    """A Kronfluence ``Task`` for (inputs, targets) batches: summed cross-entropy as the training
    loss (labels sampled from the model when Kronfluence asks for the true Fisher) and as the
    query measurement, which matches influx's per-example cross-entropy convention."""
    from kronfluence.task import Task

    class ClassificationTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            inputs, targets = batch
            logits = model(inputs)
            if sample:
                with torch.no_grad():
                    targets = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")

        def compute_measurement(self, batch, model):
            inputs, targets = batch
            return torch.nn.functional.cross_entropy(model(inputs), targets, reduction="sum")

    return ClassificationTask()


class PairDataset(torch.utils.data.Dataset):
    """(inputs, targets) tensors as the map-style Dataset of pairs that the peers' loaders take."""

    def __init__(self, data):
        self.inputs, self.targets = data[0], data[1]

    def __len__(self):
        return self.inputs.shape[0]

    def __getitem__(self, i):
        return self.inputs[i], self.targets[i]


def kronfluence_pairwise(
    model, train, query, out: str, *, strategy: str, damping_factor, train_batch: int,
    query_batch: int,
):  # fmt: skip
    """Fit Kronfluence's ``strategy`` factors on ``train`` and score ``query`` x ``train`` at its
    recommended settings, outputs under ``out``. Returns ``(analyzer, scores)``: scores [Q, N]
    float64 in Kronfluence's sign (g_q^T H^-1 g_z, positive = helpful); the analyzer for more."""
    import copy

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    task = kronfluence_classification_task()
    analyzer = Analyzer(
        "digits", prepare_model(copy.deepcopy(model), task), task, cpu=True, output_dir=out,
        disable_tqdm=True,
    )  # fmt: skip
    analyzer.fit_all_factors(
        strategy,
        PairDataset(train),
        per_device_batch_size=train_batch,
        factor_args=FactorArguments(strategy=strategy),
    )
    analyzer.compute_pairwise_scores(
        "pair",
        strategy,
        PairDataset(query),
        PairDataset(train),
        per_device_query_batch_size=query_batch,
        per_device_train_batch_size=train_batch,
        score_args=ScoreArguments(damping_factor=damping_factor),
    )
    return analyzer, analyzer.load_pairwise_scores("pair")["all_modules"].double()
