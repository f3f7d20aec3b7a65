"""``influx-score``: score every training example of a dataset, resumably, on one or many processes.

    influx-score                                            # digits / MLP: about a minute on a laptop
    influx-score --dataset cifar10 --model resnet18 --data-dir ~/data --device cuda
    torchrun --nproc-per-node 8 -m influx.cli --dataset cifar10 --model resnet18 --device cuda

It trains the model (recording the batch order, the seeds and checkpoints for TracIn), or reads
one with ``--checkpoint``, then computes the scores named by ``--scores`` for every training
example (see :data:`SCORES`) and writes to ``--out``:

    scores.parquet    one row per example: index, target, then one column per score
    scores.csv        the same table, for runs of at most CSV_MAX_ROWS examples
    report.md         histograms with tail fits, top-k image grids, Spearman correlations,
                      per-class breakdowns (PNG figures under report/)
    summary.json      configuration, versions, device, timings, per-score statistics; written
                      last, so a folder with summary.json holds a finished run
    store/            the resumable state: model, training record and score shards with their
                      sha256 checksums (influx.store)

Resuming. Each score is computed chunk by chunk (``--chunk-size`` examples) into its own shard.
Run again with the same arguments after a kill (SIGINT, SIGTERM, SIGKILL, a full disk), it
continues from the shards on disk; the final files equal those of an uninterrupted run, byte for
byte (summary.json differs only in its timings). A damaged shard or model file is named and
recomputed. Other arguments into the same folder are refused (``--overwrite`` starts over): the
run's fingerprint covers every setting that changes a score and the data's identity (name, size,
sha256 of its content).

torchrun. Chunk ``c`` is scored by rank ``c % world_size`` (gloo on the CPU, NCCL on CUDA);
rank 0 trains the model while the others wait, and merges the shards when all are done. Every
shard is computed the same way whichever rank computes it, so the merge equals the
single-process run exactly.

One run holds its output folder at a time (a lock file holding its pid; the lock of a process
that died is reclaimed). A folder holding score files no run wrote is refused, and so is
anything else that can be refused, before the first file is written.

This package is the only place in influx that prints to the terminal or sets an exit status:
every influx error becomes one line on stderr and exit code 2. Its rooms: ``args`` (the command
line), ``checkpoints`` (the model that is scored), ``scoring`` (the registry of scores, each a
library call), ``run`` (plan, shards, merge, exit codes), ``output`` (the files), ``lock``.
"""

from __future__ import annotations

# Every name influx.cli held before it became a package stays importable from here.
# ruff: noqa: F401
from influx.cli.args import (
    DEFAULT_SCORES,
    DEFAULT_SELF_INFLUENCE,
    ScoreSpec,
    _check_kernel_backend,
    _check_out,
    _check_positive,
    build_parser,
    parse_poison,
    parse_scores,
    resolve_config,
    resolve_device,
)
from influx.cli.checkpoints import (
    MODELS,
    TRACIN_CHECKPOINTS,
    TRAIN_DEFAULTS,
    _load_state_bytes,
    _looks_like_safetensors,
    _state_bytes,
    build_model,
    checkpoints_of,
    load_weights,
    read_state_dict,
    tracin_steps,
    train_and_record,
)
from influx.cli.lock import FolderLock
from influx.cli.output import (
    CSV_MAX_ROWS,
    _gus_summary,
    _json_safe,
    _versions,
    image_getter,
    json_text,
    score_statistics,
    scores_csv_text,
    scores_table_bytes,
    write_outputs,
)
from influx.cli.run import (
    _DONE_FILES,
    _GLOBAL_GROUPS,
    _MODEL_FILE,
    _NOT_FINGERPRINTED,
    _OUTPUT_FILES,
    _STORE,
    _TRAINING_FILE,
    STORE_FORMAT,
    Job,
    Plan,
    _file_sha256,
    _hash_tensor,
    _one_line,
    _or_nan,
    _os_error_message,
    _read_shard,
    _Terminated,
    data_identity,
    fingerprint,
    main,
    run,
    run_identity,
    shard_dtype,
)
from influx.cli.scoring import (
    _PARTIAL_COLUMNS,
    COMMUTATOR_FLOATS,
    COMMUTATOR_REFERENCE,
    SCORE_BATCH_SIZE,
    SCORES,
    Scorer,
    check_finite,
    commutator_norms,
    margins,
    score_batch,
)

__all__ = [
    "CSV_MAX_ROWS",
    "DEFAULT_SCORES",
    "MODELS",
    "SCORES",
    "FolderLock",
    "Job",
    "Plan",
    "ScoreSpec",
    "Scorer",
    "build_model",
    "build_parser",
    "data_identity",
    "fingerprint",
    "main",
    "parse_scores",
    "read_state_dict",
    "resolve_config",
    "run",
    "run_identity",
]
