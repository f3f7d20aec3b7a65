"""On-disk store of score shards: ``.npy`` files with sha256 records under one manifest.

A store is a folder::

    manifest.json        the run's identity: {"format", "fingerprint", "meta", "shards"}
    <name>               one shard: a ``.npy`` array (structured arrays included) or any bytes
    <name>.sha256        its record: the sha256 of the shard's bytes

Every file is written atomically (temporary file, fsync, ``os.replace``, fsync of the folder), so
a process killed at any point leaves each file either whole or absent. A shard counts as present
only when its record exists and matches its bytes, and, once :meth:`ShardStore.finalize` has
listed it in the manifest, when it also matches the manifest's checksum: a shard written without
its record (killed in between), truncated, edited, copied over another, or copied in with its
record from another store is reported and treated as missing, so the caller recomputes it
instead of trusting it. Each shard has its own record, so several processes (torchrun ranks) may
write disjoint shards into one store at the same time; only one of them writes the manifest.

:meth:`ShardStore.open` refuses a folder whose manifest holds another fingerprint (unless told to
start over): results of different settings are never mixed. It only ever deletes files a store
writes (manifest, shards with their records, temporary files), and refuses a non-empty folder
that holds no store, so pointing it at the wrong folder costs nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from influx.errors import InfluxRuntimeError, InfluxValueError

FORMAT = 1
MANIFEST = "manifest.json"
_RECORD_SUFFIX = ".sha256"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
# What atomic_write_bytes leaves behind when its process is killed: ".<name>.<pid>.tmp".
_TEMPORARY = re.compile(r"^\..+\.[0-9]+\.tmp$")

__all__ = [
    "SCORES_FORMAT",
    "ScoreMatrix",
    "ShardStore",
    "StoreMismatchError",
    "atomic_replace",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_matrix_path",
    "read_matrix",
    "sha256_bytes",
]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_folder(folder: Path) -> None:
    # The rename itself must reach the disk too, or a crash can lose a file that looked written.
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that the file is either the old one or the whole new one.

    Writes a temporary file beside the target (named after this process, so concurrent writers
    never share one), fsyncs it, renames it over the target and fsyncs the folder. On any error
    the temporary file is removed and the error propagates (``OSError`` for a full disk or a
    read-only folder).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def atomic_replace(written: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move the finished file ``written`` over ``path`` for good: fsync it, rename it, fsync the
    folder (for files too large to hold in memory, which :func:`atomic_write_bytes` needs)."""
    with open(written, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(written, path)
    _fsync_folder(Path(path).parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def array_bytes(array: np.ndarray) -> bytes:
    """The ``.npy`` serialization of ``array`` (deterministic: same array, same bytes)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


class StoreMismatchError(InfluxValueError):
    """The store folder holds a run with another fingerprint.

    ``differences`` lists ``(key, stored value, new value)`` for every ``meta`` entry that differs.
    """

    def __init__(self, message: str, differences: list[tuple[str, Any, Any]]):
        super().__init__(message)
        self.differences = differences


@dataclass
class ShardStore:
    """A folder of checksummed ``.npy`` shards; see the module docstring for the layout.

    ``rejected`` collects ``(name, reason)`` for every shard found damaged (and removed) by
    :meth:`read`, so the caller can say what it recomputes. ``listed`` maps the shards the
    manifest lists to their checksums.
    """

    root: Path
    fingerprint: str
    meta: dict[str, Any] = field(default_factory=dict)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    listed: dict[str, str] = field(default_factory=dict)

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        root: str | os.PathLike,
        fingerprint: str,
        meta: dict[str, Any] | None = None,
        *,
        overwrite: bool = False,
    ) -> ShardStore:
        """Open (creating it if needed) the store at ``root`` for the run ``fingerprint``.

        A manifest with the same fingerprint is adopted with its shards (a resume). Another
        fingerprint raises :class:`StoreMismatchError` naming the differing ``meta`` entries,
        unless ``overwrite`` (then the store's files are removed first). A folder without a
        valid manifest is started afresh when it holds nothing but a store's files (shards
        without a manifest belong to no known run: they are never adopted), and refused when it
        holds anything else, a damaged manifest included. Leftover temporary files of a killed
        writer are removed. Files a store does not write are never touched. Call it from one
        process, then :meth:`attach` from the others.
        """
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise InfluxValueError(f"the store {root} is a file: point it at a folder")
        root.mkdir(parents=True, exist_ok=True)
        meta = dict(meta or {})
        previous = cls._read_manifest(root)
        adopted = previous is not None and previous.get("fingerprint") == fingerprint
        if previous is None:
            cls._refuse_foreign(root)
        elif not adopted and not overwrite:
            raise cls._mismatch(root, previous.get("meta", {}), meta)
        if not adopted:
            cls._remove_own(root)
        for stale in root.iterdir():
            if _TEMPORARY.match(stale.name) and stale.is_file():
                stale.unlink(missing_ok=True)
        store = cls(root, fingerprint, meta, listed=_listed(previous) if adopted else {})
        if not adopted:
            store._write_manifest(shards={})
        return store

    @classmethod
    def attach(cls, root: str | os.PathLike, fingerprint: str) -> ShardStore:
        """Join a store another process opened; raise if its manifest is not this run's."""
        root = Path(root)
        previous = cls._read_manifest(root)
        if previous is None or previous.get("fingerprint") != fingerprint:
            raise InfluxRuntimeError(
                f"the store {root} does not hold this run (fingerprint {fingerprint}); another "
                "process changed it. Run one influx-score per output folder at a time."
            )
        return cls(root, fingerprint, previous.get("meta", {}), listed=_listed(previous))

    @staticmethod
    def _read_manifest(root: Path) -> dict[str, Any] | None:
        path = root / MANIFEST
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            # A manifest is written atomically: an unreadable one was damaged outside influx.
            return None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            return None
        return manifest if isinstance(manifest.get("fingerprint"), str) else None

    @staticmethod
    def _mismatch(root: Path, stored: dict, new: dict) -> StoreMismatchError:
        keys = sorted(set(stored) | set(new))
        differences = [(k, stored.get(k), new.get(k)) for k in keys if stored.get(k) != new.get(k)]
        listed = ", ".join(f"{k}: {old!r} -> {now!r}" for k, old, now in differences[:6])
        more = f" and {len(differences) - 6} more" if len(differences) > 6 else ""
        return StoreMismatchError(
            f"{root} holds results of other settings ({listed or 'unrecorded settings'}{more})",
            differences,
        )

    @staticmethod
    def _own_files(root: Path) -> tuple[list[Path], list[Path]]:
        """(files a store writes, everything else) in ``root``, the manifest left out: records,
        shards with a record and temporary files are a store's."""
        own, foreign = [], []
        for path in sorted(root.iterdir()):
            name = path.name
            if name == MANIFEST:
                continue
            recorded = (root / (name + _RECORD_SUFFIX)).is_file()
            is_record = name.endswith(_RECORD_SUFFIX) and _NAME.match(name)
            ours = is_record or recorded or _TEMPORARY.match(name)
            (own if ours and path.is_file() else foreign).append(path)
        return own, foreign

    @classmethod
    def _refuse_foreign(cls, root: Path) -> None:
        """Refuse a folder without a valid manifest that holds files a store does not write
        (a damaged manifest included: it is written atomically, so something else changed it)."""
        _, foreign = cls._own_files(root)
        if (root / MANIFEST).exists():
            foreign.insert(0, root / MANIFEST)
        if foreign:
            shown = ", ".join(p.name + ("/" if p.is_dir() else "") for p in foreign[:5])
            more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
            raise InfluxValueError(
                f"{root} is not empty and holds no influx store ({MANIFEST} missing or damaged; "
                f"found {shown}{more}): point the store at an empty or new folder, or move "
                "those files away"
            )

    @classmethod
    def _remove_own(cls, root: Path) -> None:
        """Remove the files a store writes (a previous run's), and nothing else; the manifest
        is rewritten next."""
        own, _ = cls._own_files(root)
        for path in own:
            path.unlink(missing_ok=True)

    def _write_manifest(self, shards: dict[str, str]) -> None:
        manifest = {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "meta": self.meta,
            "shards": shards,
        }
        atomic_write_text(self.root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))

    # -- shards ----------------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        if not _NAME.match(name):
            raise InfluxValueError(
                f"shard name {name!r} must be letters, digits, '_', '.' or '-' (no folders)"
            )
        if name == MANIFEST or name.endswith(_RECORD_SUFFIX):
            raise InfluxValueError(f"shard name {name!r} is reserved")
        return self.root / name

    def _record(self, name: str) -> Path:
        return self.root / (name + _RECORD_SUFFIX)

    def put_bytes(self, name: str, data: bytes) -> str:
        """Store ``data`` as shard ``name`` (file first, then its record); return its sha256."""
        digest = sha256_bytes(data)
        atomic_write_bytes(self.path(name), data)
        atomic_write_text(self._record(name), digest + "\n")
        if name in self.listed:
            # Rewritten by this run: the manifest's checksum is stale until finalize.
            self.listed[name] = digest
        return digest

    def get_bytes(self, name: str) -> bytes | None:
        """The bytes of shard ``name``, or None when it is absent or fails its checksum.

        A damaged shard (no record, unreadable, checksum mismatch) is removed and listed in
        ``rejected``.
        """
        path, record = self.path(name), self._record(name)
        if not path.exists() and not record.exists():
            return None
        reason = None
        try:
            expected = record.read_text().strip() if record.exists() else None
            data = path.read_bytes() if path.exists() else None
        except OSError as error:
            expected, data, reason = None, None, f"unreadable ({error.strerror})"
        if reason is None:
            if data is None:
                reason = "its file is missing"
            elif expected is None:
                reason = "its checksum record is missing (written when the run was stopped)"
            elif sha256_bytes(data) != expected:
                reason = "checksum mismatch (the file was changed or damaged)"
            elif self.listed.get(name, expected) != expected:
                reason = (
                    "its checksum differs from the one the manifest lists (the file and its "
                    "record were replaced after the run was finalized)"
                )
        if reason is not None:
            self.reject(name, reason)
            return None
        return data

    def reject(self, name: str, reason: str) -> None:
        """Remove shard ``name`` and note why (e.g. a valid file holding the wrong rows)."""
        self.rejected.append((name, reason))
        self.path(name).unlink(missing_ok=True)
        self._record(name).unlink(missing_ok=True)

    def write(self, name: str, array: np.ndarray) -> str:
        """Store ``array`` as shard ``name``; return its sha256."""
        return self.put_bytes(name, array_bytes(array))

    def read(self, name: str) -> np.ndarray | None:
        """The array of shard ``name``, or None when absent or damaged (see :meth:`get_bytes`)."""
        data = self.get_bytes(name)
        if data is None:
            return None
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            self.reject(name, f"not a valid .npy file ({error})")
            return None

    def checksum(self, name: str) -> str | None:
        record = self._record(name)
        return record.read_text().strip() if record.exists() else None

    def names(self) -> list[str]:
        """Names of the shards that have a record (present, not yet verified), sorted."""
        return sorted(p.name[: -len(_RECORD_SUFFIX)] for p in self.root.glob("*" + _RECORD_SUFFIX))

    def finalize(self, names: list[str]) -> None:
        """Record the checksums of ``names`` (all verified by the caller) in the manifest."""
        shards = {}
        for name in names:
            digest = self.checksum(name)
            if digest is None:
                raise InfluxRuntimeError(f"shard {self.path(name)} vanished before the merge")
            shards[name] = digest
        self._write_manifest(shards)
        self.listed = dict(shards)


def _listed(manifest: dict[str, Any]) -> dict[str, str]:
    shards = manifest.get("shards")
    return dict(shards) if isinstance(shards, dict) else {}


# -- one matrix of scores (``influence.scores(..., store=path.npy)``) ------------------------------

SCORES_FORMAT = "influx.scores/1"
# What a manifest names the parts of a stored matrix's question by, in refusals.
_IDENTITY_WORDS = {
    "query_indices": "query set",
    "train_indices": "train set",
    "shape": "shape",
    "method": "method",
    "sign": "sign",
}


def _scores_manifest(path: Path) -> dict[str, Any] | None:
    """The scores manifest at ``path``, or None when there is no such file or it is not one."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != SCORES_FORMAT:
        return None
    return manifest


def _npy_path(path, rule: str) -> Path:
    """``path`` as a ``.npy`` file name, or an error saying ``rule`` and the name to use."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise InfluxValueError(f"{rule}; got {path!r}")
    path = Path(path)
    if path.suffix != ".npy":
        raise InfluxValueError(f"{rule}; got {str(path)!r}: use {str(path.with_suffix('.npy'))!r}")
    return path


def check_matrix_path(path) -> Path:
    """``path`` as a place to store a matrix of scores, refused before any work when it is not
    a ``.npy`` file name or when writing there would overwrite a file influx did not write: the
    ``.json`` beside it (the matrix's manifest goes there) or the ``.npy`` itself."""
    path = _npy_path(path, "store= must name a .npy file (the matrix; its manifest goes next "
                     "to it as .json), e.g. store='scores.npy'")  # fmt: skip
    manifest_path = path.with_suffix(".json")
    ours = _scores_manifest(manifest_path) is not None
    for taken in (manifest_path, path):
        if taken.is_dir() or (taken.exists() and not ours):
            raise InfluxValueError(
                f"{str(taken)!r} exists and influx did not write it (no influx scores manifest "
                f"{manifest_path.name!r} describes it); storing scores at {str(path)!r} would "
                "overwrite it: choose another path, or delete it"
            )
    return path


class ScoreMatrix:
    """A ``.npy`` matrix [rows, cols] written in column blocks, and a ``.json`` manifest beside it.

    A stored matrix never looks complete before it is: first the manifest is replaced by one
    marked ``"complete": false`` and a previous matrix removed, then the matrix is written under
    a temporary name and renamed into place when whole, and only then is the manifest marked
    complete. An interrupted run leaves an incomplete manifest, which :func:`read_matrix`
    refuses. ``identity`` (JSON values: method, sign, shape, the query and train indices when
    known) says which question the matrix answers: a finished matrix that answers another one is
    refused unless ``overwrite``, and files influx did not write always are
    (:func:`check_matrix_path`).
    """

    def __init__(
        self,
        path,
        shape: tuple[int, int],
        dtype: str,
        identity: dict[str, Any],
        *,
        overwrite: bool = False,
    ):
        path = check_matrix_path(path)
        self.path, self.manifest_path = path, path.with_suffix(".json")
        previous = _scores_manifest(self.manifest_path)
        if previous is not None and previous.get("complete") is True and not overwrite:
            _refuse_other_question(path, previous, {**identity, "shape": list(shape)})
        self.manifest = {
            **identity,
            "format": SCORES_FORMAT,
            "complete": False,
            "shape": list(shape),
            "dtype": dtype,
        }
        for known in ("query_indices", "train_indices"):
            self.manifest.pop(known, None)  # written when complete
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.manifest_path, json.dumps(self.manifest))
        path.unlink(missing_ok=True)
        self.partial = path.with_name(f".{path.stem}.{os.getpid()}.partial.npy")
        self.memmap = np.lib.format.open_memmap(
            self.partial, mode="w+", dtype=dtype, shape=tuple(shape)
        )

    def write(self, start: int, stop: int, columns: np.ndarray) -> None:
        """Columns [start, stop) of the matrix."""
        self.memmap[:, start:stop] = columns

    def finish(self, described: dict[str, Any]) -> np.ndarray:
        """Move the whole matrix into place, mark the manifest complete with ``described`` added
        (the query and train indices), and return the matrix memory-mapped."""
        self.memmap.flush()
        del self.memmap  # closes the file before it is renamed
        atomic_replace(self.partial, self.path)
        atomic_write_text(
            self.manifest_path, json.dumps({**self.manifest, **described, "complete": True})
        )
        return np.load(self.path, mmap_mode="r+")

    def abort(self) -> None:
        """Drop the partial matrix; the manifest stays marked incomplete."""
        self.memmap = None
        self.partial.unlink(missing_ok=True)


def _refuse_other_question(path: Path, previous: dict, identity: dict) -> None:
    differ = [key for key, value in identity.items() if key in previous and previous[key] != value]
    if differ:
        shown = ", ".join(
            f"another {_IDENTITY_WORDS.get(key, key)}"
            if isinstance(identity[key], list) and key != "shape"
            else f"{_IDENTITY_WORDS.get(key, key)} {previous[key]!r} -> {identity[key]!r}"
            for key in differ
        )
        raise InfluxValueError(
            f"{str(path)!r} holds finished scores of another question ({shown}): choose another "
            "path, pass overwrite=True to replace them, or delete it"
        )


def read_matrix(path) -> tuple[np.ndarray, dict[str, Any]]:
    """The matrix (memory-mapped) and manifest that :class:`ScoreMatrix` wrote at ``path``.

    Refused: a missing matrix or manifest, and a run that did not finish (an interrupted one
    leaves its manifest marked incomplete), so a half-written matrix is never read as scores.
    """
    path = _npy_path(path, "stored scores are a .npy file")
    manifest_path = path.with_suffix(".json")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InfluxValueError(
            f"no readable scores manifest at {str(manifest_path)!r} ({error}): write the scores "
            "with scores(..., store=path.npy)"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != SCORES_FORMAT:
        raise InfluxValueError(
            f"{str(manifest_path)!r} is not an influx scores manifest (format {SCORES_FORMAT!r}): "
            "score again with scores(..., store=path.npy)"
        )
    if manifest.get("complete") is not True:
        raise InfluxValueError(
            f"the scores at {str(path)!r} are incomplete: the run that wrote them "
            f"({manifest.get('method')!r}) was interrupted. Score again with store={str(path)!r}"
        )
    if not path.is_file():
        raise InfluxValueError(
            f"{str(manifest_path)!r} describes a matrix {str(path)!r} that is missing: score again"
        )
    values = np.load(path, mmap_mode="r+")
    if list(values.shape) != manifest["shape"] or str(values.dtype) != manifest["dtype"]:
        raise InfluxValueError(
            f"{str(path)!r} holds a {values.dtype} {list(values.shape)} matrix but its manifest "
            f"says {manifest['dtype']} {manifest['shape']} (changed after writing?): score again"
        )
    return values, manifest
