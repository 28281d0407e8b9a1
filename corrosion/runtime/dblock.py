"""One agent per database: an advisory lock on ``<db>.lock``, held while the agent runs.

Two agents writing one database would each number versions as the same actor and corrupt the
bookkeeping; ``corrosion restore`` replacing the file under a running agent loses its writes.
An OS lock (``flock``) is released by the kernel when the process dies, so a killed agent never
leaves a stale lock behind, unlike a pid file.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..errors import CorrosionError


class DatabaseInUse(CorrosionError, RuntimeError):
    pass


def lock_path(db_path: str | os.PathLike[str]) -> Path:
    p = Path(db_path)
    return p.with_name(p.name + ".lock")


class DatabaseLock:
    def __init__(self, db_path: str | os.PathLike[str]) -> None:
        self.path = lock_path(db_path)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise ``DatabaseInUse`` at once (never waits)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DatabaseInUse(
                f"database {str(self.path)[: -len('.lock')]!r} is in use by a running agent "
                f"(it holds {str(self.path)!r})"
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def database_in_use(db_path: str | os.PathLike[str]) -> bool:
    """True while some process (an agent) holds the lock of ``db_path``."""
    if not lock_path(db_path).exists():
        return False
    probe = DatabaseLock(db_path)
    try:
        probe.acquire()
    except DatabaseInUse:
        return True
    probe.release()
    return False
