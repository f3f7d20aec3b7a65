"""A resumable, sharded ``influx-score`` run: the plan, the shards, the merge, the exit codes.

Each score group is computed chunk by chunk into its own shard of the store; rank ``r`` of a
torchrun job computes the chunks ``c`` with ``c % world_size == r``; rank 0 trains, merges and
writes the outputs. One run holds its output folder at a time (:mod:`influx.cli.lock`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from influx import data as datasets
from influx import distributed, store
from influx.cli.args import ScoreSpec, build_parser, parse_scores, resolve_config
from influx.cli.checkpoints import (
    MODEL_FILE,
    STORE,
    TRAINING_FILE,
    _load_state_bytes,
    build_model,
    checkpoints_of,
    load_weights,
    read_state_dict,
    train_and_record,
)
from influx.cli.lock import FolderLock
from influx.cli.output import (
    CSV_MAX_ROWS,
    OUTPUT_FILES,
    _gus_summary,
    _versions,
    score_statistics,
    write_outputs,
)
from influx.cli.scoring import SCORES, Scorer, check_finite, whole_set_groups
from influx.errors import InfluxError, InfluxRuntimeError, InfluxValueError
from influx.grads import projection
from influx.seeds import derive_seed
from influx.train import evaluate

# Bumped whenever the stored layout or a score's definition changes: old stores are refused.
STORE_FORMAT = 3  # 3: projection matrices drawn in float32 (self_influence:trak changed)
# Scores computed once over the whole training set (rank 0) rather than chunk by chunk.
_GLOBAL_GROUPS = whole_set_groups()
_DONE_FILES = ("summary.json",)
_OUTPUT_FILES = OUTPUT_FILES
_STORE, _MODEL_FILE, _TRAINING_FILE = STORE, MODEL_FILE, TRAINING_FILE
# The purpose under which --flip-labels draws its stream of --seed.
_FLIP_STREAM = 0x666C6970


class _Terminated(BaseException):
    """SIGTERM, turned into an exception so that cleanup runs as for Ctrl-C."""


# ------------------------------------------------------------------------------------------------
# Data identity and the run's fingerprint
# ------------------------------------------------------------------------------------------------


def _hash_tensor(digest, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.numpy().tobytes())


def data_identity(dataset) -> dict[str, Any]:
    """Name, split, size and a sha256 of the content (inputs and targets) of ``dataset``."""
    digest = hashlib.sha256()
    n = len(dataset)
    _hash_tensor(digest, dataset.targets[:n])
    if isinstance(dataset, datasets.Cifar10Dataset):
        _hash_tensor(digest, dataset.images[:n])
    elif isinstance(dataset, datasets.TensorClassificationDataset):
        _hash_tensor(digest, dataset.inputs[:n])
    elif isinstance(dataset, datasets.SyntheticDataset):
        # Items are generated from these: hashing them identifies every item.
        _hash_tensor(digest, dataset.prototypes)
        digest.update(f"{dataset.noise!r}/{dataset.item_seed}".encode())
    else:
        for inputs, _, _ in datasets.iter_batches(dataset, 1024):
            _hash_tensor(digest, inputs)
    return {
        "name": getattr(dataset, "name", type(dataset).__name__),
        "split": getattr(dataset, "split", None),
        "size": n,
        "sha256": digest.hexdigest(),
    }


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Settings that do not change the scores, so a rerun that changes only them still resumes (the
# device but for TRAK's projection: see run_identity).
_NOT_FINGERPRINTED = ("out", "data_dir", "device", "progress", "threads", "overwrite", "top_k")
# Settings that join the fingerprint only when given, so that runs made before they existed
# still resume.
_FINGERPRINTED_WHEN_GIVEN = ("flip_labels",)


def run_identity(config: dict[str, Any], train_set, test_set) -> dict[str, Any]:
    """Everything that determines the scores: settings, data identity, checkpoint content."""
    identity = {
        k: v
        for k, v in sorted(config.items())
        if k not in _NOT_FINGERPRINTED and not (k in _FINGERPRINTED_WHEN_GIVEN and v is None)
    }
    identity["format"] = STORE_FORMAT
    if "self_influence:trak" in config["scores"]:
        # dense projections of CUDA gradients are drawn on the GPU (influx.grads.projection), so
        # TRAK's scores depend on the kind of device
        on_gpu = projection.DENSE_DRAWS_ON_GPU and config["device"].startswith("cuda")
        identity["projection_drawn_on"] = "cuda" if on_gpu else "cpu"
    identity["train_data"] = data_identity(train_set)
    identity["test_data"] = data_identity(test_set)
    if config["checkpoint"] is not None:
        identity["checkpoint"] = {
            "path": config["checkpoint"],
            "sha256": _file_sha256(Path(config["checkpoint"])),
        }
    return identity


def fingerprint(identity: dict[str, Any]) -> str:
    """A hash of :func:`run_identity`."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# The plan and its shards
# ------------------------------------------------------------------------------------------------


def shard_dtype(columns: Sequence[str]) -> np.dtype:
    return np.dtype([("index", "<i8")] + [(c, "<f8") for c in columns])


@dataclass
class Plan:
    """What to compute: groups with their columns, chunk boundaries, shard names."""

    specs: list[ScoreSpec]
    num_examples: int
    chunk_size: int

    @property
    def groups(self) -> dict[str, tuple[str, ...]]:
        found: dict[str, tuple[str, ...]] = {}
        for spec in self.specs:
            found[spec.group] = (
                ("loss", "grad_norm", "margin") if spec.group == "basic" else spec.columns
            )
        return found

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_examples / self.chunk_size)

    def positions(self, chunk: int) -> torch.Tensor:
        start = chunk * self.chunk_size
        stop = min(start + self.chunk_size, self.num_examples)
        return torch.arange(start, stop, device="cpu")

    @staticmethod
    def shard(group: str, chunk: int) -> str:
        return f"{group}-{chunk:05d}.npy"

    @property
    def columns(self) -> list[str]:
        """Output score columns in the order requested."""
        out: list[str] = []
        for spec in self.specs:
            out += [c for c in spec.columns if c not in out]
        return out


def _read_shard(shards: store.ShardStore, plan: Plan, group: str, chunk: int) -> np.ndarray | None:
    """A verified shard: checksum (by the store), dtype and the expected example indices."""
    name = plan.shard(group, chunk)
    array = shards.read(name)
    if array is None:
        return None
    expected = plan.positions(chunk).numpy()
    if array.dtype != shard_dtype(plan.groups[group]):
        shards.reject(name, f"it holds columns {array.dtype.names}, not this score's")
        return None
    if array.shape != expected.shape or not np.array_equal(array["index"], expected):
        shards.reject(name, f"it holds examples other than {expected[0]}..{expected[-1]}")
        return None
    return array


# ------------------------------------------------------------------------------------------------
# One rank's part of a run
# ------------------------------------------------------------------------------------------------


class Job:
    """One rank's part of a run: its config, data, store and model."""

    def __init__(self, config: dict[str, Any], context: distributed.Context, say):
        self.config = config
        self.context = context
        self.say = say if context.is_main else (lambda message: None)
        self.out = Path(config["out"]).expanduser()
        self.device = torch.device(config["device"])
        self.timings: dict[str, float] = {}
        self.lock: FolderLock | None = None

    def _time(self, key: str, started: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - started

    def load_data(self) -> None:
        started = time.perf_counter()
        common = {"root": self.config["data_dir"], "max_examples": self.config["max_examples"]}
        self.clean_train = datasets.load(self.config["dataset"], split="train", **common)
        self.test_set = datasets.load(self.config["dataset"], split="test", **common)
        if self.config.get("flip_labels") is not None:
            # influx.data.load's label flipping, on a stream of --seed of its own: the poisons
            # draw their subset from --seed itself, and the two kinds must not coincide
            datasets.flip_labels(self.clean_train, self.config["flip_labels"], self.flip_seed())
        self.poison = None
        self.train_set = self.clean_train
        if self.config["poison"] is not None:
            from influx import poison

            self.poison = poison.gaussian(
                self.clean_train,
                fraction=self.config["poison"]["fraction"],
                noise_std=self.config["poison"]["std"],
                seed=self.config["seed"],
            )
            self.train_set = self.poison.dataset
        self._time("data_seconds", started)

    def flip_seed(self) -> int:
        """The seed of --flip-labels: a stream of --seed (influx.seeds)."""
        return derive_seed(self.config["seed"], _FLIP_STREAM)

    def planted(self) -> dict[str, np.ndarray]:
        """Boolean masks [N] of the examples this run planted: flipped labels, poisons."""
        found = {}
        n = len(self.train_set)
        if self.config.get("flip_labels") is not None:
            flipped = np.zeros(n, dtype=bool)
            flipped[self.clean_train.flipped.numpy()] = True
            found["flipped"] = flipped
        if self.poison is not None:
            found["poisoned"] = self.poison.mask.cpu().numpy().astype(bool)
        return found

    def check_out(self) -> None:
        """Refuse a folder holding score files that no influx-score run wrote (no store beside
        them): they are someone's own, and a run would overwrite them."""
        if not self.out.is_dir() or (self.out / _STORE).exists():
            return
        found = [name for name in (*_OUTPUT_FILES, "report") if (self.out / name).exists()]
        if found:
            shown = ", ".join(name + ("/" if name == "report" else "") for name in found)
            raise InfluxValueError(
                f"--out {self.out} holds {shown}, which influx-score did not write (there is no "
                f"{_STORE}/ beside them) and would overwrite; choose another --out, or move those "
                "files away"
            )

    def open_store(self) -> None:
        self.identity = run_identity(self.config, self.clean_train, self.test_set)
        self.fingerprint = fingerprint(self.identity)
        root = self.out / _STORE
        if self.context.is_main:
            self.lock = FolderLock(self.out).acquire()
            self.store = self._open(root)
            # A run is finished only when summary.json is back; other outputs are rewritten.
            names = _OUTPUT_FILES if self.config["overwrite"] else _DONE_FILES
            for name in names:
                (self.out / name).unlink(missing_ok=True)
        distributed.barrier()
        if not self.context.is_main:
            self.store = store.ShardStore.attach(root, self.fingerprint)

    def _open(self, root: Path) -> store.ShardStore:
        overwrite = self.config["overwrite"]
        manifest = root / store.MANIFEST
        try:
            return store.ShardStore.open(root, self.fingerprint, self.identity, overwrite=overwrite)
        except store.StoreMismatchError as error:
            raise InfluxValueError(
                f"--out {self.out}: {error}. Choose another --out, or pass --overwrite to "
                "replace them (results of different settings are never mixed)"
            ) from None
        except InfluxValueError:
            if not manifest.is_file():
                raise  # files the store did not write: the store's message names them
        # The manifest is there but unreadable: the store is damaged.
        if not overwrite:
            raise InfluxValueError(
                f"--out {self.out}: the store {root} is damaged ({manifest} is unreadable); pass "
                "--overwrite to clear it and start over, or choose another --out"
            )
        manifest.unlink()
        return store.ShardStore.open(root, self.fingerprint, self.identity, overwrite=True)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def build_model(self) -> nn.Module:
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.config["seed"])
            model = build_model(
                self.config["model"],
                self.train_set.input_shape,
                self.train_set.num_classes,
                self.config["width"],
            )
        return model.to(self.device)

    def read_checkpoint(self) -> None:
        """The --checkpoint model, read and checked (shapes, finite weights) before anything is
        written; none without --checkpoint."""
        self.given_model = None
        if self.config["checkpoint"] is not None:
            model = self.build_model()
            state = read_state_dict(self.config["checkpoint"])
            load_weights(model, state, f"--checkpoint {self.config['checkpoint']}")
            self.given_model = model

    def prepare_model(self) -> None:
        """The model to score: --checkpoint, the stored trained model, or a newly trained one."""
        self.checkpoints: list[tuple] = []
        self.metrics: dict[str, Any] = {}
        if self.given_model is not None:
            self.model = self.given_model
            loss, accuracy = evaluate(self.model, self.train_set, device=self.device)
            test_loss, test_accuracy = evaluate(self.model, self.test_set, device=self.device)
            self.metrics = {
                "train_loss": loss,
                "train_accuracy": accuracy,
                "test_loss": test_loss,
                "test_accuracy": test_accuracy,
            }
            return
        self.model = self.build_model()
        if self.context.is_main and not self._load_trained():
            started = time.perf_counter()
            model_file, record_file, metrics = train_and_record(
                self.model, self.train_set, self.test_set, self.config
            )
            self._time("train_seconds", started)
            # The record first: the model file marks the training as done.
            self.store.put_bytes(_TRAINING_FILE, record_file)
            self.store.put_bytes(_MODEL_FILE, model_file)
            self.say(
                f"trained {self.config['model']} on {self.config['dataset']}: train accuracy "
                f"{metrics['train_accuracy']:.4f}, test accuracy {metrics['test_accuracy']:.4f}"
            )
            self._load_trained()
        distributed.barrier()
        if not self.context.is_main and not self._load_trained():
            raise InfluxRuntimeError(f"rank {self.context.rank}: the trained model is missing")

    def _load_trained(self) -> bool:
        model_file = self.store.get_bytes(_MODEL_FILE)
        record_file = self.store.get_bytes(_TRAINING_FILE)
        if model_file is None or record_file is None:
            return False
        try:
            state, _ = _load_state_bytes(model_file)
            record, meta = _load_state_bytes(record_file)
            self.model.load_state_dict(state)
        except (ValueError, RuntimeError, KeyError, json.JSONDecodeError) as error:
            self.store.reject(_MODEL_FILE, f"unreadable ({error})")
            return False
        self.checkpoints = checkpoints_of(record, meta)
        self.metrics = dict(meta.get("metrics", {}))
        return True

    def _announce_rejected(self) -> None:
        for name, reason in self.store.rejected:
            self.say(f"recomputing {self.store.path(name)}: {reason}")
        self.store.rejected.clear()

    def score(self, plan: Plan) -> int:
        """Compute this rank's missing shards; return how many were already on disk."""
        self.scorer = Scorer(self.model, self.train_set, self.config, self.checkpoints, self.poison)
        self.model.eval()
        resumed = 0
        mine = distributed.my_items(range(plan.num_chunks), self.context)
        for group, columns in plan.groups.items():
            if group in _GLOBAL_GROUPS:
                continue
            pending = [c for c in mine if _read_shard(self.store, plan, group, c) is None]
            resumed += len(mine) - len(pending)
            self._announce_rejected()
            if not pending:
                continue
            started = time.perf_counter()
            bar = tqdm(
                total=len(pending),
                desc=group,
                unit="shard",
                disable=not (self.config["progress"] and self.context.is_main),
            )
            for chunk in pending:
                self._compute_shard(plan, group, columns, chunk)
                bar.update(1)
            bar.close()
            self._time(f"{group}_seconds", started)
        return resumed

    def _compute_shard(self, plan: Plan, group: str, columns, chunk: int) -> np.ndarray:
        positions = plan.positions(chunk)
        values = self.scorer.compute(group, positions)
        indices = positions.numpy()
        check_finite(group, values, indices, self.config)
        array = np.empty(len(indices), dtype=shard_dtype(columns))
        array["index"] = indices
        for column in columns:
            array[column] = values[column]
        self.store.write(plan.shard(group, chunk), array)
        return array

    def _whole_set_shard(self, group: str, columns, table, merged_names: list[str]) -> None:
        """One shard over all examples: the score compares every example with the others."""
        name = f"{group}-all.npy"
        array = self.store.read(name)
        expected = shard_dtype(columns)
        if array is not None and (
            array.dtype != expected or not np.array_equal(array["index"], table["index"])
        ):
            self.store.reject(name, "it does not hold every example once")
            array = None
        self._announce_rejected()
        if array is None:
            values = self.scorer.compute_whole_set(group)
            check_finite(group, values, table["index"], self.config)
            array = np.empty(table["index"].shape[0], dtype=expected)
            array["index"] = table["index"]
            for column in columns:
                array[column] = values[column]
            self.store.write(name, array)
        for column in columns:
            table[column] = array[column]
        merged_names.append(name)

    def merge(self, plan: Plan) -> dict[str, np.ndarray]:
        """Rank 0: every shard verified (recomputed if damaged), concatenated, indices 0..N-1."""
        table: dict[str, np.ndarray] = {
            "index": np.arange(plan.num_examples, dtype=np.int64),
            "target": self.train_set.targets[: plan.num_examples].numpy().astype(np.int64),
        }
        merged_names = []
        for group, columns in plan.groups.items():
            if group in _GLOBAL_GROUPS:
                continue
            parts = []
            for chunk in range(plan.num_chunks):
                array = _read_shard(self.store, plan, group, chunk)
                self._announce_rejected()
                if array is None:
                    array = self._compute_shard(plan, group, columns, chunk)
                parts.append(array)
                merged_names.append(plan.shard(group, chunk))
            merged = np.concatenate(parts)
            if not np.array_equal(merged["index"], table["index"]):
                raise InfluxRuntimeError(
                    f"the {group} shards do not cover the examples 0..{plan.num_examples - 1} "
                    "exactly once; rerun with --overwrite"
                )
            for column in columns:
                table[column] = merged[column]
        for group, columns in plan.groups.items():
            if group in _GLOBAL_GROUPS:
                self._whole_set_shard(group, columns, table, merged_names)
        trained = [_MODEL_FILE, _TRAINING_FILE] if self.config["checkpoint"] is None else []
        self.store.finalize(trained + merged_names)
        return table


def summarize(job: Job, plan: Plan, table: dict[str, np.ndarray]) -> dict[str, Any]:
    """summary.json's content but for the timings: the run, its data, model and statistics."""
    config = job.config
    return {
        "dataset": config["dataset"],
        "model": config["model"],
        "sizes": {
            "train": len(job.train_set),
            "test": len(job.test_set),
            "input_shape": list(job.train_set.input_shape),
            "num_classes": job.train_set.num_classes,
            "num_parameters": sum(p.numel() for p in job.model.parameters()),
        },
        "accuracy": {
            "train": job.metrics.get("train_accuracy"),
            "test": job.metrics.get("test_accuracy"),
        },
        "loss": {"train": job.metrics.get("train_loss"), "test": job.metrics.get("test_loss")},
        "scores": score_statistics(table, plan.columns),
        "score_definitions": {s.name: SCORES[s.name.split(":")[0]].description for s in plan.specs},
        "checkpoints": [
            {"lr": lr} for _, lr in job.checkpoints
        ],  # TracIn's checkpoints (state dicts in store/training.safetensors)
        "commutator_reference": (
            job.scorer.reference_positions().tolist()
            if any(s.name == "commutator" for s in plan.specs)
            else None
        ),
        "poison": config["poison"],
        "flip_labels": (
            None
            if config.get("flip_labels") is None
            else {"fraction": config["flip_labels"], "flipped": int(table["flipped"].sum())}
        ),
        "gus": _gus_summary(table),
        "num_chunks": plan.num_chunks,
        "world_size": job.context.world_size,
        "device": config["device"],
        "fingerprint": job.fingerprint,
        "data": {"train": job.identity["train_data"], "test": job.identity["test_data"]},
        "versions": _versions(),
        "config": config,
        "files": {
            "scores": "scores.parquet",
            "csv": "scores.csv" if plan.num_examples <= CSV_MAX_ROWS else None,
            "report": "report.md",
            "model": f"{_STORE}/{_MODEL_FILE}" if config["checkpoint"] is None else None,
            "training_record": f"{_STORE}/{_TRAINING_FILE}"
            if config["checkpoint"] is None
            else None,
        },
    }


def run(config: dict[str, Any], context: distributed.Context, say=lambda m: None) -> dict | None:
    """Score every training example as ``config`` says; rank 0 returns the summary."""
    started = time.perf_counter()
    job = Job(config, context, say)
    try:
        # Everything that can be refused is checked before the first file is written.
        job.load_data()
        if context.is_main:
            job.check_out()
        job.read_checkpoint()
        job.open_store()
        plan = Plan(
            parse_scores(
                ",".join(config["scores"]),
                checkpoint=config["checkpoint"] is not None,
                poison=config["poison"] is not None,
            ),
            len(job.train_set),
            config["chunk_size"],
        )
        job.prepare_model()
        resumed = job.score(plan)
        if resumed:
            job.say(f"resumed in {job.out}: {resumed} shards were already done")
        distributed.barrier()
        if not context.is_main:
            return None
        started_merge = time.perf_counter()
        table = job.merge(plan)
        job._time("merge_seconds", started_merge)
        planted = job.planted()
        columns = plan.columns
        if "flipped" in planted:
            # the planted label flips, next to the poisons' column when there is one
            table["flipped"] = planted["flipped"]
            at = columns.index("poisoned") if "poisoned" in columns else len(columns)
            columns = [*columns[:at], "flipped", *columns[at:]]
        summary = summarize(job, plan, table)
        write_outputs(
            job.out,
            table,
            columns,
            summary,
            images=job.train_set,
            class_names=getattr(job.train_set, "classes", None)
            or getattr(job.clean_train, "classes", None),
            top_k=config["top_k"],
            planted=planted,
            timings=job.timings,
            started=started,
        )
        summary["resumed_shards"] = resumed
        return summary
    finally:
        job.release()


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def _os_error_message(error: OSError) -> str:
    where = error.filename or "the output folder"
    if error.errno == errno.ENOSPC:
        return (
            f"no space left on the device while writing {where}; free some space, then rerun "
            "the same command to resume"
        )
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {where} ({error.strerror}); choose a writable --out"
    return f"{where}: {error.strerror or error}"


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``influx-score``; returns the exit status.

    0 done; 2 an error (one line on stderr; under torchrun on rank 0 only, unless the error is
    another rank's own); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM).
    """
    from influx.kernels import KernelBackendError, KernelInputError

    args = build_parser().parse_args(argv)
    say = lambda message: print(message, file=sys.stderr, flush=True)
    threads = torch.get_num_threads()
    previous_handler = None
    context = distributed.Context()
    configured = False

    def terminated(signum, frame):
        raise _Terminated

    def fail(message: str) -> int:
        # An error every rank meets alike (a setting) is said once, by rank 0; an error met
        # while the ranks work apart is said by the rank that met it.
        if context.is_main:
            print(f"influx-score: error: {_one_line(message)}", file=sys.stderr)
        elif configured:
            print(f"influx-score: error (rank {context.rank}): {_one_line(message)}",
                  file=sys.stderr)  # fmt: skip
        return 2

    try:
        previous_handler = signal.signal(signal.SIGTERM, terminated)
    except ValueError:
        # Not the main thread: leave SIGTERM alone.
        previous_handler = None
    summary = None
    try:
        context = distributed.launched()
        config = resolve_config(args, context)
        if config["threads"] is not None:
            torch.set_num_threads(config["threads"])
        distributed.init(torch.device(config["device"]).type)
        configured = True
        summary = run(config, context, say=say)
    except (InfluxError, KernelBackendError, KernelInputError) as error:
        return fail(str(error))
    except OSError as error:
        return fail(_os_error_message(error))
    except torch.OutOfMemoryError:
        return fail("out of memory; lower --chunk-size or --batch-size, or use --max-examples")
    except KeyboardInterrupt:
        print("influx-score: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except _Terminated:
        print("influx-score: terminated; rerun the same command to resume", file=sys.stderr)
        return 143
    finally:
        torch.set_num_threads(threads)
        distributed.finalize()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    if summary is not None:
        out = Path(config["out"])
        extra = f"; {summary['resumed_shards']} shards resumed" if summary["resumed_shards"] else ""
        accuracy = lambda split: f"{_or_nan(summary['accuracy'][split]):.4f}"
        print(
            f"scored {summary['sizes']['train']} examples ({', '.join(config['scores'])}) "
            f"-> {out / 'scores.parquet'}; train accuracy {accuracy('train')}, test accuracy "
            f"{accuracy('test')}, {summary['timing']['total_seconds']:.1f} s{extra}\n"
            f"report: {out / 'report.md'}"
        )
    return 0
