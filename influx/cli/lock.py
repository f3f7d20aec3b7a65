"""One ``influx-score`` per output folder: a lock file holding the owner's pid.

The lock is an advisory ``flock`` on ``<out>/.influx-score.lock``: the kernel drops it when its
process dies, however it dies, so the lock of a dead process (a kill -9, a crash) is reclaimed
by the next run without a word, while a live one refuses the second run by its pid. The file is
removed when its owner releases it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from influx.errors import InfluxValueError

LOCK_FILE = ".influx-score.lock"

try:
    import fcntl
except ImportError:  # not POSIX: the pid in the file decides alone
    fcntl = None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


class FolderLock:
    """Holds ``<folder>/.influx-score.lock`` from :meth:`acquire` to :meth:`release`."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_FILE
        self._fd: int | None = None

    def _owner(self) -> str:
        try:
            return self.path.read_text().strip() or "an unknown process"
        except OSError:
            return "an unknown process"

    def _refuse(self, owner: str) -> InfluxValueError:
        return InfluxValueError(
            f"--out {self.path.parent} is in use by another influx-score ({owner}; lock file "
            f"{self.path}); wait for it to finish or choose another --out (the lock of a process "
            "that died is reclaimed by the next run)"
        )

    def acquire(self) -> FolderLock:
        """Take the lock, reclaiming one whose process died; refuse one a live process holds."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not self._lock(fd):
                os.close(fd)
                raise self._refuse(self._owner())
            # The file may have been released (unlinked) between our open and our lock: then we
            # hold a lock nobody else can see, so try again on the file now at the path.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
                self._fd = fd
                return self
            os.close(fd)
        raise self._refuse(self._owner())

    def _lock(self, fd: int) -> bool:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True
        # Without flock: the pid written in the file, if its process is alive, holds the lock.
        words = os.read(fd, 200).decode(errors="replace").split()
        pid = int(words[1]) if len(words) > 1 and words[0] == "pid" and words[1].isdigit() else 0
        return not (pid and pid != os.getpid() and _pid_alive(pid))

    def release(self) -> None:
        if self._fd is None:
            return
        # Unlink while still holding the lock, so a waiting run never adopts a stale file.
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
