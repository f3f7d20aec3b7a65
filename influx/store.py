"""On-disk store of score shards: ``.npy`` files with sha256 records under one manifest.

A store is a folder::

    manifest.json        the run's identity: {"format", "fingerprint", "meta", "shards"}
    <name>               one shard: a ``.npy`` array (structured arrays included) or any bytes
    <name>.sha256        its record: the sha256 of the shard's bytes

Every file is written atomically (temporary file, fsync, ``os.replace``, fsync of the folder), so
a process killed at any point leaves each file either whole or absent. A shard counts as present
only when its record exists and matches its bytes: a shard written without its record (killed in
between), truncated, edited or copied over another is reported and treated as missing, so the
caller recomputes it instead of trusting it. Each shard has its own record, so several processes
(torchrun ranks) may write disjoint shards into one store at the same time; only one of them
writes the manifest.

:meth:`ShardStore.open` refuses a folder whose manifest holds another fingerprint (unless told to
start over): results of different settings are never mixed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from influx.errors import InfluxRuntimeError, InfluxValueError

FORMAT = 1
MANIFEST = "manifest.json"
_RECORD_SUFFIX = ".sha256"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

__all__ = [
    "ShardStore",
    "StoreMismatchError",
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
    :meth:`read`, so the caller can say what it recomputes.
    """

    root: Path
    fingerprint: str
    meta: dict[str, Any] = field(default_factory=dict)
    rejected: list[tuple[str, str]] = field(default_factory=list)

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
        unless ``overwrite`` (then every shard is removed first). Leftover temporary files of a
        killed writer are removed. Call it from one process, then :meth:`attach` from the others.
        """
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        meta = dict(meta or {})
        previous = cls._read_manifest(root)
        if previous is not None and previous.get("fingerprint") != fingerprint:
            if not overwrite:
                raise cls._mismatch(root, previous.get("meta", {}), meta)
            cls._remove_all(root)
        elif previous is None:
            # Shards without a manifest belong to no known run: never adopt them.
            cls._remove_all(root)
        for stale in root.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        store = cls(root, fingerprint, meta)
        if previous is None or previous.get("fingerprint") != fingerprint:
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
        return cls(root, fingerprint, previous.get("meta", {}))

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
        return manifest if isinstance(manifest, dict) else None

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
    def _remove_all(root: Path) -> None:
        for path in root.iterdir():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()

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
