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
    "ShardStore",
    "StoreMismatchError",
    "atomic_replace",
    "atomic_write_bytes",
    "atomic_write_text",
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
